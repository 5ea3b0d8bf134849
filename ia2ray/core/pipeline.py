"""One IA2 run end to end: data -> checks -> teacher -> stages -> evaluation, wherever the model lives.

`run_pipeline` does what every run shares: the data (`rundata`), the checks that need only the
model's config and tokenizer (`preflight`), the evaluation plan (`runeval`) and the summary. A runner
does the rest where the model is: `run_in_process` below loads the model in this process, captures
or reads the teacher (`teacher`), trains the stages (`items`, `stages`) and evaluates there;
`ia2ray.train.ray_stages.run_with_ray` does the same in Ray Train workers, and this process then
loads no weights at all. Pipelines and their stages: `ia2ray.core.items`.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from ia2ray.config.schema import RunConfig
from ia2ray.core.cache import EntrySync
from ia2ray.core.items import StageWork, similarity_work, stage_work, uses_teacher
from ia2ray.core.model import LOADS, add_lora, load_model, resolve_device, resolve_layers
from ia2ray.core.preflight import preflight
from ia2ray.core.rundata import RunData, prepare_data
from ia2ray.core.runeval import EvalPlan, eval_plan, run_evals
from ia2ray.core.sites import num_layers
from ia2ray.core.stages import train_stage
from ia2ray.core.teacher import Teacher, capture_teacher
from ia2ray.data.tasks import TaskSpec
from ia2ray.fileio import atomic_dir


@dataclass
class RunRequest:
    """What a runner gets: the config, its data and what to evaluate, and how to find the teacher."""

    cfg: RunConfig
    data: RunData
    evals: EvalPlan  # `evals.trained` False: no stages, only the ICL baseline
    progress: bool = True
    on_log: Optional[Callable[[str, dict], None]] = None  # (stage, history entry)
    cached_teacher_only: bool = False  # a study trial: the teacher must already be in the cache
    keep_model: bool = False  # keep the base model loaded in this process for the next run
    sync: Optional[EntrySync] = None  # the teacher cache's bucket sync (`ia2ray.mirror.bucket_sync`)
    fingerprint: Optional[str] = None  # the model's (`teacher.model_fingerprint`), when already known


@dataclass
class RunResult:
    """What a runner returns."""

    stages: list[tuple[dict, list[dict]]]  # per stage: (StageResult summary, history)
    metrics: dict  # per evaluated key ("val", "test", "ood/<name>"), and "icl" per key
    answers: dict  # per evaluated key: each row's prediction and correctness
    aligned_layers: list[int]
    model_loads: int  # weight loads for this run, all processes together (0: a warm run)
    driver_model_loads: int  # of those, in the process that called run_pipeline
    eval_node: str  # where evaluation ran: a Ray node id, or the host name outside Ray
    timings: dict
    model: object = None  # in process: the peft model holding the trained adapter
    tokenizer: object = None
    adapter_files: dict = field(default_factory=dict)  # Ray Train: the adapter folder (name -> bytes)
    workers: dict = field(default_factory=dict)  # Ray Train: what rank 0 measured (loads, timings, node)


Runner = Callable[[RunRequest], RunResult]


@dataclass
class RunOutcome:
    summary: dict  # JSON-ready: val/test metrics, ICL baseline, stage results
    history: list[dict]  # per stage and step: {"stage", "step", "train_loss" | "dev_loss"}
    answers: dict  # per evaluated key: each row's prediction
    model: object = None  # the peft model holding the trained adapter (in-process runs only)
    tokenizer: object = None
    adapter_files: dict = field(default_factory=dict)

    def save_adapter(self, path) -> None:
        """Write the trained adapter as a peft folder, atomically."""
        with atomic_dir(path) as tmp:
            if self.model is not None:
                self.model.save_pretrained(tmp)
                return
            for name, data in self.adapter_files.items():
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / name).write_bytes(data)


def node_name() -> str:
    """This process's Ray node id, or the host name outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return socket.gethostname()


def train_in_process(cfg: RunConfig, model, tokenizer, stages: list[StageWork], teacher: Optional[Teacher],
                     on_log=None):
    """The single-process stage trainer (no Ray, no DeepSpeed): one adapter, one Adam per stage.
    Returns (the peft model holding the final adapter, [(StageResult summary, history)] per stage)."""
    device = resolve_device(cfg.train.device)
    model = add_lora(model, cfg.lora, seed=cfg.train.seed)
    results = []
    for work in stages:
        result = train_stage(model, work.name, work.train_items, work.dev_items, work.objective, work.settings,
                             tokenizer.pad_token_id, device, on_log)
        results.append((result.summary(), result.history))
    return model, results


def run_in_process(req: RunRequest) -> RunResult:
    """The runner that keeps everything in this process (no Ray): load the model (or reuse the one kept
    from the last run), capture or read the teacher, train, evaluate."""
    cfg, data = req.cfg, req.data
    clock = [time.perf_counter()]
    device = resolve_device(cfg.train.device)
    loads = LOADS["cold"]
    model, tokenizer = load_model(cfg.model, device, keep=req.keep_model)
    loads = LOADS["cold"] - loads
    clock.append(time.perf_counter())
    layers = resolve_layers(cfg.align.layers, num_layers(model))
    teacher, stages, results = None, [], []
    capture = dict(cached_only=req.cached_teacher_only, sync=req.sync, fingerprint=req.fingerprint)
    if req.evals.trained:  # an ICL-only run has no stages
        if uses_teacher(cfg.pipeline):
            teacher = capture_teacher(cfg, model, tokenizer, data, req.progress, **capture)
        stages = stage_work(cfg, tokenizer, data, layers, teacher)
    evals, sim_items = req.evals, None
    if cfg.eval.similarity:  # the validation rows' teacher, from the base model before any adapter
        ref, sim_items = similarity_work(cfg, tokenizer, data, capture_teacher(cfg, model, tokenizer, data, req.progress,
                                                                               which="val", **capture))
        evals = replace(evals, similarity=ref)
    clock.append(time.perf_counter())
    if stages:
        model, results = train_in_process(cfg, model, tokenizer, stages, teacher, req.on_log)
    clock.append(time.perf_counter())
    metrics, answers = run_evals(model, tokenizer, evals, device, sim_items=sim_items)
    clock.append(time.perf_counter())
    # seconds: model load, teacher + items, stage training, evaluation (with the ICL baseline and similarity)
    timings = {k: round(b - a, 3) for k, a, b in zip(("load_s", "prepare_s", "train_stages_s", "eval_s"),
                                                    clock, clock[1:])}
    return RunResult(results, metrics, answers, layers, loads, loads, node_name(), timings, model=model,
                     tokenizer=tokenizer)


def run_pipeline(cfg: RunConfig, *, data: Optional[RunData] = None, progress: bool = True,
                 on_log: Optional[Callable[[str, dict], None]] = None, runner: Runner = run_in_process,
                 splits: tuple[str, ...] = ("val", "test"), cached_teacher_only: bool = False,
                 keep_model: bool = False, sync: Optional[EntrySync] = None, fingerprint: Optional[str] = None,
                 icl_only: bool = False) -> RunOutcome:
    """Run `cfg` end to end; returns the summary (metrics on `splits`, the ICL baseline when
    `eval.icl_baseline`, stage histories). `runner` says where the model lives (`run_in_process`, or
    `ia2ray.train.ray_stages.run_with_ray`). `cached_teacher_only`: the teacher must already be in the
    cache (study trials). `keep_model`: the base model stays loaded in this process for the next run.
    `icl_only`: no training, only the ICL baseline (its metrics are the summary's splits)."""
    start = time.perf_counter()
    data = data or prepare_data(cfg)
    preflight(cfg, data)
    evals = eval_plan(cfg, data, splits, trained=not icl_only)
    if icl_only and not evals.icl_draws:
        raise ValueError("an ICL-only run needs eval.icl_baseline: true")
    setup = time.perf_counter() - start
    result = runner(RunRequest(cfg, data, evals, progress, on_log, cached_teacher_only, keep_model, sync, fingerprint))
    pipeline = "icl" if icl_only else cfg.pipeline
    summary = summary_head(cfg, data.spec, pipeline) | {
        "aligned_layers": result.aligned_layers, "model_loads": result.model_loads,
        "driver_model_loads": result.driver_model_loads, "eval_node": result.eval_node}
    if icl_only:
        summary |= result.metrics["icl"]
    else:
        if "icl" in result.metrics:
            summary["icl"] = result.metrics["icl"]
        summary["stages"] = [r for r, _ in result.stages]
        summary |= {key: result.metrics[key] for key, _, _ in evals.sets}
    summary["timings"] = {"setup_s": round(setup, 3), **result.timings}
    if "sim" in result.metrics:  # its seconds (measured where the model is) go with the other timings
        summary["sim"] = {k: v for k, v in result.metrics["sim"].items() if k != "seconds"}
        summary["timings"]["sim_s"] = result.metrics["sim"]["seconds"]
    if result.workers:
        summary["workers"] = result.workers
    history = [{"stage": r["name"], **h} for r, hist in result.stages for h in hist]
    return RunOutcome(summary, history, result.answers, result.model, result.tokenizer, result.adapter_files)


def run_icl(cfg: RunConfig, **kwargs) -> dict:
    """Only the ICL baseline (no training): a summary shaped like run_pipeline's, metrics per split."""
    return run_pipeline(cfg, icl_only=True, **kwargs).summary


def summary_head(cfg: RunConfig, spec: TaskSpec, pipeline: str) -> dict:
    """The fields that identify a run in its summary."""
    return {"name": cfg.name, "pipeline": pipeline, "task": spec.name, "n": cfg.data.n, "seed": cfg.data.seed,
            "ece_scheme": cfg.eval.ece_scheme}
