"""Per-trial overhead of the distributed stages (Ray Train + DeepSpeed ZeRO-2 on CPU), measured in one run.

    python bench/bench_train.py [--out bench/results/train-cpu.json] [--quick]

For 1 and 2 workers, the wall time of one trial (the `ia2->sft` pipeline on the built-in testbed
model, N=8) is split into:
- `startup_s`: from `fit()` to the first worker's loop (controller, placement group, worker
  processes, imports, torch process group);
- `load_model_s`: the worker's one model load (weights + LoRA), shared by the stages;
- per stage: `set_adapter_s` (the stage's starting adapter into the model), `deepspeed_init_s` (engine,
  ZeRO partitioning) and `train_s` (the stage's steps, dev checks and checkpoints);
- `other_s`: the rest (checkpoint registration, shutdown of the worker group).
It also runs the same trial as two `fit()` calls (one per stage) to compare with one `fit()` for both
stages, and records each stage's resident memory at its start and end (one fit) to show whether the
first stage leaks into the second. Ray cluster start-up (`ray_init_s`) is paid once per study, not
per trial, and is reported apart.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ia2ray.config import load_run_config  # noqa: E402
from ia2ray.core.model import load_model, resolve_layers  # noqa: E402
from ia2ray.core.items import stage_work  # noqa: E402
from ia2ray.core.rundata import prepare_data  # noqa: E402
from ia2ray.core.teacher import capture_teacher  # noqa: E402
from ia2ray.core.sites import num_layers  # noqa: E402
from ia2ray.fileio import write_json_atomic  # noqa: E402
from ia2ray.train.launch import RUNTIME_ENV, fit  # noqa: E402
from ia2ray.train.ray_stages import make_job  # noqa: E402


def trial_job(workers: int, epochs: int, cache_dir: str):
    cfg = load_run_config(None, [
        "pipeline=ia2->sft", "eval.icl_baseline=false", f"train.max_epochs={epochs}", "train.patience=1000",
        f"train.num_workers={workers}", "train.checkpoint_every=0", f"capture.cache_dir={cache_dir}"])
    data = prepare_data(cfg)
    model, tok = load_model(cfg.model)
    teacher = capture_teacher(cfg, model, tok, data, progress=False)
    stages = stage_work(cfg, tok, data, resolve_layers(cfg.align.layers, num_layers(model)), teacher)
    return make_job(cfg, tok.pad_token_id, stages, teacher)


def split(outcome, wall: float) -> dict:
    stages = [f["timings"] for f in outcome.finished]
    startup = stages[0]["worker_start_s"]
    load = outcome.workers["load_model_s"]
    inside = load + sum(t["set_adapter_s"] + t["deepspeed_init_s"] + t["train_s"] for t in stages)
    return {
        "wall_s": wall, "startup_s": startup,
        "stages": [{"name": f["result"]["name"], "steps": f["result"]["steps"], **f["timings"]} for f in outcome.finished],
        "load_model_s": load,
        "deepspeed_init_s": sum(t["deepspeed_init_s"] for t in stages),
        "train_s": sum(t["train_s"] for t in stages),
        "other_s": wall - startup - inside,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/train-cpu.json")
    parser.add_argument("--quick", action="store_true", help="1 epoch per stage, 1 worker only")
    args = parser.parse_args()
    import ray

    epochs = 1 if args.quick else 10
    t0 = time.perf_counter()
    ray.init(num_cpus=4, log_to_driver=False, configure_logging=False, runtime_env=RUNTIME_ENV)
    ray_init = time.perf_counter() - t0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1,) if args.quick else (1, 2):
            job = trial_job(workers, epochs, f"{tmp}/cache")
            # warm-up fit: DeepSpeed's first use on a machine JIT-builds its shm comm op (cached afterwards)
            fit(replace(job, stages=job.stages[:1]), f"warmup-{workers}", f"{tmp}/storage")
            start = time.perf_counter()
            one = fit(job, f"one-fit-{workers}", f"{tmp}/storage")
            one_wall = time.perf_counter() - start
            start = time.perf_counter()
            first = fit(replace(job, stages=job.stages[:1]), f"two-fits-a-{workers}", f"{tmp}/storage")
            first_wall = time.perf_counter() - start
            start = time.perf_counter()
            second = fit(replace(job, stages=job.stages[1:], init_adapter=first.adapter, stage_offset=1),
                         f"two-fits-b-{workers}", f"{tmp}/storage")
            second_wall = time.perf_counter() - start
            one_split = split(one, one_wall)
            rows.append({
                "workers": workers, "one_fit": one_split,
                "two_fits": {"wall_s": first_wall + second_wall, "fits": [split(first, first_wall), split(second, second_wall)]},
                "two_fits_over_one_fit": (first_wall + second_wall) / one_wall,
                "overhead_share": 1 - one_split["train_s"] / one_wall,
                "rss_growth_between_stages_mb": one_split["stages"][1]["rss_start_mb"] - one_split["stages"][0]["rss_start_mb"],
            })
            print(f"{workers} worker(s): one fit {one_wall:.1f} s (train {one_split['train_s']:.1f} s, startup "
                  f"{one_split['startup_s']:.1f} s, deepspeed init {one_split['deepspeed_init_s']:.2f} s); two fits "
                  f"{first_wall + second_wall:.1f} s", flush=True)
    ray.shutdown()
    report = {
        "command": "python bench/bench_train.py" + (" --quick" if args.quick else ""),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "setup": f"builtin:testbed, testbed/map2, N=8, ia2->sft, {epochs} epochs per stage, batch 4, ZeRO-2 fp32, "
                 "1 CPU per worker, no periodic checkpoints (stage ends only)",
        "ray_init_s": ray_init,
        "rows": rows,
    }
    write_json_atomic(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
