"""Model, tokenizer and LoRA set-up for any Hugging Face causal LM."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from ia2ray.config.schema import LoraConfig, ModelConfig
from ia2ray.core.fingerprint import content_hash
from ia2ray.core.gguf import converted_dir, is_gguf_path
from ia2ray.core.sites import lora_target_modules, num_layers
from ia2ray.fileio import ia2ray_home

log = logging.getLogger(__name__)

# Known noise, silenced here, where every process that loads a model passes: peft asks transformers 5 for
# `is_gradient_checkpointing` (a FutureWarning per model wrapped) and transformers draws a "Loading
# weights" progress bar per load (dozens in a study's output).
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

BUILTIN_PREFIX = "builtin:tiny-"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` -> cuda when available, else cpu; anything else is passed to torch.device."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def model_dir(cfg: ModelConfig) -> str:
    """Hub id or local path to load; `builtin:tiny-<arch>` is built once into the user cache;
    `builtin:testbed` is the shipped ICL testbed model (ia2ray/testbed/model); `builtin:smollm2` and
    `*.gguf` files are converted once into a cached folder (`ia2ray.core.gguf`)."""
    if is_gguf_path(cfg.path):
        return str(converted_dir(cfg.path, cfg.dtype))
    if cfg.path == "builtin:testbed":
        path = Path(str(resources.files("ia2ray") / "testbed" / "model"))  # shipped package data
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"model.path: the testbed model is missing from {path}; "
                                    f"rebuild it with `python -m ia2ray.testbed --rebuild --out {path}`")
        return str(path)
    if not cfg.path.startswith(BUILTIN_PREFIX):
        local = cfg.path.startswith(("/", "./", "../", "~")) or os.sep + os.sep in cfg.path
        if local and not Path(cfg.path).expanduser().is_dir():  # a path, not a hub id: say so, not the hub's words
            raise FileNotFoundError(f"model.path: {cfg.path!r} is not a folder (a local model is a folder holding "
                                    "config.json and the weights; a hub id looks like 'namespace/name')")
        return cfg.path
    from ia2ray.core.tiny import TINY_ARCHS, build_tiny_checkpoint

    arch = cfg.path[len(BUILTIN_PREFIX):]
    if arch not in TINY_ARCHS:
        raise ValueError(f"model.path: unknown builtin model {cfg.path!r}; expected builtin:tiny-<{'|'.join(TINY_ARCHS)}>")
    return str(build_tiny_checkpoint(ia2ray_home() / "models" / f"tiny-{arch}", arch=arch))


_configs: dict[str, object] = {}  # model config (JSON) -> its transformers config, read once per process


def model_config(cfg: ModelConfig):
    """The model's transformers config (no weights), read once per process."""
    key = content_hash(cfg.model_dump(mode="json"))
    if key not in _configs:
        _configs[key] = AutoConfig.from_pretrained(model_dir(cfg), revision=cfg.revision,
                                                   trust_remote_code=cfg.trust_remote_code)
    return _configs[key]


def model_depth(cfg: ModelConfig) -> int:
    """Number of decoder layers, from the model's config."""
    return model_config(cfg).num_hidden_layers


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer, with a pad token (the EOS token when it has none)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir(cfg), revision=cfg.revision,
                                              trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class _Kept:
    """The base model this process keeps between runs (a warm Ray Tune trial actor)."""

    key: str  # the model config and device it was loaded with
    model: object
    tokenizer: object
    wrapper: object = None  # the peft model `add_lora` put around it; unloaded at the next `load_model`


_kept: Optional[_Kept] = None
LOADS = {"cold": 0, "warm": 0}  # load_model calls in this process that read weights / reused kept ones


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu", keep: bool = False):
    """Load (model, tokenizer) from a hub id or a local directory; the tokenizer always has a pad token.

    With `keep`, the model stays loaded in this process and the next `keep` call with the same model
    config and device returns it again, with the LoRA layers of the last `add_lora` removed (the base
    weights are frozen and never merged, so it is the model a fresh load gives). One model is kept at
    a time: a different one replaces it."""
    global _kept
    key = content_hash([cfg.model_dump(mode="json"), str(torch.device(device))])
    if keep and _kept is not None and _kept.key == key:
        if _kept.wrapper is not None:
            _kept.wrapper.unload()  # puts the original modules back into the base model, in place
            _kept.wrapper = None
        _kept.model.eval()  # a run that failed mid-stage left it in training mode
        LOADS["warm"] += 1
        return _kept.model, _kept.tokenizer
    if keep:
        _kept = None  # free the old model before loading the new one
    path = model_dir(cfg)
    tokenizer = load_tokenizer(cfg)
    hf_logging.disable_progress_bar()  # the "Loading weights" bar (see the note at the top)
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=cfg.revision, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
    )
    model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    LOADS["cold"] += 1
    if keep:
        _kept = _Kept(key, model, tokenizer)
    return model, tokenizer


def weight_bytes(cfg: ModelConfig) -> Optional[int]:
    """Bytes of the model's weights once loaded in `model.dtype`, from the safetensors headers of a
    local folder (no tensor is read); None for a hub id or a folder without safetensors files."""
    import json
    import math
    import struct

    path = Path(model_dir(cfg))
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    numel = 0
    for f in files:
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        numel += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return numel * DTYPES[cfg.dtype].itemsize


def resolve_layers(spec: str | list[int], n_layers: int, key: str = "align.layers") -> list[int]:
    """`all`, `band:START:WIDTH`, `every:K[:OFFSET]` or an explicit list -> layer indices.

    An explicit list keeps its order, so `align.layer_weights` pairs with it entry by entry."""
    if isinstance(spec, list):
        layers = list(spec)
    elif spec == "all":
        layers = list(range(n_layers))
    elif spec.startswith("band:"):
        start, width = (int(x) for x in spec.split(":")[1:])
        layers = list(range(start, start + width))
    elif spec.startswith("every:"):
        parts = [int(x) for x in spec.split(":")[1:]]
        k, offset = parts[0], parts[1] if len(parts) > 1 else 0
        if k < 1:
            raise ValueError(f"{key}: every:K needs K >= 1")
        layers = list(range(offset, n_layers, k))
    else:
        raise ValueError(f"{key}: cannot parse {spec!r}")
    bad = [i for i in layers if i >= n_layers]
    if bad or not layers:
        raise ValueError(f"{key}: {spec!r} selects layers {bad or layers} but the model has {n_layers} layers (0..{n_layers - 1})")
    return layers


def add_lora(model, cfg: LoraConfig, seed: int = 0):
    """Wrap `model` with a fresh LoRA adapter (seeded init); only adapter weights are trainable."""
    # peft is imported here, not at the top: a Ray Train trial driver never adds an adapter, and peft
    # costs it about 150 MB and seconds of imports (bench/bench_trials.py, driver memory)
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if _kept is not None and _kept.model is model and _kept.wrapper is not None:
        _kept.wrapper.unload()  # one adapter at a time on the kept model
        _kept.wrapper = None
    n = num_layers(model)
    if cfg.layers is not None:
        resolve_layers(cfg.layers, n, key="lora.layers")
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=lora_target_modules(model, cfg.targets),
        layers_to_transform=cfg.layers,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, peft_cfg)
    if _kept is not None and _kept.model is model:
        _kept.wrapper = peft_model
    return peft_model


def trainable_state(model) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the trainable (adapter) parameters."""
    return {k: p.detach().to("cpu", copy=True) for k, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    """Copy a `trainable_state` snapshot back into the model in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].device, params[k].dtype))
