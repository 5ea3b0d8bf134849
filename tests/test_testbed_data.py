"""The testbed task family (ia2ray.data.testbed): formats, held-out exclusion, determinism."""

import random
import re

import pytest

from ia2ray.data import build_icl_prompt, format_answer, format_query, generate_rows, get_task, load_examples
from ia2ray.data import synthetic
from ia2ray.data.testbed import (
    CONCEPT_CLASSES,
    GLOBAL_MAPPING,
    HELD_OUT,
    LABEL_WORDS,
    MixConfig,
    TestbedTask,
    build_sequence,
    is_held_out_mapping,
    row_example,
    sample_sequence,
    sample_task,
    task_rows,
)

ITEM = re.compile(r"Text: [a-z]+( [a-z]+)*\nLabel: [A-Za-z]+( [A-Za-z]+)*")


def test_held_out_tasks_are_registered_with_generators():
    for name, task in HELD_OUT.items():
        spec = get_task(name)
        assert spec.generator == name and name in synthetic.GENERATORS
        assert spec.template == "Text: {text}\nLabel:" and spec.answer_template == " {answer}"
        if task.family == "map":
            assert spec.answer_type == "label" and spec.label_words == task.mapping
        else:
            assert spec.answer_type == "text" and spec.parser == "strip" and spec.max_new_tokens >= 4
    assert {t.family for t in HELD_OUT.values()} == {"map", "seq"}


def test_vocabulary_is_alphabetic_and_disjoint():
    words = [w for ws in CONCEPT_CLASSES.values() for w in ws]
    assert len(words) == len(set(words)) == 16 * 8
    assert len(set(LABEL_WORDS)) == len(LABEL_WORDS) and not set(words) & set(LABEL_WORDS)
    assert all(w.isalpha() for w in words + list(LABEL_WORDS))


def test_held_out_mappings_differ_from_the_global_mapping_everywhere():
    for task in HELD_OUT.values():
        assert 2 <= len(task.classes) <= 4 and len(set(task.labels)) == len(task.labels)
        for cls, label in task.mapping.items():
            assert GLOBAL_MAPPING[cls] != label, (cls, label)


def test_prompts_are_exactly_the_library_format():
    spec = get_task("testbed/map3")
    rows = load_examples(spec, split="train")
    assert format_query(spec, rows[0]) == f"Text: {rows[0].fields['text']}\nLabel:"
    assert format_answer(spec, rows[0]) == f" {rows[0].answer}"
    prompt = build_icl_prompt(spec, rows[:2], rows[2])
    expected = (f"Text: {rows[0].fields['text']}\nLabel: {rows[0].answer}\n\n"
                f"Text: {rows[1].fields['text']}\nLabel: {rows[1].answer}\n\n"
                f"Text: {rows[2].fields['text']}\nLabel:")
    assert prompt == expected


def test_pretraining_sequences_are_library_prompts_with_answer_targets():
    rng = random.Random(0)
    for _ in range(200):
        seq = sample_sequence(rng, MixConfig())
        blocks = seq.text.split("\n\n")
        assert len(blocks) == len(seq.target_spans) == 10
        assert all(ITEM.fullmatch(b) for b in blocks), blocks
        answers = [seq.text[a:b] for a, b in seq.target_spans]
        assert answers == [" " + b.split("\nLabel: ")[1] + "\n\n" for b in blocks[:-1]] + [" " + blocks[-1].split("\nLabel: ")[1]]


def test_build_sequence_matches_build_icl_prompt():
    task = HELD_OUT["testbed/seq3"]
    examples = [row_example(task, r) for r in task_rows(task, 4, 1)]
    spec = task.spec("x")
    seq = build_sequence(task, examples)
    assert seq.text == build_icl_prompt(spec, examples[:3], examples[3]) + format_answer(spec, examples[3])


def test_sampler_never_produces_a_held_out_mapping():
    rng = random.Random(1)
    mix = MixConfig()
    seen_global = seen_random = 0
    for _ in range(20000):
        task = sample_task(rng, mix)
        assert 2 <= len(task.classes) <= 4
        assert not is_held_out_mapping(task)
        for held in HELD_OUT.values():  # the definition spelled out
            assert not all(task.mapping.get(c) == l for c, l in held.mapping.items())
        is_global = all(GLOBAL_MAPPING[c] == l for c, l in task.mapping.items())
        seen_global += is_global
        seen_random += not is_global
    assert 0.25 < seen_global / 20000 < 0.35 and seen_random > 0
    # ... and the rejection is active: a held-out task itself, or a superset of it, is recognised
    assert is_held_out_mapping(HELD_OUT["testbed/map2"])
    superset = TestbedTask(("animal", "tool", "bird"), ("Friday", "gamma", "north"))
    assert is_held_out_mapping(superset)
    assert not is_held_out_mapping(TestbedTask(("animal", "tool"), ("gamma", "Friday")))


def test_pretraining_sequences_never_use_a_held_out_mapping():
    rng = random.Random(2)
    for _ in range(3000):
        seq = sample_sequence(rng, MixConfig())
        assert not is_held_out_mapping(seq.task)


@pytest.mark.parametrize("name", sorted(HELD_OUT))
def test_generators_are_deterministic(name):
    assert generate_rows(name, 50, 7) == generate_rows(name, 50, 7)
    assert generate_rows(name, 50, 7) != generate_rows(name, 50, 8)
    spec = get_task(name)
    assert load_examples(spec, split="eval") == load_examples(spec, split="eval")


def test_rows_use_the_task_classes_with_some_label_noise():
    task = HELD_OUT["testbed/map3"]
    rows = task_rows(task, 3000, 0)
    word_class = {w: c for c, ws in CONCEPT_CLASSES.items() for w in ws}
    assert {word_class[r["text"]] for r in rows} == set(task.classes)
    noise = sum(word_class[r["text"]] != r["label"] for r in rows) / len(rows)
    assert 0.07 < noise < 0.13
    seq = HELD_OUT["testbed/seq3"]
    lengths = {len(r["text"].split()) for r in task_rows(seq, 200, 0)}
    assert lengths == {2, 3}
    for r in task_rows(seq, 200, 0):
        assert len(r["answer"].split()) == len(r["text"].split())
        assert set(r["answer"].split()) <= set(seq.labels)


def test_register_generator_refuses_a_different_function():
    synthetic.register_generator("testbed/map2", synthetic.GENERATORS["testbed/map2"])  # same: no-op
    with pytest.raises(ValueError, match="already registered"):
        synthetic.register_generator("testbed/map2", lambda n, s: [])
