"""World-size-independent training state of a DeepSpeed engine: full fp32 adapter weights and full
Adam moments per parameter name, gathered from (or scattered back to) however ZeRO partitions them.

Every function here is collective under ZeRO-3 (and all-reduces under ZeRO-1/2): call it on every
rank, in the same order. Stage 0 in fp32 keeps plain parameters and a plain torch optimizer.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_optimizer_state,
)

MOMENTS = ("exp_avg", "exp_avg_sq")  # torch Adam's per-parameter state


def trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _zero_managed(p) -> bool:
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch Adam inside DeepSpeed's wrapper (ZeRO and bf16 wrap it; stage-0 fp32 does not)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def optimizer_step(engine) -> int:
    """Adam's step count (0 before the first step)."""
    for st in _base_optimizer(engine).state.values():
        if "step" in st:
            return int(st["step"])
    return 0


def adapter_state(engine) -> dict[str, torch.Tensor]:
    """Full fp32 copies (CPU) of the trainable parameters, by name."""
    out = {}
    for name, p in trainable(engine):
        full = safe_get_full_fp32_param(p) if _zero_managed(p) else p.detach()
        out[name] = full.detach().to("cpu", torch.float32, copy=True).reshape(_shape(p))
    return out


def set_module_adapter(module, adapter: dict[str, torch.Tensor]) -> None:
    """Copy a full adapter (by parameter name) into the module's trainable parameters, outside any
    engine: before a stage's engine is built, and before evaluation. Parameters that an earlier ZeRO-3
    engine partitioned are gathered, set on rank 0 and partitioned again (collective: every rank)."""
    import deepspeed

    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(adapter))
    if missing:
        raise KeyError(f"adapter has no weights for {missing[:3]}")
    partitioned = [p for p in params.values() if hasattr(p, "ds_id")]
    gather = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0) if partitioned else nullcontext()
    with gather, torch.no_grad():
        for name, p in params.items():
            p.copy_(adapter[name].to(p.device, p.dtype).view_as(p))


def optimizer_state(engine) -> dict[str, dict[str, torch.Tensor]]:
    """Full Adam moments (CPU fp32) by parameter name; empty before the first step."""
    if optimizer_step(engine) == 0:
        return {}
    base = _base_optimizer(engine)
    out = {}
    for name, p in trainable(engine):
        if _zero_managed(p):
            out[name] = {k: safe_get_full_optimizer_state(p, k).detach().to("cpu", torch.float32, copy=True)
                         .reshape(_shape(p)) for k in MOMENTS}
        else:
            out[name] = {k: base.state[p][k].detach().to("cpu", torch.float32, copy=True) for k in MOMENTS}
    return out


def load_optimizer_state(engine, moments: dict[str, dict[str, torch.Tensor]], step: int) -> None:
    """Give a freshly initialised engine the Adam state of a checkpoint (any former world size)."""
    if step == 0:
        return
    base = _base_optimizer(engine)
    # torch Adam creates its state lazily at the first step; create it now, then fill it. ZeRO-3 keeps
    # its flat fp32 partitions out of the param groups between steps.
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    flats = flats if flats is not None else [p for group in base.param_groups for p in group["params"]]
    for flat in flats:
        base.state[flat] = {"step": torch.tensor(float(step)), **{k: torch.zeros_like(flat) for k in MOMENTS}}
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2 and bf16: map each parameter onto its fragment of the flat state
        link()
    params = dict(trainable(engine))
    missing = sorted(set(params) - set(moments))
    if missing:
        raise KeyError(f"checkpoint has no optimizer state for {missing[:3]}")
    for name, p in params.items():
        for k in MOMENTS:
            value = moments[name][k]
            if _zero_managed(p):
                safe_set_full_optimizer_state(p, value.to(_device(engine), torch.float32).reshape(_shape(p)), k)
            else:
                base.state[p][k].copy_(value.view_as(p))


def _shape(p) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def _device(engine) -> torch.device:
    return engine.device if hasattr(engine, "device") else torch.device("cpu")
