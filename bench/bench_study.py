"""Wall time of studies and where it goes: trial compute versus start-up and scheduling.

    python bench/bench_study.py [--out bench/results/study-cpu.json] [--trials 2 4 8] [--quick] [--no-ray-train]

1. The default study (`python -m ia2ray.tune`, no --config: search_spaces/testbed.yaml, whose trials
   train in-process and stay warm) in a fresh process: wall time, its phases (teacher capture, search,
   baselines' learning rates, confirmation), search trials per hour.
2. The same study with every trial on one Ray Train worker (`train.num_workers=1`), in the same run
   (not with `--no-ray-train`).
3. With `--trials`: search-only studies (confirmation off) with growing trial counts on Ray Train
   workers, to show how the wall time and the compute share grow with the number of trials.

For every search run (a trial trains one run per search subset), from its `summary.json`: `compute` = the stages' optimiser steps and dev checks
(`train_s` measured inside the Train workers, or the whole in-process stage loop) + the validation
evaluation; everything else in the trial (Ray Train controller and worker start, imports, model
loads, DeepSpeed init, checkpoints, teardown) is overhead. The study's compute share is
sum(compute) / (search wall x concurrent trials): the fraction of the trial slots' time spent on
work that scales with the model. `--quick` runs only a 2-trial search-only study of smoke.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ia2ray.fileio import write_json_atomic  # noqa: E402


def trial_split(summary: dict) -> dict:
    t = summary.get("timings", {})
    stages = [s.get("timings", {}) for s in summary.get("stages", [])]
    if stages and all("train_s" in s for s in stages):  # Ray Train: measured inside the workers
        train = sum(s["train_s"] for s in stages)
    else:
        train = t.get("train_stages_s", 0.0)
    compute = train + t.get("eval_s", 0.0)
    return {"wall_s": summary["seconds"], "compute_s": compute, "train_s": train, "eval_s": t.get("eval_s", 0.0),
            "overhead_s": summary["seconds"] - compute, "model_loads": summary.get("model_loads"),
            "driver_model_loads": summary.get("driver_model_loads"), "driver_rss_mb": summary.get("driver_rss_mb")}


def run_study(config: str | None, storage: Path, sets: list[str], extra: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, "-m", "ia2ray.tune", "--storage", str(storage), *extra]
    cmd += ["--config", config] if config else []
    for s in sets:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"study failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    study_dir = next(p.parent for p in storage.glob("*/study.json"))
    timings = json.loads((study_dir / "timings.json").read_text())
    runs = [json.loads(p.read_text()) for p in sorted(study_dir.glob("runs/trial-*/summary.json"))]
    splits = [trial_split(r) for r in runs if "seconds" in r]  # not a trial's means over its subsets
    concurrency = int(next(line for line in (study_dir / "report.md").read_text().splitlines()
                           if "concurrent trials:" in line).split("concurrent trials: ")[1].split()[0])
    search = timings["search"]
    compute = sum(s["compute_s"] for s in splits)
    return {
        "command": " ".join(cmd[1:]), "process_wall_s": round(wall, 1),
        "phases_s": {k: round(v, 1) for k, v in timings.items() if isinstance(v, float)},
        "trials": timings["trials"], "search_runs": len(splits), "concurrency": concurrency,
        "search_trials_per_hour": round(timings["trials"] / search * 3600, 1),
        "mean_run_wall_s": round(sum(s["wall_s"] for s in splits) / len(splits), 2),
        "mean_run_compute_s": round(compute / len(splits), 2),
        "compute_share_of_search": round(compute / (search * concurrency), 3),
        "slot_busy_share_of_search": round(sum(s["wall_s"] for s in splits) / (search * concurrency), 3),
        "per_trial": splits,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/study-cpu.json")
    parser.add_argument("--trials", type=int, nargs="*", default=[])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-ray-train", action="store_true", help="skip the default study on Ray Train workers")
    args = parser.parse_args()
    no_confirm = ["study.confirm.top_k=0", "study.confirm.baselines=[]"]
    if args.no_ray_train:
        result_note = "default study in-process only (--no-ray-train)"
    else:
        result_note = "default study in-process and on 1-worker Ray Train, same run"
    result: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "note": result_note}
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            result["growth"] = [run_study(str(ROOT / "search_spaces/smoke.yaml"), Path(tmp) / "q",
                                          ["study.num_trials=2", *no_confirm])]
        else:
            result["default_study"] = run_study(None, Path(tmp) / "default", [])
            print(json.dumps({k: v for k, v in result["default_study"].items() if k != "per_trial"}), flush=True)
            if not args.no_ray_train:
                r = run_study(None, Path(tmp) / "default-ray-train", ["train.num_workers=1"])
                result["default_study_ray_train"] = r
                print(json.dumps({k: v for k, v in r.items() if k != "per_trial"}), flush=True)
                result["ray_train_over_in_process"] = round(r["process_wall_s"] / result["default_study"]["process_wall_s"], 2)
            result["growth"] = []
            for n in args.trials:
                r = run_study(None, Path(tmp) / f"n{n}", [f"study.num_trials={n}", "train.num_workers=1", *no_confirm])
                result["growth"].append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "per_trial"}), flush=True)
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
