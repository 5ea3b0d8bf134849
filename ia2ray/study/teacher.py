"""Teacher capture before the trials: once per (model, task, N, seed, site) key, into the study's cache.

Each needed key is captured by a Ray task (on a GPU when the cluster has one), all keys in parallel.
Trials then run with `cached_teacher_only`, so a trial never runs the teacher itself: a study of any
number of trials runs the teacher exactly once per key. Every capture is appended to
`<study>/teacher.jsonl`, saying whether it was computed or found in the cache.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

from ia2ray.config.schema import RunConfig, StudyFile
from ia2ray.core.items import uses_teacher
from ia2ray.study.space import apply_params

log = logging.getLogger(__name__)


def needs_teacher(study: StudyFile, base: RunConfig) -> bool:
    pipelines = {base.pipeline}
    param = study.search.params.get("pipeline")
    if param is not None and param.values:
        pipelines.update(param.values)
    pipelines.update(b for b in study.study.confirm.baselines if b != "icl")
    return any(uses_teacher(p) for p in pipelines)


def teacher_variants(base: RunConfig, study: StudyFile) -> list[RunConfig]:
    """One config per teacher key the study can need: every seed of the search and the confirmation,
    every activation site in the space (each capture also takes the similarity rows' teacher when
    `eval.similarity` is on)."""
    if not needs_teacher(study, base) and not base.eval.similarity:  # similarity needs the validation rows' teacher
        return []
    sites = {base.align.site}
    param = study.search.params.get("align.site")
    if param is not None and param.values:
        sites.update(param.values)
    seeds = dict.fromkeys([*study.study.search_seeds, *(study.study.confirm.seeds if study.study.confirm.top_k or
                                                        study.study.confirm.baselines else [])])
    return [apply_params(base, {}, **{"data.seed": seed, "align.site": site, "task.ood": {}})  # OOD rows: not needed
            for seed in seeds for site in sorted(sites)]


def capture_all(variants: list[RunConfig], study_dir: Path, use_gpu: bool, fingerprint: Optional[str] = None) -> list[dict]:
    """Capture every variant's teacher as parallel Ray tasks (`fingerprint`: the model's, computed once
    by the study); append each outcome to teacher.jsonl."""
    from ia2ray.train.capture import capture_remote

    outcomes = capture_remote(variants, use_gpu, fingerprint)
    if not outcomes:
        return []
    with open(study_dir / "teacher.jsonl", "a") as fh:
        for o in outcomes:
            log.info("teacher capture %s: key %s (seed %d, site %s, %d prompts, %.1f s)",
                     "computed" if o["computed"] else "cache hit", o["key"], o["seed"], o["site"], o["prompts"],
                     o["seconds"])
            fh.write(json.dumps({**o, "time": time.time()}) + "\n")
    return outcomes
