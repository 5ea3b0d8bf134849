"""Fast teacher capture (batched, left-padded, KV cache) == the slow IA2 reference procedure."""

import pytest
import torch

from ia2ray.core.capture import capture_icl_activations, capture_reference
from ia2ray.core.generate import Generated, eos_token_ids, greedy_generate
from ia2ray.core.sites import ActivationRecorder
from ia2ray.core.tiny import TINY_ARCHS, default_corpus, tiny_model, train_bpe_tokenizer

LAYERS, HIDDEN, NEW = 3, 32, 6
PROMPTS = [  # different lengths, so every batch is left-padded
    "Text: great movie\nLabel:",
    "Text: a very long and boring film about a dog, a cat and a horse by the river\nLabel:",
    "0 1 2",
    "Question: what is 3 plus 4?\nAnswer:",
    "x",
]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(default_corpus())


def make(arch, tok):
    seed = TINY_ARCHS.index(arch)  # llama and mistral would otherwise be the same network
    return tiny_model(arch, tok, hidden_size=HIDDEN, num_layers=LAYERS, seed=seed, initializer_range=0.2)


def assert_same(fast, ref):
    assert len(fast) == len(ref)
    for f, r in zip(fast, ref):
        assert torch.equal(f.token_ids, r.token_ids)
        assert f.token_ids.dtype == torch.long and f.activations.dtype == torch.float32
        assert f.activations.shape == r.activations.shape == (r.activations.shape[0], len(r.token_ids), HIDDEN)
        torch.testing.assert_close(f.activations, r.activations, atol=1e-5, rtol=1e-4)


def expected_lengths(tok, free, stop):
    """G_i when decoding stops at the first token that completes `stop` (free = unstopped run)."""
    lengths = []
    for g in free:
        ids = g.token_ids.tolist()
        hit = [j + 1 for j in range(len(ids)) if stop in tok.decode(ids[: j + 1])]
        lengths.append(hit[0] if hit else len(ids))
    return lengths


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_fast_capture_matches_reference(arch, tok):
    model = make(arch, tok)
    fast = capture_icl_activations(model, tok, PROMPTS, NEW, batch_size=3)
    ref = capture_reference(model, tok, PROMPTS, NEW)
    assert [len(g.token_ids) for g in ref] == [NEW] * len(PROMPTS)
    assert all(g.activations.shape == (LAYERS, NEW, HIDDEN) for g in fast)
    assert_same(fast, ref)
    assert len({tuple(g.token_ids.tolist()) for g in ref}) > 1  # prompts lead to different outputs


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_stop_string_matches_reference(arch, tok):
    model = make(arch, tok)
    free = capture_reference(model, tok, PROMPTS, NEW)
    candidates = [tok.decode([t]) for g in free for t in g.token_ids.tolist()[1:]]
    stop = next(s for s in candidates if len(set(expected_lengths(tok, free, s))) > 1)
    want = expected_lengths(tok, free, stop)
    fast = capture_icl_activations(model, tok, PROMPTS, NEW, batch_size=2, stop_strings=["@@", stop])
    ref = capture_reference(model, tok, PROMPTS, NEW, stop_strings=["@@", stop])
    assert [len(g.token_ids) for g in fast] == want
    assert_same(fast, ref)
    for f, g in zip(fast, free):  # stopping early only truncates
        assert torch.equal(f.token_ids, g.token_ids[: len(f.token_ids)])
        torch.testing.assert_close(f.activations, g.activations[:, : len(f.token_ids)], atol=1e-5, rtol=1e-4)
        if len(f.token_ids) < NEW:
            assert stop in tok.decode(f.token_ids) and stop not in tok.decode(f.token_ids[:-1])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_eos_matches_reference(arch, tok):
    """Make the tokenizer's EOS (id 0, also the pad id) win wherever some token t would have won:
    sequences that emitted t now end there with EOS, the others run to max_new_tokens."""
    model = make(arch, tok)
    free = capture_reference(model, tok, PROMPTS, NEW)
    head = model.get_output_embeddings().weight
    for t in [t for g in free for t in g.token_ids.tolist()]:
        with torch.no_grad():
            head[0] = head[t] * 1.01
        ref = capture_reference(model, tok, PROMPTS, NEW)
        lengths = [len(g.token_ids) for g in ref]
        if len(set(lengths)) > 1:
            break
    assert len(set(lengths)) > 1
    for g in ref:
        assert (g.token_ids[-1] == 0) == (len(g.token_ids) < NEW) and (g.token_ids[:-1] != 0).all()
    assert_same(capture_icl_activations(model, tok, PROMPTS, NEW, batch_size=5), ref)
    assert_same(capture_icl_activations(model, tok, PROMPTS, NEW, batch_size=2), ref)


def test_generation_config_eos_ids_also_stop(tok):
    model = make("qwen2", tok)
    free = greedy_generate(model, tok, PROMPTS, NEW)
    stop_id = free[0].token_ids[2].item()
    model.generation_config.eos_token_id = [0, stop_id]
    assert eos_token_ids(model, tok) == {0, stop_id}
    out = greedy_generate(model, tok, PROMPTS, NEW)
    assert out[0].token_ids.tolist() == free[0].token_ids.tolist()[: free[0].token_ids.tolist().index(stop_id) + 1]


def test_layers_subset_and_residual_site(tok):
    model = make("qwen3", tok)
    full = capture_icl_activations(model, tok, PROMPTS, 3, site="residual")
    sub = capture_icl_activations(model, tok, PROMPTS, 3, site="residual", layers=[2, 0])
    ref = capture_reference(model, tok, PROMPTS, 3, site="residual", layers=[2, 0])
    assert_same(sub, ref)
    for f, s in zip(full, sub):
        assert f.activations.shape == (LAYERS, 3, HIDDEN) and s.activations.shape == (2, 3, HIDDEN)
        torch.testing.assert_close(s.activations, f.activations[[2, 0]], atol=1e-5, rtol=1e-4)
    attn = capture_icl_activations(model, tok, PROMPTS, 3, site="attn_out")
    assert not torch.allclose(attn[0].activations, full[0].activations)


def test_single_token_capture_is_last_prompt_position(tok):
    """G = 1 (classification): the activation is the site output at the last prompt token."""
    model = make("llama", tok)
    out = capture_icl_activations(model, tok, PROMPTS, 1)
    for prompt, g in zip(PROMPTS, out):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad(), ActivationRecorder(model, "attn_out") as rec:
            logits = model(ids).logits
            expected = rec.stack()[:, 0, -1:]
        assert g.token_ids.tolist() == [int(logits[0, -1].argmax())]
        torch.testing.assert_close(g.activations, expected, atol=1e-5, rtol=1e-4)


def test_matches_transformers_generate(tok):
    model = make("mistral", tok)
    ours = greedy_generate(model, tok, PROMPTS, NEW, batch_size=4)
    for prompt, g in zip(PROMPTS, ours):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                            pad_token_id=0, eos_token_id=0)
        assert g.token_ids.tolist() == hf[0, ids.shape[1]:].tolist()


def test_tolerance_detects_wrong_positions(tok):
    """Negative control: left padding WITHOUT position ids shifts GPT-2's absolute positions, and
    the comparison used above notices. (Rotary models are invariant to a constant shift.)"""
    model = make("gpt2", tok)
    ref = capture_reference(model, tok, PROMPTS[:2], 1)
    ids = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    width = max(map(len, ids))
    x = torch.tensor([[0] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    with torch.no_grad(), ActivationRecorder(model, "attn_out") as rec:
        model(input_ids=x, attention_mask=mask)
        wrong = rec.stack()[:, 0, -1:]
    assert not torch.allclose(wrong, ref[0].activations, atol=1e-5, rtol=1e-4)


def test_generated_api_progress_and_modes(tok):
    model = make("gpt2", tok).train()
    calls = []
    plain = greedy_generate(model, tok, PROMPTS, 2, batch_size=2, progress=calls.append)
    assert calls == [2, 4, 5] and model.training  # training mode restored
    assert all(isinstance(g, Generated) and g.activations is None for g in plain)
    token_ids, activations = capture_icl_activations(model, tok, PROMPTS, 2, batch_size=2, progress=True)[3]
    assert torch.equal(token_ids, plain[3].token_ids) and activations.shape == (LAYERS, 2, HIDDEN)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_generate(model, tok, PROMPTS, 0)
    with pytest.raises(ValueError, match="unknown activation site"):
        capture_icl_activations(model, tok, PROMPTS, 1, site="mlp")
    with pytest.raises(ValueError, match="no tokens"):
        capture_reference(model, tok, ["ok", ""], 1)


def test_peft_wrapped_model_capture_matches_reference(tok):
    from peft import LoraConfig, get_peft_model

    from ia2ray.core.sites import lora_target_modules

    model = make("llama", tok)
    config = LoraConfig(r=4, target_modules=lora_target_modules(model, ["q_proj", "k_proj", "o_proj"]),
                        init_lora_weights=False)
    student = get_peft_model(model, config)
    fast = capture_icl_activations(student, tok, PROMPTS, 4, batch_size=3)
    assert_same(fast, capture_reference(student, tok, PROMPTS, 4))
    with student.disable_adapter():
        base = capture_icl_activations(student, tok, PROMPTS, 4, batch_size=3)
    assert not torch.allclose(fast[0].activations, base[0].activations)
