"""One training stage in one process: Adam over the adapter, dev-loss early stopping, best-state restore.

The paper's recipe: Adam without weight decay, scheduler or clipping; dev loss checked every
`eval_every` optimiser steps and at the end of every epoch (as the reference does); stop after
`patience` checks without improvement; restore the best adapter. With `keep_initial` (not the paper's)
we also check once before the first step, so a stage that only makes the dev loss worse leaves the
adapter as it found it.

`stage_loop` is that loop, once, over a small engine interface (`train_step`, `dev_loss`, `adapter`,
`train`): `LocalEngine` below is a plain torch Adam in this process; `ia2ray.train.worker` wraps a
DeepSpeed engine in Ray Train workers and adds checkpoints and reports through the loop's hooks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch

from ia2ray.core.batches import TrainItem, collate
from ia2ray.core.model import load_trainable_state, trainable_state
from ia2ray.core.objective import StageObjective, stage_loss


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


class StageOutOfMemoryError(RuntimeError):
    """A training step ran out of (GPU or host) memory; the message names the batch geometry."""


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, or the CPU allocator failing to find memory."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        m in text for m in ("out of memory", "not enough memory", "can't allocate memory", "Cannot allocate memory"))


def out_of_memory(stage: str, step: int, batch: str, exc: BaseException) -> StageOutOfMemoryError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StageOutOfMemoryError(
        f"{stage}: out of memory at step {step} with {batch}; lower train.micro_batch_size (or "
        f"train.batch_size), or shard more with train.deepspeed=zero3 / zero3-offload ({first})")


@dataclass
class StageSettings:
    lr: float
    batch_size: int = 4
    max_epochs: int = 50
    patience: int = 5
    eval_every: int = 2
    seed: int = 0
    keep_initial: bool = False  # the adapter a stage starts with is a candidate (a dev check before step 1)


@dataclass
class StageResult:
    name: str
    steps: int = 0
    epochs: int = 0
    best_step: int = 0
    best_dev_loss: float = math.inf
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)  # {"step", "train_loss"?, "dev_loss"?}

    def summary(self) -> dict:
        return {k: getattr(self, k) for k in ("name", "steps", "epochs", "best_step", "best_dev_loss", "stopped_early")}


@dataclass
class EarlyStopping:
    """Tracks the best dev loss and a snapshot of the adapter that reached it."""

    patience: int
    best: float = math.inf
    best_step: int = 0
    bad_checks: int = 0
    best_state: Optional[dict] = None

    def update(self, loss: float, step: int, snapshot: Callable[[], dict]) -> bool:
        """Record a dev-loss check (`snapshot()` copies the adapter); True when `patience` checks in a
        row did not improve."""
        if loss < self.best:
            self.best, self.best_step, self.bad_checks = loss, step, 0
            self.best_state = snapshot()
        else:
            self.bad_checks += 1
        return self.bad_checks >= self.patience


def batches(items: list[TrainItem], batch_size: int, order: Optional[torch.Tensor] = None):
    """Consecutive chunks of `items` (in `order` when given)."""
    idx = order.tolist() if order is not None else list(range(len(items)))
    for start in range(0, len(idx), batch_size):
        yield [items[i] for i in idx[start : start + batch_size]]


@torch.no_grad()
def dev_loss(model, items: list[TrainItem], objective: StageObjective, pad_id: int, batch_size: int, device) -> float:
    """Mean per-example loss over the dev items (model in eval mode)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in batches(items, batch_size):
        batch = collate(chunk, pad_id, _layers(objective)).to(device)
        total += stage_loss(model, batch, objective).item() * len(chunk)
        count += len(chunk)
    model.train(was_training)
    return total / max(count, 1)


def _layers(objective: StageObjective):
    return list(objective.layers) if objective.layers is not None else None


class StageEngine(Protocol):
    """What `stage_loop` needs from whatever holds the model and its optimiser."""

    def train_step(self, chunk: list[TrainItem], step: int) -> float:
        """One optimiser step on the global batch `chunk` (step number `step`); its mean loss."""

    def dev_loss(self) -> float:
        """Mean loss over the whole dev set; a check between training steps leaves the model training."""

    def adapter(self) -> dict:
        """A copy of the trainable state (the adapter) as it is now."""

    def train(self) -> None:
        """Put the model in training mode."""


@dataclass
class Position:
    """Where a stage stands: `step` optimiser steps done; next batch `batch` of epoch `epoch`."""

    epoch: int = 0
    batch: int = 0
    step: int = 0


@dataclass
class LoopState:
    """Everything the loop carries between steps; a checkpoint saves it and a resume passes it back."""

    result: StageResult
    stopper: EarlyStopping
    position: Position = field(default_factory=Position)


def stage_loop(
    name: str,
    settings: StageSettings,
    train_items: list[TrainItem],
    engine: StageEngine,
    state: Optional[LoopState] = None,
    on_record: Optional[Callable[[dict], None]] = None,
    after_check: Optional[Callable[[LoopState, dict], None]] = None,
    after_step: Optional[Callable[[LoopState, dict, bool], None]] = None,
) -> LoopState:
    """The stage loop: epochs of seeded shuffled batches, a dev check every `eval_every` steps and at
    each epoch end (with `settings.keep_initial` also once before the first step), early stopping after
    `patience` checks without improvement. `state` resumes a stage mid-way (the shuffles of skipped
    epochs are drawn again, so the batches are the same). Hooks: `on_record(entry)` after each history entry; `after_check(state,
    entry)` after the first check; `after_step(state, entry, checked)` after each step that did not
    stop the stage. The best adapter is `state.stopper.best_state`; the engine keeps the last one."""
    fresh = state is None
    state = state or LoopState(StageResult(name), EarlyStopping(settings.patience))
    result, stopper = state.result, state.stopper

    def add(entry: dict) -> None:
        result.history.append(entry)
        if on_record:
            on_record(entry)

    def check(step: int) -> bool:
        loss = engine.dev_loss()
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"stage {name}: dev loss is {loss} at step {step}")
        add({"step": step, "dev_loss": loss})
        return stopper.update(loss, step, engine.adapter)

    if fresh and settings.keep_initial:
        check(0)
        if after_check:
            after_check(state, result.history[-1])
    engine.train()
    gen = torch.Generator().manual_seed(settings.seed)
    for epoch in range(settings.max_epochs):
        order = torch.randperm(len(train_items), generator=gen)  # drawn every epoch: a resume replays them
        if epoch < state.position.epoch or result.stopped_early:
            continue
        result.epochs = epoch + 1
        chunks = list(batches(train_items, settings.batch_size, order))
        first = state.position.batch if epoch == state.position.epoch else 0
        for i in range(first, len(chunks)):
            loss = engine.train_step(chunks[i], state.position.step + 1)
            state.position = Position(epoch, i + 1, state.position.step + 1)
            entry = {"step": state.position.step, "train_loss": loss}
            add(entry)
            checked = state.position.step % settings.eval_every == 0 or i == len(chunks) - 1  # the reference checks at epoch ends too
            if checked and check(state.position.step):
                result.stopped_early = True
                break
            if after_step:
                after_step(state, {**entry, **({"dev_loss": result.history[-1]["dev_loss"]} if checked else {})}, checked)
        state.position = Position(epoch + 1, 0, state.position.step)
    result.steps = state.position.step
    result.best_step, result.best_dev_loss = stopper.best_step, stopper.best
    return state


@dataclass
class LocalEngine:
    """The in-process engine: torch Adam over the model's trainable parameters (no weight decay)."""

    name: str
    model: torch.nn.Module
    objective: StageObjective
    dev_items: list[TrainItem]
    settings: StageSettings
    pad_id: int
    device: object
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"stage {self.name}: the model has no trainable parameters (no adapter?)")
        self.optimizer = torch.optim.Adam(params, lr=self.settings.lr, weight_decay=0.0)

    def train_step(self, chunk: list[TrainItem], step: int) -> float:
        batch = collate(chunk, self.pad_id, _layers(self.objective)).to(self.device)
        try:
            loss = stage_loss(self.model, batch, self.objective)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"stage {self.name}: loss is {loss.item()} at step {step}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        except RuntimeError as exc:
            if is_out_of_memory(exc):
                raise out_of_memory(f"stage {self.name}", step, f"a batch of {len(chunk)} (train.batch_size="
                                    f"{self.settings.batch_size})", exc) from exc
            raise
        return loss.item()

    def dev_loss(self) -> float:
        return dev_loss(self.model, self.dev_items, self.objective, self.pad_id, self.settings.batch_size, self.device)

    def adapter(self) -> dict:
        return trainable_state(self.model)

    def train(self) -> None:
        self.model.train()


def train_stage(
    model,
    name: str,
    train_items: list[TrainItem],
    dev_items: list[TrainItem],
    objective: StageObjective,
    settings: StageSettings,
    pad_id: int,
    device,
    on_log: Optional[Callable[[str, dict], None]] = None,
) -> StageResult:
    """Train the model's trainable parameters on one stage, in this process; returns its history. The
    model ends holding the best adapter by dev loss (with `settings.keep_initial` the starting adapter
    is a candidate too, as step 0)."""
    engine = LocalEngine(name, model, objective, dev_items, settings, pad_id, device)
    state = stage_loop(name, settings, train_items, engine, on_record=(lambda e: on_log(name, e)) if on_log else None)
    model.eval()
    load_trainable_state(model, state.stopper.best_state)
    return state.result
