"""The teacher of a run: its cache key, its capture, and its records read back from the cache.

The key names everything the teacher's output depends on: the model's weights (by content for a
local folder, by commit for a hub id), its dtype, the tokenizer, the task format, the ICL prompts,
the decoding budget and stop strings, the activation site and the storage dtype. It is computed
without loading weights: a study computes the model fingerprint once and passes it down, and a Ray
Train trial driver reads only the token ids of a cached entry (its workers read the activations).

A cache in a bucket is reached through an `EntrySync` (`ia2ray.mirror.bucket_sync`); core itself only
reads and writes this node's folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ia2ray.config.schema import RunConfig
from ia2ray.core.cache import ActivationCache, EntrySync
from ia2ray.core.capture import capture_icl_activations
from ia2ray.core.fingerprint import content_hash, fingerprint_model, fingerprint_tokenizer
from ia2ray.core.generate import Generated
from ia2ray.core.model import model_config, model_dir
from ia2ray.core.rundata import RunData
from ia2ray.data.splits import dev_prompts, held_out_prompts, training_prompts
from ia2ray.fileio import ia2ray_home

log = logging.getLogger(__name__)


@dataclass
class Teacher:
    """Teacher records for the train then dev examples, and the cache entry that holds them. Records
    carry activations when read in the process that trains; a Ray Train driver reads token ids only."""

    records: list[Generated]
    cache_root: str  # the cache folder, or its bucket URI
    key: str
    hit: bool = True  # found in the cache (False: the teacher ran for this run)


class TeacherNotCachedError(RuntimeError):
    """A run that may only read teacher activations (a study trial) found none in the cache."""


def cache_location(cfg: RunConfig) -> str:
    """`capture.cache_dir` (a folder or a bucket URI), else `$IA2RAY_HOME/activations`."""
    return cfg.capture.cache_dir or str(ia2ray_home() / "activations")


def is_bucket(location: str) -> bool:
    return "://" in location


def local_root(location: str, sync: Optional[EntrySync]) -> Path:
    """This node's folder of the cache at `location` (for a bucket: the sync's local copy)."""
    if not is_bucket(location):
        return Path(location).expanduser()
    if sync is None:
        raise ValueError(f"capture.cache_dir={location!r} is a bucket URI; reading it needs a sync "
                         "(ia2ray.mirror.bucket_sync)")
    return sync.root()


def open_entry(location: str, key: str, sync: Optional[EntrySync]) -> ActivationCache:
    """The cache at `location` as this node sees it, with the entry `key` fetched from the bucket first
    when the cache lives there and this node has no copy yet (the entry may still be missing)."""
    if sync is not None:
        sync.fetch(key)
    return ActivationCache(local_root(location, sync))


def shared_root(location: str, sync: Optional[EntrySync]) -> str:
    """How other processes and nodes name the cache: the bucket URI, or the absolute folder."""
    return location if is_bucket(location) else str(local_root(location, sync).resolve())


def teacher_prompts(cfg: RunConfig, data: RunData) -> list[str]:
    """The ICL prompts of the train then dev examples."""
    return (training_prompts(data.spec, data.splits, cfg.data.seed)
            + dev_prompts(data.spec, data.splits, cfg.data.seed))


def similarity_rows(cfg: RunConfig, data: RunData) -> list:
    """The validation rows activation similarity is measured on (`eval.similarity_rows` first ones)."""
    return data.splits.val[: cfg.eval.similarity_rows or len(data.splits.val)]


def similarity_prompts(cfg: RunConfig, data: RunData) -> list[str]:
    """The teacher's prompts for activation similarity: each similarity row's query after N-1 of the
    training examples as demos (drawn like the dev prompts', with their own seed)."""
    return held_out_prompts(data.spec, data.splits, similarity_rows(cfg, data), cfg.data.seed, "val-demos")


PROMPTS = {"train": teacher_prompts, "val": similarity_prompts}  # which teacher -> its prompts


def model_fingerprint(cfg: RunConfig) -> str:
    """The model weights' identity: a local folder by content (hashed once per process), a hub id by the
    commit its config was loaded from."""
    commit = getattr(model_config(cfg.model), "_commit_hash", None)
    return fingerprint_model(model_dir(cfg.model), commit or cfg.model.revision)


def teacher_key(cfg: RunConfig, tokenizer, data: RunData, fingerprint: Optional[str] = None,
                prompts: Optional[list[str]] = None, which: str = "train") -> str:
    """The cache key of the run's teacher (`fingerprint`: `model_fingerprint(cfg)`, when known;
    `prompts`: `PROMPTS[which](cfg, data)`, when already built; `which`: the training teacher, or the
    validation rows' teacher of activation similarity)."""
    spec = data.spec
    return ActivationCache.key_of(
        model=fingerprint or model_fingerprint(cfg),
        model_dtype=cfg.model.dtype,
        tokenizer=fingerprint_tokenizer(tokenizer),
        task=spec.model_dump(mode="json"),
        prompts=content_hash(prompts if prompts is not None else PROMPTS[which](cfg, data)),
        max_new_tokens=cfg.align.max_new_tokens or spec.max_new_tokens,
        stop=list(spec.stop_strings),
        site=cfg.align.site,
        dtype=cfg.capture.dtype,
        top_k=cfg.capture.kd_top_k,
    )


def capture_teacher(cfg: RunConfig, model, tokenizer, data: RunData, progress: bool = True,
                    cached_only: bool = False, sync: Optional[EntrySync] = None,
                    fingerprint: Optional[str] = None, which: str = "train") -> Teacher:
    """Teacher tokens + activations (all layers) + top-k log-probabilities, via the cache: for the train
    then dev examples (`which="train"`), or for the similarity rows (`"val"`). With `cached_only`, a
    cache miss raises TeacherNotCachedError instead of running the teacher."""
    spec = data.spec
    location = cache_location(cfg)
    prompts = PROMPTS[which](cfg, data)
    key = teacher_key(cfg, tokenizer, data, fingerprint, prompts)
    meta = {"dtype": cfg.capture.dtype, "site": cfg.align.site, "task": spec.name, "n_prompts": len(prompts)}

    def compute():
        if cached_only:
            raise not_cached(cfg, key, location)
        return capture_icl_activations(model, tokenizer, prompts, cfg.align.max_new_tokens or spec.max_new_tokens,
                                       site=cfg.align.site, batch_size=cfg.capture.batch_size,
                                       stop_strings=spec.stop_strings, progress=progress, top_k=cfg.capture.kd_top_k)

    cache = open_entry(location, key, sync)
    records, hit = cache.get_or_compute(key, compute, meta)
    if not hit and sync is not None:
        sync.publish(key)
    log.info("teacher capture %s: key %s (%d prompts)", "cache hit" if hit else "computed", key, len(prompts))
    return Teacher(records, shared_root(location, sync), key, hit)


def cached_teacher_tokens(cfg: RunConfig, tokenizer, data: RunData, sync: Optional[EntrySync] = None,
                          fingerprint: Optional[str] = None, which: str = "train") -> tuple[str, Optional[Teacher]]:
    """(key, the cached teacher's generated tokens without its activations): what a Ray Train driver
    needs to build training items. The teacher is None when the entry is not in the cache."""
    location = cache_location(cfg)
    key = teacher_key(cfg, tokenizer, data, fingerprint, which=which)
    cache = open_entry(location, key, sync)
    if not cache.has(key):
        return key, None
    return key, Teacher(cache.load_tokens(key), shared_root(location, sync), key, True)


def not_cached(cfg: RunConfig, key: str, location: str) -> TeacherNotCachedError:
    return TeacherNotCachedError(f"teacher activations {key} are not in the cache {location} (task "
                                 f"{cfg.task.name}, N={cfg.data.n}, seed {cfg.data.seed}, site {cfg.align.site})")
