"""Answer parsers: table-driven, with the tricky cases spelled out."""

import pytest

from ia2ray.data.parsers import PARSERS, get_parser, normalize_number, register_parser


@pytest.mark.parametrize(
    "text, expected",
    [
        (" c b a", "c b a"),
        (" c b a\n\nQuestion:x y z\nAnswer:", "c b a"),
        ("line one\nline two\n\nafter", "line one\nline two"),
        ("answer\n  \t\nmore", "answer"),  # a whitespace-only line is a blank line
        ("\n\nanswer", None),  # starts with a blank line: nothing before it
        ("   ", None),
        ("", None),
    ],
)
def test_strip(text, expected):
    assert PARSERS["strip"](text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She has 3 apples and buys 4 more, so 7.", "7"),
        ("#### 72", "72"),
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
        ("so 5 + 5 = 10. The answer is 12.", "12"),
        ("The answer is $1,200.00.", "1200"),
        ("the ANSWER IS -3 degrees", "-3"),
        ("First 2 then \\boxed{18} and finally 99", "18"),
        ("\\boxed{1} ... \\boxed{\\$1,000}", "1000"),  # last boxed wins
        ("\\boxed{x} no number inside, #### 5", "5"),  # boxed without a number falls through
        ("#### 1,234,567", "1234567"),
        ("It costs 18.0 dollars", "18"),
        ("It costs 18.50 dollars", "18.5"),
        ("Only .5 left", "0.5"),
        ("values 3, 4", "4"),  # a comma list is not a thousands separator
        ("The answer is 12 #### 13", "13"),  # #### beats 'The answer is'
        ("#### none here. The answer is 9", "9"),
        ("no digits at all", None),
        ("", None),
    ],
)
def test_number(text, expected):
    assert PARSERS["number"](text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}"),
        ("\\boxed{ x + 1 }", "x+1"),
        ("first \\boxed{1} then \\boxed{ {a}^{2} }", "{a}^{2}"),
        ("\\boxed {7}", "7"),
        ("\\boxed{1} then \\boxed{unclosed", "1"),  # unbalanced last one: earlier one used
        ("\\boxed{unclosed", None),
        ("\\boxed{}", None),
        ("no box", None),
    ],
)
def test_boxed(text, expected):
    assert PARSERS["boxed"](text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("reasoning... #### mitochondria", "mitochondria"),
        ("#### a #### b ", "b"),
        ("#### gravity\nQuestion: next", "gravity"),
        ("####   ", None),
        ("no hashes", None),
    ],
)
def test_after_hashes(text, expected):
    assert PARSERS["after_hashes"](text) == expected


@pytest.mark.parametrize(
    "token, expected",
    [("1,200", "1200"), ("18.0", "18"), ("18.50", "18.5"), ("007", "7"), ("-0.0", "0"), ("+3", "3"), ("-.25", "-0.25")],
)
def test_normalize_number(token, expected):
    assert normalize_number(token) == expected


def test_registry():
    assert set(PARSERS) >= {"strip", "number", "boxed", "after_hashes"}
    with pytest.raises(KeyError, match="unknown parser 'nope'; known: after_hashes, boxed, number, strip"):
        get_parser("nope")
    register_parser("strip", PARSERS["strip"])  # same function again: fine
    with pytest.raises(ValueError, match="already registered"):
        register_parser("strip", lambda text: text)
