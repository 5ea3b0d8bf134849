"""Teacher capture as Ray tasks: the process that asks for it loads no weights.

Each config's teacher is captured (or found in the cache) by a Ray task that loads the model on a
GPU when the cluster has one; several configs run in parallel. A study captures every key it can
need before its trials start; a single Ray Train run (`python -m ia2ray.run` with
`train.num_workers >= 1`) captures its own teacher here on a cache miss.
"""

from __future__ import annotations

import time
from typing import Optional

from ia2ray.config.schema import RunConfig


def _capture_one(cfg_json: dict, fingerprint: Optional[str]) -> dict:
    """Ray task body: load data and model, capture the teacher (or find it cached), and the validation
    rows' teacher of activation similarity when the config measures it."""
    from ia2ray.core.model import load_model, resolve_device
    from ia2ray.core.rundata import prepare_data
    from ia2ray.core.teacher import cache_location, capture_teacher
    from ia2ray.mirror import bucket_sync

    cfg = RunConfig.model_validate(cfg_json)
    start = time.perf_counter()
    data = prepare_data(cfg)
    model, tokenizer = load_model(cfg.model, resolve_device(cfg.train.device))
    sync = bucket_sync(cache_location(cfg))
    teacher = capture_teacher(cfg, model, tokenizer, data, progress=False, sync=sync, fingerprint=fingerprint)
    out = {"key": teacher.key, "computed": not teacher.hit, "seed": cfg.data.seed, "site": cfg.align.site,
           "task": cfg.task.name, "n": cfg.data.n, "prompts": len(teacher.records)}
    if cfg.eval.similarity:  # the validation rows' teacher of activation similarity
        val = capture_teacher(cfg, model, tokenizer, data, progress=False, sync=sync, fingerprint=fingerprint, which="val")
        out |= {"similarity_key": val.key, "similarity_computed": not val.hit, "similarity_prompts": len(val.records)}
    return out | {"seconds": round(time.perf_counter() - start, 2)}


def capture_remote(configs: list[RunConfig], use_gpu: Optional[bool], fingerprint: Optional[str] = None) -> list[dict]:
    """Capture every config's teacher as parallel Ray tasks (on a GPU each when `use_gpu`; None: when
    the cluster has GPUs); one outcome dict per config, in order."""
    if not configs:
        return []
    import ray

    from ia2ray.train.launch import ensure_ray

    ensure_ray()
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0, max_retries=1)(_capture_one)
    return ray.get([task.remote(c.model_dump(mode="json"), fingerprint) for c in configs])
