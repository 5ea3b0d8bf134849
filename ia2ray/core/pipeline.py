"""One IA2 run in one process: data -> teacher capture (cached) -> stages of the pipeline -> evaluation.

Pipelines (paper name -> ours):
  SFT only -> `sft`; IA2 only -> `ia2`; IA2 -> SFT -> `ia2->sft` (same adapter, fresh Adam);
  IA2 + SFT (joint) -> `ia2+sft`; SFT on ICL responses -> `sft-icl`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from transformers import AutoConfig, AutoTokenizer

from ia2ray.config.load import ConfigError
from ia2ray.config.schema import OodTarget, RunConfig, format_overrides
from ia2ray.core.batches import TrainItem
from ia2ray.core.cache import ActivationCache, cache_root, fetch_entry, publish_entry
from ia2ray.core.capture import capture_icl_activations
from ia2ray.core.evaluate import evaluate, icl_baseline, label_token_ids
from ia2ray.core.fingerprint import content_hash, fingerprint_model, fingerprint_tokenizer
from ia2ray.core.generate import Generated, continuation_ids
from ia2ray.core.model import LOADS, add_lora, load_model, model_dir, resolve_device, resolve_layers
from ia2ray.core.objective import StageObjective
from ia2ray.core.sites import num_layers
from ia2ray.core.stages import StageSettings, train_stage
from ia2ray.data.examples import Example, format_answer, format_query
from ia2ray.data.splits import Splits, dev_prompts, eval_pool, icl_demo_draws, load_pools, make_splits, training_prompts
from ia2ray.data.tasks import TaskSpec, get_task, resolve_task
from ia2ray.fileio import ia2ray_home
from ia2ray.mirror import is_remote

log = logging.getLogger(__name__)

# pipeline -> stages as (stage name, objective kind, response source, lr key)
PIPELINE_STAGES = {
    "sft": [("sft", "sft", "gold", "sft")],
    "ia2": [("align", "align", "teacher", "align")],
    "ia2->sft": [("align", "align", "teacher", "align"), ("sft", "sft", "gold", "sft")],
    "ia2+sft": [("joint", "joint", "teacher", "align")],
    "sft-icl": [("sft", "sft", "teacher", "sft")],
}


def uses_teacher(pipeline: str) -> bool:
    """Whether any stage of `pipeline` trains on the teacher's responses or activations."""
    return any(src == "teacher" for _, _, src, _ in PIPELINE_STAGES[pipeline])


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
    ood: dict[str, tuple[TaskSpec, list[Example]]] = field(default_factory=dict)  # target -> (spec, test rows)


def ood_split(name: str) -> str:
    """The summary key (and metric prefix) of an out-of-domain target: `ood/<name>`."""
    return f"ood/{name}"


def prepare_data(cfg: RunConfig) -> RunData:
    """Task spec, rows, N-shot splits and ICL demo draws; raises DataError/ValueError before any
    model loads (every task shape, the out-of-domain targets' too, before any rows load)."""
    spec = resolve_task(cfg.task.name, format_overrides(cfg.task), cfg.task.define)
    targets = {name: ood_spec(spec, name, ood) for name, ood in cfg.task.ood.items()}
    train_rows, eval_rows = load_pools(spec, cfg.data.train_pool, cfg.data.eval_pool, cfg.task.path, cfg.task.eval_path)
    splits = make_splits(train_rows, eval_rows, cfg.data.n, cfg.data.seed, cfg.data.val_size, cfg.data.test_size)
    draws = []
    if cfg.eval.icl_baseline:
        draws = icl_demo_draws(splits, max(cfg.data.n - 1, 0), cfg.eval.icl_draws, cfg.data.seed)
    ood = {name: (target, ood_rows(cfg, target, name, cfg.task.ood[name].path)) for name, target in targets.items()}
    return RunData(spec, splits, draws, ood)


def ood_spec(source: TaskSpec, name: str, ood: OodTarget) -> TaskSpec:
    """An out-of-domain target's spec, its format keys applied; errors name `task.ood.<name>`."""
    try:
        get_task(name)
    except KeyError as exc:
        raise ValueError(f"task.ood.{name}: {exc.args[0]}") from None
    target = resolve_task(name, format_overrides(ood), where=f"task.ood.{name}")
    if target.answer_type != source.answer_type:
        raise ValueError(f"task.ood.{name}: a {target.answer_type} task cannot be an out-of-domain target of "
                         f"{source.name!r}, a {source.answer_type} task")
    return target


def ood_rows(cfg: RunConfig, target: TaskSpec, name: str, path: Optional[str]) -> list[Example]:
    """An out-of-domain target's first `data.test_size` eval-pool rows (all of them when there are
    fewer: the paper scores PoemS on its 288 positive and negative rows)."""
    rows = eval_pool(target, cfg.data.eval_pool, path)
    if not rows:
        raise ValueError(f"task.ood.{name}: no usable rows in {path or target.hub_id} (every row's label is one the "
                         "task leaves out)")
    return rows[: cfg.data.test_size]


def eval_sets(data: RunData, splits: tuple[str, ...]) -> list[tuple[str, TaskSpec, list[Example]]]:
    """(summary key, task, rows) evaluated for `splits`: each split, then with "test" the OOD targets."""
    sets = [(split, data.spec, getattr(data.splits, split)) for split in splits]
    if "test" in splits:
        sets += [(ood_split(name), target, rows) for name, (target, rows) in data.ood.items()]
    return sets


def preflight(cfg: RunConfig, data: RunData) -> None:
    """Checks that need the model's config or tokenizer (layer ranges, layer weights, label tokens),
    all reported together as a ConfigError before any weights are loaded."""
    try:
        path = model_dir(cfg.model)  # a builtin or GGUF model is built or converted here, once
    except (FileNotFoundError, ImportError, ValueError) as exc:
        raise ConfigError([str(exc)], "model.path") from None
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
        own = "task.label_words" if cfg.task.label_words else "task.define" if cfg.task.define else "task.name"
        checks = [(own, data.spec, data.splits.train[0])]
        checks += [(f"task.ood.{name}", target, rows[0]) for name, (target, rows) in data.ood.items()]
        for key, spec, example in checks:
            try:
                label_token_ids(tokenizer, spec, format_query(spec, example))
            except ValueError as exc:
                errors.append(f"{key}: {exc}")
    if errors:
        raise ConfigError(errors, f"the config (checked against {path})")


@dataclass
class Teacher:
    """Teacher records for the train then dev examples, and the cache entry that holds them."""

    records: list[Generated]
    cache_root: str  # the cache folder, or its bucket URI
    key: str
    hit: bool = True  # found in the cache (False: the teacher ran for this run)


class TeacherNotCachedError(RuntimeError):
    """A run that may only read teacher activations (a study trial) found none in the cache."""


def capture_teacher(cfg: RunConfig, model, tokenizer, data: RunData, progress: bool = True,
                    cached_only: bool = False) -> Teacher:
    """Teacher tokens + activations (all layers) for train then dev examples, via the cache.
    With `cached_only`, a cache miss raises TeacherNotCachedError instead of running the teacher."""
    spec, splits = data.spec, data.splits
    prompts = training_prompts(spec, splits, cfg.data.seed) + dev_prompts(spec, splits, cfg.data.seed)
    budget = cfg.align.max_new_tokens or spec.max_new_tokens
    location = cfg.capture.cache_dir or str(ia2ray_home() / "activations")  # a folder or a bucket URI
    root = cache_root(location)
    cache = ActivationCache(root)
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
        if cached_only:
            raise TeacherNotCachedError(f"teacher activations {key} are not in the cache {location} (task "
                                        f"{spec.name}, N={cfg.data.n}, seed {cfg.data.seed}, site {cfg.align.site})")
        return capture_icl_activations(model, tokenizer, prompts, budget, site=cfg.align.site,
                                       batch_size=cfg.capture.batch_size, stop_strings=spec.stop_strings,
                                       progress=progress)

    fetch_entry(location, key)  # from the bucket, when the cache is there and this node has no copy
    records, hit = cache.get_or_compute(key, compute, meta)
    if not hit:
        publish_entry(location, key)
    log.info("teacher capture %s: key %s (%d prompts)", "cache hit" if hit else "computed", key, len(prompts))
    return Teacher(records, location if is_remote(location) else str(root.resolve()), key, hit)


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


# (cfg, model, tokenizer, stages, teacher, on_log) -> (peft model holding the final adapter,
# [(StageResult summary, history)] per stage)
StageTrainer = Callable[..., tuple[object, list[tuple[dict, list[dict]]]]]


def train_in_process(cfg: RunConfig, model, tokenizer, stages: list[StageWork], teacher: Optional[Teacher],
                     on_log=None):
    """The single-process stage trainer (no Ray, no DeepSpeed): one adapter, one Adam per stage."""
    device = resolve_device(cfg.train.device)
    model = add_lora(model, cfg.lora, seed=cfg.train.seed)
    results = []
    for work in stages:
        result = train_stage(model, work.name, work.train_items, work.dev_items, work.objective, work.settings,
                             tokenizer.pad_token_id, device, on_log)
        results.append((result.summary(), result.history))
    return model, results


def stage_work(cfg: RunConfig, tokenizer, data: RunData, layers: list[int], teacher: Optional[Teacher]) -> list[StageWork]:
    """The pipeline's stages with their objectives, settings and items."""
    n_train = len(data.splits.train)
    records = teacher.records if teacher else None
    out = []
    for name, kind, source, lr_key in PIPELINE_STAGES[cfg.pipeline]:
        objective = StageObjective(kind=kind, site=cfg.align.site, layers=tuple(layers),
                                   align_loss=cfg.loss.align, ce_weight=cfg.loss.ce_weight,
                                   layer_weights=tuple(cfg.align.layer_weights) if cfg.align.layer_weights else None)
        settings = StageSettings(lr=getattr(cfg.lr, lr_key), batch_size=cfg.train.batch_size,
                                 max_epochs=cfg.train.max_epochs, patience=cfg.train.patience,
                                 eval_every=cfg.train.eval_every, seed=cfg.train.seed)
        train_items = stage_items(tokenizer, data.spec, data.splits.train, source, records[:n_train] if records else None)
        dev_items = stage_items(tokenizer, data.spec, data.splits.dev, source, records[n_train:] if records else None)
        out.append(StageWork(name, source, objective, settings, train_items, dev_items))
    return out


def run_pipeline(cfg: RunConfig, *, data: Optional[RunData] = None, progress: bool = True,
                 on_log: Optional[Callable[[str, dict], None]] = None,
                 train_stages: StageTrainer = train_in_process, splits: tuple[str, ...] = ("val", "test"),
                 cached_teacher_only: bool = False, keep_model: bool = False) -> RunOutcome:
    """Run `cfg` end to end; returns the summary (metrics on `splits`, ICL baseline, stage histories).
    `train_stages` trains the adapter (in this process by default; `ia2ray.train` has the Ray Train one).
    `cached_teacher_only`: the teacher must already be in the cache (study trials). `keep_model`: the
    base model stays loaded in this process for the next run (`load_model(keep=True)`)."""
    clock = [time.perf_counter()]
    data = data or prepare_data(cfg)
    preflight(cfg, data)
    spec = data.spec
    device = resolve_device(cfg.train.device)
    loads = LOADS["cold"]
    model, tokenizer = load_model(cfg.model, device, keep=keep_model)
    clock.append(time.perf_counter())
    layers = resolve_layers(cfg.align.layers, num_layers(model))

    # weights this process read from disk for the run (0: a model kept from an earlier run)
    summary = summary_head(cfg, spec, cfg.pipeline) | {"aligned_layers": layers, "model_loads": LOADS["cold"] - loads}
    if cfg.eval.icl_baseline:
        summary["icl"] = icl_metrics(cfg, model, tokenizer, data, splits, device)

    teacher = None
    if uses_teacher(cfg.pipeline):
        teacher = capture_teacher(cfg, model, tokenizer, data, progress, cached_only=cached_teacher_only)
    stages = stage_work(cfg, tokenizer, data, layers, teacher)
    clock.append(time.perf_counter())
    model, results = train_stages(cfg, model, tokenizer, stages, teacher, on_log)
    clock.append(time.perf_counter())
    summary["stages"] = [r for r, _ in results]
    history = [{"stage": r["name"], **h} for r, hist in results for h in hist]
    model.eval()
    for key, task, rows in eval_sets(data, splits):
        summary[key] = evaluate(model, tokenizer, task, rows, cfg.eval, device)
    clock.append(time.perf_counter())
    # seconds: data + model load, ICL baseline + teacher + items, stage training (all of it, e.g. a
    # whole Ray Train fit), evaluation
    summary["timings"] = {k: round(b - a, 3) for k, a, b in zip(("load_s", "prepare_s", "train_stages_s", "eval_s"),
                                                                clock, clock[1:])}
    return RunOutcome(summary, model, tokenizer, history)


def icl_metrics(cfg: RunConfig, model, tokenizer, data: RunData, splits: tuple[str, ...], device) -> dict:
    """The ICL baseline (base model, N-1 demos from outside the training set) on each split, and on the
    out-of-domain targets with demos from this task."""
    return {key: icl_baseline(model, tokenizer, task, rows, data.icl_draws, cfg.eval, device, demo_spec=data.spec)
            for key, task, rows in eval_sets(data, splits)}


def run_icl(cfg: RunConfig, *, data: Optional[RunData] = None, splits: tuple[str, ...] = ("val", "test"),
            keep_model: bool = False) -> dict:
    """Only the ICL baseline (no training): a summary shaped like run_pipeline's, metrics per split."""
    data = data or prepare_data(cfg)
    if not data.icl_draws:
        raise ValueError("run_icl needs eval.icl_baseline: true")
    device = resolve_device(cfg.train.device)
    loads = LOADS["cold"]
    model, tokenizer = load_model(cfg.model, device, keep=keep_model)
    return (summary_head(cfg, data.spec, "icl") | {"model_loads": LOADS["cold"] - loads}
            | icl_metrics(cfg, model, tokenizer, data, splits, device))


def summary_head(cfg: RunConfig, spec: TaskSpec, pipeline: str) -> dict:
    """The fields that identify a run in its summary."""
    return {"name": cfg.name, "pipeline": pipeline, "task": spec.name, "n": cfg.data.n, "seed": cfg.data.seed,
            "ece_scheme": cfg.eval.ece_scheme}
