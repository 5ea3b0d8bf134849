"""The core benchmark runs end to end and writes its report (a smoke run; figures are not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_core_quick_writes_its_report(tmp_path):
    out = tmp_path / "core.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_core.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["command"] == "python bench/bench_core.py --quick"
    assert {row["G"] for row in report["capture"]} == {8, 64}
    assert all(row["fast_s"] > 0 and row["reference_s"] > 0 for row in report["capture"])
    assert {"align_step_ms", "sft_step_ms", "align_layer0_step_ms", "align_over_sft"} <= set(report["steps"][0])


@pytest.mark.slow
def test_align_throughput_bench_runs_on_cpu(tmp_path):
    """The GPU throughput/MFU benchmark, on a tiny shape on the CPU (a smoke run; no figures asserted)."""
    out = tmp_path / "align.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_align_throughput.py"), "--shape", "tiny",
                          "--precision", "fp32", "--batch", "2", "--seq", "16", "--g", "2", "--steps", "2",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["seq"] == 16 and report["tokens_per_s"] > 0 and report["mfu"] is None
    assert report["model_flops_per_token"] > 4 * report["lora_params"]


@pytest.mark.cluster  # it starts a Ray cluster of its own in a fresh process
def test_gpu_trial_bench_runs_on_cpu(tmp_path):
    """The GPU trial benchmark (one ia2->sft trial through the Ray Train runner, time split, tokens/s, peak
    memory, MFU) on a tiny shape on the CPU: a smoke run; the figures themselves are not asserted."""
    out = tmp_path / "gpu-trial.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu_trial.py"), "--shape", "tiny", "--epochs", "2",
                          "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["shape"] == "tiny" and report["dtype"] == "float32" and report["mfu"] is None
    assert report["steps"] == {"align": 4, "sft": 4} and report["train_tokens_per_s"] > 0
    assert report["driver_model_loads"] == 0 and report["model_loads"] == 1
    assert {"worker_start", "model_load", "deepspeed_init", "train_align", "train_sft", "eval"} <= set(report["split_s"])
    assert report["model_flops_per_token"] > 4 * report["lora_params"]


@pytest.mark.slow
def test_bench_trials_quick_writes_its_report(tmp_path):
    out = tmp_path / "trials.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_trials.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=900,
                         env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    paths = report["paths"]
    assert set(paths) == {"warm_in_process", "cold_in_process", "ray_train_1_worker"}
    assert paths["warm_in_process"]["model_loads"] == [0] and paths["ray_train_1_worker"]["model_loads"] == [1]
    assert report["ray_train_driver"]["driver_model_loads"] == 0 and report["ray_train_driver"]["peak_rss_mb"] > 0


@pytest.mark.slow
def test_bench_train_quick_writes_its_report(tmp_path):
    out = tmp_path / "train.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["command"] == "python bench/bench_train.py --quick"
    row = report["rows"][0]
    assert row["workers"] == 1 and [s["name"] for s in row["one_fit"]["stages"]] == ["align", "sft"]
    assert row["one_fit"]["startup_s"] > 0 and row["one_fit"]["train_s"] > 0 and len(row["two_fits"]["fits"]) == 2


@pytest.mark.slow
def test_bench_study_quick_writes_its_report(tmp_path):
    out = tmp_path / "study.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_study.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    row = json.loads(out.read_text())["growth"][0]
    assert row["trials"] == 2 and len(row["per_trial"]) == 2
    assert 0 < row["compute_share_of_search"] < row["slot_busy_share_of_search"] <= 1.0
    assert all(t["compute_s"] > 0 and t["overhead_s"] > 0 for t in row["per_trial"])


@pytest.mark.slow
def test_bench_tracking_quick_writes_its_report(tmp_path):
    out = tmp_path / "tracking.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_tracking.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["studies"]) == {"off", "sqlite", "server"}
    assert all(s["trials"] == 2 for s in report["studies"].values())
    assert all(r["metrics"] == 500 and r["metrics_per_s"] > 0 for r in report["runlog"].values())


def test_label_tokens_bench_checks_a_vocabulary_against_its_own_encoder(tmp_path):
    """bench/label_tokens.py on a small ranks file in tiktoken's format: the 256 bytes, the digits' colon
    and the pieces of "apple" (as in Qwen's vocabulary, which is not stored here). The digit tasks pass,
    the MCQ tasks fail on the words the vocabulary lacks, and the run says so with exit status 1."""
    import base64

    tokens = [bytes([b]) for b in range(256)] + [b"ap", b"app", b"appl", b"apple", b"Answer", b"Label"]
    ranks = tmp_path / "tiny.tiktoken"
    ranks.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))
    out = tmp_path / "label-tokens.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "label_tokens.py"), "--qwen", str(ranks),
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    report = json.loads(out.read_text())
    assert report["command"] == "python bench/label_tokens.py --qwen QWEN_TIKTOKEN"
    qwen = report["results"]["qwen"]
    assert qwen["sst2"] == {"ok": True, "words": {"0": "0", "1": "1"}}
    assert qwen["agnews"]["ok"] and qwen["bbcnews"]["ok"]
    assert not qwen["sciq-remap"]["ok"] and "label word 'Friday' is 6 tokens" in qwen["sciq-remap"]["error"]
    assert "qwen    sciq-remap  BAD" in res.stdout


def test_compare_continues_where_an_earlier_run_stopped(tmp_path):
    """The comparison rewrites its JSON after each (N, seed) and a rerun computes only the missing splits."""
    out = tmp_path / "compare.json"
    cmd = [sys.executable, str(ROOT / "bench" / "compare_testbed.py"), "--n", "4", "--lrs", "1e-2", "--out", str(out),
           "--set", "data.val_size=16", "--set", "data.test_size=16", "--set", "train.max_epochs=2",
           "--set", "eval.icl_draws=1", "--set", "task.ood={testbed/map3: null}"]

    def run(*extra: str) -> str:
        res = subprocess.run(cmd + list(extra), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout

    first = run("--seeds", "1")
    one = json.loads(out.read_text())
    assert one["complete"] and len(one["results"]["4"]) == 1 and "N=4 seed=0" in first
    assert one["paired"]["4"]["ia2->sft - sft"]["acc"]["n"] == 1

    second = run("--seeds", "2")
    two = json.loads(out.read_text())
    assert "N=4 seed=0" not in second and "N=4 seed=1" in second  # seed 0 was read back, not trained again
    assert two["results"]["4"][0] == one["results"]["4"][0] and len(two["results"]["4"]) == 2
    diff = two["paired"]["4"]["ia2->sft - sft"]["acc"]
    runs = two["results"]["4"]
    assert diff["n"] == 2 and diff["mean"] == pytest.approx(
        sum(r["ia2->sft"]["0.01"]["test"]["acc"] - r["sft"]["0.01"]["test"]["acc"] for r in runs) / 2)
    assert "| 4 | 2 | ia2->sft | 0.01 |" in two["table"] and "ia2->sft - sft" in two["paired_table"]
    ood = two["ood"]["ood/testbed/map3"]  # the out-of-domain target gets the same tables, at the in-domain rates
    assert "| 4 | 2 | ia2->sft | 0.01 |" in ood["table"] and "Δ ood/testbed/map3 acc" in ood["paired_table"]
    assert ood["paired"]["4"]["ia2->sft - icl"]["ece"]["mean"] == pytest.approx(
        sum(r["ia2->sft"]["0.01"]["ood/testbed/map3"]["ece"] - r["icl"]["ood/testbed/map3"]["ece"] for r in runs) / 2)

    third = run("--seeds", "1", "--set", "eval.batch_size=8")  # another setup: not mixed with the file's splits
    assert "different setup; starting afresh" in third and "N=4 seed=0" in third


def test_bench_similarity_reads_a_study_folder(tmp_path):
    """The study mode of bench_similarity: each run's similarity seconds against its training + evaluation."""
    folder = tmp_path / "study"
    for name, sim, train, ev in (("a", 0.1, 2.0, 0.5), ("b", 0.3, 1.0, 0.5)):
        (folder / "runs" / name).mkdir(parents=True)
        (folder / "runs" / name / "summary.json").write_text(json.dumps({
            "name": name, "pipeline": "ia2", "timings": {"sim_s": sim, "train_stages_s": train, "eval_s": ev}}))
    out = tmp_path / "sim.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_similarity.py"), "--study", str(folder), "--out",
                          str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert [r["share"] for r in report["runs"]] == pytest.approx([0.04, 0.2])
    assert report["max_share"] == pytest.approx(0.2) and report["median_sim_s"] == pytest.approx(0.2)
