"""The data of one run: task spec, N-shot splits, ICL demo draws and out-of-domain targets.

Everything here reads rows and configs only: no model, no tokenizer. `prepare_data` raises
DataError / ValueError before any model loads (every task shape, the out-of-domain targets' too,
before any rows load).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ia2ray.config.schema import OodTarget, RunConfig, format_overrides
from ia2ray.data.examples import Example
from ia2ray.data.splits import Splits, dev_size, eval_pool, icl_demo_draws, load_pools, make_splits
from ia2ray.data.tasks import TaskSpec, get_task, resolve_task


@dataclass
class RunData:
    spec: TaskSpec
    splits: Splits
    icl_draws: list[list[Example]]  # demo sets of the ICL baseline (empty when it is off)
    ood: dict[str, tuple[TaskSpec, list[Example]]] = field(default_factory=dict)  # target -> (spec, test rows)


def ood_split(name: str) -> str:
    """The summary key (and metric prefix) of an out-of-domain target: `ood/<name>`."""
    return f"ood/{name}"


VAL_SIZE, TEST_SIZE = 256, 500  # the sizes `data.val_size` / `data.test_size` null stand for, where the pools allow


def split_sizes(cfg: RunConfig, train_rows: int, eval_rows: int) -> tuple[int, int]:
    """(val, test) sizes: the configured ones, else `VAL_SIZE` / `TEST_SIZE` or what the pools hold
    (the train pool after N and the dev split; the whole eval pool)."""
    val, test = cfg.data.val_size, cfg.data.test_size
    if val is None:
        val = max(1, min(VAL_SIZE, train_rows - cfg.data.n - dev_size(cfg.data.n)))
    if test is None:
        test = min(TEST_SIZE, eval_rows)
    return val, test


def prepare_data(cfg: RunConfig) -> RunData:
    """Task spec, rows, N-shot splits and ICL demo draws."""
    spec = resolve_task(cfg.task.name, format_overrides(cfg.task), cfg.task.define)
    targets = {name: ood_spec(spec, name, ood) for name, ood in cfg.task.ood.items()}
    train_rows, eval_rows = load_pools(spec, cfg.data.train_pool, cfg.data.eval_pool, cfg.task.path, cfg.task.eval_path)
    splits = make_splits(train_rows, eval_rows, cfg.data.n, cfg.data.seed, *split_sizes(cfg, len(train_rows), len(eval_rows)))
    draws = []
    if cfg.eval.icl_baseline:
        draws = icl_demo_draws(splits, max(cfg.data.n - 1, 0), cfg.eval.icl_draws, cfg.data.seed)
    ood = {name: (target, ood_rows(cfg, target, name, cfg.task.ood[name].path)) for name, target in targets.items()}
    return RunData(spec, splits, draws, ood)


def ood_spec(source: TaskSpec, name: str, ood: OodTarget) -> TaskSpec:
    """An out-of-domain target's spec, its format keys applied; errors name `task.ood.<name>`."""
    try:
        get_task(name)
    except KeyError as exc:
        raise ValueError(f"task.ood.{name}: {exc.args[0]}") from None
    target = resolve_task(name, format_overrides(ood), where=f"task.ood.{name}")
    if target.answer_type != source.answer_type:
        raise ValueError(f"task.ood.{name}: a {target.answer_type} task cannot be an out-of-domain target of "
                         f"{source.name!r}, a {source.answer_type} task")
    return target


def ood_rows(cfg: RunConfig, target: TaskSpec, name: str, path: Optional[str]) -> list[Example]:
    """An out-of-domain target's first `data.test_size` eval-pool rows (all of them when there are
    fewer: the paper scores PoemS on its 288 positive and negative rows)."""
    rows = eval_pool(target, cfg.data.eval_pool, path)
    if not rows:
        raise ValueError(f"task.ood.{name}: no usable rows in {path or target.hub_id} (every row's label is one the "
                         "task leaves out)")
    return rows[: cfg.data.test_size or TEST_SIZE]


def eval_sets(data: RunData, splits: tuple[str, ...]) -> list[tuple[str, TaskSpec, list[Example]]]:
    """(summary key, task, rows) evaluated for `splits`: each split, then with "test" the OOD targets."""
    sets = [(split, data.spec, getattr(data.splits, split)) for split in splits]
    if "test" in splits:
        sets += [(ood_split(name), target, rows) for name, (target, rows) in data.ood.items()]
    return sets
