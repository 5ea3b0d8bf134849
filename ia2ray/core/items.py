"""The stages of a pipeline and their training items.

Pipelines (paper name -> ours):
  SFT only -> `sft`; IA2 only -> `ia2`; IA2 -> SFT -> `ia2->sft` (same adapter, fresh Adam);
  IA2 + SFT (joint) -> `ia2+sft`; SFT on ICL responses -> `sft-icl`; soft-label KD on the ICL output
  distribution -> `kd`; SFT -> IA2 -> `sft->ia2` (same adapter, fresh Adam).

An item is a query without demos and its target tokens: the gold answer, or the teacher's response
(with the teacher's activations where the process trains; token ids only in a Ray Train driver,
whose workers read the activations from the cache by record index).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ia2ray.config.schema import RunConfig
from ia2ray.core.batches import TrainItem
from ia2ray.core.generate import Generated, continuation_ids
from ia2ray.core.objective import StageObjective
from ia2ray.core.rundata import RunData
from ia2ray.core.similarity import SimilarityRef
from ia2ray.core.stages import StageSettings
from ia2ray.core.teacher import Teacher, similarity_rows
from ia2ray.data.examples import Example, format_answer, format_query
from ia2ray.data.tasks import TaskSpec

# pipeline -> stages as (stage name, objective kind, response source, lr key)
PIPELINE_STAGES = {
    "sft": [("sft", "sft", "gold", "sft")],
    "ia2": [("align", "align", "teacher", "align")],
    "ia2->sft": [("align", "align", "teacher", "align"), ("sft", "sft", "gold", "sft")],
    "ia2+sft": [("joint", "joint", "teacher", "align")],
    "sft-icl": [("sft", "sft", "teacher", "sft")],
    "kd": [("kd", "kd", "teacher", "sft")],
    "sft->ia2": [("sft", "sft", "gold", "sft"), ("align", "align", "teacher", "align")],
}


def uses_teacher(pipeline: str) -> bool:
    """Whether any stage of `pipeline` trains on the teacher's responses or activations."""
    return any(src == "teacher" for _, _, src, _ in PIPELINE_STAGES[pipeline])


def uses_key(pipeline: str, key: str) -> bool:
    """Whether the dotted config `key` can change a run of `pipeline`: `lr.<x>` only where a stage
    trains at that rate, `loss.ce_weight` only in a joint stage, other `align.*` / `loss.*` keys only
    where a stage aligns activations; keys of every other section always."""
    kinds = {kind for _, kind, _, _ in PIPELINE_STAGES[pipeline]}
    if key.startswith("lr."):
        return any(lr == key[len("lr."):] for *_, lr in PIPELINE_STAGES[pipeline])
    if key == "loss.ce_weight":
        return "joint" in kinds
    if key.startswith(("align.", "loss.")):
        return bool(kinds & {"align", "joint"})
    return True


def answer_ids(tokenizer, spec: TaskSpec, ex: Example) -> list[int]:
    """Gold answer tokens as they follow the query (EOS appended for free-text answers, as in the paper)."""
    ids = continuation_ids(tokenizer, format_query(spec, ex), format_answer(spec, ex))
    if spec.answer_type == "text" and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def stage_items(tokenizer, spec: TaskSpec, examples: list[Example], source: str,
                teacher: Optional[list[Generated]]) -> list[TrainItem]:
    """Training items: each query (no demos) with the gold answer or the teacher's response."""
    items = []
    for i, ex in enumerate(examples):
        query = tokenizer(format_query(spec, ex))["input_ids"]
        if source == "gold":
            items.append(TrainItem(query, answer_ids(tokenizer, spec, ex)))
        else:
            rec = teacher[i]
            items.append(TrainItem(query, rec.token_ids.tolist(), rec.activations, rec.top_ids, rec.top_logp))
    return items


@dataclass
class StageWork:
    """One stage of a run, ready to train: items carry teacher activations when `source` is teacher
    (train item i is teacher record i, dev item j is record len(train) + j)."""

    name: str
    source: str  # "gold" | "teacher"
    objective: StageObjective
    settings: StageSettings
    train_items: list[TrainItem]
    dev_items: list[TrainItem]


def stage_work(cfg: RunConfig, tokenizer, data: RunData, layers: list[int], teacher: Optional[Teacher]) -> list[StageWork]:
    """The pipeline's stages with their objectives, settings and items (`teacher`: None for a pipeline
    without teacher stages)."""
    n_train = len(data.splits.train)
    records = teacher.records if teacher else None
    out = []
    for name, kind, source, lr_key in PIPELINE_STAGES[cfg.pipeline]:
        objective = StageObjective(kind=kind, site=cfg.align.site, layers=tuple(layers),
                                   align_loss=cfg.loss.align, ce_weight=cfg.loss.ce_weight,
                                   layer_weights=tuple(cfg.align.layer_weights) if cfg.align.layer_weights else None)
        settings = StageSettings(lr=getattr(cfg.lr, lr_key), batch_size=cfg.train.batch_size,
                                 max_epochs=cfg.train.max_epochs, patience=cfg.train.patience,
                                 eval_every=cfg.train.eval_every, seed=cfg.train.seed,
                                 keep_initial=cfg.train.keep_initial)
        train_items = stage_items(tokenizer, data.spec, data.splits.train, source, records[:n_train] if records else None)
        dev_items = stage_items(tokenizer, data.spec, data.splits.dev, source, records[n_train:] if records else None)
        out.append(StageWork(name, source, objective, settings, train_items, dev_items))
    return out


def similarity_work(cfg: RunConfig, tokenizer, data: RunData, teacher: Teacher) -> tuple[SimilarityRef, list[TrainItem]]:
    """The similarity rows' plan entry and items (bare query + the validation teacher's response; with its
    activations where `teacher` carries them)."""
    items = stage_items(tokenizer, data.spec, similarity_rows(cfg, data), "teacher", teacher.records)
    rows = [(it.query_ids, it.target_ids) for it in items]
    return SimilarityRef(teacher.cache_root, teacher.key, cfg.align.site, rows), items
