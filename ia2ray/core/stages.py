"""One training stage in one process: Adam over the adapter, dev-loss early stopping, best-state restore.

The paper's recipe: Adam without weight decay, scheduler or clipping; dev loss checked every
`eval_every` optimiser steps and at the end of every epoch (as the reference does); stop after
`patience` checks without improvement; restore the best adapter. We also check once before the first
step, so a stage that only makes the dev loss worse leaves the adapter as it found it. The loop below reads top to bottom; the distributed version reuses `stage_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

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
    """Train the model's trainable parameters on one stage; returns its history. The model ends
    holding the best adapter (by dev loss; the starting adapter counts as step 0)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"stage {name}: the model has no trainable parameters (no adapter?)")
    optimizer = torch.optim.Adam(params, lr=settings.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(settings.seed)
    result = StageResult(name)
    log = on_log or (lambda _n, _m: None)
    stopper = EarlyStopping(settings.patience)

    def check(step: int) -> bool:
        loss = dev_loss(model, dev_items, objective, pad_id, settings.batch_size, device)
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"stage {name}: dev loss is {loss} at step {step}")
        result.history.append({"step": step, "dev_loss": loss})
        log(name, {"step": step, "dev_loss": loss})
        return stopper.update(loss, step, lambda: trainable_state(model))

    check(0)
    model.train()
    step = 0
    for epoch in range(settings.max_epochs):
        result.epochs = epoch + 1
        order = torch.randperm(len(train_items), generator=gen)
        chunks = list(batches(train_items, settings.batch_size, order))
        for i, chunk in enumerate(chunks):
            batch = collate(chunk, pad_id, _layers(objective)).to(device)
            try:
                loss = stage_loss(model, batch, objective)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"stage {name}: loss is {loss.item()} at step {step + 1}")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            except RuntimeError as exc:
                if is_out_of_memory(exc):
                    raise out_of_memory(f"stage {name}", step + 1, f"a batch of {len(chunk)} (train.batch_size="
                                        f"{settings.batch_size})", exc) from exc
                raise
            step += 1
            result.history.append({"step": step, "train_loss": loss.item()})
            log(name, {"step": step, "train_loss": loss.item()})
            epoch_end = i == len(chunks) - 1  # the reference also checks at every epoch end
            if (step % settings.eval_every == 0 or epoch_end) and check(step):
                result.stopped_early = True
                break
        if result.stopped_early:
            break
    result.steps = step
    result.best_step, result.best_dev_loss = stopper.best_step, stopper.best
    model.eval()
    load_trainable_state(model, stopper.best_state)
    return result
