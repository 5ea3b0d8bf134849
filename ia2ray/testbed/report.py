"""Held-out evaluation of a testbed model with the library: zero-shot vs ICL, accuracy and ECE.

Every number comes from :func:`ia2ray.core.evaluate.evaluate` / ``icl_baseline`` with the
``EvalConfig`` defaults (top-10 confidence, 15 equal-mass ECE bins), on the data a run would see:
train/eval pools and N-shot splits built exactly as ``ia2ray.core.pipeline.prepare_data`` builds
them, ICL demos (N-1 per prompt) drawn from each split's ICL pool with ``icl_demo_draws``.

Besides zero-shot and ICL, each label task reports two guards against a model that merely repeats
labels it saw in the demos: ``label_chance`` (1 / number of label words) and ``copy_majority_acc``
(answer every query with the most frequent label of its demos), plus the fewest classes present in
any demo set (``min_demo_classes``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from statistics import mean
from typing import Any, Sequence

from ia2ray.config.schema import EvalConfig
from ia2ray.core.evaluate import evaluate, icl_baseline
from ia2ray.data.examples import Example
from ia2ray.data.splits import icl_demo_draws, load_pools, make_splits
from ia2ray.data.tasks import get_task
from ia2ray.data.testbed import HELD_OUT

LABEL_TASKS = tuple(name for name, task in HELD_OUT.items() if task.family == "map")
TEXT_TASKS = tuple(name for name, task in HELD_OUT.items() if task.family != "map")
VAL_SIZE = 64  # validation rows per task in the calibration report (the library once defaulted to 64)


@dataclass(frozen=True)
class ReportSettings:
    """How much held-out data the report evaluates (the defaults are the shipped report's)."""

    ns: tuple[int, ...] = (2, 4, 8)
    seeds: tuple[int, ...] = (0, 1, 2)  # N-shot split seeds (data.seed)
    test_size: int = 128  # test examples per task
    draws: int = 5  # ICL demo draws per seed (the library's default eval.icl_draws)
    text_test_size: int = 64  # multi-token tasks decode: fewer examples
    text_draws: int = 2
    batch_size: int = 64


def copy_majority_acc(test: Sequence[Example], draws: Sequence[Sequence[Example]]) -> float:
    """Accuracy of answering every query with the most frequent label of its demos."""
    scores = []
    for demos in draws:
        majority = Counter(d.answer for d in demos).most_common(1)[0][0]
        scores.append(mean(ex.answer == majority for ex in test))
    return mean(scores)


def evaluate_task(model, tokenizer, name: str, settings: ReportSettings, device: str = "cpu") -> dict[str, Any]:
    """Zero-shot and per-N ICL metrics of one held-out task (ICL averaged over seeds and draws)."""
    spec = get_task(name)
    is_label = spec.answer_type == "label"
    test_size, n_draws = (settings.test_size, settings.draws) if is_label else (settings.text_test_size, settings.text_draws)
    cfg = EvalConfig(batch_size=settings.batch_size)
    train, eval_rows = load_pools(spec, spec.train_pool, spec.eval_pool)  # as a run's prepare_data builds them
    zero = evaluate(model, tokenizer, spec, eval_rows[:test_size], cfg, device)
    out: dict[str, Any] = {"zero_shot": {"acc": zero["acc"], "ece": zero["ece"]}, "icl": {}}
    if is_label:
        out["label_chance"] = 1 / len(set(spec.label_words.values()))
        out["copy_majority_acc"], out["min_demo_classes"] = {}, {}
    for n in settings.ns:
        runs, copies, classes = [], [], []
        for seed in settings.seeds:
            splits = make_splits(train, eval_rows, n, seed, VAL_SIZE, test_size)
            draws = icl_demo_draws(splits, n - 1, n_draws, seed)
            runs.append(icl_baseline(model, tokenizer, spec, splits.test, draws, cfg, device))
            if is_label:
                copies.append(copy_majority_acc(splits.test, draws))
                classes += [len({d.answer for d in demos}) for demos in draws]
        key = str(n)
        out["icl"][key] = {
            "acc": mean(r["acc"] for r in runs),
            "ece": mean(r["ece"] for r in runs) if is_label else None,
            "per_seed_acc": [r["acc"] for r in runs],
        }
        if is_label:
            out["copy_majority_acc"][key] = mean(copies)
            out["min_demo_classes"][key] = min(classes)
    return out


def heldout_report(model, tokenizer, settings: ReportSettings = ReportSettings(), device: str = "cpu") -> dict[str, Any]:
    """The testbed report: per-N averages over the held-out label tasks, and per-task detail.

    ``zero_shot_*`` does not depend on N (no demos); it is repeated under every N so all maps
    share their keys.
    """
    tasks = {name: evaluate_task(model, tokenizer, name, settings, device) for name in LABEL_TASKS + TEXT_TASKS}
    label = [tasks[name] for name in LABEL_TASKS]
    keys = [str(n) for n in settings.ns]
    report: dict[str, Any] = {
        "zero_shot_acc": {k: mean(t["zero_shot"]["acc"] for t in label) for k in keys},
        "icl_acc": {k: mean(t["icl"][k]["acc"] for t in label) for k in keys},
        "zero_shot_ece": {k: mean(t["zero_shot"]["ece"] for t in label) for k in keys},
        "icl_ece": {k: mean(t["icl"][k]["ece"] for t in label) for k in keys},
        "label_chance": {k: mean(t["label_chance"] for t in label) for k in keys},
        "copy_majority_acc": {k: mean(t["copy_majority_acc"][k] for t in label) for k in keys},
        "averaged_over": list(LABEL_TASKS),
        "multi_token_acc": {name: {"zero_shot": tasks[name]["zero_shot"]["acc"],
                                   **{k: tasks[name]["icl"][k]["acc"] for k in keys}} for name in TEXT_TASKS},
        "tasks": tasks,
        "eval": {"confidence": EvalConfig().confidence, "ece_scheme": EvalConfig().ece_scheme,
                 "ece_bins": EvalConfig().ece_bins, **asdict(settings)},
    }
    return report


def icl_gap(report: dict[str, Any], n: int = 8) -> float:
    """ICL accuracy at ``n`` minus the larger of zero-shot accuracy and label chance."""
    k = str(n)
    return report["icl_acc"][k] - max(report["zero_shot_acc"][k], report["label_chance"][k])
