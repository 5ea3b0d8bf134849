"""The Ray Train stage trainer for `ia2ray.core.pipeline.run_pipeline` (`train.num_workers >= 1`).

The driver keeps what it already does in one process (data, teacher capture into the cache, ICL
baseline, final evaluation); the stages run as one Ray Train run named after the config's `name`,
whose workers read teacher activations from the cache entry. The driver then loads the trained
adapter into its own model for evaluation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from ia2ray.config.schema import RunConfig
from ia2ray.core.fingerprint import content_hash
from ia2ray.core.gguf import SMOLLM2, is_gguf_path
from ia2ray.core.model import add_lora, load_trainable_state, model_dir
from ia2ray.core.pipeline import StageWork, Teacher
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
             tracking: Optional[dict] = None) -> TrainJob:
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
    })
    return TrainJob(model=model, lora=cfg.lora, lora_seed=cfg.train.seed, train=cfg.train,
                    deepspeed=load_preset(cfg.train.deepspeed), stages=specs,
                    pad_id=pad_id, fingerprint=fingerprint,
                    teacher_cache=(teacher.cache_root, teacher.key) if teacher else None, tracking=tracking)


def train_with_ray(cfg: RunConfig, model, tokenizer, stages: list[StageWork], teacher: Optional[Teacher], on_log=None,
                   tracking: Optional[dict] = None):
    """Stage trainer: one Ray Train run for all stages; returns the driver's model with the adapter.
    `on_log` sees the stage histories when the run has finished; with `tracking` (an MLflow run's
    `RunLog.target()`) rank 0 logs them to that run as they happen."""
    job = make_job(cfg, tokenizer.pad_token_id, stages, teacher, tracking)
    outcome = fit(job, cfg.name, train_storage(cfg), cfg.train.use_gpu)
    log.info("Ray Train run %s finished in %.1f s; final checkpoint %s", cfg.name, outcome.timings["fit"],
             outcome.checkpoint_dir)
    model = add_lora(model, cfg.lora, seed=cfg.train.seed)
    load_trainable_state(model, outcome.adapter)
    # stage summaries carry the workers' timings (model load, DeepSpeed init, training), as recorded
    # in the final checkpoint (a rerun of a finished run returns the same)
    results = [({**f["result"], "timings": f.get("timings", {}), "placement": f.get("placement", {})}, f["history"])
               for f in outcome.finished]
    if on_log:
        for summary, history in results:
            for h in history:
                on_log(summary["name"], h)
    return model, results
