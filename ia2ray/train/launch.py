"""Launch the stages of a pipeline as one Ray Train run (`TorchTrainer`, gloo on CPU, NCCL on GPU).

One `fit()` runs all stages of a trial: in `bench/bench_train.py` one fit per stage (new worker group,
imports, process group each time) took 1.8-2.1x the wall time of one fit for both stages, and the
worker loop builds a fresh model and engine per stage and destroys the old engine, so nothing but the
adapter carries over between stages. The run is named by the caller (deterministically, no
timestamps): a run restarted with the same name and storage resumes from its last complete
checkpoint.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ia2ray.core.stages import NonFiniteLossError, StageOutOfMemoryError
from ia2ray.train import checkpoint as ckpt
from ia2ray.train.entry import train_loop
from ia2ray.train.worker import TrainJob

log = logging.getLogger(__name__)

RAISED_AS_IS = (NonFiniteLossError, StageOutOfMemoryError, ckpt.CheckpointError)


class StageRunError(RuntimeError):
    """A distributed stage run failed; the message carries the workers' errors."""


@dataclass
class FitOutcome:
    adapter: Optional[dict]  # best adapter of the last stage (full fp32, by parameter name); None: no stages
    finished: list[dict]  # per stage: {"result": StageResult summary, "history": [...], "timings": {...}}
    checkpoint_dir: str  # final checkpoint (holds adapter/ as a peft directory)
    timings: dict  # seconds: "fit" (wall of trainer.fit)
    evals: dict = field(default_factory=dict)  # the workers' evaluation: metrics per key, "icl" per key
    answers: dict = field(default_factory=dict)  # per evaluated key: each row's prediction
    workers: dict = field(default_factory=dict)  # rank 0: node, model loads, load and eval seconds, memory
    adapter_files: dict = field(default_factory=dict)  # the final checkpoint's adapter/ (name -> bytes)


def _outcome(state: dict, directory: Path, checkpoint: str, timings: dict) -> FitOutcome:
    folder = directory / "adapter"
    files = {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}
    return FitOutcome(state["adapter"], state["finished"], checkpoint, timings, state["evals"], state["answers"],
                      state["workers"], files)


# Job-wide environment for Ray's processes: the Train controller polls its workers every 0.1 s instead
# of 2 s, so reports and a finished run are noticed sooner (bench/bench_train.py: 2 s -> 0.5 s took
# about 5 s off each fit(); bench/bench_trials.py: 0.5 s -> 0.1 s about 2 s more).
RUNTIME_ENV = {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}}


def ensure_ray(num_cpus: Optional[float] = None) -> None:
    """Connect to the cluster in RAY_ADDRESS, or start a local one (num_cpus: its logical CPUs)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True, runtime_env=RUNTIME_ENV)
    else:
        ray.init(num_cpus=num_cpus, log_to_driver=True, runtime_env=RUNTIME_ENV)


def pin_train_helpers() -> None:
    """Create Ray Train's detached autoscaling-coordinator actor on this (the study driver's) node.

    Ray Train 2.60 creates it, detached and pinned, on the node of the first Train controller, which
    sits beside the first trial driver: on an autoscaling cluster that node then never becomes idle
    and is never scaled down (seen with the fake multi-node provider). Created first from the study
    driver, it lives on the head instead; Train finds it by name. Best effort: the helper is private."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
    except ImportError:  # another Ray version: nothing to pin
        return
    try:
        get_or_create_autoscaling_coordinator()
    except Exception as exc:  # noqa: BLE001 - a private API: the study runs without the pin
        log.warning("could not create Ray Train's autoscaling coordinator on this node (%s); an autoscaler may "
                    "keep the first trial's node up", exc)


def local_run_dir(storage: str, name: str) -> Optional[str]:
    """The run folder when storage is a local path (workers scan it for checkpoints Ray did not
    register); None for remote storage, where only Ray's registered checkpoints are used."""
    return None if "://" in storage else str(Path(storage) / name)


def fit(job: TrainJob, name: str, storage: str, use_gpu: Optional[bool] = None, callbacks: Sequence = ()) -> FitOutcome:
    """Run `job`'s stages on `job.train.num_workers` Ray Train workers; resume if `name` has checkpoints.

    Workers report `{"stage", "step", "best_dev_loss"}` (plus `train_loss` and `dev_loss` where the
    step has them, `stage_done` at stage ends) with every checkpoint, and at every
    `train.report_every`-th dev check, to Ray Train `callbacks`, e.g. Tune's `TuneReportCallback`."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    ensure_ray()
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    storage = storage if "://" in storage else str(Path(storage).expanduser().resolve())
    run_dir = local_run_dir(storage, name)
    latest = ckpt.latest_complete(Path(run_dir)) if run_dir else None
    if latest is not None:
        state = ckpt.read_state(latest, job.fingerprint)
        if state["done"]:  # a finished run: its final checkpoint is the result, no workers needed
            log.info("run %s already finished; using %s", name, latest)
            return _outcome(state, latest, str(latest), {"fit": 0.0})
    cfg = job.train
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {}), **cfg.worker_resources}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": pickle.dumps(job), "use_gpu": use_gpu, "run_dir": run_dir, "launched": time.time()},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures), callbacks=list(callbacks),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    start = time.perf_counter()
    try:
        result = trainer.fit()
    except (ray.train.TrainingFailedError, ray.exceptions.RayError) as exc:
        raise _worker_error(exc, name) from None
    elapsed = time.perf_counter() - start
    if result.checkpoint is None:
        raise StageRunError(f"Ray Train run {name} ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = ckpt.read_state(Path(d), job.fingerprint)
        if not state["done"]:
            raise StageRunError(f"Ray Train run {name} ended before its evaluation finished ({result.checkpoint.path})")
        return _outcome(state, Path(d), result.checkpoint.path, {"fit": elapsed})


def _worker_error(exc: Exception, name: str) -> Exception:
    """Our own worker errors (NaN loss, OOM, checkpoint problems) come back as themselves."""
    failures = getattr(exc, "worker_failures", None) or {}
    for rank, err in sorted(failures.items()):
        chain = [err, getattr(err, "cause", None), err.__cause__]
        for e in chain:
            if isinstance(e, RAISED_AS_IS):
                return type(e)(f"{e} (Ray Train run {name}, worker rank {rank})")
    messages = "\n".join(f"rank {r}: {type(e).__name__}: {e}" for r, e in sorted(failures.items()))
    if not messages:  # e.g. the Train controller died: keep the line that names the cause
        causes = [line.strip() for line in str(exc).splitlines() if re.match(r"\s*[\w.]+(Error|Exception): ", line)]
        messages = causes[-1] if causes else str(exc)
    for cls in RAISED_AS_IS:  # errors that crossed process boundaries only as text
        if cls.__name__ in messages:
            return cls(f"Ray Train run {name} failed:\n{messages}")
    return StageRunError(f"Ray Train run {name} failed:\n{messages}")
