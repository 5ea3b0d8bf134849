"""Per-trial overhead by where a trial trains, measured in one run: warm in-process, cold in-process,
Ray Train with 1 and 2 workers; model loads per trial; a Ray Train trial driver's memory.

    python bench/bench_trials.py [--out bench/results/trials-cpu.json] [--repeats 3] [--quick]

Every trial is a search trial of the default study (`search_spaces/testbed.yaml` with its searched
parameters at their defaults: builtin:testbed, testbed/map2, N=8, `ia2->sft`), scored on the
validation split, teacher read from the cache (captured once before the trials, as a study does).
For each trial, `compute` is the work that grows with the model: the stages' optimiser steps and dev
checks plus the evaluation, measured where they ran (in the process, or inside the Ray Train
workers); `overhead` = wall - compute. The paths:

- warm in-process: `run_pipeline(..., keep_model=True)` in a process that already ran a trial (a Tune
  actor reused for its next trial: the model stays loaded, each trial gets a fresh adapter);
- cold in-process: the same trial in a new Python process (interpreter, imports, model load), timed
  from outside: what a trial pays on a fresh actor;
- Ray Train, 1 and 2 workers: `run_pipeline(..., runner=run_with_ray)` from a process connected to a
  local Ray cluster started once (as a study's trial drivers are), a fresh run name per trial.

`model_loads` is the summary's count of weight loads for the trial (all processes); the Ray Train
trial driver's peak resident memory is measured in a fresh process (which starts a Ray cluster of
its own) that runs one such trial and loads no weights. Trials run one at a time, so nothing else competes for the 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ia2ray.fileio import write_json_atomic  # noqa: E402

STUDY = str(ROOT / "search_spaces" / "testbed.yaml")


def trial_sets(cache: str, workers: int, name: str, storage: str) -> list[str]:
    return ["eval.icl_baseline=false", f"capture.cache_dir={cache}", f"train.num_workers={workers}", f"name={name}",
            f"train.storage={storage}", "train.cpus_per_worker=1"]


def compute_s(summary: dict) -> float:
    """Training (inside the workers for Ray Train, else the in-process stage loop) + evaluation."""
    stages = [s.get("timings", {}) for s in summary["stages"]]
    if stages and all("train_s" in t for t in stages):
        train = sum(t["train_s"] for t in stages)
    else:
        train = summary["timings"]["train_stages_s"]
    return train + summary["timings"]["eval_s"]


def one_trial(sets: list[str], keep: bool, runner: str = "in_process") -> dict:
    """Run one trial in this process; its wall, compute, overhead and loads."""
    from ia2ray.config import load_run_config
    from ia2ray.core.pipeline import run_in_process, run_pipeline

    cfg = load_run_config(STUDY, sets)
    run = run_in_process
    if runner == "ray":
        from ia2ray.train.ray_stages import run_with_ray

        run = run_with_ray
    start = time.perf_counter()
    summary = run_pipeline(cfg, progress=False, splits=("val",), cached_teacher_only=True, keep_model=keep,
                           runner=run).summary
    wall = time.perf_counter() - start
    out = {"wall_s": round(wall, 3), "compute_s": round(compute_s(summary), 3),
           "overhead_s": round(wall - compute_s(summary), 3), "model_loads": summary["model_loads"],
           "driver_model_loads": summary["driver_model_loads"], "val_acc": summary["val"]["acc"]}
    if "workers" in summary:
        w = summary["workers"]
        out["workers"] = {k: w.get(k) for k in ("worker_start_s", "load_model_s", "eval_s", "rss_loaded_mb", "rss_end_mb")}
        out["deepspeed_init_s"] = round(sum(s["timings"]["deepspeed_init_s"] for s in summary["stages"]), 3)
    return out


CHILD = """
import json, resource, sys, time
start = time.perf_counter()
sys.path.insert(0, {root!r})
from bench.bench_trials import one_trial
row = one_trial({sets!r}, keep=False, runner={runner!r})
row["process_wall_s"] = round(time.perf_counter() - start, 3)
row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
print("RESULT " + json.dumps(row))
"""


def child_trial(sets: list[str], runner: str, env: dict) -> dict:
    """One trial in a new Python process, timed from here (interpreter start and imports included)."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), sets=sets, runner=runner)], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"child trial failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    row = json.loads(line[len("RESULT "):])
    row["wall_s"] = round(wall, 3)
    row["overhead_s"] = round(wall - row["compute_s"], 3)
    return row


def summarise(rows: list[dict]) -> dict:
    keys = ("wall_s", "compute_s", "overhead_s")
    return {**{f"median_{k}": round(statistics.median(r[k] for r in rows), 3) for k in keys},
            "model_loads": [r["model_loads"] for r in rows], "trials": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/trials-cpu.json")
    parser.add_argument("--repeats", type=int, default=3, help="trials per path")
    parser.add_argument("--quick", action="store_true", help="1 trial per path, Ray Train with 1 worker only")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    from ia2ray.train.launch import ensure_ray

    result: dict = {"command": "python bench/bench_trials.py" + (" --quick" if args.quick else ""),
                    "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version()},
                    "setup": "search trial of search_spaces/testbed.yaml at its defaults (builtin:testbed, "
                             "testbed/map2, N=8, ia2->sft), validation split, teacher from the cache, 1 CPU per trial "
                             "or per Train worker"}
    with tempfile.TemporaryDirectory() as tmp:
        cache, storage = f"{tmp}/cache", f"{tmp}/train"
        from ia2ray.config import load_run_config
        from ia2ray.core.pipeline import run_pipeline

        run_pipeline(load_run_config(STUDY, trial_sets(cache, 0, "capture", storage)), progress=False,
                     splits=("val",))  # the teacher into the cache, as a study captures it before its trials
        paths: dict = {}
        one_trial(trial_sets(cache, 0, "warm-0", storage), keep=True)  # the actor's first (cold) trial
        paths["warm_in_process"] = summarise([one_trial(trial_sets(cache, 0, f"warm-{i + 1}", storage), keep=True)
                                              for i in range(repeats)])
        print("warm in-process:", {k: v for k, v in paths["warm_in_process"].items() if k != "trials"}, flush=True)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        paths["cold_in_process"] = summarise([child_trial(trial_sets(cache, 0, f"cold-{i}", storage), "in_process", env)
                                              for i in range(repeats)])
        print("cold in-process:", {k: v for k, v in paths["cold_in_process"].items() if k != "trials"}, flush=True)

        import ray

        start = time.perf_counter()
        ensure_ray(num_cpus=4)  # logical CPUs: 2 workers and the driver on this 2-core machine
        result["ray_init_s"] = round(time.perf_counter() - start, 2)
        one_trial(trial_sets(cache, 1, "ray-warmup", storage), keep=False, runner="ray")  # first-use JIT builds
        for workers in (1,) if args.quick else (1, 2):
            rows = [one_trial(trial_sets(cache, workers, f"ray{workers}-{i}", storage), keep=False, runner="ray")
                    for i in range(repeats)]
            paths[f"ray_train_{workers}_worker{'s' if workers > 1 else ''}"] = summarise(rows)
            print(f"Ray Train {workers} worker(s):", {k: v for k, v in summarise(rows).items() if k != "trials"},
                  flush=True)
        ray.shutdown()
        # a fresh driver process (with a Ray cluster of its own) runs one Ray Train trial: its peak memory
        driver = child_trial(trial_sets(cache, 1, "ray-driver-rss", storage), "ray", env)
        result["ray_train_driver"] = {"peak_rss_mb": driver["peak_rss_mb"], "driver_model_loads": driver["driver_model_loads"],
                                      "model_loads": driver["model_loads"], "process_wall_s": driver["process_wall_s"]}
        print("Ray Train trial driver:", result["ray_train_driver"], flush=True)
    result["paths"] = paths
    write_json_atomic(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
