"""Activation sites of decoder-only LMs, and the one hook implementation that records them.

The same `ActivationRecorder` serves teacher capture (no grad, KV cache) and student training
(graph kept so the alignment loss back-propagates into the LoRA weights).

Sites:
  attn_out -- output of each decoder layer's self-attention block after the output projection
              (o_proj; GPT-2: attn.c_proj), before it is added to the residual stream. IA2's site.
  residual -- output of the decoder layer (the residual stream after the layer). For the last
              layer this is BEFORE the model's final norm.
"""

from __future__ import annotations

from types import TracebackType

import torch
from torch import nn

SITES = ("attn_out", "residual")

_LAYER_LISTS = ("layers", "h")  # LlamaModel/Qwen*/Mistral: .layers; GPT2Model: .h
_ATTN_CHILDREN = ("self_attn", "attn")
_WRAPPER_CLASSES = ("DistributedDataParallel", "DeepSpeedEngine", "FullyShardedDataParallel")
# canonical LoRA target -> module names to look for, first one present wins
_LORA_ALIASES = {
    "q_proj": ("q_proj", "c_attn"),
    "k_proj": ("k_proj", "c_attn"),
    "v_proj": ("v_proj", "c_attn"),
    "o_proj": ("o_proj", "attn.c_proj"),
}


def base_model(model: nn.Module) -> nn.Module:
    """The HF model inside DDP / DeepSpeed / peft wrappers (returned unchanged when unwrapped)."""
    while type(model).__name__ in _WRAPPER_CLASSES and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):  # peft PeftModel
        model = model.get_base_model()
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers of an HF causal LM (optionally peft/DDP-wrapped)."""
    inner = base_model(model)
    candidates = []
    if hasattr(inner, "get_decoder"):
        candidates.append(inner.get_decoder())
    candidates += [getattr(inner, name) for name in ("model", "transformer") if hasattr(inner, name)]
    candidates.append(inner)
    for decoder in candidates:
        for name in _LAYER_LISTS:
            layers = getattr(decoder, name, None)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return layers
    raise ValueError(
        f"cannot find decoder layers in {type(inner).__name__}: looked for a non-empty ModuleList "
        f"named {' or '.join(_LAYER_LISTS)} on get_decoder(), .model, .transformer and the model"
    )


def num_layers(model: nn.Module) -> int:
    """Number of decoder layers."""
    return len(decoder_layers(model))


def hidden_size(model: nn.Module) -> int:
    """Width of the residual stream (= width of every site's output)."""
    config = base_model(model).config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return int(config.hidden_size)


def site_module(model: nn.Module, layer: int, site: str) -> nn.Module:
    """The module whose forward output (first element if a tuple) is `site` at `layer`."""
    if site not in SITES:
        raise ValueError(f"unknown activation site {site!r}; expected one of {SITES}")
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range: the model has {len(layers)} decoder layers")
    block = layers[layer]
    if site == "residual":
        return block
    for name in _ATTN_CHILDREN:
        child = getattr(block, name, None)
        if isinstance(child, nn.Module):
            return child
    raise ValueError(
        f"cannot find the self-attention module of {type(block).__name__} in "
        f"{type(base_model(model)).__name__}: looked for a child named {' or '.join(_ATTN_CHILDREN)}"
    )


class StopForward(Exception):
    """Raised by an `ActivationRecorder(stop_early=True)` once its last layer is recorded."""


class ActivationRecorder:
    """Context manager recording a site's output at chosen layers on every forward.

        with ActivationRecorder(model, "attn_out", layers=[3, 7]) as rec:
            model(input_ids)
            acts = rec.stack()          # [2, B, T, d], graph kept

    `latest(layer)` is the output of the most recent forward ([B, T, d]). With
    `last_position_only=True` only position -1 is kept ([B, 1, d]), which saves memory when
    decoding long prompts. With `stop_early=True` the hook of the deepest recorded layer raises
    `StopForward`, so layers above it are never computed (run the forward via `forward_until`).
    Hooks are removed on exit, also when the body raises.
    """

    def __init__(
        self,
        model: nn.Module,
        site: str = "attn_out",
        layers: list[int] | None = None,
        *,
        last_position_only: bool = False,
        stop_early: bool = False,
    ) -> None:
        self.model = model
        self.site = site
        self.layers = list(range(num_layers(model))) if layers is None else [int(l) for l in layers]
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"duplicate layers in {self.layers}")
        self.modules = [site_module(model, layer, site) for layer in self.layers]
        self.last_position_only = last_position_only
        self.stop_layer = max(self.layers) if stop_early else None
        self._outputs: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, layer: int):
        def record(module: nn.Module, args: tuple, output) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            self._outputs[layer] = out[:, -1:] if self.last_position_only else out
            if layer == self.stop_layer:
                raise StopForward

        return record

    def __enter__(self) -> ActivationRecorder:
        try:
            for layer, module in zip(self.layers, self.modules):
                self._handles.append(module.register_forward_hook(self._hook(layer)))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks and drop recorded tensors (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()

    def clear(self) -> None:
        """Forget recorded outputs (keeps the hooks)."""
        self._outputs.clear()

    def latest(self, layer: int) -> torch.Tensor:
        """The site output of `layer` from the most recent forward: [B, T, d]."""
        if layer not in self._outputs:
            raise KeyError(f"nothing recorded for layer {layer} (recording {self.layers}); run a forward first")
        return self._outputs[layer]

    def stack(self) -> torch.Tensor:
        """All recorded layers of the most recent forward, in `layers` order: [len(layers), B, T, d]."""
        return torch.stack([self.latest(layer) for layer in self.layers])

    def forward_until(self, module: nn.Module, **inputs):
        """Call `module(**inputs)`; returns its output, or None when `stop_early` cut it short."""
        try:
            return module(**inputs)
        except StopForward:
            return None


def lora_target_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """Map canonical LoRA targets (q_proj, k_proj, v_proj, o_proj) to this architecture's names.

    GPT-2 has a fused q/k/v projection ("c_attn") and its attention output projection is
    "attn.c_proj" (the MLP also has a c_proj). Other names pass through if a module of that name
    exists. Returns peft `target_modules` entries (suffix-matched by peft), deduplicated, in order.
    """
    names = [name for name, _ in base_model(model).named_modules()]

    def present(candidate: str) -> bool:
        return any(name == candidate or name.endswith("." + candidate) for name in names)

    resolved: list[str] = []
    for target in targets:
        match = next((c for c in _LORA_ALIASES.get(target, (target,)) if present(c)), None)
        if match is None:
            raise ValueError(
                f"LoRA target {target!r} matches no module of {type(base_model(model)).__name__} "
                f"(looked for {_LORA_ALIASES.get(target, (target,))})"
            )
        if match not in resolved:
            resolved.append(match)
    return resolved
