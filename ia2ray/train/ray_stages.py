"""The Ray Train runner of `ia2ray.core.pipeline.run_pipeline` (`train.num_workers >= 1`).

This process (a trial driver, or `python -m ia2ray.run`) loads no model weights: it reads the
tokenizer and the model's config, builds the training items from the teacher's cached token ids,
and starts one Ray Train run named after the config's `name`. Its workers load the model once,
train every stage on it (a fresh DeepSpeed engine and Adam per stage), then evaluate on their own
device: the validation and test rows, the out-of-domain targets and the ICL baseline, the rows
split over the ranks. Metrics, per-row answers and the adapter come back in the final checkpoint.

A teacher that is not cached yet is captured by a Ray task (`ia2ray.train.capture`), which loads
the model on its own (on a GPU when the cluster has one), unless the run may only read the cache.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from ia2ray.config.schema import RunConfig
from ia2ray.core.fingerprint import content_hash
from ia2ray.core.gguf import SMOLLM2, is_gguf_path
from ia2ray.core.items import StageWork, similarity_work, stage_work, uses_teacher
from ia2ray.core.model import LOADS, load_tokenizer, model_depth, model_dir, resolve_layers
from ia2ray.core.pipeline import RunRequest, RunResult
from ia2ray.core.runeval import EvalPlan
from ia2ray.core.teacher import Teacher, cache_location, cached_teacher_tokens, not_cached
from ia2ray.train.dsconfig import load_preset, zero_stage
from ia2ray.train.launch import fit
from ia2ray.train.worker import ItemRef, StageSpec, TrainJob

log = logging.getLogger(__name__)


def train_storage(cfg: RunConfig) -> str:
    """Where the run's checkpoints go: `train.storage`, else `<output.dir>/train`."""
    if cfg.train.storage:
        return cfg.train.storage
    return str(Path(cfg.output.dir.format(name=cfg.name)).expanduser().resolve() / "train")


def check_train_config(cfg: RunConfig) -> None:
    """Config problems of the distributed path that need files (DeepSpeed JSON): ConfigError early."""
    load_preset(cfg.train.deepspeed)
    zero_stage(cfg.train)


def make_job(cfg: RunConfig, pad_id: int, stages: list[StageWork], teacher: Optional[Teacher],
             tracking: Optional[dict] = None, evals: Optional[EvalPlan] = None) -> TrainJob:
    specs = []
    for work in stages:
        n_train = len(work.train_items)
        refs = lambda items, offset: [  # noqa: E731
            ItemRef(it.query_ids, it.target_ids, offset + i if work.source == "teacher" else None)
            for i, it in enumerate(items)]
        specs.append(StageSpec(work.name, work.objective, work.settings, refs(work.train_items, 0),
                               refs(work.dev_items, n_train)))
    path = model_dir(cfg.model)  # workers run elsewhere (another cwd, maybe another node): no relative paths
    if is_gguf_path(cfg.model.path):  # each node converts (once, cached) into its own $IA2RAY_HOME
        path = cfg.model.path if cfg.model.path == SMOLLM2 else str(Path(cfg.model.path).expanduser().resolve())
    model = cfg.model.model_copy(update={"path": str(Path(path).resolve()) if Path(path).is_dir() else path})
    fingerprint = content_hash({
        # what decides the result; worker count, ZeRO stage and checkpoint cadence may change on resume
        "model": model.model_dump(mode="json"), "lora": cfg.lora.model_dump(mode="json"), "seed": cfg.train.seed,
        "precision": cfg.train.precision, "teacher": teacher.key if teacher else None,
        "stages": [[s.name, s.objective.__dict__, s.settings.__dict__, [r.__dict__ for r in s.train + s.dev]]
                   for s in specs],
        "evals": evals.fingerprint() if evals else None,
    })
    return TrainJob(model=model, lora=cfg.lora, lora_seed=cfg.train.seed, train=cfg.train,
                    deepspeed=load_preset(cfg.train.deepspeed), stages=specs,
                    pad_id=pad_id, fingerprint=fingerprint,
                    teacher_cache=(teacher.cache_root, teacher.key) if teacher else None, tracking=tracking,
                    evals=evals)


def teacher_tokens(req: RunRequest, tokenizer, which: str = "train") -> Teacher:
    """The teacher's token ids from the cache (`which`: the training teacher, or the similarity rows');
    on a miss (unless the run may only read the cache) the teachers are captured first by a Ray task."""
    cfg = req.cfg
    key, teacher = cached_teacher_tokens(cfg, tokenizer, req.data, req.sync, req.fingerprint, which)
    if teacher is None:
        if req.cached_teacher_only:
            raise not_cached(cfg, key, cache_location(cfg))
        from ia2ray.train.capture import capture_remote

        capture_remote([cfg], cfg.train.use_gpu, req.fingerprint)
        key, teacher = cached_teacher_tokens(cfg, tokenizer, req.data, req.sync, req.fingerprint, which)
    return teacher


def run_with_ray(req: RunRequest, tracking: Optional[dict] = None) -> RunResult:
    """The runner: one Ray Train run trains every stage and evaluates. `req.on_log` sees the stage
    histories when the run has finished; with `tracking` (an MLflow run's `RunLog.target()`) rank 0
    logs them to that run as they happen."""
    cfg, data = req.cfg, req.data
    clock = [time.perf_counter()]
    loads = LOADS["cold"]
    tokenizer = load_tokenizer(cfg.model)
    layers = resolve_layers(cfg.align.layers, model_depth(cfg.model))
    clock.append(time.perf_counter())
    stages, teacher = [], None
    if req.evals.trained:
        teacher = teacher_tokens(req, tokenizer) if uses_teacher(cfg.pipeline) else None
        stages = stage_work(cfg, tokenizer, data, layers, teacher)
    evals = req.evals
    if cfg.eval.similarity:  # the workers read the rows' activations from the cache
        evals = replace(evals, similarity=similarity_work(cfg, tokenizer, data, teacher_tokens(req, tokenizer, "val"))[0])
    job = make_job(cfg, tokenizer.pad_token_id, stages, teacher, tracking, evals)
    clock.append(time.perf_counter())
    outcome = fit(job, cfg.name, train_storage(cfg), cfg.train.use_gpu)
    clock.append(time.perf_counter())
    log.info("Ray Train run %s finished in %.1f s; final checkpoint %s", cfg.name, outcome.timings["fit"],
             outcome.checkpoint_dir)
    # stage summaries carry the workers' timings (DeepSpeed init, training), as recorded in the final
    # checkpoint (a rerun of a finished run returns the same)
    results = [({**f["result"], "timings": f.get("timings", {}), "placement": f.get("placement", {})}, f["history"])
               for f in outcome.finished]
    if req.on_log:
        for summary, history in results:
            for h in history:
                req.on_log(summary["name"], h)
    workers = outcome.workers
    driver_loads = LOADS["cold"] - loads
    timings = {k: round(b - a, 3) for k, a, b in zip(("load_s", "prepare_s", "train_stages_s"), clock, clock[1:])}
    timings["eval_s"] = workers.get("eval_s", 0.0)  # inside the workers, part of train_stages_s
    return RunResult(results, outcome.evals, outcome.answers, layers, driver_loads + workers.get("model_loads", 0),
                     driver_loads, workers.get("node_id", ""), timings, tokenizer=tokenizer,
                     adapter_files=outcome.adapter_files, workers=workers)
