"""Answer parsers: turn a model's generated text into a comparable answer string.

Every parser is a plain function ``str -> str | None`` registered in :data:`PARSERS` under a short
name; a :class:`~ia2ray.data.tasks.TaskSpec` names its parser. ``None`` means "nothing parsed" and
always counts as a wrong answer.

Built-ins:

* ``strip`` - whitespace stripped, cut at the first blank line (free-text answers).
* ``number`` - GSM8K style: ``\\boxed{...}``, else the text after ``####``, else after
  "The answer is", else the last number in the text; commas removed, ``18.0`` -> ``18``.
* ``boxed`` - MATH style: content of the LAST ``\\boxed{...}`` (balanced braces), whitespace
  removed, ``\\dfrac``/``\\tfrac`` -> ``\\frac``.
* ``after_hashes`` - the text after the last ``####`` up to the end of that line, stripped.
"""

from __future__ import annotations

import re
from typing import Callable

Parser = Callable[[str], "str | None"]

_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")
# 1,234,567 | 1234 | optional sign and decimals | .5
_NUMBER = re.compile(r"-?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_ANSWER_IS = re.compile(r"the answer is", re.IGNORECASE)


def parse_strip(text: str) -> str | None:
    """Text up to the first blank line, whitespace stripped; ``None`` if that is empty."""
    head = _BLANK_LINE.split(text, maxsplit=1)[0].strip()
    return head or None


def normalize_number(token: str) -> str:
    """Canonical number string: commas and ``+`` dropped, no leading zeros, no trailing decimal
    zeros (``"1,200.50"`` -> ``"1200.5"``, ``"18.0"`` -> ``"18"``, ``".5"`` -> ``"0.5"``)."""
    s = token.replace(",", "").strip().lstrip("+")
    negative = s.startswith("-")
    int_part, _, frac = s.lstrip("-").partition(".")
    int_part = int_part.lstrip("0") or "0"
    frac = frac.rstrip("0")
    out = int_part + ("." + frac if frac else "")
    return "-" + out if negative and out != "0" else out


def _first_number(text: str) -> str | None:
    match = _NUMBER.search(text)
    return normalize_number(match.group()) if match else None


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces, or ``None``."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j]
        # unbalanced or brace-less \boxed: try an earlier one
        start = text.rfind("\\boxed", 0, start)
    return None


def parse_number(text: str) -> str | None:
    """GSM8K-style numeric answer (see module docstring); ``None`` if the text has no number."""
    boxed = _last_boxed(text)
    if boxed is not None:
        found = _first_number(boxed)
        if found is not None:
            return found
    if "####" in text:
        found = _first_number(text.rsplit("####", 1)[1])
        if found is not None:
            return found
    matches = list(_ANSWER_IS.finditer(text))
    if matches:
        found = _first_number(text[matches[-1].end() :])
        if found is not None:
            return found
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def parse_boxed(text: str) -> str | None:
    """MATH-style answer: last ``\\boxed{...}`` content, whitespace removed, ``\\dfrac`` -> ``\\frac``."""
    boxed = _last_boxed(text)
    if boxed is None:
        return None
    answer = re.sub(r"\s+", "", boxed).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return answer or None


def parse_after_hashes(text: str) -> str | None:
    """The text after the last ``####``, up to the end of that line, stripped."""
    if "####" not in text:
        return None
    answer = text.rsplit("####", 1)[1].lstrip(" \t").split("\n", 1)[0].strip()
    return answer or None


PARSERS: dict[str, Parser] = {
    "strip": parse_strip,
    "number": parse_number,
    "boxed": parse_boxed,
    "after_hashes": parse_after_hashes,
}


def register_parser(name: str, fn: Parser) -> None:
    """Add a parser under ``name``; re-registering a name with a different function is an error."""
    if name in PARSERS and PARSERS[name] is not fn:
        raise ValueError(f"parser {name!r} is already registered")
    PARSERS[name] = fn


def get_parser(name: str) -> Parser:
    """The parser registered as ``name`` (``KeyError`` listing the known names otherwise)."""
    try:
        return PARSERS[name]
    except KeyError:
        raise KeyError(f"unknown parser {name!r}; known: {', '.join(sorted(PARSERS))}") from None
