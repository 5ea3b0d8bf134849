"""The per-worker loop of a Ray Train run: the stages of one pipeline on one model, then evaluation.

Every rank runs this function. It loads the base model once and adds the LoRA adapter. For each stage
it puts the stage's starting adapter in the model, wraps it in a fresh DeepSpeed engine with a fresh
torch Adam (ZeRO stage from the config) and runs the one stage loop of `ia2ray.core.stages` on it
(`WorkerEngine`): the same global batches in the same order as in one process, dev loss every
`eval_every` steps and at epoch ends, early stopping, and the best adapter carried to the next stage;
checkpoints and Ray Train reports hang on its hooks. The engine is destroyed at the stage's end; the
model stays. After the last stage the ranks evaluate the best adapter (and the ICL baseline) on their
own devices, each rank every W-th row (under ZeRO-3 with the parameters gathered whole), and the
final checkpoint carries the metrics, the answers and the adapter.
Each global batch is split across ranks in a world-size-independent way (rank r takes slots r, r+W,
...), and each rank's loss is weighted so the summed gradient equals the gradient of the mean loss
over the real examples of the batch: 1 worker and W workers take the same steps.

Checkpoints (every `checkpoint_every` steps and at each stage end) hold the consolidated state, so a
run resumes at any worker count (see `ia2ray.train.checkpoint`).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ia2ray.config.schema import LoraConfig, ModelConfig, TrainConfig
from ia2ray.core.batches import TrainItem, collate
from ia2ray.core.cache import CacheError
from ia2ray.core.model import LOADS, add_lora, load_model
from ia2ray.core.objective import StageObjective, stage_loss
from ia2ray.core.runeval import run_evals
from ia2ray.core.stages import (
    EarlyStopping,
    LoopState,
    NonFiniteLossError,
    Position,
    StageResult,
    StageSettings,
    is_out_of_memory,
    out_of_memory,
    stage_loop,
)
from ia2ray.core.teacher import open_entry
from ia2ray.fileio import require_visible
from ia2ray.mirror import bucket_sync
from ia2ray.tracking import RunLog
from ia2ray.tracking.shape import step_metrics
from ia2ray.train import checkpoint as ckpt
from ia2ray.train.dsconfig import batch_geometry, deepspeed_config, zero_stage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItemRef:
    """A training item without its activations: `record` indexes the teacher cache entry."""

    query_ids: list[int]
    target_ids: list[int]
    record: Optional[int] = None


@dataclass
class StageSpec:
    name: str
    objective: StageObjective
    settings: StageSettings
    train: list[ItemRef]
    dev: list[ItemRef]


@dataclass
class TrainJob:
    """Everything a worker needs; pickled into each worker by Ray."""

    model: ModelConfig  # `path` resolved to an absolute local directory or a hub id
    lora: LoraConfig
    lora_seed: int
    train: TrainConfig
    deepspeed: dict  # the `train.deepspeed` preset or file, as the driver read it
    stages: list[StageSpec]
    pad_id: int
    fingerprint: str
    teacher_cache: Optional[tuple[str, str]] = None  # (cache root, entry key)
    tracking: Optional[dict] = None  # MLflow run (`RunLog.target()`) rank 0 logs the stage losses into, live
    evals: Optional[object] = None  # `ia2ray.core.runeval.EvalPlan` scored after the last stage (None: nothing)
    init_adapter: Optional[dict] = None  # adapter the first stage starts from (default: fresh LoRA)
    stage_offset: int = 0  # index of stages[0] in the whole pipeline (names checkpoints)
    crash_after: Optional[tuple[str, int]] = None  # test fault injection: (stage, step) after whose checkpoint
    # workers exit; ("eval", 0): before the evaluation


@dataclass
class WorkerContext:
    rank: int
    world: int
    device: torch.device
    on_gpu: bool
    resumed_rng: Optional[dict] = None
    launched: Optional[float] = None  # wall clock (time.time) when the driver called fit()
    started: float = 0.0  # wall clock when this worker's loop began
    finished: list[dict] = field(default_factory=list)  # {"result": StageResult summary, "history": [...]}
    live: Optional[RunLog] = None  # rank 0's MLflow run, when the job has one
    node_id: Optional[str] = None  # the Ray node this worker runs on
    loaded: dict = field(default_factory=dict)  # the model load: count, seconds, resident memory after


def record(stage: str, entry: dict, wc: WorkerContext) -> None:
    """After a history entry: rank 0 logs it to the trial's MLflow run (buffered, best effort: the
    trial driver logs the whole history again at the end and fills any gap)."""
    if wc.live is not None:
        wc.live.log_metrics(step_metrics(stage, entry))


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    started = time.time()
    job: TrainJob = config["job"]
    ctx = ray.train.get_context()
    on_gpu = torch.cuda.is_available() and bool(config.get("use_gpu"))
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    torch.set_num_threads(max(1, int(job.train.cpus_per_worker)))
    wc = WorkerContext(ctx.get_world_rank(), ctx.get_world_size(), device, on_gpu,
                       launched=config.get("launched"), started=started,
                       node_id=ray.get_runtime_context().get_node_id())
    logging.basicConfig(level=logging.INFO if wc.rank == 0 else logging.WARNING)

    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")  # reuses Ray's process group
    on_disk = ckpt.latest_complete(Path(config["run_dir"])) if config.get("run_dir") else None
    resume = _resume_state(ray.train.get_checkpoint(), str(on_disk) if on_disk else None, job, wc)
    teacher = _load_teacher(job, wc)
    start_index = resume["stage_index"] if resume else 0
    adapter = resume["adapter"] if resume else job.init_adapter
    wc.finished = list(resume["finished"]) if resume else []
    if job.tracking and wc.rank == 0:
        wc.live = RunLog.from_state(job.tracking)
    clock = time.perf_counter()
    loads = LOADS["cold"]
    model, tokenizer = load_model(job.model, "cpu")  # once: every stage and the evaluation use it
    if job.stages:
        model = add_lora(model, job.lora, seed=job.lora_seed)
    wc.loaded = {"model_loads": LOADS["cold"] - loads, "load_model_s": time.perf_counter() - clock,
                 "rss_loaded_mb": _rss_mb()}
    try:
        for index in range(start_index, len(job.stages)):
            mid_stage = resume if resume and resume["stage_index"] == index and resume["position"] else None
            adapter = run_stage(job, index, model, teacher, adapter, mid_stage, wc)
            resume = None
    finally:  # also when a stage fails: its last losses reach MLflow (the driver fills gaps on success)
        if wc.live is not None:
            for line in wc.live.close(tries=1):
                log.warning("MLflow: not logged from the Train worker: %s", line)
    # the model sits on this rank's device when a stage ran in this process (DeepSpeed put it there);
    # an ICL-only run, or a restart after the last stage, places it here
    finish(job, model, tokenizer, adapter, wc, placed=start_index < len(job.stages))


def run_stage(job: TrainJob, index: int, model, teacher: dict, adapter: Optional[dict], resume: Optional[dict],
              wc: WorkerContext) -> dict:
    """Train one stage of `model` from `adapter` (or from the `resume` state) on a fresh DeepSpeed
    engine; returns its best adapter."""
    import deepspeed

    from ia2ray.train.state import (
        adapter_state,
        load_optimizer_state,
        optimizer_state,
        optimizer_step,
        set_module_adapter,
    )

    spec = job.stages[index]
    s, name = spec.settings, spec.name
    geo = batch_geometry(s.batch_size, wc.world, job.train.micro_batch_size)
    objective = spec.objective
    if zero_stage(job.train, job.deepspeed) == 3 and objective.stop_early:
        # ZeRO-3 gathers each layer's weights in forward hooks and frees them in post-forward hooks; an
        # aborted forward skips those. On CPU the results were the same with stopping on (1 and 2
        # workers), but what it does to GPU memory is unmeasured: run the full forward.
        objective = StageObjective(**{**objective.__dict__, "stop_early": False})

    clock = {"start": time.perf_counter(), "rss_start": _rss_mb()}
    start = resume["adapter"] if resume else adapter
    if start is not None:
        set_module_adapter(model, start)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=s.lr, weight_decay=0.0)
    ds_cfg = deepspeed_config(job.train, wc.world, wc.on_gpu, job.deepspeed)
    clock["adapter_set"] = time.perf_counter()
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg, dist_init_required=False)
    del optimizer
    clock["engine_ready"] = time.perf_counter()

    state = None
    if resume:
        load_optimizer_state(engine, resume["moments"], resume["adam_step"])
        state = LoopState(StageResult(**resume["result"]), EarlyStopping(s.patience, **resume["stopper"]),
                          Position(**resume["position"]))
        if wc.resumed_rng is not None:
            ckpt.set_rng_state(wc.resumed_rng)
    train_items = [_item(r, teacher) for r in spec.train]
    dev_shard = [_item(r, teacher) for r in spec.dev[wc.rank :: wc.world]]
    dev_batches = math.ceil(math.ceil(len(spec.dev) / wc.world) / s.batch_size)  # same count on every rank
    stage = WorkerEngine(engine, geo, objective, job.pad_id, wc, name, s.batch_size, dev_shard, dev_batches,
                         train_items[0])

    def save(state: LoopState, stage_done: bool, metrics: dict) -> None:
        pos, stopper = state.position, state.stopper
        moments = {} if stage_done else optimizer_state(engine)
        ckpt_state = {
            "format": ckpt.FORMAT, "fingerprint": job.fingerprint, "world_size": wc.world,
            "stage_index": index + 1 if stage_done else index,
            "position": None if stage_done else pos.__dict__.copy(),
            "adapter": stopper.best_state if stage_done else adapter_state(engine),
            "moments": moments, "adam_step": 0 if stage_done else optimizer_step(engine),
            "stopper": None if stage_done else {k: getattr(stopper, k) for k in ("best", "best_step", "bad_checks", "best_state")},
            "result": None if stage_done else state.result.__dict__.copy(),
            "finished": wc.finished, "done": False,
        }
        _report(ckpt_state, metrics, wc, ckpt.checkpoint_name(job.stage_offset + index, name,
                                                               None if stage_done else pos.step))
        if job.crash_after == (name, pos.step) and not stage_done:
            log.warning("fault injection: worker exits after the checkpoint of step %d", pos.step)
            os._exit(1)

    def fields(state: LoopState, **extra) -> dict:
        """What a report carries (Tune and the Train callbacks see these; all ranks send the same)."""
        return {"stage": name, "step": state.position.step, "best_dev_loss": state.stopper.best, **extra}

    def report_check(state: LoopState, **extra) -> None:
        """After a dev check: a metrics-only report on every `train.report_every`-th check of the stage
        (counted from the history, which a resume restores)."""
        done = sum(1 for h in state.result.history if "dev_loss" in h)
        if job.train.report_every and done % job.train.report_every == 0:
            _report_metrics(fields(state, **extra))

    def after_step(state: LoopState, entry: dict, checked: bool) -> None:
        extra = {k: entry[k] for k in ("train_loss", "dev_loss") if k in entry}
        if job.train.checkpoint_every and state.position.step % job.train.checkpoint_every == 0:
            save(state, False, fields(state, **extra))
        elif checked:
            report_check(state, **extra)

    state = stage_loop(name, s, train_items, stage, state, on_record=lambda entry: record(name, entry, wc),
                       after_check=lambda state, entry: report_check(state, dev_loss=entry["dev_loss"]),
                       after_step=after_step)
    result, stopper = state.result, state.stopper
    clock["trained"] = time.perf_counter()
    timings = {"set_adapter_s": clock["adapter_set"] - clock["start"],
               "deepspeed_init_s": clock["engine_ready"] - clock["adapter_set"],
               "train_s": clock["trained"] - clock["engine_ready"], "rss_start_mb": clock["rss_start"],
               "rss_end_mb": _rss_mb(), "worker_start_s": wc.started - wc.launched if wc.launched else None}
    # where rank 0 trained the stage, and the step it resumed from (a restarted or preempted worker group)
    placement = {"node_id": wc.node_id, "resumed_at_step": resume["position"]["step"] if resume else None}
    wc.finished.append({"result": result.summary(), "history": result.history, "timings": timings,
                        "placement": placement})
    best = stopper.best_state
    save(state, True, fields(state, stage_done=True))
    engine.destroy()  # frees DeepSpeed's buffers and hooks; the next stage builds its own engine on the model
    if wc.on_gpu:
        torch.cuda.empty_cache()
    return best


def _rss_mb() -> float:
    """Resident memory of this process (a stage that leaked would raise the next stage's start)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _item(ref: ItemRef, teacher: dict) -> TrainItem:
    if ref.record is None:
        return TrainItem(ref.query_ids, ref.target_ids)
    rec = teacher[ref.record]
    return TrainItem(ref.query_ids, ref.target_ids, rec.activations, rec.top_ids, rec.top_logp)


@dataclass
class WorkerEngine:
    """`ia2ray.core.stages.StageEngine` on a DeepSpeed engine: this rank's share of each global batch
    and of the dev set; losses are all-reduced, so every rank sees the same numbers."""

    engine: object  # deepspeed.DeepSpeedEngine
    geo: object  # dsconfig.BatchGeometry
    objective: StageObjective
    pad_id: int
    wc: WorkerContext
    name: str
    batch_size: int
    dev_shard: list[TrainItem]
    dev_batches: int
    pad_item: TrainItem

    def train_step(self, chunk: list[TrainItem], step: int) -> float:
        return _train_step(self.engine, chunk, self.geo, self.objective, self.pad_id, self.wc, f"stage {self.name}",
                           step, self.batch_size)

    def dev_loss(self) -> float:
        return _dev_loss(self.engine, self.dev_shard, self.dev_batches, self.batch_size, self.objective, self.pad_id,
                         self.wc, self.pad_item)

    def adapter(self) -> dict:
        from ia2ray.train.state import adapter_state

        return adapter_state(self.engine)

    def train(self) -> None:
        self.engine.train()


def _train_step(engine, chunk: list[TrainItem], geo, objective, pad_id: int, wc: WorkerContext,
                stage: str, step: int, batch_size: int) -> float:
    """One optimiser step on this rank's slots of the global batch; returns the batch's mean loss."""
    import torch.distributed as dist

    mine = chunk[wc.rank :: wc.world]
    scale = wc.world * geo.accumulation / len(chunk)  # DeepSpeed divides by accumulation and world size
    total = torch.zeros(1, dtype=torch.float64)
    for m in range(geo.accumulation):
        micro = mine[m * geo.micro : (m + 1) * geo.micro]
        real = len(micro)
        micro = micro or chunk[:1]  # an empty slot still runs (weight 0): ZeRO needs every rank's gradients
        batch = collate(micro, pad_id, _layers(objective)).to(wc.device)
        try:
            loss = stage_loss(engine.module, batch, objective)
            if real and not torch.isfinite(loss):
                raise NonFiniteLossError(f"{stage}: loss is {loss.item()} at step {step}")
            engine.backward(loss * (real * scale))
            engine.step()
        except RuntimeError as exc:
            if is_out_of_memory(exc):
                raise out_of_memory(stage, step, f"a micro-batch of {geo.micro} on each of {wc.world} worker(s) "
                                    f"({geo.accumulation} accumulation steps; train.batch_size={batch_size})", exc) from exc
            raise
        total += loss.detach().double().cpu() * real
    dist.all_reduce(total)
    return float(total) / len(chunk)


@torch.no_grad()
def _dev_loss(engine, shard: list[TrainItem], n_batches: int, batch_size: int, objective, pad_id: int,
              wc: WorkerContext, pad_item: TrainItem) -> float:
    """Mean loss over the whole dev set; every rank runs `n_batches` forwards on its shard (a rank
    that has run out runs `pad_item` and ignores it: ZeRO-3 needs every rank in every forward)."""
    import torch.distributed as dist

    engine.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    for b in range(n_batches):
        chunk = shard[b * batch_size : (b + 1) * batch_size]
        batch = collate(chunk or [pad_item], pad_id, _layers(objective)).to(wc.device)
        loss = stage_loss(engine.module, batch, objective)
        if chunk:
            sums += torch.tensor([loss.item() * len(chunk), len(chunk)], dtype=torch.float64)
    dist.all_reduce(sums)
    engine.train()
    return float(sums[0] / sums[1]) if sums[1] else math.nan


def _layers(objective: StageObjective):
    return list(objective.layers) if objective.layers is not None else None


def _load_teacher(job: TrainJob, wc: WorkerContext) -> dict:
    """The teacher records this rank uses: all train items (each global batch is split over ranks)
    and its own shard of the dev items."""
    if job.teacher_cache is None:
        return {}
    wanted = set()
    for spec in job.stages:
        wanted |= {r.record for r in spec.train if r.record is not None}
        wanted |= {r.record for r in spec.dev[wc.rank :: wc.world] if r.record is not None}
    location, key = job.teacher_cache
    cache = _cached_entry(location, key, "teacher")
    return cache.load_subset(key, sorted(wanted)) if wanted else {}


def _cached_entry(location: str, key: str, what: str):
    """The cache at `location` holding the complete entry `key` (a bucket cache's entry fetched to this node
    first); a clear error when this node cannot see it."""
    sync = bucket_sync(location)
    cache = open_entry(location, key, sync)
    if sync is None:
        require_visible(cache.path(key), f"the {what} cache entry")
    elif not cache.has(key):
        raise CacheError(f"{what} cache entry {key} is not in {location} (its capture did not finish)")
    return cache


def _load_similarity(ref) -> list[TrainItem]:
    """The similarity rows with the validation teacher's activations, from its cache entry."""
    from ia2ray.core.similarity import items_from

    return items_from(ref, _cached_entry(ref.cache_root, ref.key, "similarity teacher").load(ref.key))


def _resume_state(checkpoint, resume_from: Optional[str], job: TrainJob, wc: WorkerContext) -> Optional[dict]:
    """State to resume from: the further of Ray's latest registered checkpoint and `resume_from`, the
    furthest complete checkpoint in the run folder (Ray may not have registered it: a worker that
    dies between upload and registration leaves it unknown to Ray). A registered checkpoint that is
    incomplete or from another configuration raises CheckpointError. Run at every (re)start of the
    worker group, so a restart within one fit() (train.max_failures) resumes the same way."""
    if checkpoint is not None and resume_from is not None:
        ray_progress = ckpt.progress(Path(checkpoint.path).name) or (-1, -1)
        if (ckpt.progress(Path(resume_from).name) or (-1, -1)) <= ray_progress:
            resume_from = None
    if checkpoint is None and resume_from is None:
        return None
    source = resume_from or checkpoint.path
    with (nullcontext(resume_from) if resume_from else checkpoint.as_directory()) as d:
        state = ckpt.read_state(Path(d), job.fingerprint)
        if state["world_size"] == wc.world:
            wc.resumed_rng = ckpt.read_rank_part(Path(d), wc.rank)
    if wc.rank == 0:
        log.info("resuming from %s: stage %d, position %s (written by %d workers, now %d)", source,
                 state["stage_index"], state["position"], state["world_size"], wc.world)
    return state


def _report_metrics(metrics: dict) -> None:
    """Metrics without a checkpoint (every rank calls it: a report is a barrier in Ray Train)."""
    import ray.train

    ray.train.report(metrics)


def _report(state: dict, metrics: dict, wc: WorkerContext, dir_name: str, adapter_dir=None) -> None:
    """All ranks: write their part of a checkpoint and report it (a barrier in Ray Train). `adapter_dir`
    (rank 0, the final checkpoint): writes the adapter as a peft folder into the given path."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ckpt.write_rank_part(d, wc.rank)
        if wc.rank == 0:
            if adapter_dir is not None:
                adapter_dir(d / "adapter")
            ckpt.write_state(d, state, wc.world)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=dir_name)


def finish(job: TrainJob, model, tokenizer, adapter: Optional[dict], wc: WorkerContext, placed: bool) -> None:
    """After the last stage: evaluate the best adapter where it is (every rank scores its share of the
    rows), then report the final checkpoint with the metrics, the answers and the adapter. `placed`: a
    DeepSpeed engine has put the model on this rank's device."""
    from ia2ray.train.state import set_module_adapter

    if job.crash_after == ("eval", 0):
        log.warning("fault injection: worker exits before the evaluation")
        os._exit(1)
    start = time.perf_counter()
    metrics, answers = {}, {}
    if job.evals is not None:
        if not placed:
            model.to(wc.device)
        if adapter is not None:
            set_module_adapter(model, adapter)
        sim_items = _load_similarity(job.evals.similarity) if job.evals.similarity else None
        with whole_parameters(model):
            metrics, answers = run_evals(model, tokenizer, job.evals, wc.device, _shard(wc), sim_items)
    eval_s = time.perf_counter() - start
    workers = {"node_id": wc.node_id, "world_size": wc.world, "device": str(wc.device), **wc.loaded,
               "eval_s": round(eval_s, 3), "rss_end_mb": _rss_mb(),
               "peak_gpu_mb": torch.cuda.max_memory_allocated(wc.device) / 2**20 if wc.on_gpu else None,
               "worker_start_s": wc.started - wc.launched if wc.launched else None}
    state = {"format": ckpt.FORMAT, "fingerprint": job.fingerprint, "world_size": wc.world,
             "stage_index": len(job.stages), "position": None, "adapter": adapter, "moments": {}, "adam_step": 0,
             "stopper": None, "result": None, "finished": wc.finished, "done": True,
             "evals": metrics, "answers": answers, "workers": workers}
    save_adapter = None
    if adapter is not None:
        save_adapter = lambda path: model.save_pretrained(path, state_dict=adapter)  # noqa: E731
    _report(state, {"stage": "eval", "step": 0, "done": True}, wc, ckpt.checkpoint_name(len(job.stages), "eval", None),
            save_adapter)


def whole_parameters(model):
    """Every parameter whole on this rank while evaluating: a gather under ZeRO-3 (collective: call it on
    every rank), nothing to do otherwise."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


def _shard(wc: WorkerContext):
    """This rank's share of the evaluation rows; the ranks exchange their scored rows."""
    from ia2ray.core.runeval import Shard

    def gather(mine: list) -> list[list]:
        import torch.distributed as dist

        out = [None] * wc.world
        dist.all_gather_object(out, mine)
        return out

    return Shard(wc.rank, wc.world, gather) if wc.world > 1 else Shard()
