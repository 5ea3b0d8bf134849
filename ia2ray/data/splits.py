"""N-shot splits per seed, as in the paper, plus a validation split the paper lacked.

From a train pool (``pools(rows, 2000, 0)``) and an eval pool (``pools(eval_rows, 500, 0)``), each
seed gets, from ONE seeded shuffle of the train pool, consecutive slices:

    train (N) | dev (max(1, N//2), early stopping only) | val (model selection) | icl_pool (the rest)

and ``test`` = the first ``test_size`` eval-pool rows, the same for every seed and N. For a given
seed the shuffle does not depend on N, so the N=2 train set is a prefix of the N=4 one.
ICL-baseline demos come from ``icl_pool``, disjoint from train, dev and val.

All randomness comes from ``random.Random`` seeded with strings like ``"splits:3"`` (hashed with
sha512 by Python, independent of PYTHONHASHSEED), so every purpose gets its own stream.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence, TypeVar

from ia2ray.data.examples import Example, build_icl_prompt
from ia2ray.data.loaders import load_examples
from ia2ray.data.tasks import TaskSpec

T = TypeVar("T")


@dataclass
class Splits:
    """The examples one (N, seed) run sees. ``n`` = number of training examples."""

    train: list[Example]
    dev: list[Example]
    val: list[Example]
    test: list[Example]
    icl_pool: list[Example]
    n: int
    seed: int


def pools(rows: Sequence[T], size: int, seed: int = 0) -> list[T]:
    """A seeded shuffle of ``rows`` truncated to ``size`` (all rows if there are fewer)."""
    if size < 0:
        raise ValueError(f"pool size must be >= 0, got {size}")
    shuffled = list(rows)
    random.Random(f"pool:{seed}").shuffle(shuffled)
    return shuffled[:size]


def load_pools(spec: TaskSpec, train_size: int, eval_size: int, train_path: str | None = None,
               eval_path: str | None = None) -> tuple[list[Example], list[Example]]:
    """(train pool, eval pool) of a task: its rows from a local file, the hub or its generator,
    each seeded-shuffled (pool seed 0) and truncated to the given size. A task with `eval_holdout`
    K and no separate eval file takes both from its train rows: the last K of the shuffle are the eval
    pool, the train pool comes from the others."""
    if spec.eval_holdout and eval_path is None:
        return _held_out(spec, train_size, eval_size, train_path)
    return pools(load_examples(spec, train_path, "train", seed=0), train_size, seed=0), \
        eval_pool(spec, eval_size, eval_path)


def eval_pool(spec: TaskSpec, size: int, path: str | None = None) -> list[Example]:
    """The eval pool alone (an out-of-domain target needs no train rows): the rows of `path` (an eval
    file), else the hub's eval split, or for `eval_holdout` tasks the hub rows it holds out."""
    if spec.eval_holdout and path is None:
        return _held_out(spec, 0, size, None)[1]
    return pools(load_examples(spec, path, "eval", seed=0), size, seed=0)


def _held_out(spec: TaskSpec, train_size: int, eval_size: int,
              train_path: str | None) -> tuple[list[Example], list[Example]]:
    """(train pool, eval pool) of one set of rows: the last `eval_holdout` of the shuffle are the eval pool."""
    rows = load_examples(spec, train_path, "train", seed=0)
    if len(rows) <= spec.eval_holdout:
        where = train_path or f"{spec.hub_id}[{spec.train_split}]"
        raise ValueError(f"task {spec.name!r}: {where} has {len(rows)} usable rows, but the eval pool alone takes "
                         f"the last {spec.eval_holdout} (eval_holdout)")
    shuffled = pools(rows, len(rows), seed=0)
    cut = len(shuffled) - spec.eval_holdout
    return shuffled[:cut][:train_size], shuffled[cut:][:eval_size]


def dev_size(n: int) -> int:
    """Size of the early-stopping dev split for N training examples: ``max(1, N // 2)``."""
    return max(1, n // 2)


def make_splits(
    train_rows: Sequence[Example],
    eval_rows: Sequence[Example],
    n: int,
    seed: int,
    val_size: int,
    test_size: int,
) -> Splits:
    """Train/dev/val/icl_pool slices of a per-seed shuffle of ``train_rows``; test = first
    ``test_size`` of ``eval_rows``. ``ValueError`` (saying needed vs available) if a pool is too small."""
    if n < 1:
        raise ValueError(f"N must be >= 1, got {n}")
    if val_size < 0 or test_size < 0:
        raise ValueError(f"val_size and test_size must be >= 0, got {val_size} and {test_size}")
    n_dev = dev_size(n)
    needed = n + n_dev + val_size
    if len(train_rows) < needed:
        raise ValueError(
            f"train pool too small: N={n} needs {n} train + {n_dev} dev + {val_size} val = {needed} "
            f"examples, only {len(train_rows)} available"
        )
    if len(eval_rows) < test_size:
        raise ValueError(f"eval pool too small: test_size={test_size} needed, only {len(eval_rows)} available")
    order = list(train_rows)
    random.Random(f"splits:{seed}").shuffle(order)
    return Splits(
        train=order[:n],
        dev=order[n : n + n_dev],
        val=order[n + n_dev : needed],
        test=list(eval_rows[:test_size]),
        icl_pool=order[needed:],
        n=n,
        seed=seed,
    )


def training_demos(splits: Splits, seed: int) -> list[list[Example]]:
    """For each training example i: the other N-1 training examples in a seeded shuffled order."""
    demos: list[list[Example]] = []
    for i in range(len(splits.train)):
        others = splits.train[:i] + splits.train[i + 1 :]
        random.Random(f"demos:{seed}:{i}").shuffle(others)
        demos.append(others)
    return demos


def training_prompts(spec: TaskSpec, splits: Splits, seed: int) -> list[str]:
    """ICL prompt of each training example: the other N-1 examples as demos, then its query
    (the teacher's input for IA2; with N=1 it is the bare query)."""
    return [
        build_icl_prompt(spec, demos, query)
        for demos, query in zip(training_demos(splits, seed), splits.train)
    ]


def dev_prompts(spec: TaskSpec, splits: Splits, seed: int) -> list[str]:
    """Teacher prompts of the dev examples (for the alignment dev loss): N-1 of the training
    examples, in a seeded shuffled order, as demos."""
    return held_out_prompts(spec, splits, splits.dev, seed, "dev-demos")


def held_out_prompts(spec: TaskSpec, splits: Splits, rows: Sequence[Example], seed: int, tag: str) -> list[str]:
    """Teacher prompts of rows outside the training set: per row, N-1 of the training examples in a
    shuffled order seeded by (`tag`, seed, row index) as demos, then the row's query."""
    prompts = []
    for i, ex in enumerate(rows):
        demos = list(splits.train)
        random.Random(f"{tag}:{seed}:{i}").shuffle(demos)
        prompts.append(build_icl_prompt(spec, demos[: max(len(demos) - 1, 0)], ex))
    return prompts


def icl_demo_draws(splits: Splits, n_demos: int, draws: int, seed: int) -> list[list[Example]]:
    """``draws`` demo sets for the ICL baseline, each ``n_demos`` examples sampled without
    replacement from ``splits.icl_pool``; no two draws hold the same set of examples."""
    if n_demos < 0 or draws < 0:
        raise ValueError(f"n_demos and draws must be >= 0, got {n_demos} and {draws}")
    pool = splits.icl_pool
    if n_demos > len(pool):
        raise ValueError(
            f"ICL pool too small: {n_demos} demos per draw needed, only {len(pool)} examples available"
        )
    if n_demos == 0:
        return [[] for _ in range(draws)]
    if math.comb(len(pool), n_demos) < draws:
        raise ValueError(
            f"ICL pool too small: {draws} different draws of {n_demos} demos needed, but {len(pool)} "
            f"examples give only {math.comb(len(pool), n_demos)}"
        )
    rng = random.Random(f"icl:{seed}")
    seen: set[frozenset[int]] = set()
    result: list[list[Example]] = []
    while len(result) < draws:
        picked = rng.sample(range(len(pool)), n_demos)
        if frozenset(picked) in seen:
            continue
        seen.add(frozenset(picked))
        result.append([pool[j] for j in picked])
    return result
