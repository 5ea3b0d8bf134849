"""DeepSpeed presets, batch geometry and the distributed-training config keys (no Ray needed)."""

from __future__ import annotations

import json

import pytest
import torch

from ia2ray.config import ConfigError, load_run_config
from ia2ray.core.stages import is_out_of_memory, out_of_memory
from ia2ray.train.dsconfig import (
    batch_geometry,
    deepspeed_config,
    load_preset,
    zero_stage,
)


@pytest.mark.parametrize("batch,world,micro,expected", [
    (4, 1, None, (4, 4, 1)),  # (slots per worker, micro, accumulation)
    (4, 2, None, (2, 2, 1)),
    (4, 3, None, (2, 2, 1)),  # 6 slots for 4 examples: 2 padding slots of weight 0
    (8, 2, 1, (4, 1, 4)),
    (5, 2, 2, (4, 2, 2)),  # 3 per worker -> 2 micro-batches of 2
    (1, 2, None, (1, 1, 1)),
])
def test_batch_geometry(batch, world, micro, expected):
    geo = batch_geometry(batch, world, micro)
    assert (geo.slots, geo.micro, geo.accumulation) == expected
    assert geo.global_slots >= batch


@pytest.mark.parametrize("preset,stage", [("zero2", 2), ("zero3", 3), ("zero3-offload", 3)])
def test_presets_fill_in_batch_and_precision(preset, stage):
    cfg = load_run_config(None, [f"train.deepspeed={preset}", "train.batch_size=8", "train.micro_batch_size=2"])
    ds = deepspeed_config(cfg.train, world_size=2, on_gpu=False)
    assert ds["zero_optimization"]["stage"] == stage == zero_stage(cfg.train)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (8, 2, 2)
    assert ds["bf16"] == {"enabled": False}  # auto: fp32 on CPU
    assert deepspeed_config(cfg.train, 1, on_gpu=True)["bf16"] == {"enabled": True}
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["gradient_clipping"] == 0.0  # DeepSpeed's own default clips at 1.0; the paper does not clip
    assert ("offload_param" in ds["zero_optimization"]) == (preset == "zero3-offload")


def test_zero_stage_overrides_the_preset():
    cfg = load_run_config(None, ["train.zero_stage=3"])
    assert zero_stage(cfg.train) == 3
    ds = deepspeed_config(cfg.train, 1, on_gpu=False)
    assert ds["zero_optimization"]["stage"] == 3
    down = load_run_config(None, ["train.deepspeed=zero3", "train.zero_stage=1"])
    zero = deepspeed_config(down.train, 1, on_gpu=False)["zero_optimization"]
    assert zero["stage"] == 1 and not any(k.startswith("stage3_") for k in zero)
    assert deepspeed_config(load_run_config(None, ["train.precision=bf16"]).train, 1, False)["bf16"]["enabled"]


@pytest.mark.parametrize("overrides,message", [
    (["train.zero_stage=4"], "train.zero_stage: Input should be less than or equal to 3"),
    (["train.num_workers=-1"], "train.num_workers: Input should be greater than or equal to 0"),
    (["train.micro_batch_size=8", "train.batch_size=4"], "train.micro_batch_size=8 exceeds train.batch_size=4"),
    (["train.deepspeed=zero4"], "train.deepspeed='zero4' is neither a preset"),
    (["train.deepspeed=zero3-offload", "train.zero_stage=2"], "conflicts with train.deepspeed=zero3-offload"),
    (["train.precision=fp16"], "train.precision: Input should be 'auto', 'fp32' or 'bf16'"),
    (["train.cpus_per_worker=0"], "train.cpus_per_worker: Input should be greater than 0"),
])
def test_bad_train_keys_are_named(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_run_config(None, overrides)
    assert message in str(err.value)


def test_user_deepspeed_json(tmp_path):
    good = tmp_path / "mine.json"
    good.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    cfg = load_run_config(None, [f"train.deepspeed={good}"])
    assert zero_stage(cfg.train) == 1
    assert deepspeed_config(cfg.train, 1, False)["gradient_clipping"] == 0.0
    clipped = tmp_path / "clipped.json"
    clipped.write_text(json.dumps({"gradient_clipping": 0.5}))
    assert deepspeed_config(load_run_config(None, [f"train.deepspeed={clipped}"]).train, 1, False)["gradient_clipping"] == 0.5
    owned = tmp_path / "owned.json"
    owned.write_text(json.dumps({"train_batch_size": 32, "optimizer": {"type": "AdamW"}}))
    with pytest.raises(ConfigError, match=r"owned.json sets train_batch_size, optimizer"):
        load_preset(str(owned))
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "zero_optimization": {\n    "stage": 2,\n  }\n}')
    with pytest.raises(ConfigError, match=r"broken.json:4: invalid JSON"):
        load_preset(str(broken))
    with pytest.raises(ConfigError, match=r"train.deepspeed=.*missing.json.*no such file"):
        load_preset(str(tmp_path / "missing.json"))


def test_out_of_memory_is_reported_with_the_batch():
    try:  # a real allocator failure: 128 TiB
        torch.empty(2**45)
    except RuntimeError as exc:
        assert is_out_of_memory(exc)
        err = out_of_memory("stage align", 7, "a micro-batch of 4 on each of 2 worker(s)", exc)
    assert "stage align: out of memory at step 7 with a micro-batch of 4 on each of 2 worker(s)" in str(err)
    assert "train.micro_batch_size" in str(err) and "can't allocate memory" in str(err)
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
