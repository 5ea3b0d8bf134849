"""N-shot splits: sizes, disjointness, determinism per seed, training prompts, ICL demo draws."""

import pytest

from ia2ray.data import (
    Example,
    Splits,
    TaskSpec,
    build_icl_prompt,
    icl_demo_draws,
    make_splits,
    pools,
    training_demos,
    training_prompts,
)


def rows(prefix: str, count: int) -> list[Example]:
    return [Example(fields={"text": f"{prefix}{i}"}, answer=str(i % 2), source=f"{prefix}:{i}") for i in range(count)]


SPEC = TaskSpec(
    name="t",
    template="Text:{text}\nLabel:",
    input_fields=["text"],
    label_field="label",
    label_words={"0": "0", "1": "1"},
    answer_type="label",
)
TRAIN = rows("tr", 100)
EVAL = rows("ev", 40)


def sources(examples: list[Example]) -> list[str]:
    return [e.source for e in examples]


@pytest.mark.parametrize("n, n_dev", [(1, 1), (2, 1), (4, 2), (8, 4), (16, 8)])
def test_sizes(n, n_dev):
    s = make_splits(TRAIN, EVAL, n=n, seed=0, val_size=20, test_size=30)
    assert (len(s.train), len(s.dev), len(s.val), len(s.test)) == (n, n_dev, 20, 30)
    assert len(s.icl_pool) == 100 - n - n_dev - 20
    assert (s.n, s.seed) == (n, 0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_disjoint_and_complete(seed):
    s = make_splits(TRAIN, EVAL, n=8, seed=seed, val_size=20, test_size=30)
    parts = [sources(p) for p in (s.train, s.dev, s.val, s.icl_pool)]
    flat = [x for p in parts for x in p]
    assert len(flat) == len(set(flat)) == len(TRAIN)  # disjoint, and together the whole pool
    assert not set(sources(s.icl_pool)) & set(sources(s.train) + sources(s.dev) + sources(s.val))


def test_deterministic_per_seed_and_seeds_differ():
    a = make_splits(TRAIN, EVAL, n=4, seed=3, val_size=10, test_size=10)
    b = make_splits(TRAIN, EVAL, n=4, seed=3, val_size=10, test_size=10)
    assert a == b
    trains = {tuple(sources(make_splits(TRAIN, EVAL, 4, seed, 10, 10).train)) for seed in range(5)}
    assert len(trains) == 5


def test_test_split_fixed_across_seeds_and_n():
    tests = {tuple(sources(make_splits(TRAIN, EVAL, n, seed, 10, 25).test)) for n in (2, 8) for seed in range(3)}
    assert tests == {tuple(sources(EVAL[:25]))}


def test_smaller_n_is_prefix_for_same_seed():
    small = make_splits(TRAIN, EVAL, n=2, seed=1, val_size=10, test_size=10)
    big = make_splits(TRAIN, EVAL, n=8, seed=1, val_size=10, test_size=10)
    assert big.train[:2] == small.train


def test_pools_too_small():
    message = r"train pool too small: N=8 needs 8 train \+ 4 dev \+ 20 val = 32 examples, only 30 available"
    with pytest.raises(ValueError, match=message):
        make_splits(TRAIN[:30], EVAL, n=8, seed=0, val_size=20, test_size=10)
    with pytest.raises(ValueError, match="eval pool too small: test_size=50 needed, only 40 available"):
        make_splits(TRAIN, EVAL, n=8, seed=0, val_size=20, test_size=50)
    with pytest.raises(ValueError, match="N must be >= 1"):
        make_splits(TRAIN, EVAL, n=0, seed=0, val_size=20, test_size=10)


def test_exactly_enough_rows_leaves_empty_icl_pool():
    s = make_splits(TRAIN[:7], EVAL, n=4, seed=0, val_size=1, test_size=0)
    assert s.icl_pool == [] and s.test == []


def test_pools_helper():
    assert pools(TRAIN, 10, seed=0) == pools(TRAIN, 10, seed=0)
    assert pools(TRAIN, 10, seed=0) != pools(TRAIN, 10, seed=1)
    assert pools(TRAIN, 10, seed=0) == pools(TRAIN, 50, seed=0)[:10]  # truncation of one shuffle
    assert sorted(sources(pools(TRAIN, 500, seed=0))) == sorted(sources(TRAIN))
    assert pools(TRAIN, 100, seed=0) != TRAIN


def test_training_demos_are_the_other_examples():
    s = make_splits(TRAIN, EVAL, n=8, seed=2, val_size=10, test_size=10)
    demos = training_demos(s, seed=2)
    assert len(demos) == 8
    for i, d in enumerate(demos):
        others = [e for j, e in enumerate(s.train) if j != i]
        assert len(d) == 7 and sorted(sources(d)) == sorted(sources(others))
    assert any(sources(d) != [e.source for e in s.train if e is not s.train[i]] for i, d in enumerate(demos))
    assert training_demos(s, seed=2) == demos
    assert training_demos(s, seed=3) != demos


def test_training_prompts_exact():
    train = [
        Example(fields={"text": "a"}, answer="1", source="s:0"),
        Example(fields={"text": "b"}, answer="0", source="s:1"),
        Example(fields={"text": "c"}, answer="1", source="s:2"),
    ]
    s = Splits(train=train, dev=[], val=[], test=[], icl_pool=[], n=3, seed=0)
    prompts = training_prompts(SPEC, s, seed=0)
    demos = training_demos(s, seed=0)
    assert prompts == [build_icl_prompt(SPEC, d, q) for d, q in zip(demos, train)]
    for prompt, query in zip(prompts, train):
        assert prompt.endswith("\n\nText:" + query.fields["text"] + "\nLabel:")
        assert prompt.count("\n\n") == 2 and prompt.count("Label:") == 3
    # pinned: the seeded demo order is part of the cache key of teacher activations
    assert prompts == [
        "Text:c\nLabel: 1\n\nText:b\nLabel: 0\n\nText:a\nLabel:",
        "Text:c\nLabel: 1\n\nText:a\nLabel: 1\n\nText:b\nLabel:",
        "Text:b\nLabel: 0\n\nText:a\nLabel: 1\n\nText:c\nLabel:",
    ]


def test_training_prompt_with_one_example_is_bare_query():
    s = make_splits(TRAIN, EVAL, n=1, seed=0, val_size=5, test_size=5)
    assert training_prompts(SPEC, s, seed=0) == [f"Text:{s.train[0].fields['text']}\nLabel:"]


def test_icl_demo_draws():
    s = make_splits(TRAIN, EVAL, n=8, seed=0, val_size=20, test_size=10)
    draws = icl_demo_draws(s, n_demos=7, draws=5, seed=0)
    assert len(draws) == 5 and all(len(d) == 7 for d in draws)
    pool = set(sources(s.icl_pool))
    assert all(set(sources(d)) <= pool and len(set(sources(d))) == 7 for d in draws)
    assert len({frozenset(sources(d)) for d in draws}) == 5
    assert not pool & set(sources(s.train) + sources(s.dev) + sources(s.val))
    assert icl_demo_draws(s, 7, 5, seed=0) == draws
    assert icl_demo_draws(s, 7, 5, seed=1) != draws


def test_icl_demo_draws_edge_cases():
    s = make_splits(TRAIN[:10], EVAL, n=2, seed=0, val_size=4, test_size=0)  # icl_pool: 3 rows
    assert icl_demo_draws(s, 0, 3, seed=0) == [[], [], []]
    assert len({frozenset(sources(d)) for d in icl_demo_draws(s, 2, 3, seed=0)}) == 3  # all 3 pairs
    with pytest.raises(ValueError, match="ICL pool too small: 4 demos per draw needed, only 3 examples available"):
        icl_demo_draws(s, 4, 1, seed=0)
    with pytest.raises(ValueError, match="4 different draws of 2 demos needed, but 3 examples give only 3"):
        icl_demo_draws(s, 2, 4, seed=0)
