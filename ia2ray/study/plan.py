"""Resources of one trial and how many trials run at once, from the config and the cluster.

A trial is a Tune function trainable (the trial driver) plus, when `train.num_workers >= 1`, the Ray
Train workers its `fit()` starts. Tune only knows the driver's resources, so the driver asks for what
it uses: `study.driver_cpus` (0 by default) and `DRIVER_BYTES` of memory (it loads no weights: the
workers load the model, train and evaluate), and concurrency is capped so that every running trial's
Train workers fit on the cluster too. With `train.num_workers: 0` the trial trains in its own process:
it asks for `train.cpus_per_worker` CPUs (and a GPU) and the memory it holds (`study.trial_memory_gb`,
else the weights in `model.dtype` plus `RUNTIME_BYTES`), and keeps the model loaded for its actor's
next trial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from ia2ray.config.schema import RunConfig, StudyFile

RUNTIME_BYTES = 2**30  # an in-process trial's Python, torch, tokenizer, data and activations, beside the weights
# A Ray Train trial driver: Python, Ray, torch, transformers, the tokenizer, the data and the training
# items (no weights, no activations). bench/bench_trials.py measured a peak of 606 MB for such a driver
# (it also started a Ray cluster); 768 MiB leaves a margin for bigger tokenizers and datasets.
DRIVER_BYTES = 768 * 2**20


@dataclass
class TrialPlan:
    driver: dict  # resources of the trial driver process (what Tune reserves)
    worker: dict  # resources of one Ray Train worker ({} when the trial trains in-process)
    num_workers: int
    use_gpu: bool
    concurrency: int
    limits: list[str] = field(default_factory=list)  # why concurrency is what it is

    @property
    def per_trial(self) -> dict:
        total = dict(self.driver)
        for key, value in self.worker.items():
            total[key] = total.get(key, 0) + value * self.num_workers
        return total

    def pg_factory(self):
        """Tune's resource request for a trial driver (its zero amounts left out: a driver of Train
        workers takes no CPU from them)."""
        from ray import tune

        return tune.PlacementGroupFactory([{k: v for k, v in self.driver.items() if v > 0}])

    def describe(self) -> list[str]:
        fmt = lambda d: ", ".join(f"{k}={_amount(k, v)}" for k, v in d.items() if v) or "nothing"  # noqa: E731
        basic = lambda d: ", ".join(f"{k} {_amount(k, d.get(k, 0))}" for k in ("CPU", "GPU", "memory"))  # noqa: E731
        lines = [f"trial driver: {basic(self.driver)}" + "".join(f", {k} {v:g}" for k, v in self.driver.items()
                                                                 if k not in ("CPU", "GPU", "memory"))]
        if self.num_workers:
            lines.append(f"Ray Train workers: {self.num_workers} x ({fmt(self.worker)})")
        else:
            lines.append("training: inside the trial driver (train.num_workers = 0)")
        lines.append(f"per trial: {basic(self.per_trial)}" + "".join(f", {k} {v:g}" for k, v in self.per_trial.items()
                                                                  if k not in ("CPU", "GPU", "memory")))
        lines.append(f"concurrent trials: {self.concurrency} ({'; '.join(self.limits)})")
        return lines


def _amount(key: str, value: float) -> str:
    return f"{value / 2**30:.2f} GiB" if key == "memory" else f"{value:g}"


def trial_memory(study: StudyFile, model_bytes: Optional[int]) -> dict:
    """The driver's memory request in bytes (`{}` when neither the study nor the weights say)."""
    if study.study.trial_memory_gb is not None:
        return {"memory": float(round(study.study.trial_memory_gb * 2**30))}
    return {"memory": float(model_bytes + RUNTIME_BYTES)} if model_bytes else {}


def driver_memory(study: StudyFile) -> dict:
    """A Ray Train trial driver's memory request in bytes: `study.trial_memory_gb`, else `DRIVER_BYTES`,
    except with `study.driver_resources`: on a cluster whose driver nodes carry a custom resource, its
    count per node bounds the drivers there (the node type is sized for them), and an autoscaler cannot
    launch a node for a memory request when the node type does not declare memory (Google Cloud's
    launcher does not fill it in; Ray's fake multi-node provider cannot declare it)."""
    gb = study.study.trial_memory_gb
    if gb is not None:
        return {"memory": float(round(gb * 2**30))}
    return {} if study.study.driver_resources else {"memory": float(DRIVER_BYTES)}


def plan_trials(study: StudyFile, base: RunConfig, cluster: dict[str, float],
                model_bytes: Optional[int] = None) -> TrialPlan:
    """`cluster`: total resources (`ray.cluster_resources()`, or this machine's for --dry-run);
    `model_bytes`: the model's weights as loaded (`ia2ray.core.model.weight_bytes`)."""
    t, s = base.train, study.study
    use_gpu = t.use_gpu if t.use_gpu is not None else cluster.get("GPU", 0) > 0
    gpu = {"GPU": 1.0} if use_gpu else {}
    if t.num_workers == 0:
        memory = trial_memory(study, model_bytes)
        driver = {"CPU": max(t.cpus_per_worker, s.driver_cpus), **gpu, **memory, **s.driver_resources}
        worker: dict = {}
    else:
        driver = {"CPU": s.driver_cpus, **driver_memory(study), **s.driver_resources}
        worker = {"CPU": t.cpus_per_worker, **gpu, **t.worker_resources}
    plan = TrialPlan(driver, worker, t.num_workers, use_gpu, 1)
    limits = [f"study.num_trials = {s.num_trials}"]
    fits = s.num_trials
    for key, need in plan.per_trial.items():
        if need > 0:
            have = cluster.get(key, 0)
            n = math.floor(have / need + 1e-9)
            limits.append(f"{_amount(key, have)} {key} / {_amount(key, need)} per trial = {n}")
            fits = min(fits, n)
    if s.max_concurrent:
        limits = [f"study.max_concurrent = {s.max_concurrent}"]
        fits = min(s.max_concurrent, s.num_trials)
    plan.concurrency = max(1, fits)
    plan.limits = limits
    return plan
