"""Consolidated training state of DeepSpeed engines (one process, gloo world of 1): for every ZeRO
stage and the CPU-offload preset, gathering the adapter and Adam state and loading them into a fresh engine continues training
exactly as the original engine does."""

from __future__ import annotations

import socket

import pytest
import torch

from ia2ray.config.schema import LoraConfig, ModelConfig, TrainConfig
from ia2ray.core.model import add_lora, load_model, load_trainable_state


@pytest.fixture(scope="module")
def process_group():
    import deepspeed
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        deepspeed.init_distributed(dist_backend="gloo")
        yield
        dist.destroy_process_group()


def _engine(path, stage, adapter=None):
    import deepspeed

    from ia2ray.train.dsconfig import deepspeed_config

    model, _ = load_model(ModelConfig(path=str(path)))
    model = add_lora(model, LoraConfig(rank=4), seed=0)
    if adapter is not None:
        load_trainable_state(model, adapter)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    preset = {"deepspeed": stage} if isinstance(stage, str) else {"zero_stage": stage}  # a stage or a preset name
    train = TrainConfig(batch_size=2, **preset)
    cfg = deepspeed_config(train, world_size=1, on_gpu=False)
    if cfg["zero_optimization"]["stage"] == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the LoRA matrices
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)
    return engine


def _step(engine, ids):
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return loss.item()


@pytest.mark.parametrize("stage", [0, 1, 2, 3, "zero3-offload"])
def test_state_round_trip_continues_identically(process_group, tiny_checkpoints, stage):
    from ia2ray.train.state import (
        adapter_state,
        load_optimizer_state,
        optimizer_state,
        optimizer_step,
    )

    path = tiny_checkpoints("llama")
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    first = _engine(path, stage)
    assert optimizer_step(first) == 0 and optimizer_state(first) == {}
    for _ in range(3):
        _step(first, ids)
    adapter, moments, step = adapter_state(first), optimizer_state(first), optimizer_step(first)
    assert step == 3 and adapter.keys() == moments.keys() and len(adapter) > 0
    assert all(m["exp_avg_sq"].abs().sum() > 0 for m in moments.values() if m["exp_avg_sq"].numel())

    second = _engine(path, stage, adapter)
    load_optimizer_state(second, moments, step)
    assert optimizer_step(second) == 3
    for name, m in optimizer_state(second).items():
        torch.testing.assert_close(m["exp_avg"], moments[name]["exp_avg"], atol=0, rtol=0)
    assert _step(second, ids) == pytest.approx(_step(first, ids), abs=1e-6)
    after_first, after_second = adapter_state(first), adapter_state(second)
    for name in after_first:
        torch.testing.assert_close(after_second[name], after_first[name], atol=1e-6, rtol=0)
    # a fresh Adam (no loaded moments) would have taken a different step: the state mattered
    fresh = _engine(path, stage, adapter)
    _step(fresh, ids)
    assert any((adapter_state(fresh)[n] - after_first[n]).abs().max() > 1e-5 for n in after_first)
    for e in (first, second, fresh):
        e.destroy()
