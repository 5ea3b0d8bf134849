"""Activation sites: the recorded tensors are exactly the o_proj / decoder-layer outputs, on every
tiny architecture, plain and peft-wrapped."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from ia2ray.core.sites import (
    SITES,
    ActivationRecorder,
    base_model,
    decoder_layers,
    hidden_size,
    lora_target_modules,
    num_layers,
    site_module,
)
from ia2ray.core.tiny import TINY_ARCHS, default_corpus, tiny_model, train_bpe_tokenizer

LAYERS, HIDDEN = 3, 32


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(default_corpus())


def make(arch, tok):
    return tiny_model(arch, tok, hidden_size=HIDDEN, num_layers=LAYERS, initializer_range=0.2)


def out_projection(model, layer):
    """The attention output projection, found independently of site_module."""
    decoder = base_model(model).get_decoder()
    block = decoder.h[layer] if hasattr(decoder, "h") else decoder.layers[layer]
    return block.attn.c_proj if hasattr(block, "attn") else block.self_attn.o_proj


def final_norm(model):
    decoder = base_model(model).get_decoder()
    return decoder.ln_f if hasattr(decoder, "ln_f") else decoder.norm


def inputs(tok):
    rows = ["Text: great movie\nLabel: positive", "Question: what is 3 plus 4?\nAnswer: 7"]
    ids = [tok(r)["input_ids"][:9] for r in rows]
    return torch.tensor(ids)


def record_projection_outputs(model):
    seen, handles = {}, []
    for layer in range(LAYERS):
        hook = lambda mod, args, out, layer=layer: seen.__setitem__(layer, out)  # noqa: E731
        handles.append(out_projection(model, layer).register_forward_hook(hook))
    return seen, handles


def hook_count(model):
    """Number of ActivationRecorder hooks on the site modules (transformers adds hooks of its own)."""
    hooks = [h for l in range(LAYERS) for s in SITES for h in site_module(model, l, s)._forward_hooks.values()]
    return sum("ActivationRecorder" in getattr(h, "__qualname__", "") for h in hooks)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_attn_out_is_output_projection(arch, tok):
    model = make(arch, tok)
    assert num_layers(model) == LAYERS and hidden_size(model) == HIDDEN
    assert len(decoder_layers(model)) == LAYERS
    seen, handles = record_projection_outputs(model)
    x = inputs(tok)
    with torch.no_grad(), ActivationRecorder(model, "attn_out") as rec:
        hidden = model(x, output_hidden_states=True).hidden_states
        acts = rec.stack()
        assert hook_count(model) == LAYERS
    for h in handles:
        h.remove()
    assert acts.shape == (LAYERS, 2, 9, HIDDEN)
    for layer in range(LAYERS):
        assert torch.equal(acts[layer], seen[layer]) and acts[layer].abs().max() > 0.1
        assert not torch.allclose(acts[layer], hidden[layer + 1])  # not the residual stream
    assert hook_count(model) == 0


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_residual_is_decoder_layer_output(arch, tok):
    model = make(arch, tok)
    with torch.no_grad(), ActivationRecorder(model, "residual") as rec:
        hidden = model(inputs(tok), output_hidden_states=True).hidden_states
        acts = rec.stack()
    assert len(hidden) == LAYERS + 1
    for layer in range(LAYERS - 1):
        assert torch.equal(acts[layer], hidden[layer + 1])
    # HF's last hidden state is after the final norm; the site is the layer output before it.
    with torch.no_grad():
        assert torch.equal(final_norm(model)(acts[-1]), hidden[-1])
    assert hook_count(model) == 0


def test_layers_subset_in_given_order_and_latest(tok):
    model = make("llama", tok)
    with torch.no_grad(), ActivationRecorder(model, "attn_out") as full:
        model(inputs(tok))
        everything = full.stack()
    with torch.no_grad(), ActivationRecorder(model, "attn_out", layers=[2, 0]) as rec:
        with pytest.raises(KeyError, match="run a forward"):
            rec.latest(2)
        model(inputs(tok))
        assert torch.equal(rec.stack(), everything[[2, 0]])
        assert torch.equal(rec.latest(0), everything[0])
    with torch.no_grad(), ActivationRecorder(model, "attn_out", last_position_only=True) as rec:
        model(inputs(tok))
        assert torch.equal(rec.stack(), everything[:, :, -1:])


def test_hooks_removed_when_body_raises(tok):
    model = make("gpt2", tok)
    with pytest.raises(RuntimeError, match="boom"):
        with ActivationRecorder(model, "attn_out"):
            assert hook_count(model) == LAYERS
            raise RuntimeError("boom")
    assert hook_count(model) == 0


def test_graph_kept_for_student_loss(tok):
    model = make("qwen3", tok)
    with ActivationRecorder(model, "attn_out", layers=[1]) as rec:
        model(inputs(tok))
        rec.stack().pow(2).mean().backward()
    grad = out_projection(model, 1).weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert out_projection(model, 2).weight.grad is None  # later layers do not feed layer 1


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_peft_wrapped_model(arch, tok):
    model = make(arch, tok)
    targets = lora_target_modules(model, ["q_proj", "k_proj", "v_proj", "o_proj"])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                        fan_in_fan_out=arch == "gpt2")
    peft_model = get_peft_model(model, config)
    assert num_layers(peft_model) == LAYERS and hidden_size(peft_model) == HIDDEN
    assert hasattr(out_projection(peft_model, 0), "lora_A")  # the projection got an adapter
    seen, handles = record_projection_outputs(peft_model)
    x = inputs(tok)
    with ActivationRecorder(peft_model, "attn_out", layers=[2, 0]) as rec:
        peft_model(input_ids=x)
        acts = rec.stack()
        assert torch.equal(acts[0], seen[2]) and torch.equal(acts[1], seen[0])
        with torch.no_grad(), peft_model.disable_adapter():
            peft_model(input_ids=x)
            base_acts = rec.stack()
    for h in handles:
        h.remove()
    assert torch.equal(base_acts[0], seen[2]) and torch.equal(base_acts[1], seen[0])
    assert not torch.allclose(acts, base_acts)  # the adapter changes the site
    acts.pow(2).mean().backward()
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads[:2])
    assert hook_count(peft_model) == 0


def test_peft_adapter_output_matches_hooked_projection(tok):
    model = make("llama", tok)
    config = LoraConfig(r=4, target_modules=lora_target_modules(model, ["o_proj"]), init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    seen, handles = record_projection_outputs(peft_model)
    with torch.no_grad(), ActivationRecorder(peft_model, "attn_out") as rec:
        peft_model(input_ids=inputs(tok))
        acts = rec.stack()
    for h in handles:
        h.remove()
    for layer in range(LAYERS):
        assert torch.equal(acts[layer], seen[layer])


def test_lora_target_modules_llama(tok):
    model = make("llama", tok)
    assert lora_target_modules(model, ["q_proj", "k_proj", "o_proj"]) == ["q_proj", "k_proj", "o_proj"]
    assert lora_target_modules(model, ["v_proj", "gate_proj", "v_proj"]) == ["v_proj", "gate_proj"]
    with pytest.raises(ValueError, match="nonexistent"):
        lora_target_modules(model, ["q_proj", "nonexistent"])


def test_lora_target_modules_gpt2(tok):
    model = make("gpt2", tok)
    assert lora_target_modules(model, ["q_proj", "k_proj", "o_proj"]) == ["c_attn", "attn.c_proj"]
    assert lora_target_modules(model, ["v_proj", "c_fc"]) == ["c_attn", "c_fc"]
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        lora_target_modules(model, ["gate_proj"])
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["attn.c_proj"], fan_in_fan_out=True))
    block = base_model(peft_model).transformer.h[0]
    assert hasattr(block.attn.c_proj, "lora_A") and not hasattr(block.mlp.c_proj, "lora_A")


def test_unknown_architecture_and_site(tok):
    with pytest.raises(ValueError, match="Sequential.*layers or h"):
        decoder_layers(nn.Sequential(nn.Linear(2, 2)))
    model = make("mistral", tok)
    with pytest.raises(ValueError, match="unknown activation site"):
        ActivationRecorder(model, "mlp_out")
    with pytest.raises(ValueError, match="out of range"):
        site_module(model, LAYERS, "attn_out")
