"""The paper's comparison on a task: ICL vs SFT only vs IA2 only vs IA2 -> SFT, over seeds and N.

    python bench/compare_testbed.py [--task testbed/map2] [--n 4 8] [--seeds 5] [--lrs 3e-3 1e-2 3e-2]
                                    [--out bench/results/testbed-comparison.json] [--set KEY=VALUE ...]

Each (N, seed) trains the three pipelines with the core library (one process) from the same
N-shot split, once per learning rate of the grid (IA2 -> SFT uses one rate for both stages, as in
the paper); the ICL baseline (base model, N-1 demos from outside the training set, averaged over
demo draws) comes from the same split. As in the paper, the best rate is chosen per method and N,
but by mean VALIDATION accuracy (the paper picked it on test). Reports test accuracy and ECE
(mean and std over seeds) at the chosen rate, the paired per-seed difference of IA2 -> SFT against
SFT only and against ICL (mean, bootstrap 95% interval, paired t-test p), and writes every run's
metrics to the JSON file. With out-of-domain targets (`--set task.ood.fins=...`), the same tables are
made for each target (key `ood` of the file), at the rates chosen on the in-domain validation split.

The JSON file is rewritten after each (N, seed): run the same command again after an interruption
and it continues with the splits that are missing (a different task, model, grid or --set starts
afresh). `"complete": false` marks a file that does not hold every split yet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ia2ray.fileio import write_json_atomic  # noqa: E402
from ia2ray.config import load_run_config  # noqa: E402
from ia2ray.core.pipeline import run_pipeline  # noqa: E402
from ia2ray.core.stats import paired  # noqa: E402

METHODS = ("sft", "ia2", "ia2->sft")


def one_split(task: str, n: int, seed: int, lrs: list[float], overrides: list[str]) -> dict:
    """Validation and test metrics of ICL and of each pipeline at each learning rate, on one split."""
    out: dict = {}
    for method in METHODS:
        for lr in lrs:
            first = not out
            cfg = load_run_config(None, [f"task.name={task}", f"data.n={n}", f"data.seed={seed}",
                                         f"pipeline={method}", f"lr.align={lr}", f"lr.sft={lr}",
                                         f"eval.icl_baseline={'true' if first else 'false'}", *overrides])
            summary = run_pipeline(cfg, progress=False).summary
            splits = ("val", "test", *(key for key in summary if key.startswith("ood/")))
            if first:
                out["icl"] = {split: {k: summary["icl"][split][k] for k in ("acc", "ece")} for split in splits}
            out.setdefault(method, {})[str(lr)] = {
                **{split: {k: summary[split][k] for k in ("acc", "ece")} for split in splits},
                "stages": summary["stages"],
            }
    return out


def ood_splits(results: dict) -> list[str]:
    """The out-of-domain splits (`ood/<target>`) the runs were scored on."""
    return sorted({key for runs in results.values() for r in runs for key in r["icl"] if key.startswith("ood/")})


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def choose_lr(runs: list[dict], method: str) -> str:
    """The learning rate with the best mean validation accuracy over seeds (ties: the smaller rate)."""
    lrs = sorted(runs[0][method], key=float)
    return max(lrs, key=lambda lr: (statistics.mean(r[method][lr]["val"]["acc"] for r in runs), -float(lr)))


def picked(runs: list[dict], method: str, lr: str | None, split: str, key: str) -> list[float]:
    """One value per seed: ICL (lr None) or a method at a rate."""
    return [r["icl"][split][key] if lr is None else r[method][lr][split][key] for r in runs]


def choose(results: dict, ns: list[int]) -> dict:
    """Per N (that has runs): each method's rate, chosen on validation."""
    return {str(n): {m: choose_lr(results[str(n)], m) for m in METHODS} for n in ns if results.get(str(n))}


def table(results: dict, chosen: dict, split: str = "test") -> str:
    """Markdown table of one split's metrics: ICL, and each method at its chosen rate."""
    rows = [f"| N | seeds | method | lr (chosen on val) | {split} acc (mean ± std) | {split} ECE (mean ± std) |",
            "|---|---|---|---|---|---|"]
    for n, picks in chosen.items():
        runs = results[n]
        for method, lr in {"icl": None, **picks}.items():
            acc = mean_std(picked(runs, method, lr, split, "acc"))
            ece = mean_std(picked(runs, method, lr, split, "ece"))
            rows.append(f"| {n} | {len(runs)} | {method} | {lr or '-'} | {acc[0]:.3f} ± {acc[1]:.3f} | "
                        f"{ece[0]:.3f} ± {ece[1]:.3f} |")
    return "\n".join(rows)


PAIRS = (("ia2->sft", "sft"), ("ia2->sft", "icl"), ("ia2", "icl"), ("sft", "icl"))


def paired_table(results: dict, chosen: dict, split: str = "test") -> tuple[str, dict]:
    """Per N: the paired per-seed differences (a - b) on one split at each method's chosen rate."""
    rows = [f"| N | a - b | Δ {split} acc [95% CI] | p | verdict | Δ {split} ECE [95% CI] | p | verdict |",
            "|---|---|---|---|---|---|---|---|"]
    out: dict = {}
    for n, picks in chosen.items():
        runs = results[n]
        for a, b in PAIRS:
            cells, stats = [], {}
            for key, higher in (("acc", True), ("ece", False)):
                r = paired(picked(runs, a, picks.get(a), split, key), picked(runs, b, picks.get(b), split, key),
                           higher_is_better=higher)
                stats[key] = r.as_dict()
                cells += [f"{r.mean:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]", f"{r.p_value:.3f}", r.verdict]
            out.setdefault(n, {})[f"{a} - {b}"] = stats
            rows.append(f"| {n} | {a} - {b} | " + " | ".join(cells) + " |")
    return "\n".join(rows), out


def load_done(path: Path, setup: dict) -> tuple[dict[str, list], float]:
    """The splits an earlier run of the same setup finished, and its wall seconds (nothing when the file
    is absent or was written by another setup)."""
    if not path.is_file():
        return {}, 0.0
    report = json.loads(path.read_text())
    if {k: report.get(k) for k in setup} != setup:
        print(f"{path}: written by a different setup; starting afresh", flush=True)
        return {}, 0.0
    return report.get("results", {}), report.get("wall_s", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="testbed/map2")
    parser.add_argument("--model", default="builtin:testbed")
    parser.add_argument("--n", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2])
    parser.add_argument("--out", default="bench/results/testbed-comparison.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides = [f"model.path={args.model}", *args.overrides]
    setup = {"task": args.task, "model": args.model, "lrs": args.lrs, "overrides": args.overrides}
    out = Path(args.out)
    results, previous_s = load_done(out, setup)
    started = time.time()

    def write(complete: bool) -> dict:
        chosen = choose(results, args.n)
        pmd, diffs = paired_table(results, chosen)
        report = {"command": "python " + " ".join(sys.argv), **setup, "complete": complete,
                  "wall_s": round(previous_s + time.time() - started, 1), "chosen_lr": chosen,
                  "paired": diffs, "results": results, "table": table(results, chosen), "paired_table": pmd}
        for split in ood_splits(results):  # at the rates chosen in domain
            ood_pmd, ood_diffs = paired_table(results, chosen, split)
            report.setdefault("ood", {})[split] = {"paired": ood_diffs, "table": table(results, chosen, split),
                                                   "paired_table": ood_pmd}
        write_json_atomic(out, report)
        return report

    for n in args.n:
        runs = results.setdefault(str(n), [])
        for seed in range(len(runs), args.seeds):
            r = one_split(args.task, n, seed, args.lrs, overrides)
            runs.append(r)
            print(f"N={n} seed={seed}: icl {r['icl']['test']['acc']:.3f} | " + " | ".join(
                f"{m} " + " ".join(f"{lr}:{v['test']['acc']:.3f}" for lr, v in r[m].items()) for m in METHODS),
                flush=True)
            write(complete=False)
    report = write(complete=True)
    print(report["table"], report["paired_table"], *(t for o in report.get("ood", {}).values()
                                                     for t in (o["table"], o["paired_table"])), sep="\n\n")
    print(f"wrote {out} in {report['wall_s']} s")


if __name__ == "__main__":
    main()
