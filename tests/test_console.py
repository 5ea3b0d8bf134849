"""What a person sees of a study: the live view (plain lines without a terminal), the study's log, the
report's plots, and `python -m ia2ray.report`. The fresh-process study is marked `cluster` (it starts its
own Ray cluster); the rest runs without Ray."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ia2ray.study.console import PHASES, OutputLog, StudyView, ViewCallback, pareto_size
from ia2ray.study.plots import plot_losses, plot_pareto, plot_reliability, pooled_bins

ROOT = Path(__file__).resolve().parents[1]


def test_pareto_size_counts_the_points_nothing_dominates():
    assert pareto_size([]) == 0
    assert pareto_size([(0.5, 0.1)]) == 1
    # (0.9, 0.3) and (0.6, 0.1) trade off; (0.5, 0.2) is beaten by (0.6, 0.1) on both; a tie counts twice
    assert pareto_size([(0.9, 0.3), (0.6, 0.1), (0.5, 0.2)]) == 2
    assert pareto_size([(0.7, 0.2), (0.7, 0.2), (0.6, 0.3)]) == 2


def test_plain_view_says_phases_progress_best_and_failures():
    out = io.StringIO()
    view = StudyView(out, live=False, every=3600, gap=0)
    view.phase("checks")
    view.phase("search", 3)
    view.started_run("a")
    view.started_run("b")
    view.finished_run("a", {"val/acc": 0.6, "val/ece": 0.1})
    view.finished_run("b", {"val/acc": 0.8, "val/ece": 0.3})
    view.started_run("c")
    view.finished_run("c", error="NonFiniteLossError: align loss is nan")
    view.phase("confirmation", 2)
    view.stop()
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("phase 1/6: checks") and lines[1].endswith("phase 3/6: search (3 runs)")
    assert lines[2].endswith("search: 1/3 done, 1 running, 0 failed | ~0:00 left | best val acc 0.600, "
                             "best val ECE 0.100, Pareto front 1")
    assert lines[3].endswith("search: 2/3 done, 0 running, 0 failed | ~0:00 left | best val acc 0.800, "
                             "best val ECE 0.100, Pareto front 2")
    assert lines[4] == "search: run c failed: NonFiniteLossError: align loss is nan"
    assert lines[5].endswith("search: 2/3 done, 0 running, 1 failed | best val acc 0.800, best val ECE 0.100, "
                             "Pareto front 2")  # the phase's last count, said when the next phase starts
    assert lines[6].endswith("phase 5/6: confirmation (2 runs)") and lines[7].split("] ")[1].startswith("done in")
    assert len(lines) == 8 and len(PHASES) == 6


def test_live_view_draws_the_panel_on_a_terminal(tmp_path):
    """On a terminal the view is a rich live panel: the study, the phases with the current one marked,
    the counts, the search's best; notes print above it."""
    out = io.StringIO()
    view = StudyView(out, live=True)
    view.phase("checks")
    view.study("testbed", "/studies/testbed", tmp_path)
    view.phase("search", 4)
    view.started_run("a")
    view.finished_run("b", {"val/acc": 0.75, "val/ece": 0.125})
    view.note("warning: something to see")
    view.stop()
    screen = out.getvalue()
    assert "\x1b[" in screen  # drawn with terminal codes
    for text in ("testbed  /studies/testbed", "teacher capture", "search", "1/4 done, 1 running, 0 failed",
                 "best val acc 0.750, best val ECE 0.125, Pareto front 1", "warning: something to see", "elapsed"):
        assert text in screen, text


def test_a_quiet_view_prints_nothing_and_its_tune_callback_pickles_without_it():
    view = StudyView()  # a study run from Python: progress kept, nothing printed
    view.phase("search", 2)
    view.finished_run("x", {"val/acc": 0.5, "val/ece": 0.2})
    assert (view.done, view.best_acc) == (1, 0.5)
    callback = pickle.loads(pickle.dumps(ViewCallback(view)))  # Tune pickles its run config
    assert callback.view is None
    callback.on_trial_start(0, [], object())  # a restored callback without a view does nothing


def test_output_log_takes_fd_1_and_2_and_moves_into_the_study(tmp_path):
    """What C code and child processes write to the file descriptors goes to the log, first a temporary
    file, then the study's logs/ with what it held; the terminal gets its descriptors back."""
    script = f"""
import os, subprocess, sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from ia2ray.study.console import OutputLog, terminal
term = terminal()
log = OutputLog()
first = log.path
os.write(1, b"before the move\\n")
log.move_to(Path({str(tmp_path)!r}) / "study" / "logs" / "study.log")
subprocess.run([sys.executable, "-c", "import sys; print('child out'); print('child err', file=sys.stderr)"])
print("python print")
log.close()
print("back on the terminal", first.exists())
term.write("view line\\n")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["back on the terminal False", "view line"]
    text = (tmp_path / "study" / "logs" / "study.log").read_text()
    assert text.splitlines() == ["before the move", "child out", "child err", "python print"]


def summary(seed: int, bins: list[dict], ece: float, history=()) -> dict:
    return {"seed": seed, "test": {"acc": 0.5, "ece": ece, "reliability": bins}, "history": list(history)}


def test_pooled_bins_weigh_each_seed_bin_by_its_count():
    bins = [{"count": 10, "acc": 0.5, "conf": 0.55}, {"count": 30, "acc": 0.9, "conf": 0.58},
            {"count": 5, "acc": 1.0, "conf": 0.95}]
    pooled = pooled_bins(bins)
    assert [(b["lo"], b["count"]) for b in pooled] == [(0.5, 40), (0.9, 5)]
    assert pooled[0]["acc"] == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)
    assert pooled[0]["conf"] == pytest.approx((10 * 0.55 + 30 * 0.58) / 40)


def test_plots_carry_their_labels(tmp_path):
    trials = [{"params": {"pipeline": "ia2->sft"}, "values": [0.7, 0.2]},
              {"params": {"pipeline": "ia2"}, "values": [0.5, 0.1]},
              {"params": {}, "values": [0.4, 0.3]}]  # the pipeline not searched: the study's
    front = [{"values": {"val/acc": 0.7, "val/ece": 0.2}}, {"values": {"val/acc": 0.5, "val/ece": 0.1}}]
    texts = plot_pareto(trials, front, tmp_path / "pareto.png", "sft", [("ICL", 0.12, 0.8), ("SFT only", 0.25, 0.6)])
    assert {"ia2->sft (1)", "ia2 (1)", "sft (1)", "Pareto front (2)", "ICL", "SFT only"} <= set(texts)
    bins = [{"count": 20, "acc": 0.6, "conf": 0.7}]
    runs = {"ICL": [summary(0, bins, 0.1), summary(1, bins, 0.3)],
            "SFT only": [summary(0, bins, 0.2, [{"stage": "sft", "step": s, "train_loss": 1 / s, "dev_loss": 2 / s}
                                                 for s in (1, 2, 3)])]}
    texts = plot_reliability(runs, tmp_path / "reliability.png")
    assert "ICL\nECE 0.200 (mean of 2)" in texts and "SFT only\nECE 0.200 (mean of 1)" in texts
    assert {"accuracy", "gap to confidence"} <= set(texts)
    texts = plot_losses(runs, tmp_path / "losses.png")
    assert {"SFT only", "sft train", "sft dev"} <= set(texts) and "ICL" not in texts  # ICL trains nothing
    for name in ("pareto.png", "reliability.png", "losses.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG" and (tmp_path / name).stat().st_size > 10_000
    assert plot_losses({"ICL": [summary(0, bins, 0.1)]}, tmp_path / "none.png") == []
    assert not (tmp_path / "none.png").exists()


def test_report_of_a_folder_that_is_not_a_study_exits_2(tmp_path):
    from ia2ray.report import main

    assert main([str(tmp_path)]) == 2
    (tmp_path / "study.json").write_text("{}")
    assert main([str(tmp_path)]) == 2
    assert main(["s3://bucket/study"]) == 2


@pytest.mark.cluster
def test_a_study_in_a_fresh_process_prints_a_short_view_logs_the_rest_and_its_report_rebuilds(tmp_path):
    """`python -m ia2ray.tune` without a terminal: the console holds the phase lines, the progress
    counts and the final table in under 150 lines; the workers' output is in logs/study.log; `python -m
    ia2ray.report` rebuilds the same report.csv, of a finished study and of an interrupted one."""
    storage = tmp_path / "studies"
    sets = ["study.num_trials=3", "study.search_seeds=[0]", "study.confirm.seeds=[0]", "study.confirm.top_k=1",
            "study.confirm.baseline_lrs=[3.0e-3, 1.0e-2]", "study.confirm.baselines=[icl, sft]"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-m", "ia2ray.tune", "--storage", str(storage),
                          *[a for s in sets for a in ("--set", s)]], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-4000:]
    lines = console.splitlines()
    assert len(lines) < 150, console
    study = storage / "testbed"
    for number, phase in enumerate(PHASES, start=1):
        assert any(line.endswith(f"phase {number}/6: {phase}") or f"phase {number}/6: {phase} (" in line
                   for line in lines), (phase, console)
    assert any("search: 3/3 done, 0 running, 0 failed" in line and "Pareto front" in line for line in lines), console
    assert any("baselines' learning rates: 2/2 done" in line for line in lines), console
    assert any("confirmation: 3/3 done" in line for line in lines), console
    assert "| ICL | 0 |" in console and "| SFT only | 0 |" in console and "| best-1 | 0 |" in console
    assert f"report: {study / 'report.md'}" in lines and f"log: {study / 'logs' / 'study.log'}" in lines
    assert "Loading weights" not in console and "FutureWarning" not in console and "INFO" not in console
    log = (study / "logs" / "study.log").read_text()
    # the workers' output (Ray streams it to the driver, prefixed with the process) and Ray's own
    assert "(search_trial pid=" in log and "run trial-" in log and "(confirm_trial pid=" in log
    assert "Started a local Ray instance" in log and "Loading weights" not in log and "is_gradient_checkpointing" not in log

    before = {name: (study / name).read_bytes() for name in ("report.csv", "pareto.csv", "trials.csv")}
    (study / "report.csv").unlink()
    rebuilt = subprocess.run([sys.executable, "-m", "ia2ray.report", str(study)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert {name: (study / name).read_bytes() for name in before} == before
    assert "| best-1 | 0 |" in rebuilt.stdout and f"report: {study / 'report.md'}" in rebuilt.stdout
    # the study's MLflow run (the default SQLite store beside the study) got the rebuilt report, and kept its status
    assert "MLflow: sqlite:///" in rebuilt.stdout and "updated" in rebuilt.stdout, rebuilt.stdout[-2000:]
    import mlflow

    from ia2ray.study.records import study_runs

    uri = f"sqlite:///{storage / 'mlflow.db'}"
    (parent,) = study_runs(uri, study, "tags.`ia2ray.role` = 'study'")
    assert parent.info.status == "FINISHED" and parent.info.run_id in rebuilt.stdout
    client = mlflow.tracking.MlflowClient(uri)
    assert {"report.md", "report.csv", "pareto.png", "reliability.png", "losses.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    assert Path(client.download_artifacts(parent.info.run_id, "report.csv", str(tmp_path))).read_bytes() == \
        before["report.csv"]
    for png in ("pareto.png", "reliability.png", "losses.png"):
        assert (study / png).stat().st_size > 10_000

    # an interrupted study: the search done, one of the three confirmation runs finished
    cut = tmp_path / "cut" / "testbed"
    shutil.copytree(study, cut)
    (cut / "timings.json").unlink()
    for run in json.loads((cut / "confirm.json").read_text())["rows"][1:]:
        shutil.rmtree(cut / "runs" / f"confirm-{run['label'].replace(' ', '-')}-s{run['seed']}")
    from ia2ray.report import main

    assert main([str(study), str(cut), "--tracking-uri", "none"]) == 0  # the copy shares the study's MLflow run
    with open(cut / "report.csv") as fh:
        assert [r["method"] for r in csv.DictReader(fh)] == ["ICL"]
    assert "the study has not finished" in (cut / "report.md").read_text()


@pytest.mark.cluster
def test_verbose_prints_everything_to_the_terminal_and_keeps_no_log(tmp_path):
    """`--verbose`: Ray's, Tune's and the workers' output on the terminal as it comes, among the view's
    plain lines; no logs/ folder."""
    storage = tmp_path / "studies"
    sets = ["study.num_trials=2", "study.search_seeds=[0]", "study.confirm.seeds=[0]", "study.confirm.baseline_lrs=[]",
            "study.confirm.baselines=[icl]"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-m", "ia2ray.tune", "--verbose", "--storage", str(storage),
                          *[a for s in sets for a in ("--set", s)]], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-4000:]
    assert "phase 3/6: search (2 runs)" in console and "(search_trial pid=" in console and "run trial-" in console
    assert "Started a local Ray instance" in console and "INFO ia2ray.study" in console
    assert "| ICL | 0 |" in console and not (storage / "testbed" / "logs").exists()
