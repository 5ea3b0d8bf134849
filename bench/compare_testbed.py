"""The paper's comparison on a task: ICL vs SFT only vs IA2 only vs IA2 -> SFT, over seeds and N.

    python bench/compare_testbed.py [--task testbed/map2] [--n 4 8] [--seeds 5]
                                    [--out bench/results/testbed-comparison.json] [--set KEY=VALUE ...]

Each (N, seed) trains the three pipelines with the core library (one process) from the same
N-shot split; the ICL baseline (base model, N-1 demos from outside the training set, averaged over
demo draws) comes from the same split. Reports test accuracy and ECE (mean and std over seeds) and
writes every run's summary to the JSON file. Model selection never looks at the test split.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ia2ray.fileio import write_json_atomic  # noqa: E402
from ia2ray.config import load_run_config  # noqa: E402
from ia2ray.core.pipeline import run_pipeline  # noqa: E402

METHODS = ("sft", "ia2", "ia2->sft")


def one_split(task: str, n: int, seed: int, overrides: list[str]) -> dict:
    """Test metrics of ICL and each pipeline on one N-shot split."""
    out = {}
    for i, method in enumerate(METHODS):
        cfg = load_run_config(None, [f"task.name={task}", f"data.n={n}", f"data.seed={seed}", f"pipeline={method}",
                                     f"eval.icl_baseline={'true' if i == 0 else 'false'}", *overrides])
        summary = run_pipeline(cfg, progress=False).summary
        if i == 0:
            out["icl"] = {k: summary["icl"]["test"][k] for k in ("acc", "ece")}
        out[method] = {k: summary["test"][k] for k in ("acc", "ece")}
        out[method]["stages"] = summary["stages"]
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(results: dict, ns: list[int]) -> str:
    rows = ["| N | method | test acc (mean ± std) | test ECE (mean ± std) |", "|---|---|---|---|"]
    for n in ns:
        runs = results[str(n)]
        for method in ("icl", *METHODS):
            acc = mean_std([r[method]["acc"] for r in runs])
            ece = mean_std([r[method]["ece"] for r in runs])
            rows.append(f"| {n} | {method} | {acc[0]:.3f} ± {acc[1]:.3f} | {ece[0]:.3f} ± {ece[1]:.3f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="testbed/map2")
    parser.add_argument("--model", default="builtin:testbed")
    parser.add_argument("--n", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default="bench/results/testbed-comparison.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides = [f"model.path={args.model}", *args.overrides]
    started = time.time()
    results: dict[str, list] = {}
    for n in args.n:
        results[str(n)] = []
        for seed in range(args.seeds):
            results[str(n)].append(one_split(args.task, n, seed, overrides))
            r = results[str(n)][-1]
            print(f"N={n} seed={seed}: " + ", ".join(f"{m} {r[m]['acc']:.3f}/{r[m]['ece']:.3f}"
                                                     for m in ("icl", *METHODS)), flush=True)
    md = table(results, args.n)
    print(md)
    report = {"command": "python " + " ".join(sys.argv), "task": args.task, "model": args.model,
              "overrides": args.overrides, "wall_s": round(time.time() - started, 1), "results": results,
              "table": md}
    write_json_atomic(args.out, report)
    print(f"wrote {args.out} in {report['wall_s']} s")


if __name__ == "__main__":
    main()
