"""Tiny tokenizer / configs / checkpoints: deterministic, round-trip through from_pretrained."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ia2ray.core.tiny import (
    TINY_ARCHS,
    build_tiny_checkpoint,
    default_corpus,
    tiny_config,
    tiny_model,
    train_bpe_tokenizer,
)

ROUND_TRIP = [
    "Text: great movie\nLabel: positive\n\nText: bad film\nLabel:",
    "  leading and trailing  ",
    "\n\n\n\t tabs\tand\n newlines \n\n",
    "digits 0123456789 and sums 12+30=42",
    "unicode: héllo ✓ ünïcödé",
]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(default_corpus())


def test_tokenizer_round_trips_whitespace_and_newlines(tok):
    for text in ROUND_TRIP:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text


def test_tokenizer_specials_and_no_bos(tok):
    assert len(tok) == 400
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    assert tok.pad_token_id == 0
    assert tok.bos_token_id is None
    ids = tok("Label:")["input_ids"]
    assert 0 not in ids and tok.decode(ids) == "Label:"  # nothing added around the text
    assert tok("x" + tok.eos_token)["input_ids"][-1] == 0  # EOS text is one special token


def test_tokenizer_is_deterministic(tok):
    again = train_bpe_tokenizer(default_corpus())
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_tokenizer_on_custom_texts_and_vocab_size():
    small = train_bpe_tokenizer(["aaa bbb aaa bbb ccc"] * 10, vocab_size=300)
    assert len(small) <= 300
    assert small.decode(small("aaa zzz\n")["input_ids"]) == "aaa zzz\n"  # bytes outside the corpus too


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_config(arch):
    config = tiny_config(arch, vocab_size=123, hidden_size=32, num_layers=2, num_heads=4)
    fields = config.to_dict()
    dropouts = {k: v for k, v in fields.items() if "drop" in k and isinstance(v, float)}
    assert dropouts and all(v == 0.0 for v in dropouts.values()), dropouts
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert 0 <= fields[name] < 123
    assert config.hidden_size == 32 and config.num_hidden_layers == 2 and config.vocab_size == 123
    if arch == "gpt2":
        assert config.n_positions >= 1024
    else:
        assert config.head_dim == 8
    assert tiny_config(arch, 123, eos_token_id=5).eos_token_id == 5  # kw overrides


def test_tiny_config_unknown_arch():
    with pytest.raises(ValueError, match="falcon"):
        tiny_config("falcon", 100)


def test_tiny_model_seeded_and_rng_untouched(tok):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = tiny_model("llama", tok, hidden_size=32, num_layers=2, seed=1)
    b = tiny_model("llama", tok, hidden_size=32, num_layers=2, seed=1)
    c = tiny_model("llama", tok, hidden_size=32, num_layers=2, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert not a.training
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_build_tiny_checkpoint_round_trip(arch, tok, tmp_path):
    out = build_tiny_checkpoint(tmp_path / arch, arch=arch, hidden_size=32, num_layers=2, seed=3)
    assert out == tmp_path / arch
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    loaded = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == arch and model.config.num_hidden_layers == 2
    for text in ROUND_TRIP:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"]) == text
    assert loaded.eos_token_id == 0 and loaded.pad_token_id == 0
    expected = tiny_model(arch, tok, hidden_size=32, num_layers=2, seed=3)
    ids = torch.tensor([tok(ROUND_TRIP[0])["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected(ids).logits)
    assert [p.name for p in tmp_path.iterdir()] == [arch]  # no temp dir left behind


def test_build_tiny_checkpoint_reuses_complete_dir(tmp_path):
    out = build_tiny_checkpoint(tmp_path / "ckpt", hidden_size=32, num_layers=2)
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.iterdir()}
    dir_inode = out.stat().st_ino
    assert build_tiny_checkpoint(tmp_path / "ckpt", hidden_size=32, num_layers=2) == out
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.iterdir()}
    assert after == before and out.stat().st_ino == dir_inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_build_tiny_checkpoint_refuses_to_clobber(tmp_path):
    out = build_tiny_checkpoint(tmp_path / "ckpt", hidden_size=32, num_layers=2)
    with pytest.raises(ValueError, match="built with"):
        build_tiny_checkpoint(out, hidden_size=32, num_layers=3)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a tiny checkpoint"):
        build_tiny_checkpoint(foreign)
    assert os.listdir(foreign) == ["notes.txt"]


def test_build_tiny_checkpoint_into_empty_dir_with_custom_texts(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    texts = ["Text: sun\nLabel: yes", "Text: rain\nLabel: no"] * 20
    out = build_tiny_checkpoint(empty, arch="gpt2", texts=texts, hidden_size=32, num_layers=2, vocab_size=300)
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded.get_vocab() == train_bpe_tokenizer(texts, vocab_size=300).get_vocab()
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == len(loaded)
