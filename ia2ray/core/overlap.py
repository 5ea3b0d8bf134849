"""LoRA subspace overlap: how much two adapters of the same model write into the same directions.

For one adapted module (a layer's projection) with LoRA matrices B1 [out, r1] and B2 [out, r2], take
the top-r left singular vectors U1, U2 of each B (r = min(r1, r2): with different ranks both sides keep
the r strongest directions, so the value stays in [0, 1]) and compute (1/r)·||U1ᵀU2||²_F. It is 1 when
the column spaces coincide and 0 when they are orthogonal; two random r-dimensional subspaces of an
out-dimensional space overlap r/out on average. An adapter pair's overlap is the mean over the modules
both adapt; per layer, the mean over that layer's modules.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

_LORA_B = re.compile(r"^(?P<module>.+)\.lora_B(?:\.[^.]+)?\.weight$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def top_left_singular(b: torch.Tensor, r: int) -> torch.Tensor:
    """[out, r]: the left singular vectors of `b` for its r largest singular values."""
    u, _, _ = torch.linalg.svd(b.double(), full_matrices=False)
    return u[:, :r]


def subspace_overlap(b1: torch.Tensor, b2: torch.Tensor) -> float:
    """(1/r)·||U1ᵀU2||²_F of the two LoRA B matrices' top-r left singular vectors, r = min of their ranks."""
    if b1.shape[0] != b2.shape[0]:
        raise ValueError(f"LoRA B matrices of different output sizes: {tuple(b1.shape)} and {tuple(b2.shape)}")
    r = min(b1.shape[1], b2.shape[1], b1.shape[0])
    u1, u2 = top_left_singular(b1, r), top_left_singular(b2, r)
    return float((u1.T @ u2).pow(2).sum() / r)


def lora_b(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module name -> its LoRA B matrix, from an adapter's state dict (peft's key names)."""
    out = {}
    for key, value in state.items():
        m = _LORA_B.match(key)
        if m:
            out[m.group("module")] = value
    return out


def load_lora_b(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA B matrices of a saved peft adapter folder (`adapter_model.safetensors`)."""
    from safetensors.torch import load_file

    file = Path(adapter_dir) / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no adapter weights")
    return lora_b(load_file(str(file)))


def adapter_overlap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    """{"mean", "modules": {module: overlap}, "layers": {layer: mean overlap}} over the modules both
    adapters adapt (`a`, `b`: module -> LoRA B, as from `lora_b`)."""
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError("the two adapters share no adapted module")
    modules = {m: subspace_overlap(a[m], b[m]) for m in shared}
    layers: dict[int, list[float]] = {}
    for m, v in modules.items():
        found = _LAYER.search(f".{m}.")
        if found:
            layers.setdefault(int(found.group(1)), []).append(v)
    return {"mean": sum(modules.values()) / len(modules), "modules": modules,
            "layers": {k: sum(v) / len(v) for k, v in sorted(layers.items())}}
