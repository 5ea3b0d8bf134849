"""One IA2 run in one process: data -> teacher capture (cached) -> stages of the pipeline -> evaluation.

Pipelines (paper name -> ours):
  SFT only -> `sft`; IA2 only -> `ia2`; IA2 -> SFT -> `ia2->sft` (same adapter, fresh Adam);
  IA2 + SFT (joint) -> `ia2+sft`; SFT on ICL responses -> `sft-icl`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from transformers import AutoConfig, AutoTokenizer

from ia2ray.config.load import ConfigError
from ia2ray.config.schema import RunConfig
from ia2ray.core.batches import TrainItem
from ia2ray.core.cache import ActivationCache
from ia2ray.core.fingerprint import content_hash, fingerprint_model, fingerprint_tokenizer
from ia2ray.core.capture import capture_icl_activations
from ia2ray.core.evaluate import evaluate, icl_baseline, label_token_ids
from ia2ray.core.generate import Generated, continuation_ids
from ia2ray.core.model import add_lora, load_model, model_dir, resolve_device, resolve_layers
from ia2ray.core.objective import StageObjective
from ia2ray.core.sites import num_layers
from ia2ray.core.stages import StageSettings, train_stage
from ia2ray.data.examples import Example, format_answer, format_query
from ia2ray.data.splits import Splits, dev_prompts, icl_demo_draws, load_pools, make_splits, training_prompts
from ia2ray.data.tasks import TaskSpec, get_task
from ia2ray.fileio import ia2ray_home

log = logging.getLogger(__name__)

# pipeline -> stages as (stage name, objective kind, response source, lr key)
PIPELINE_STAGES = {
    "sft": [("sft", "sft", "gold", "sft")],
    "ia2": [("align", "align", "teacher", "align")],
    "ia2->sft": [("align", "align", "teacher", "align"), ("sft", "sft", "gold", "sft")],
    "ia2+sft": [("joint", "joint", "teacher", "align")],
    "sft-icl": [("sft", "sft", "teacher", "sft")],
}


@dataclass
class RunOutcome:
    summary: dict  # JSON-ready: val/test metrics, ICL baseline, stage results
    model: object  # the peft model holding the trained adapter
    tokenizer: object
    history: list[dict]  # per stage and step: {"stage", "step", "train_loss" | "dev_loss"}


@dataclass
class RunData:
    spec: TaskSpec
    splits: Splits
    icl_draws: list[list[Example]]  # demo sets of the ICL baseline (empty when it is off)


def prepare_data(cfg: RunConfig) -> RunData:
    """Task spec, rows, N-shot splits and ICL demo draws; raises DataError/ValueError before any
    model loads."""
    spec = get_task(cfg.task.name)
    train_rows, eval_rows = load_pools(spec, cfg.data.train_pool, cfg.data.eval_pool, cfg.task.path, cfg.task.eval_path)
    splits = make_splits(train_rows, eval_rows, cfg.data.n, cfg.data.seed, cfg.data.val_size, cfg.data.test_size)
    draws = []
    if cfg.eval.icl_baseline:
        draws = icl_demo_draws(splits, max(cfg.data.n - 1, 0), cfg.eval.icl_draws, cfg.data.seed)
    return RunData(spec, splits, draws)


def preflight(cfg: RunConfig, data: RunData) -> None:
    """Checks that need the model's config or tokenizer (layer ranges, layer weights, label tokens),
    all reported together as a ConfigError before any weights are loaded."""
    path = model_dir(cfg.model)
    kw = dict(revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    n_layers = AutoConfig.from_pretrained(path, **kw).num_hidden_layers
    errors, layers = [], None
    try:
        layers = resolve_layers(cfg.align.layers, n_layers)
    except ValueError as exc:
        errors.append(str(exc))
    weights = cfg.align.layer_weights
    if layers is not None and weights is not None and len(weights) != len(layers):
        errors.append(f"align.layer_weights: {len(weights)} weights for the {len(layers)} layers that "
                      f"align.layers={cfg.align.layers!r} selects ({layers})")
    if cfg.lora.layers is not None:
        try:
            resolve_layers(cfg.lora.layers, n_layers, key="lora.layers")
        except ValueError as exc:
            errors.append(str(exc))
    if data.spec.answer_type == "label":
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        try:
            label_token_ids(tokenizer, data.spec, format_query(data.spec, data.splits.train[0]))
        except ValueError as exc:
            errors.append(f"task.name: {exc}")
    if errors:
        raise ConfigError(errors, f"the config (checked against {path})")


def capture_teacher(cfg: RunConfig, model, tokenizer, data: RunData, progress: bool = True) -> list[Generated]:
    """Teacher tokens + activations (all layers) for train then dev examples, via the cache."""
    spec, splits = data.spec, data.splits
    prompts = training_prompts(spec, splits, cfg.data.seed) + dev_prompts(spec, splits, cfg.data.seed)
    budget = cfg.align.max_new_tokens or spec.max_new_tokens
    cache = ActivationCache(Path(cfg.capture.cache_dir).expanduser() if cfg.capture.cache_dir else ia2ray_home() / "activations")
    parts = dict(
        # a hub checkpoint's config carries the commit it was loaded from: key on that, not a branch
        model=fingerprint_model(model_dir(cfg.model), getattr(model.config, "_commit_hash", None) or cfg.model.revision),
        model_dtype=cfg.model.dtype,
        tokenizer=fingerprint_tokenizer(tokenizer),
        task=spec.model_dump(mode="json"),
        prompts=content_hash(prompts),
        max_new_tokens=budget,
        stop=list(spec.stop_strings),
        site=cfg.align.site,
        dtype=cfg.capture.dtype,
    )
    key = cache.key(**parts)
    meta = {"dtype": cfg.capture.dtype, "site": cfg.align.site, "task": spec.name, "n_prompts": len(prompts)}

    def compute():
        return capture_icl_activations(model, tokenizer, prompts, budget, site=cfg.align.site,
                                       batch_size=cfg.capture.batch_size, stop_strings=spec.stop_strings,
                                       progress=progress)

    records, hit = cache.get_or_compute(key, compute, meta)
    log.info("teacher capture %s: key %s (%d prompts)", "cache hit" if hit else "computed", key, len(prompts))
    return records


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
            items.append(TrainItem(query, rec.token_ids.tolist(), rec.activations))
    return items


def run_pipeline(cfg: RunConfig, *, data: Optional[RunData] = None, progress: bool = True,
                 on_log: Optional[Callable[[str, dict], None]] = None) -> RunOutcome:
    """Run `cfg` end to end; returns the summary (val/test metrics, ICL baseline, stage histories)."""
    data = data or prepare_data(cfg)
    preflight(cfg, data)
    spec, splits = data.spec, data.splits
    device = resolve_device(cfg.train.device)
    model, tokenizer = load_model(cfg.model, device)
    layers = resolve_layers(cfg.align.layers, num_layers(model))

    summary: dict = {"name": cfg.name, "pipeline": cfg.pipeline, "task": spec.name, "n": cfg.data.n,
                     "seed": cfg.data.seed, "aligned_layers": layers, "ece_scheme": cfg.eval.ece_scheme}
    if cfg.eval.icl_baseline:
        summary["icl"] = {split: icl_baseline(model, tokenizer, spec, getattr(splits, split), data.icl_draws,
                                              cfg.eval, device) for split in ("val", "test")}

    stages = PIPELINE_STAGES[cfg.pipeline]
    teacher = None
    if any(src == "teacher" for _, _, src, _ in stages):
        teacher = capture_teacher(cfg, model, tokenizer, data, progress)
    n_train = len(splits.train)
    train_teacher = teacher[:n_train] if teacher else None
    dev_teacher = teacher[n_train:] if teacher else None

    model = add_lora(model, cfg.lora, seed=cfg.train.seed)
    summary["stages"], history = [], []
    for name, kind, source, lr_key in stages:
        objective = StageObjective(kind=kind, site=cfg.align.site, layers=tuple(layers),
                                   align_loss=cfg.loss.align, ce_weight=cfg.loss.ce_weight,
                                   layer_weights=tuple(cfg.align.layer_weights) if cfg.align.layer_weights else None)
        train_items = stage_items(tokenizer, spec, splits.train, source, train_teacher)
        dev_items = stage_items(tokenizer, spec, splits.dev, source, dev_teacher)
        settings = StageSettings(lr=getattr(cfg.lr, lr_key), batch_size=cfg.train.batch_size,
                                 max_epochs=cfg.train.max_epochs, patience=cfg.train.patience,
                                 eval_every=cfg.train.eval_every, seed=cfg.train.seed)
        result = train_stage(model, name, train_items, dev_items, objective, settings,
                             tokenizer.pad_token_id, device, on_log)
        summary["stages"].append(result.summary())
        history += [{"stage": name, **h} for h in result.history]
    for split in ("val", "test"):
        summary[split] = evaluate(model, tokenizer, spec, getattr(splits, split), cfg.eval, device)
    return RunOutcome(summary, model, tokenizer, history)
