"""The paper's analyses and its last two methods, with exact values on tiny models: activation
similarity, LoRA subspace overlap, soft-label KD, SFT -> IA2."""

from __future__ import annotations

import math

import pytest
import torch

from ia2ray.config import load_run_config
from ia2ray.core.batches import TrainItem, collate
from ia2ray.core.cache import ActivationCache
from ia2ray.core.generate import Generated, greedy_generate
from ia2ray.core.losses import kd_loss
from ia2ray.core.overlap import adapter_overlap, load_lora_b, lora_b, subspace_overlap
from ia2ray.core.pipeline import run_pipeline
from ia2ray.core.similarity import row_similarities, summarize, token_cosines

FAST = ["train.max_epochs=3", "data.val_size=8", "data.test_size=8", "eval.icl_draws=2", "data.n=4"]


def _cfg(tmp_path, *extra):
    return load_run_config(None, [*FAST, f"capture.cache_dir={tmp_path / 'cache'}", *extra])


# --- activation similarity -------------------------------------------------------------------------

def test_identical_activations_have_similarity_one():
    acts = torch.randn(3, 2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    cos = token_cosines(acts, acts.clone(), mask)
    assert cos.shape == (2, 3)
    assert torch.allclose(cos, torch.ones(2, 3), atol=1e-6)


def test_a_known_rotation_gives_its_cosine_and_masked_tokens_do_not_count():
    theta = 0.7
    d = 8
    rot = torch.eye(d)  # a rotation by theta in the plane of the first two coordinates
    rot[:2, :2] = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    student = torch.zeros(2, 1, 4, d)
    student[..., :2] = torch.randn(2, 1, 4, 2)  # vectors in the rotated plane
    teacher = student @ rot.T
    teacher[:, :, 3] = -student[:, :, 3]  # a masked position that would pull the mean down
    mask = torch.tensor([[1, 1, 1, 0]])
    cos = token_cosines(student, teacher, mask)
    assert torch.allclose(cos, torch.full((1, 2), math.cos(theta)), atol=1e-6)


def test_the_base_model_against_a_teacher_without_demos_has_similarity_one(tiny_checkpoints):
    """A 'teacher' that saw the bare query is the model itself: every layer's similarity is 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_checkpoints("llama")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompts = ["a b c", "d e f g h", "i j"]
    records = greedy_generate(model, tok, prompts, 3, site="attn_out")
    items = [TrainItem(tok(p)["input_ids"], r.token_ids.tolist(), r.activations) for p, r in zip(prompts, records)]
    rows = row_similarities(model, items, "attn_out", tok.pad_token_id, "cpu", batch_size=2)
    n_layers = records[0].activations.shape[0]
    assert len(rows) == 3 and all(len(r) == n_layers for r in rows)
    s = summarize(rows)
    assert s["mean"] == pytest.approx(1.0, abs=1e-5) and all(v == pytest.approx(1.0, abs=1e-5) for v in s["layers"])


def test_runs_measure_similarity_of_the_adapter_and_icl_runs_of_the_base_model(tmp_path):
    trained = run_pipeline(_cfg(tmp_path, "pipeline=ia2", "eval.icl_baseline=false"), progress=False).summary
    base = run_pipeline(_cfg(tmp_path, "pipeline=ia2"), progress=False, icl_only=True).summary
    for s in (trained, base):
        assert s["sim"]["rows"] == 8 and s["sim"]["site"] == "attn_out" and len(s["sim"]["layers"]) == 4
        assert -1 <= s["sim"]["mean"] <= 1 and s["sim"]["mean"] == pytest.approx(sum(s["sim"]["layers"]) / 4, abs=1e-6)
        assert s["timings"]["sim_s"] > 0
    assert trained["sim"]["layers"] != base["sim"]["layers"]  # the trained adapter changed the activations
    off = run_pipeline(_cfg(tmp_path, "pipeline=sft", "eval.icl_baseline=false", "eval.similarity=false"),
                       progress=False).summary
    assert "sim" not in off and "sim_s" not in off["timings"]


# --- LoRA subspace overlap ------------------------------------------------------------------------

def test_identical_adapters_overlap_one_and_orthogonal_ones_zero():
    b = torch.randn(32, 4)
    assert subspace_overlap(b, b.clone()) == pytest.approx(1.0, abs=1e-9)
    assert subspace_overlap(b, b @ torch.randn(4, 4)) == pytest.approx(1.0, abs=1e-9)  # same column space
    e = torch.eye(32)
    assert subspace_overlap(e[:, :4], e[:, 4:8]) == pytest.approx(0.0, abs=1e-12)
    assert subspace_overlap(e[:, :4] * 3, e[:, 2:6]) == pytest.approx(0.5, abs=1e-9)  # 2 of 4 directions shared


def test_different_ranks_compare_the_top_min_rank_directions():
    e = torch.eye(16)
    b1 = e[:, :2]  # rank 2: e0, e1
    b2 = torch.stack([3 * e[:, 0], 2 * e[:, 5], e[:, 6], e[:, 7]], dim=1)  # rank 4, strongest: e0 then e5
    assert subspace_overlap(b1, b2) == pytest.approx(0.5, abs=1e-9)  # r = 2: {e0, e1} vs {e0, e5}
    with pytest.raises(ValueError, match="output sizes"):
        subspace_overlap(torch.randn(8, 2), torch.randn(9, 2))


def test_adapter_overlap_reads_saved_peft_adapters_per_module_and_layer(tmp_path, tiny_checkpoints):
    from transformers import AutoModelForCausalLM

    from ia2ray.config.schema import LoraConfig
    from ia2ray.core.model import add_lora

    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_checkpoints("llama")), LoraConfig(rank=4), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p))
    model.save_pretrained(tmp_path / "a")
    a = load_lora_b(tmp_path / "a")
    assert a and all(m.shape[1] == 4 for m in a.values())
    same = adapter_overlap(a, a)
    assert same["mean"] == pytest.approx(1.0, abs=1e-9) and sorted(same["layers"]) == [0, 1, 2, 3]
    other = {m: torch.randn_like(b) for m, b in a.items()}
    assert 0 < adapter_overlap(a, other)["mean"] < 1
    assert list(lora_b({"x.layers.3.self_attn.q_proj.lora_B.default.weight": torch.ones(2, 1),
                        "x.layers.3.self_attn.q_proj.lora_A.default.weight": torch.ones(1, 2)})) == ["x.layers.3.self_attn.q_proj"]
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_lora_b(tmp_path)


# --- soft-label KD --------------------------------------------------------------------------------

def test_kd_loss_is_zero_when_the_teacher_is_the_student():
    logits = torch.randn(2, 3, 11)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    full = logits.log_softmax(-1)
    ids = torch.arange(11).expand(2, 3, 11)
    assert kd_loss(logits, ids, full, mask).item() == pytest.approx(0.0, abs=1e-6)
    top, top_ids = full.topk(4, dim=-1)  # top-k: both renormalised over the teacher's k tokens
    assert kd_loss(logits, top_ids, top, mask).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 3, 11).log_softmax(-1)
    assert kd_loss(logits, ids, other, mask).item() > 0


def test_kd_gradient_moves_the_student_towards_the_teacher():
    """With the whole vocabulary the loss is KL(p_t || p_s): d/dlogits = (p_s - p_t) / tokens / batch."""
    logits = torch.randn(2, 3, 7, requires_grad=True)
    teacher = torch.randn(2, 3, 7).log_softmax(-1)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    ids = torch.arange(7).expand(2, 3, 7)
    loss = kd_loss(logits, ids, teacher, mask)
    loss.backward()
    tokens = mask.sum(1, keepdim=True).unsqueeze(-1).float()
    expected = (logits.detach().softmax(-1) - teacher.exp()) * mask.unsqueeze(-1) / tokens / 2
    assert torch.allclose(logits.grad, expected, atol=1e-6)
    kl = (teacher.exp() * (teacher - logits.detach().log_softmax(-1))).sum(-1)
    assert loss.item() == pytest.approx(float(((kl * mask).sum(1) / mask.sum(1)).mean()), abs=1e-6)


def test_the_teacher_distribution_is_captured_cached_and_batched(tmp_path, tiny_checkpoints):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_checkpoints("llama")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    records = greedy_generate(model, tok, ["a b c", "d e"], 3, site="attn_out", top_k=5)
    for r in records:
        assert r.top_logp.shape == (len(r.token_ids), 5) and r.top_ids.shape == (len(r.token_ids), 5)
        assert torch.equal(r.top_ids[:, 0].long(), r.token_ids)  # greedy: the chosen token is the most likely
        with torch.no_grad():
            ids = tok("a b c" if r is records[0] else "d e")["input_ids"] + r.token_ids.tolist()[:-1]
            logp = model(torch.tensor([ids])).logits[0, -len(r.token_ids):].log_softmax(-1)
        assert torch.allclose(r.top_logp, logp.topk(5, -1).values, atol=1e-4)
    cache = ActivationCache(tmp_path)
    cache.save("k", records, {"dtype": "float32"})
    back = cache.load("k")
    assert all(torch.equal(a.top_logp, b.top_logp) and torch.equal(a.top_ids, b.top_ids) for a, b in zip(records, back))
    assert cache.read_manifest("k")["top_k"] == 5
    batch = collate([TrainItem([1, 2], r.token_ids.tolist(), None, r.top_ids, r.top_logp) for r in back], 0)
    assert batch.top_logp.shape == (2, max(len(r.token_ids) for r in back), 5)
    plain = Generated(torch.tensor([1, 2]))
    cache.save("plain", [plain], {})
    assert cache.read_manifest("plain")["top_k"] == 0 and cache.load("plain")[0].top_logp is None


def test_kd_pipeline_trains_on_the_teachers_distribution(tmp_path):
    out = run_pipeline(_cfg(tmp_path, "pipeline=kd", "eval.icl_baseline=false", "capture.kd_top_k=8"), progress=False)
    (stage,) = out.summary["stages"]
    assert stage["name"] == "kd" and stage["steps"] > 0 and 0 <= stage["best_dev_loss"] < float("inf")
    train_losses = [h["train_loss"] for h in out.history if "train_loss" in h]
    assert all(v >= -1e-6 for v in train_losses)  # a KL divergence


# --- SFT -> IA2 -----------------------------------------------------------------------------------

def test_sft_then_ia2_runs_sft_first_then_aligns_with_a_fresh_optimizer(tmp_path, monkeypatch):
    from ia2ray.core import stages as stages_mod

    engines = []
    original = stages_mod.LocalEngine.__post_init__

    def spy(self):
        original(self)
        engines.append((self.name, self.objective.kind, self.optimizer, len(self.optimizer.state)))

    monkeypatch.setattr(stages_mod.LocalEngine, "__post_init__", spy)
    out = run_pipeline(_cfg(tmp_path, "pipeline=sft->ia2", "eval.icl_baseline=false"), progress=False)
    assert [s["name"] for s in out.summary["stages"]] == ["sft", "align"]
    assert [(name, kind) for name, kind, *_ in engines] == [("sft", "sft"), ("align", "align")]
    (_, _, first, first_state), (_, _, second, second_state) = engines
    assert first_state == 0 and second_state == 0  # each stage's Adam starts empty
    assert second is not first and len(first.state) > 0  # the SFT stage's Adam had moments; align's is another
    assert [h["stage"] for h in out.history][0] == "sft" and out.history[-1]["stage"] == "align"
