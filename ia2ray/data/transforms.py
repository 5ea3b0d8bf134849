"""Row transforms: build a task's input fields and label from a raw dataset row.

Most tasks read their columns as they are. A few of the IA2 paper's benchmarks need a row rebuilt
first; a :class:`~ia2ray.data.tasks.TaskSpec` names its transform (``transform: sciq_remap``) and the
loader then requires the transform's raw ``columns`` instead of the task's fields. A transform raises
``ValueError`` with a short reason for a row it cannot use; the loader reports it with the row's file
and line.

Built-ins:

* ``sciq_remap`` - SciQ as an MCQ: the correct answer and the three distractors in an order shuffled
  per example (seeded by the question and its answer, so independent of file order), written as
  ``[apple]...``, ``[Friday]...`` lines; the label is the correct option's index.
* ``qasc_remap`` - QASC's eight options in the dataset's order, same layout; label from ``answerKey``.
* ``bbc_to_agnews`` - BBC News classes onto AG News's (tech -> Sci/Tech 3, business -> Business 2,
  sport -> Sports 1, entertainment and politics -> World 0); texts longer than 256 characters are
  cut to 256 and the last, possibly partial, word dropped.
* ``sciq_generative`` - SciQ as free text: the target is ``{support}\\n#### {correct_answer}``.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Any, Callable

# the paper's remapped label words for MCQ options 0..7 (not the options' letters, so the model cannot
# lean on letter priors)
REMAP_WORDS = ("apple", "Friday", "banana", "Saturday", "Thursday", "Sunday", "Wednesday", "Monday")
BBC_TO_AGNEWS = {0: 3, 1: 2, 2: 1, 3: 0, 4: 0}  # SetFit/bbc-news ids -> fancyzhx/ag_news ids
BBC_CLASSES = "0 tech, 1 business, 2 sport, 3 entertainment, 4 politics"
BBC_MAX_CHARS = 256


@dataclass(frozen=True)
class Transform:
    columns: tuple[str, ...]  # raw columns the transform reads (required in every row)
    build: Callable[[dict[str, Any]], dict[str, Any]]


def _text(value: Any, what: str) -> str:
    """`value` when it is non-empty text; else a ValueError naming `what` (a column, an option)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be non-empty text, got {value!r}")
    return value


def _column(row: dict[str, Any], col: str) -> str:
    return _text(row[col], f"column '{col}'")


def choices_block(options: list[str]) -> str:
    """One ``[word]option`` line per option, each ending in a newline."""
    return "".join(f"[{REMAP_WORDS[i]}]{option}\n" for i, option in enumerate(options))


def sciq_remap(row: dict[str, Any]) -> dict[str, Any]:
    question, correct = _column(row, "question"), _column(row, "correct_answer")
    options = [_column(row, f"distractor{i}") for i in (1, 2, 3)]
    position = random.Random(zlib.crc32(f"{question}\x00{correct}".encode())).randrange(len(options) + 1)
    options.insert(position, correct)
    return {"question": question, "choices": choices_block(options), "label": position}


def qasc_remap(row: dict[str, Any]) -> dict[str, Any]:
    question, key, choices = _column(row, "question"), _column(row, "answerKey"), row["choices"]
    if not isinstance(choices, dict) or not isinstance(choices.get("text"), list) \
            or not isinstance(choices.get("label"), list) or len(choices["text"]) != len(choices["label"]):
        raise ValueError("column 'choices' must be an object {text: [...], label: [...]} of equal-length lists")
    if not 2 <= len(choices["text"]) <= len(REMAP_WORDS):
        raise ValueError(f"column 'choices' has {len(choices['text'])} options (expected 2 to {len(REMAP_WORDS)})")
    if key not in choices["label"]:
        raise ValueError(f"answerKey {key!r} is not one of the choice labels {choices['label']}")
    texts = [_text(t, f"option {i + 1} of column 'choices'") for i, t in enumerate(choices["text"])]
    return {"question": question, "choices": choices_block(texts), "label": choices["label"].index(key)}


def bbc_to_agnews(row: dict[str, Any]) -> dict[str, Any]:
    text, label = _column(row, "text"), row["label"]
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or label not in BBC_TO_AGNEWS:
        raise ValueError(f"unknown label {label!r} (expected {BBC_CLASSES})")
    if len(text) > BBC_MAX_CHARS:
        text = " ".join(text[:BBC_MAX_CHARS].split(" ")[:-1])
    return {"text": text, "label": BBC_TO_AGNEWS[label]}


def sciq_generative(row: dict[str, Any]) -> dict[str, Any]:
    support = row.get("support") if isinstance(row.get("support"), str) else ""  # some rows have none
    return {"question": _column(row, "question"), "answer": f"{support}\n#### {_column(row, 'correct_answer')}"}


TRANSFORMS: dict[str, Transform] = {
    "sciq_remap": Transform(("question", "correct_answer", "distractor1", "distractor2", "distractor3"), sciq_remap),
    "qasc_remap": Transform(("question", "choices", "answerKey"), qasc_remap),
    "bbc_to_agnews": Transform(("text", "label"), bbc_to_agnews),
    "sciq_generative": Transform(("question", "correct_answer"), sciq_generative),
}
