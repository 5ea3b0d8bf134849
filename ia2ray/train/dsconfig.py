"""DeepSpeed configs: shipped presets (`zero2`, `zero3`, `zero3-offload`) or a user JSON file, with the
batch geometry and precision filled in from the run config.

The global batch (`train.batch_size` examples per optimiser step) is split across W workers: each
takes `ceil(B / W)` slots, run as micro-batches of `train.micro_batch_size` (default: all of its
slots at once) with gradient accumulation. Slots past the end of a short batch are padded with
weight-0 examples (see `ia2ray.train.worker`), so DeepSpeed always sees a fixed geometry.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

from ia2ray.config.load import ConfigError
from ia2ray.config.schema import DEEPSPEED_PRESETS, TrainConfig

# Keys ia2ray sets itself; a user file that sets them is rejected rather than silently overridden.
_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
          "scheduler", "bf16", "fp16")


@dataclass(frozen=True)
class BatchGeometry:
    world_size: int
    slots: int  # examples per worker per optimiser step (some may be weight-0 padding)
    micro: int  # examples per forward pass
    accumulation: int  # micro-batches per optimiser step

    @property
    def global_slots(self) -> int:
        return self.slots * self.world_size


def batch_geometry(batch_size: int, world_size: int, micro_batch_size: Optional[int] = None) -> BatchGeometry:
    per_worker = math.ceil(batch_size / world_size)
    micro = min(micro_batch_size or per_worker, per_worker)
    accumulation = math.ceil(per_worker / micro)
    return BatchGeometry(world_size, micro * accumulation, micro, accumulation)


def load_preset(name_or_path: str) -> dict:
    """The preset's dict; ConfigError naming `train.deepspeed` and the file when it is unusable."""
    if name_or_path in DEEPSPEED_PRESETS:
        text = resources.files("ia2ray.train").joinpath("presets", f"{name_or_path}.json").read_text()
        return json.loads(text)
    path = Path(name_or_path).expanduser()
    where = f"train.deepspeed={name_or_path!r}"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{where}: no such file ({path.resolve()})"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{where}: cannot read {path}: {exc}"]) from None
    except json.JSONDecodeError as exc:
        raise ConfigError([f"{where}: {path}:{exc.lineno}: invalid JSON ({exc.msg})"]) from None
    if not isinstance(cfg, dict):
        raise ConfigError([f"{where}: {path} must hold a JSON object"])
    owned = [k for k in _OWNED if k in cfg]
    if owned:
        raise ConfigError([f"{where}: {path} sets {', '.join(owned)}; ia2ray derives batch sizes from "
                           "train.batch_size/micro_batch_size, precision from train.precision, and uses its own "
                           "Adam: remove these keys"])
    return cfg


def zero_stage(train: TrainConfig, preset: Optional[dict] = None) -> int:
    """The ZeRO stage a run uses: `train.zero_stage`, else the preset's (`preset`: the loaded
    `train.deepspeed`, read from disk when not given)."""
    if train.zero_stage is not None:
        return train.zero_stage
    preset = load_preset(train.deepspeed) if preset is None else preset
    return int(preset.get("zero_optimization", {}).get("stage", 0))


def use_bf16(train: TrainConfig, on_gpu: bool) -> bool:
    return train.precision == "bf16" or (train.precision == "auto" and on_gpu)


def deepspeed_config(train: TrainConfig, world_size: int, on_gpu: bool, preset: Optional[dict] = None) -> dict:
    """The complete DeepSpeed config of one stage on `world_size` workers. Workers pass `preset`, the
    `train.deepspeed` file as the driver read it (a path means nothing on another node or cwd)."""
    cfg = copy.deepcopy(load_preset(train.deepspeed) if preset is None else preset)
    geo = batch_geometry(train.batch_size, world_size, train.micro_batch_size)
    zero = dict(cfg.get("zero_optimization", {}))
    zero["stage"] = zero_stage(train, cfg)
    if zero["stage"] < 3:
        zero.pop("offload_param", None)
        zero = {k: v for k, v in zero.items() if not k.startswith("stage3_")}
    # DeepSpeed clips gradients to norm 1.0 unless told otherwise; the paper (and the in-process loop)
    # does not clip. A user JSON may still set gradient_clipping.
    cfg.setdefault("gradient_clipping", 0.0)
    cfg.update(
        zero_optimization=zero,
        train_batch_size=geo.global_slots,
        train_micro_batch_size_per_gpu=geo.micro,
        gradient_accumulation_steps=geo.accumulation,
        bf16={"enabled": use_bf16(train, on_gpu)},
        zero_allow_untested_optimizer=True,  # our torch Adam: DeepSpeed's own would JIT-compile an op
    )
    return cfg
