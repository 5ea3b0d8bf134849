"""The built-in testbed's task family: concept classes of words, remapped per task to label words.

A testbed *task* picks 2-4 concept classes and maps each to a label word (like the paper's
remapped labels: "apple", "Friday", ...). An input is a word of one of those classes; its answer is
the label word of that class, replaced by another class's label with probability ``LABEL_NOISE``
(so the best possible accuracy is ~0.9 and confidence is meaningful)::

    Text: owl\\nLabel: Friday\\n\\nText: hammer\\nLabel: gamma\\n\\nText: crow\\nLabel:

The ``seq`` family is the multi-token variant: an input is 2-3 words and the answer is each word's
label, in order (``Text: owl saw crow\\nLabel: Friday gamma Friday``; free text, parser ``strip``).

Since the class -> label mapping is drawn per task, the answer to a query can only be known from
the demonstrations, or from having been trained on that task. The held-out tasks (``HELD_OUT``,
registered as ``testbed/...``) have fixed mappings that the pretraining sampler never produces: a
sampled task whose mapping agrees with a held-out one on all of the held-out task's classes is
rejected, and every held-out label differs from the ``GLOBAL_MAPPING`` that a share of the
pretraining tasks use. Prompts are built with :mod:`ia2ray.data.examples`, so pretraining
sequences are exactly the library's ICL prompts.

Only ``random.Random`` with int or str seeds is used: same seed, same data on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from ia2ray.data.examples import Example, build_icl_prompt, format_answer, format_query
from ia2ray.data.synthetic import register_generator
from ia2ray.data.tasks import TaskSpec, register_task

TEMPLATE = "Text: {text}\nLabel:"
ANSWER_TEMPLATE = " {answer}"
LABEL_NOISE = 0.1
SEQ_LENGTHS = (2, 3)  # words per input in the multi-token ``seq`` family

CONCEPT_CLASSES: dict[str, tuple[str, ...]] = {
    "animal": ("cat", "dog", "horse", "cow", "sheep", "goat", "pig", "mouse"),
    "fruit": ("apple", "pear", "plum", "grape", "lemon", "mango", "peach", "cherry"),
    "color": ("red", "blue", "green", "yellow", "purple", "pink", "brown", "black"),
    "tool": ("hammer", "saw", "drill", "wrench", "shovel", "axe", "chisel", "pliers"),
    "vehicle": ("car", "bus", "truck", "train", "bike", "boat", "plane", "taxi"),
    "body": ("arm", "leg", "hand", "foot", "head", "knee", "elbow", "neck"),
    "weather": ("rain", "snow", "wind", "storm", "fog", "hail", "frost", "cloud"),
    "furniture": ("chair", "table", "sofa", "bed", "desk", "shelf", "bench", "stool"),
    "clothing": ("shirt", "coat", "hat", "shoe", "sock", "scarf", "glove", "dress"),
    "instrument": ("piano", "guitar", "violin", "drum", "flute", "harp", "trumpet", "cello"),
    "bird": ("eagle", "owl", "crow", "swan", "duck", "hawk", "robin", "parrot"),
    "metal": ("iron", "gold", "silver", "copper", "tin", "zinc", "lead", "steel"),
    "vegetable": ("carrot", "potato", "onion", "pea", "bean", "corn", "leek", "cabbage"),
    "kitchen": ("spoon", "fork", "knife", "plate", "bowl", "cup", "pan", "kettle"),
    "building": ("house", "tower", "castle", "barn", "church", "school", "hotel", "temple"),
    "sport": ("soccer", "tennis", "golf", "hockey", "rugby", "boxing", "skiing", "rowing"),
}
LABEL_WORDS: tuple[str, ...] = (
    "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "alpha",
    "beta", "gamma", "delta", "omega", "north", "south", "east", "west",
)
CLASS_NAMES: tuple[str, ...] = tuple(CONCEPT_CLASSES)
# The one fixed class -> label mapping used by a share of the pretraining tasks (in-weights signal).
GLOBAL_MAPPING: dict[str, str] = dict(zip(CLASS_NAMES, LABEL_WORDS))


@dataclass(frozen=True)
class TestbedTask:
    """One task: its classes, the label word of each (same order), and the family."""

    __test__ = False  # not a pytest test class despite the name
    classes: tuple[str, ...]
    labels: tuple[str, ...]
    family: str = "map"  # "map": one word -> one label word; "seq": 2-3 words -> their labels

    @property
    def mapping(self) -> dict[str, str]:
        return dict(zip(self.classes, self.labels))

    def spec(self, name: str, generator: str | None = None) -> TaskSpec:
        """The library task spec (label task for ``map``, free-text task for ``seq``)."""
        common = dict(name=name, template=TEMPLATE, answer_template=ANSWER_TEMPLATE, input_fields=["text"],
                      generator=generator)
        if self.family == "map":
            return TaskSpec(label_field="label", label_words=self.mapping, answer_type="label", **common)
        return TaskSpec(label_field="answer", answer_type="text", parser="strip", stop_strings=["\n\n"],
                        max_new_tokens=max(SEQ_LENGTHS) + 1, **common)


# Held-out tasks: every label differs from GLOBAL_MAPPING's label of that class (checked in tests).
HELD_OUT: dict[str, TestbedTask] = {
    "testbed/map2": TestbedTask(("animal", "tool"), ("Friday", "gamma")),
    "testbed/map3": TestbedTask(("fruit", "vehicle", "weather"), ("south", "Monday", "omega")),
    "testbed/map4": TestbedTask(("color", "clothing", "instrument", "metal"), ("delta", "west", "Tuesday", "beta")),
    "testbed/seq3": TestbedTask(("bird", "kitchen", "sport"), ("east", "Sunday", "alpha"), family="seq"),
}


def _other_class(rng: random.Random, task: TestbedTask, cls: int) -> int:
    """A class of ``task`` other than ``cls`` (uniformly): the label noise."""
    return rng.choice([c for c in range(len(task.classes)) if c != cls])


def task_row(rng: random.Random, task: TestbedTask) -> dict[str, Any]:
    """One row: ``{"text": word, "label": class}`` (map) or ``{"text": words, "answer": labels}`` (seq).

    Map rows carry a wrong class with probability LABEL_NOISE; noisy seq rows have one word's label
    replaced by another class's."""
    n_words = 1 if task.family == "map" else rng.choice(SEQ_LENGTHS)
    classes = [rng.randrange(len(task.classes)) for _ in range(n_words)]
    words = [rng.choice(CONCEPT_CLASSES[task.classes[c]]) for c in classes]
    if rng.random() < LABEL_NOISE:
        i = rng.randrange(n_words)
        classes[i] = _other_class(rng, task, classes[i])
    if task.family == "map":
        return {"text": words[0], "label": task.classes[classes[0]]}
    return {"text": " ".join(words), "answer": " ".join(task.labels[c] for c in classes)}


def task_rows(task: TestbedTask, n_rows: int, seed: int | str) -> list[dict[str, Any]]:
    """``n_rows`` deterministic rows of ``task`` for ``seed``."""
    rng = random.Random(seed)
    return [task_row(rng, task) for _ in range(n_rows)]


def row_example(task: TestbedTask, row: dict[str, Any], source: str = "testbed") -> Example:
    """A generated row as a library Example (the label mapped to its word for ``map`` tasks)."""
    answer = task.mapping[row["label"]] if task.family == "map" else row["answer"]
    return Example(fields={"text": row["text"]}, answer=answer, source=source)


def is_held_out_mapping(task: TestbedTask) -> bool:
    """True if ``task`` agrees with a held-out task's mapping on all of that task's classes."""
    mapping = task.mapping
    return any(all(mapping.get(c) == label for c, label in h.mapping.items()) for h in HELD_OUT.values())


@dataclass(frozen=True)
class MixConfig:
    """The pretraining task mix."""

    p_global: float = 0.3  # share of tasks using GLOBAL_MAPPING instead of a random mapping
    p_seq: float = 0.25  # share of tasks from the multi-token seq family
    min_classes: int = 2
    max_classes: int = 4
    min_items: int = 10  # items per sequence: uniform in min_items..max_items; item k is a k-shot
    max_items: int = 10  # prediction, so one sequence trains 0..max_items-1 demos at once
    class_names: tuple[str, ...] = field(default=CLASS_NAMES)


def sample_task(rng: random.Random, mix: MixConfig) -> TestbedTask:
    """A random pretraining task; never one whose mapping matches a held-out task (see module doc)."""
    family = "seq" if rng.random() < mix.p_seq else "map"
    while True:
        classes = tuple(rng.sample(mix.class_names, rng.randint(mix.min_classes, mix.max_classes)))
        if rng.random() < mix.p_global:
            labels = tuple(GLOBAL_MAPPING[c] for c in classes)
        else:
            labels = tuple(rng.sample(LABEL_WORDS, len(classes)))
        task = TestbedTask(classes, labels, family)
        if not is_held_out_mapping(task):
            return task


@dataclass(frozen=True)
class PretrainSequence:
    """One pretraining sequence: ``text`` (the library's ICL prompt of the last item followed by its
    answer) and the character spans ``[start, end)`` the loss covers: every item's answer plus the
    blank line after it (the last answer is followed by EOS, which the trainer appends)."""

    task: TestbedTask
    text: str
    target_spans: tuple[tuple[int, int], ...]


def build_sequence(task: TestbedTask, examples: list[Example]) -> PretrainSequence:
    """``examples`` joined exactly as :func:`build_icl_prompt` joins demos and query, plus the last answer."""
    spec = task.spec("testbed/pretrain")
    pieces: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for i, ex in enumerate(examples):
        query, answer = format_query(spec, ex), format_answer(spec, ex)
        sep = spec.demo_separator if i < len(examples) - 1 else ""
        spans.append((pos + len(query), pos + len(query) + len(answer) + len(sep)))
        pieces.append(query + answer + sep)
        pos += len(pieces[-1])
    text = "".join(pieces)
    assert text == build_icl_prompt(spec, examples[:-1], examples[-1]) + format_answer(spec, examples[-1])
    return PretrainSequence(task, text, tuple(spans))


def sample_sequence(rng: random.Random, mix: MixConfig, n_items: int | None = None) -> PretrainSequence:
    """A random task and ``n_items`` (default: uniform in min_items..max_items) of its rows as one sequence."""
    task = sample_task(rng, mix)
    n = n_items if n_items is not None else rng.randint(mix.min_items, mix.max_items)
    return build_sequence(task, [row_example(task, task_row(rng, task)) for _ in range(n)])


def _register() -> None:
    for name, task in HELD_OUT.items():
        register_generator(name, lambda n_rows, seed, task=task: task_rows(task, n_rows, seed))
        register_task(task.spec(name, generator=name))


_register()
