"""Model loading from local directories, dtype, LoRA set-up and layer selection."""

from __future__ import annotations

import pytest
import torch

from ia2ray.config.schema import LoraConfig, ModelConfig
from ia2ray.core.model import (add_lora, load_model, load_trainable_state, model_dir, resolve_layers,
                               trainable_state)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("all", [0, 1, 2, 3, 4, 5]),
        ("band:2:3", [2, 3, 4]),
        ("every:2", [0, 2, 4]),
        ("every:3:1", [1, 4]),
        ([4, 0, 2], [4, 0, 2]),  # explicit lists keep their order (layer_weights pair with it)
    ],
)
def test_resolve_layers(spec, expected):
    assert resolve_layers(spec, 6) == expected


@pytest.mark.parametrize("spec", ["band:5:2", [0, 6], "every:2:9"])
def test_resolve_layers_out_of_range_names_the_key(spec):
    with pytest.raises(ValueError, match=r"align.layers: .* the model has 6 layers"):
        resolve_layers(spec, 6)


def test_load_local_checkpoint_in_bfloat16(tiny_checkpoints):
    path = str(tiny_checkpoints("qwen2"))
    model, tok = load_model(ModelConfig(path=path, dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert tok.pad_token_id is not None


def test_builtin_models_are_built_into_ia2ray_home(ia2ray_home):
    path = model_dir(ModelConfig(path="builtin:tiny-mistral"))
    assert path.startswith(str(ia2ray_home)) and path.endswith("tiny-mistral")
    with pytest.raises(ValueError, match="unknown builtin model"):
        model_dir(ModelConfig(path="builtin:tiny-falcon"))
    assert model_dir(ModelConfig(path="Qwen/Qwen3-4B-Base")) == "Qwen/Qwen3-4B-Base"


def _lora_layers(model):
    return sorted({int(n.split(".layers.")[1].split(".")[0]) for n, p in model.named_parameters()
                   if p.requires_grad and ".layers." in n})


def test_lora_targets_layers_and_seeded_init(tiny_checkpoints):
    path = str(tiny_checkpoints("llama"))
    model, _ = load_model(ModelConfig(path=path))
    peft = add_lora(model, LoraConfig(rank=4, targets=["q_proj", "o_proj"], layers=[1, 3]), seed=7)
    names = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert _lora_layers(peft) == [1, 3]
    assert all(("q_proj" in n or "o_proj" in n) and "lora_" in n for n in names)
    state = trainable_state(peft)
    peft.unload()

    model2, _ = load_model(ModelConfig(path=path))
    peft2 = add_lora(model2, LoraConfig(rank=4, targets=["q_proj", "o_proj"], layers=[1, 3]), seed=7)
    again = trainable_state(peft2)
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    # snapshots restore in place
    with torch.no_grad():
        for p in peft2.parameters():
            if p.requires_grad:
                p.add_(1.0)
    load_trainable_state(peft2, state)
    assert all(torch.equal(v, trainable_state(peft2)[k]) for k, v in state.items())


def test_lora_layer_restriction_out_of_range_and_unknown_target(tiny_checkpoints):
    model, _ = load_model(ModelConfig(path=str(tiny_checkpoints("llama"))))
    with pytest.raises(ValueError, match="lora.layers"):
        add_lora(model, LoraConfig(layers=[9]))
    with pytest.raises(ValueError):
        add_lora(model, LoraConfig(targets=["not_a_module"]))
