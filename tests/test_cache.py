"""Activation cache tests: round trips, sharding, integrity checks, atomic writes, fingerprints."""

import hashlib
import json
import logging
import os
import shutil
import time

import pytest
import torch

import ia2ray.core.cache as cache_mod
from ia2ray.core.cache import SHARD_BYTES, ActivationCache, CacheError
from ia2ray.core.fingerprint import content_hash, fingerprint_model, fingerprint_tokenizer
from ia2ray.core.generate import Generated

L, D = 3, 8


def make_records(lengths=(1, 5, 3, 0, 2), seed=0, with_acts=True) -> list:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for g in lengths:
        ids = torch.randint(0, 50_000, (g,), generator=gen, dtype=torch.int64)
        acts = torch.randn(L, g, D, generator=gen) * 10 if with_acts else None
        out.append(Generated(token_ids=ids, activations=acts))
    return out


def assert_same(loaded, records, dtype=torch.bfloat16):
    assert len(loaded) == len(records)
    for got, want in zip(loaded, records):
        ids, acts = got  # Generated unpacks as a tuple
        assert ids.dtype == torch.int64 and torch.equal(ids, want.token_ids)
        if want.activations is None:
            assert acts is None
        else:
            assert acts.dtype == torch.float32 and acts.is_contiguous()
            assert torch.equal(acts, want.activations.to(dtype).float())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_round_trip_with_varied_lengths(tmp_path, dtype):
    cache = ActivationCache(tmp_path)
    records = make_records()
    key = cache.key(task="sst2", n=4)
    assert not cache.has(key)
    entry = cache.save(key, records, {"dtype": dtype, "note": "x"})
    assert entry == tmp_path / key and cache.has(key)
    assert_same(cache.load(key), records, getattr(torch, dtype))
    manifest = cache.read_manifest(key)
    assert manifest["meta"] == {"dtype": dtype, "note": "x"}
    assert manifest["num_records"] == 5 and manifest["lengths"] == [1, 5, 3, 0, 2]
    assert (manifest["num_layers"], manifest["hidden_size"], manifest["dtype"]) == (L, D, dtype)
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors"]
    shard = entry / "shard-00000.safetensors"
    assert manifest["shards"][0]["bytes"] == shard.stat().st_size
    assert manifest["shards"][0]["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_default_dtype_is_bfloat16(tmp_path):
    cache = ActivationCache(tmp_path)
    records = make_records()
    cache.save("k", records, {})
    assert cache.read_manifest("k")["dtype"] == "bfloat16"
    assert_same(cache.load("k"), records, torch.bfloat16)
    assert SHARD_BYTES == 256 * 2**20


def test_records_without_activations(tmp_path):
    cache = ActivationCache(tmp_path)
    records = make_records(with_acts=False)
    cache.save("noacts", records, {})
    assert_same(cache.load("noacts"), records)
    assert cache.read_manifest("noacts")["has_activations"] is False
    mixed = make_records(lengths=(2,)) + make_records(lengths=(2,), with_acts=False)
    with pytest.raises(ValueError, match="all or none"):
        cache.save("mixed", mixed, {})
    assert not (tmp_path / "mixed").exists()


def test_empty_record_list_round_trips(tmp_path):
    cache = ActivationCache(tmp_path)
    cache.save("empty", [], {})
    assert cache.load("empty") == []


@pytest.mark.parametrize(
    "bad, message",
    [
        (Generated(token_ids=torch.arange(3), activations=torch.zeros(L, 2, D)), r"\[L, G, d\]"),
        (Generated(token_ids=torch.arange(3), activations=torch.zeros(3, D)), r"\[L, G, d\]"),
        (Generated(token_ids=torch.zeros(1, 3, dtype=torch.long), activations=None), "1-D"),
    ],
)
def test_bad_records_rejected(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        ActivationCache(tmp_path).save("bad", [bad], {})
    with pytest.raises(ValueError, match="dtype"):
        ActivationCache(tmp_path).save("bad", make_records(), {"dtype": "int8"})
    with pytest.raises(ValueError, match="invalid cache key"):
        ActivationCache(tmp_path).path("../escape")


def test_multiple_shards(tmp_path):
    # each G=4 record holds 3*4*8 bf16 values = 192 bytes; 400-byte shards take 2 records each
    cache = ActivationCache(tmp_path, shard_bytes=400)
    records = make_records(lengths=(4, 4, 4, 4, 4))
    cache.save("multi", records, {})
    shards = cache.read_manifest("multi")["shards"]
    assert [s["file"] for s in shards] == [f"shard-{i:05d}.safetensors" for i in range(3)]
    assert [s["num_records"] for s in shards] == [2, 2, 1]
    assert_same(cache.load("multi"), records)
    # a record larger than a shard gets a shard of its own
    big = ActivationCache(tmp_path, shard_bytes=10)
    big.save("big", records[:3], {})
    assert len(big.read_manifest("big")["shards"]) == 3
    assert_same(big.load("big"), records[:3])


def test_load_subset_reads_only_the_shards_it_needs(tmp_path):
    cache = ActivationCache(tmp_path, shard_bytes=400)  # 2 records per shard: [0,1] [2,3] [4]
    records = make_records(lengths=(4, 4, 4, 4, 4))
    cache.save("sub", records, {})
    (tmp_path / "sub" / "shard-00001.safetensors").unlink()  # records 2 and 3 are gone
    got = cache.load_subset("sub", [4, 0])
    assert sorted(got) == [0, 4]
    assert_same([got[0], got[4]], [records[0], records[4]])
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors"):
        cache.load_subset("sub", [3])
    with pytest.raises(CacheError, match=r"records \[7\] out of range"):
        cache.load_subset("sub", [7])


def _saved(tmp_path, key="entry"):
    cache = ActivationCache(tmp_path, shard_bytes=400)
    cache.save(key, make_records(lengths=(4, 4, 4)), {})
    return cache, tmp_path / key


def test_tampered_shard_byte_names_the_file(tmp_path):
    cache, entry = _saved(tmp_path)
    shard = entry / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"shard-00001\.safetensors.*sha256"):
        cache.load("entry")


def test_truncated_or_missing_shard(tmp_path):
    cache, entry = _saved(tmp_path)
    shard = entry / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(CacheError, match=r"shard-00000\.safetensors.*size"):
        cache.load("entry")
    shard.unlink()
    with pytest.raises(CacheError, match=r"shard-00000\.safetensors.*missing"):
        cache.load("entry")


def test_bad_manifest(tmp_path):
    cache, entry = _saved(tmp_path)
    manifest = entry / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(CacheError, match=r"manifest\.json"):
        cache.load("entry")
    manifest.write_text(json.dumps({**json.loads(text), "format_version": 99}))
    with pytest.raises(CacheError, match=r"manifest\.json.*format_version 99"):
        cache.load("entry")
    changed = json.loads(text)
    changed["lengths"][0] = 5  # shapes no longer match the shard
    changed["num_records"] = 3
    manifest.write_text(json.dumps(changed))
    with pytest.raises(CacheError, match=r"shard-00000\.safetensors.*disagree"):
        cache.load("entry")
    for field, value in [("shards", [{"file": "../escape"}]), ("dtype", "int8"), ("lengths", None)]:
        manifest.write_text(json.dumps({**json.loads(text), field: value}))
        with pytest.raises(CacheError, match=r"manifest\.json: malformed"):
            cache.load("entry")
    manifest.unlink()
    assert not cache.has("entry")
    with pytest.raises(CacheError, match=r"manifest\.json.*missing"):
        cache.load("entry")


def test_crash_while_writing_shards_leaves_nothing(tmp_path, monkeypatch):
    real_write = cache_mod._write_shard

    def crash_on_second_shard(path, group, dtype):
        if path.name.endswith("00001.safetensors"):
            path.write_bytes(b"partial")
            raise OSError("disk full")
        return real_write(path, group, dtype)

    monkeypatch.setattr(cache_mod, "_write_shard", crash_on_second_shard)
    cache = ActivationCache(tmp_path, shard_bytes=400)
    with pytest.raises(OSError, match="disk full"):
        cache.save("k", make_records(lengths=(4, 4, 4)), {})
    assert not cache.has("k") and list(tmp_path.iterdir()) == []
    with pytest.raises(CacheError):
        cache.load("k")


def test_crash_at_rename_leaves_nothing(tmp_path, monkeypatch):
    def failing_rename(src, dst):
        raise OSError("killed")

    monkeypatch.setattr(cache_mod.os, "rename", failing_rename)
    cache = ActivationCache(tmp_path)
    with pytest.raises(OSError, match="killed"):
        cache.save("k", make_records(), {})
    assert not cache.has("k") and list(tmp_path.iterdir()) == []


def test_hard_kill_leaves_only_an_ignored_temp_dir(tmp_path, monkeypatch):
    """A process killed mid-write gets no cleanup: the temp dir stays but is never an entry."""
    monkeypatch.setattr(cache_mod.shutil, "rmtree", lambda *a, **k: None)  # no cleanup
    def killed(src, dst):
        raise OSError("killed before rename")

    monkeypatch.setattr(cache_mod.os, "rename", killed)
    cache = ActivationCache(tmp_path)
    with pytest.raises(OSError):
        cache.save("k", make_records(), {})
    monkeypatch.undo()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".tmp-k-{os.getpid()}-")
    assert not cache.has("k")
    records, hit = cache.get_or_compute("k", make_records, {})
    assert not hit and cache.has("k")


def test_concurrent_writer_keeps_the_first_entry(tmp_path):
    cache = ActivationCache(tmp_path)
    first, second = make_records(seed=1), make_records(seed=2)
    cache.save("k", first, {})
    assert cache.save("k", second, {}) == tmp_path / "k"  # destination exists: ours is discarded
    assert_same(cache.load("k"), first)
    assert [p.name for p in tmp_path.iterdir()] == ["k"]


def test_get_or_compute_when_another_process_wins_the_race(tmp_path):
    cache = ActivationCache(tmp_path)
    first = make_records(seed=1)

    def compute():  # while we compute, another process saves the same entry
        ActivationCache(tmp_path).save("k", first, {})
        return make_records(seed=2)

    records, hit = cache.get_or_compute("k", compute, {})
    assert not hit
    assert_same(records, first)  # everyone ends up using the entry that won
    assert [p.name for p in tmp_path.iterdir()] == ["k"]


def test_get_or_compute_computes_once(tmp_path):
    cache = ActivationCache(tmp_path)
    calls = []

    def compute():
        calls.append(1)
        return make_records()

    miss, hit1 = cache.get_or_compute("k", compute, {"dtype": "bfloat16"})
    again, hit2 = cache.get_or_compute("k", compute, {"dtype": "bfloat16"})
    assert (len(calls), hit1, hit2) == (1, False, True)
    assert_same(miss, make_records())  # a miss returns the stored (bf16-rounded) values too
    assert all(torch.equal(a.activations, b.activations) for a, b in zip(miss, again))


def test_corrupt_entry_is_moved_aside_and_recomputed(tmp_path, caplog):
    cache, entry = _saved(tmp_path)
    (entry / "shard-00001.safetensors").write_bytes(b"garbage")
    calls = []

    def compute():
        calls.append(1)
        return make_records(seed=5)

    with caplog.at_level(logging.WARNING, logger="ia2ray.core.cache"):
        records, hit = cache.get_or_compute("entry", compute, {})
    assert not hit and len(calls) == 1
    assert "shard-00001.safetensors" in caplog.text and "corrupt" in caplog.text
    assert_same(records, make_records(seed=5))
    aside = [p.name for p in tmp_path.iterdir() if p.name != "entry"]
    assert len(aside) == 1 and aside[0].startswith("entry.corrupt-")
    assert_same(cache.load("entry"), make_records(seed=5))


def test_content_hash_and_keys():
    expected = hashlib.sha256(b'{"a":1,"b":[1,2]}').hexdigest()
    assert content_hash({"b": [1, 2], "a": 1}) == expected
    cache = ActivationCache("unused")
    base = dict(model="m@main", task="sst2", n=4, seed=0, layers=[0, 1])
    key = cache.key(**base)
    assert len(key) == 32 and key == content_hash(base)[:32]
    assert cache.key(**dict(reversed(base.items()))) == key
    variants = [{**base, name: value} for name, value in
                [("model", "m@v2"), ("task", "fins"), ("n", 8), ("seed", 1), ("layers", [0])]]
    keys = {key} | {cache.key(**v) for v in variants} | {cache.key(**base, extra=None)}
    assert len(keys) == 7
    with pytest.raises(TypeError):
        content_hash({"x": object()})


def test_fingerprint_model(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 64}')
    weights = model / "model.safetensors"
    weights.write_bytes(b"\x00" * 100)
    fp = fingerprint_model(str(model), None)
    assert len(fp) == 64 and fp == fingerprint_model(str(model), "v1")
    (model / "README.md").write_text("docs do not count")
    assert fingerprint_model(str(model), None) == fp
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)
    assert fingerprint_model(str(copy), None) == fp  # content-addressed, not path-addressed
    time.sleep(0.05)  # a new modification time: the per-process memo keys on it (see the next test)
    weights.write_bytes(b"\x00" * 99 + b"\x01")  # same size, one byte differs
    assert fingerprint_model(str(model), None) != fp
    (copy / "config.json").write_text('{"hidden_size": 65}')
    assert fingerprint_model(str(copy), None) != fp
    assert fingerprint_model("org/Some-Model", None) == "org/Some-Model@main"
    assert fingerprint_model("org/Some-Model", "abc123") == "org/Some-Model@abc123"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config or weight files"):
        fingerprint_model(str(tmp_path / "empty"), None)


def test_fingerprint_model_hashes_weights_once_per_process_while_they_are_unchanged(tmp_path, monkeypatch):
    from ia2ray.core import fingerprint

    reads = []
    real = fingerprint.file_sha256
    monkeypatch.setattr(fingerprint, "file_sha256", lambda p: reads.append(p.name) or real(p))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    weights = model / "model.safetensors"
    weights.write_bytes(b"\x00" * 10)
    fp = fingerprint_model(str(model), None)
    assert fingerprint_model(str(model), None) == fp and sorted(reads) == ["config.json", "model.safetensors"]
    stat = weights.stat()
    weights.write_bytes(b"\x01" * 10)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert fingerprint_model(str(model), None) != fp and len(reads) == 4


def _word_tokenizer(words=("a", "b", "c"), eos="<eos>"):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, eos: 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token=eos, pad_token=eos
    )


def test_fingerprint_tokenizer():
    tok = _word_tokenizer()
    fp = fingerprint_tokenizer(tok)
    assert len(fp) == 64 and fingerprint_tokenizer(_word_tokenizer()) == fp
    tok(["a", "a b c"], padding=True, truncation=True, max_length=2)  # mutates runtime settings
    assert fingerprint_tokenizer(tok) == fp
    assert fingerprint_tokenizer(_word_tokenizer(words=("a", "b", "d"))) != fp
    assert fingerprint_tokenizer(_word_tokenizer(eos="</s>")) != fp

    class SlowTokenizer:  # no backend_tokenizer: falls back to vocab + special tokens
        special_tokens_map = {"eos_token": "<eos>"}

        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return dict(self.vocab)

    slow = fingerprint_tokenizer(SlowTokenizer({"a": 0, "b": 1}))
    assert slow == fingerprint_tokenizer(SlowTokenizer({"b": 1, "a": 0}))
    assert slow != fingerprint_tokenizer(SlowTokenizer({"a": 1, "b": 0}))
