"""Task specs, the registry, prompt formatting (exact strings) and the synthetic generators."""

import pydantic
import pytest

from ia2ray.data import (
    Example,
    TaskSpec,
    build_icl_prompt,
    format_answer,
    format_demo,
    format_query,
    generate_rows,
    get_task,
    register_task,
    task_names,
    template_fields,
)
from ia2ray.data import tasks
from ia2ray.data.synthetic import NEGATIVE_WORDS, POSITIVE_WORDS


def label_spec(**overrides) -> TaskSpec:
    kwargs = dict(
        name="t",
        template="Text:{text}\nLabel:",
        input_fields=["text"],
        label_field="label",
        label_words={"0": "0", "1": "1"},
        answer_type="label",
    )
    kwargs.update(overrides)
    return TaskSpec(**kwargs)


def ex(text: str, answer: str, source: str = "x:1") -> Example:
    return Example(fields={"text": text}, answer=answer, source=source)


# --- TaskSpec validation -------------------------------------------------------------------------


def test_defaults():
    spec = label_spec()
    assert spec.answer_template == " {answer}"
    assert spec.demo_separator == "\n\n"
    assert spec.stop_strings == ["\n\n"]
    assert (spec.parser, spec.max_new_tokens, spec.train_pool, spec.eval_pool) == ("strip", 1, 2000, 500)
    assert spec.generator is None and spec.hub_id is None


def test_frozen_and_extra_forbidden():
    spec = label_spec()
    with pytest.raises(pydantic.ValidationError):
        spec.name = "other"
    with pytest.raises(pydantic.ValidationError, match="extra"):
        label_spec(colour="blue")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"template": "Q:{question}\nA:"}, r"placeholders \{question\} are not in input_fields \['text'\]"),
        ({"template": "Text:{text"}, "template is not a valid format string"),
        ({"template": "Text:{}"}, "placeholders {} are not in input_fields"),
        ({"label_words": None}, "answer_type 'label' requires label_words"),
        ({"label_words": {}}, "answer_type 'label' requires label_words"),
        ({"label_words": {"0": "yes", "1": "yes"}}, "label_words must be distinct"),
        ({"label_words": {"0": " ", "1": "a"}}, "label_words must not be empty"),
        ({"answer_type": "text"}, "label_words is only allowed with answer_type 'label'"),
        ({"parser": "nope"}, r"unknown parser 'nope' \(known: after_hashes, boxed, number, strip\)"),
        ({"generator": "nope"}, r"unknown generator 'nope' \(known: polarity, reverse, testbed/map2, "),
        ({"answer_template": " {label}"}, r"answer_template must use exactly the placeholder \{answer\}"),
        ({"max_new_tokens": 0}, "greater than or equal to 1"),
        ({"input_fields": []}, "at least 1 item"),
    ],
)
def test_invalid_specs(overrides, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        label_spec(**overrides)


def test_all_problems_reported_together():
    with pytest.raises(pydantic.ValidationError) as info:
        label_spec(template="{q}", label_words=None, parser="nope")
    text = str(info.value)
    assert "placeholders {q}" in text and "requires label_words" in text and "unknown parser 'nope'" in text


def test_label_word_keys_from_yaml_ints():
    spec = label_spec(label_words={0: "negative", 1: "positive"})
    assert spec.label_words == {"0": "negative", "1": "positive"}


def test_template_fields():
    assert template_fields("Q:{question}\nC:{choices[0]} {a.b} {question}") == ["question", "choices", "a"]
    assert template_fields("no fields") == []


# --- registry ------------------------------------------------------------------------------------


def test_builtin_tasks():
    assert {"sst2", "toy/polarity", "toy/reverse"} <= set(task_names())
    sst2 = get_task("sst2")
    assert sst2.hub_id == "stanfordnlp/sst2"
    assert sst2.template == "Text:{sentence}\nLabel:"
    assert sst2.input_fields == ["sentence"] and sst2.label_field == "label"
    assert sst2.label_words == {"0": "0", "1": "1"}
    assert (sst2.train_split, sst2.eval_split) == ("train", "validation")
    rev = get_task("toy/reverse")
    assert (rev.answer_type, rev.parser, rev.max_new_tokens, rev.stop_strings) == ("text", "strip", 8, ["\n\n"])
    assert rev.template == "Question:{text}\nAnswer:" and rev.generator == "reverse"
    pol = get_task("toy/polarity")
    assert (pol.answer_type, pol.generator, pol.max_new_tokens) == ("label", "polarity", 1)


def test_register_and_get(monkeypatch):
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))  # keep the global registry clean
    spec = label_spec(name="test/registered")
    assert register_task(spec) is spec
    assert get_task("test/registered") is spec
    register_task(label_spec(name="test/registered"))  # identical spec again: fine
    with pytest.raises(ValueError, match="already registered"):
        register_task(label_spec(name="test/registered", template="T:{text}\nL:"))
    register_task(label_spec(name="test/registered", template="T:{text}\nL:"), replace=True)
    assert get_task("test/registered").template == "T:{text}\nL:"
    assert "test/registered" in task_names()


def test_unknown_task_lists_known():
    with pytest.raises(KeyError, match="unknown task 'nope'; known tasks: .*sst2.*toy/polarity"):
        get_task("nope")


# --- formatting ----------------------------------------------------------------------------------


def test_query_demo_and_answer_strings():
    spec = label_spec()
    e = ex("great fun", "1")
    assert format_query(spec, e) == "Text:great fun\nLabel:"
    assert format_answer(spec, e) == " 1"
    assert format_demo(spec, e) == "Text:great fun\nLabel: 1"


def test_icl_prompt_exact():
    spec = label_spec()
    demos = [ex("great fun", "1"), ex("sad bad", "0")]
    prompt = build_icl_prompt(spec, demos, ex("nice", "1"))
    assert prompt == "Text:great fun\nLabel: 1\n\nText:sad bad\nLabel: 0\n\nText:nice\nLabel:"


def test_icl_prompt_without_demos_is_the_query():
    spec = label_spec()
    assert build_icl_prompt(spec, [], ex("nice", "1")) == "Text:nice\nLabel:"


def test_icl_prompt_free_text_multi_field():
    spec = TaskSpec(
        name="qa",
        template="Question:{q}\nContext:{c}\nAnswer:",
        input_fields=["q", "c"],
        label_field="a",
        answer_type="text",
        demo_separator="\n###\n",
    )
    demo = Example(fields={"q": "2+2?", "c": "math"}, answer="4", source="f:1")
    query = Example(fields={"q": "3+3?", "c": "math"}, answer="6", source="f:2")
    assert build_icl_prompt(spec, [demo], query) == (
        "Question:2+2?\nContext:math\nAnswer: 4\n###\nQuestion:3+3?\nContext:math\nAnswer:"
    )


def test_reverse_prompt_exact():
    spec = get_task("toy/reverse")
    prompt = build_icl_prompt(spec, [ex("a b c", "c b a")], ex("x y z", "z y x"))
    assert prompt == "Question:a b c\nAnswer: c b a\n\nQuestion:x y z\nAnswer:"


# --- generators ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["polarity", "reverse"])
def test_generators_deterministic(name):
    assert generate_rows(name, 50, 7) == generate_rows(name, 50, 7)
    assert generate_rows(name, 50, 7) != generate_rows(name, 50, 8)
    assert generate_rows(name, 20, 7) == generate_rows(name, 50, 7)[:20]


def test_polarity_rows():
    rows = generate_rows("polarity", 2000, 0)
    flipped = 0
    for row in rows:
        words = row["text"].split()
        assert 3 <= len(words) <= 5
        assert all(w in POSITIVE_WORDS or w in NEGATIVE_WORDS for w in words)
        n_pos = sum(w in POSITIVE_WORDS for w in words)
        assert 2 * n_pos != len(words)  # never a tie
        majority = int(2 * n_pos > len(words))
        flipped += row["label"] != majority
    assert 0.07 < flipped / len(rows) < 0.13  # ~10% label noise
    assert 0.45 < sum(r["label"] for r in rows) / len(rows) < 0.55


def test_reverse_rows():
    for row in generate_rows("reverse", 100, 0):
        letters = row["text"].split(" ")
        assert len(letters) == 3 and all(len(c) == 1 and c.islower() for c in letters)
        assert row["answer"] == " ".join(reversed(letters))


def test_unknown_generator():
    with pytest.raises(KeyError, match="unknown generator 'nope'"):
        generate_rows("nope", 1, 0)
