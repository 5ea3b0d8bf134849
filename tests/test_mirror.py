"""Bucket folders through local copies (`ia2ray.mirror`), against a real S3 API server (moto) on
127.0.0.1: what is copied up and down and when, atomic folder fetches, the teacher cache in a bucket,
and the checks `--storage s3://...` gets before anything runs."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch

from ia2ray import mirror
from ia2ray.core.cache import ActivationCache
from ia2ray.core.generate import Generated
from ia2ray.tune import main

SMOKE = "search_spaces/smoke.yaml"


def _files(uri: str) -> dict[str, int]:
    return {name: info.size for name, info in mirror._remote_files(uri, "").items()}


def test_push_uploads_changes_only_and_pull_fetches_what_is_missing_or_newer(s3, tmp_path, monkeypatch):
    uri = f"s3://{s3.bucket}/studies/one"
    local = mirror.local_copy(uri)
    assert local == tmp_path / "mirror" / "s3" / s3.bucket / "studies" / "one"
    (local / "runs" / "a").mkdir(parents=True)
    (local / "study.json").write_text("{}")
    (local / "runs" / "a" / "summary.json").write_text('{"acc": 1}')
    (local / "train").mkdir()
    (local / "train" / "ckpt").write_text("Ray Train's")
    (local / ".study.json.tmp123").write_text("half")  # an atomic write's temporary
    (local / "optuna.db-journal").write_text("j")
    assert mirror.push(uri, skip=("train",)) == 2
    assert _files(uri) == {"study.json": 2, "runs/a/summary.json": 10}
    assert mirror.push(uri, skip=("train",)) == 0  # nothing changed
    (local / "study.json").write_text('{"x": 1}')
    assert mirror.push(uri, skip=("train",)) == 1
    assert _files(uri)["study.json"] == 8

    # another node: its own copy, filled from the bucket; a second pull fetches nothing
    monkeypatch.setenv("IA2RAY_MIRROR", str(tmp_path / "node-b"))
    other = mirror.local_copy(uri)
    assert mirror.pull(uri, "runs") == 1 and not (other / "study.json").exists()
    assert mirror.pull(uri) == 1 and json.loads((other / "study.json").read_text()) == {"x": 1}
    assert mirror.pull(uri) == 0
    assert mirror.push(uri) == 0  # what was just fetched is not sent back
    # a newer copy in the bucket replaces the local one (same size: by time)
    time.sleep(1.1)
    monkeypatch.setenv("IA2RAY_MIRROR", str(tmp_path / "mirror"))
    (local / "runs" / "a" / "summary.json").write_text('{"acc": 0}')
    assert mirror.push(uri, "runs") == 1
    monkeypatch.setenv("IA2RAY_MIRROR", str(tmp_path / "node-b"))
    assert mirror.pull(uri) == 1
    assert json.loads((other / "runs" / "a" / "summary.json").read_text()) == {"acc": 0}
    assert not [p for p in other.rglob(".*")]  # no temporaries left behind


def test_a_fresh_process_uploads_only_files_that_differ_from_the_bucket(s3, tmp_path):
    uri = f"s3://{s3.bucket}/s"
    local = mirror.local_copy(uri)
    local.mkdir(parents=True)
    (local / "a.txt").write_text("aaa")
    (local / "b.txt").write_text("bbb")
    assert mirror.push(uri) == 2
    mirror._synced.clear()  # as a new process (a resumed study driver) sees it
    assert mirror.push(uri) == 0
    (local / "b.txt").write_text("bbbb")
    mirror._synced.clear()
    assert mirror.push(uri) == 1


def _records(n: int, layers: int = 2, dim: int = 4) -> list[Generated]:
    torch.manual_seed(0)
    return [Generated(torch.arange(3) + i, torch.randn(layers, 3, dim)) for i in range(n)]


def test_teacher_cache_in_a_bucket_is_published_manifest_last_and_fetched_whole(s3, tmp_path, monkeypatch):
    location = f"s3://{s3.bucket}/studies/one/activations"
    sync = mirror.bucket_sync(location)
    cache = ActivationCache(sync.root(), shard_bytes=64)  # several shards
    cache.save("k1", _records(4), {"dtype": "float32"})
    before = len(s3.requests())
    sync.publish("k1")
    # pyarrow uploads in parts: an object appears when its upload is completed (POST ...?uploadId=)
    done = [r.split("?")[0].rsplit("/", 1)[1] for r in s3.requests()[before:]
            if r.startswith("POST ") and "uploadId=" in r]
    assert done[-1] == "manifest.json" and len(done) == len(set(done)) >= 3, done  # complete once the manifest is up

    monkeypatch.setenv("IA2RAY_MIRROR", str(tmp_path / "node-b"))
    assert sync.root() == tmp_path / "node-b" / "s3" / s3.bucket / "studies" / "one" / "activations"
    assert not (sync.root() / "k1").exists()
    sync.fetch("k1")  # fetched on first use
    theirs = ActivationCache(sync.root())
    got, want = theirs.load("k1"), cache.load("k1")
    assert [torch.equal(a.activations, b.activations) for a, b in zip(got, want)] == [True] * 4
    before = len(s3.requests())
    sync.fetch("k1")  # already here: the bucket is not asked again
    assert s3.requests()[before:] == []
    # an entry without its manifest in the bucket (an upload cut short) is not fetched
    mirror.push(location, "k1", skip=("k1/manifest.json",))  # nothing new to send from node b
    fs, path = mirror._fs(location)
    fs.delete_file(f"{path}/k1/manifest.json")
    monkeypatch.setenv("IA2RAY_MIRROR", str(tmp_path / "node-c"))
    assert mirror.fetch_dir(location, "k1", "manifest.json") is None
    assert not (sync.root() / "k1").exists()
    sync.fetch("k1")
    assert ActivationCache(sync.root()).has("k1") is False


def test_local_cache_locations_are_untouched(tmp_path):
    """A folder needs no sync: core reads and writes it in place; a bucket without a sync is refused."""
    from ia2ray.core.teacher import local_root

    assert mirror.bucket_sync(str(tmp_path / "acts")) is None
    assert local_root(str(tmp_path / "acts"), None) == tmp_path / "acts"
    with pytest.raises(ValueError, match="is a bucket URI; reading it needs a sync"):
        local_root("s3://b/acts", None)
    assert not mirror.is_remote(str(tmp_path)) and not mirror.is_remote("file:///x") and mirror.is_remote("gs://b/x")


def test_storage_uri_problems_are_named_before_anything_runs(s3, capsys):
    assert main(["--config", SMOKE, "--storage", "s3://no-such-bucket/studies", "--dry-run"]) == 2
    assert "--storage / study.storage = 's3://no-such-bucket/studies': bucket 'no-such-bucket' does not exist" \
        in capsys.readouterr().err
    assert main(["--config", SMOKE, "--storage", "hdfs://nn/studies", "--dry-run"]) == 2
    assert "unsupported scheme 'hdfs'" in capsys.readouterr().err
    assert main(["--config", SMOKE, "--storage", "s3:///studies", "--dry-run"]) == 2
    assert "no bucket in the URI" in capsys.readouterr().err
    assert main(["--config", SMOKE, "--storage", f"s3://{s3.bucket}/studies", "--dry-run"]) == 0
    assert _files(f"s3://{s3.bucket}") == {}  # the write probe is gone again


def test_bucket_study_dry_run_existing_study_and_resume_checks(s3, capsys, tmp_path):
    storage = f"s3://{s3.bucket}/studies"
    assert main(["--config", SMOKE, "--storage", storage, "--dry-run"]) == 0
    out = capsys.readouterr().out
    copy = tmp_path / "mirror" / "s3" / s3.bucket / "studies"
    assert f"folder: {storage}/smoke" in out and f"local copy: {copy / 'smoke'}" in out
    assert f"MLflow: sqlite:///{copy / 'mlflow.db'}, experiment smoke" in out  # beside the local copies
    assert _files(storage) == {}  # a dry run writes nothing to the bucket
    assert main(["--config", SMOKE, "--storage", storage, "--resume", "--dry-run"]) == 2
    assert f"--resume: no study named 'smoke' in {storage}/smoke" in capsys.readouterr().err
    # a study of that name in the bucket, none in the local copy: refused without --resume
    fs, path = mirror._fs(storage)
    with fs.open_output_stream(f"{path}/smoke/study.json") as fh:
        fh.write(json.dumps({"study": {}}).encode())
    assert main(["--config", SMOKE, "--storage", storage, "--dry-run"]) == 2
    assert f"a study named 'smoke' already exists in {storage}/smoke" in capsys.readouterr().err
    assert not os.path.exists(copy)


def test_a_trial_with_a_bucket_cache_runs_the_teacher_only_from_the_bucket(s3, tmp_path):
    """Captured teacher -> bucket; a trial on a node with an empty copy fetches it; an entry the bucket
    lacks is named by its bucket location."""
    from ia2ray.config import load_run_config
    from ia2ray.core.pipeline import run_pipeline
    from ia2ray.core.teacher import TeacherNotCachedError

    location = f"s3://{s3.bucket}/studies/one/activations"
    cfg = load_run_config(SMOKE, [f"capture.cache_dir={location}", "train.num_workers=0", "eval.icl_baseline=false",
                                  "train.max_epochs=1"])
    sync = mirror.bucket_sync(location)
    with pytest.raises(TeacherNotCachedError, match=f"not in the cache {location}"):
        run_pipeline(cfg, progress=False, splits=("val",), cached_teacher_only=True, sync=sync)
    first = run_pipeline(cfg, progress=False, splits=("val",), sync=sync)  # captures, publishes
    keys = {n.split("/")[0] for n in _files(location)}  # the training teacher and the validation rows' (similarity)
    assert len(keys) == 2 and all(f"{k}/manifest.json" in _files(location) for k in keys)
    shutil.rmtree(tmp_path / "mirror")  # another node: nothing local
    again = run_pipeline(cfg, progress=False, splits=("val",), cached_teacher_only=True, sync=sync)
    assert again.summary["val"] == first.summary["val"] and again.summary["sim"] == first.summary["sim"]
