"""`python -m ia2ray.tune` for real: the smoke study in a fresh process with its own local Ray cluster,
logging to a real `mlflow server`, killed mid-search (SIGKILL to the driver's process group and its Ray
processes) and
continued with --resume. Marked `cluster` (it starts its own Ray cluster; ~3 min): CI runs it after the
default suite."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "search_spaces" / "smoke.yaml"


def tune_command(storage: Path, *extra: str) -> list[str]:
    # longer align stages than the shipped smoke study, so the kill lands inside a trial's Train run
    return [sys.executable, "-m", "ia2ray.tune", "--config", str(SMOKE), "--storage", str(storage),
            "--set", "train.max_epochs=12", "--set", "train.patience=100", *extra]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def caught(study: Path, moment: str):
    """The trial run a kill at `moment` interrupts, once the study is there: `checkpoint`: a trial
    has finished and another has a complete checkpoint but no result yet; `start`: a trial's Ray Train
    run has started but has no checkpoint yet; `confirm`: a confirmation run has started."""
    if moment == "confirm":
        started = {p.name for p in study.glob("train/confirm-*") if p.is_dir()}
        running = started - {p.parent.name for p in study.glob("runs/confirm-*/summary.json")}
        return sorted(running)[0] if running else None
    done = {p.parent.name for p in study.glob("runs/trial-*/summary.json")}
    ckpts = [p.parent for p in study.glob("train/trial-*/ckpt-*/COMPLETE.json")]
    finished = {c.parent.name for c in ckpts if c.name.endswith(("sft-end", "eval-end"))}  # trained (and evaluated)
    if moment == "checkpoint":
        running = {c.parent.name for c in ckpts} - done - finished
        return sorted(running)[0] if done and running else None
    started = {p.name for p in study.glob("train/trial-*") if p.is_dir()} - {c.parent.name for c in ckpts} - done
    return sorted(started)[0] if started else None


@pytest.mark.cluster
@pytest.mark.parametrize("moment", ["checkpoint", "start", "confirm"])
def test_smoke_study_killed_mid_search_then_resumed(tmp_path, tiny_checkpoints, mlflow_server, moment):
    """Killed at a `moment` of a search trial (`caught`), then resumed: the record is exact either way.
    A trial killed after its first checkpoint is restored by Tune and resumes its Train run. One killed
    before that may have started after Tune's last experiment snapshot: Tune then runs another trial in
    its place, and the killed one is closed as FAIL in Optuna and KILLED + superseded in MLflow. A
    confirmation run killed midway runs again under its own name and continues its MLflow run."""
    tiny_checkpoints("llama")  # built once for the session (builtin:tiny-llama)
    storage = tmp_path / "studies"
    study = storage / "smoke"
    proc = start(tune_command(storage, "--tracking-uri", mlflow_server), tmp_path / "first.log")
    deadline, killed_run = time.time() + 400, None
    while time.time() < deadline and proc.poll() is None and killed_run is None:
        killed_run = caught(study, moment)
        time.sleep(0.05)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    assert killed_run, f"no trial was caught at moment {moment!r}"
    # the whole local cluster goes with the driver: its Ray processes (and so the Train workers, which
    # would otherwise finish a run this small before they notice) are killed at the same moment
    import psutil

    tree = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGKILL)
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    if moment == "checkpoint":  # the Train worker (rank 0) logged the interrupted trial's stage losses live
        live = live_metrics(mlflow_server, study, killed_run)
        assert any(k.startswith("align/") for k in live), live
    finished_before = {p.parent.name: p.stat().st_mtime_ns for p in study.glob("runs/trial-*/summary.json")}
    time.sleep(2)

    resumed = start(tune_command(storage, "--resume", "--tracking-uri", mlflow_server), tmp_path / "resume.log")
    assert resumed.wait(timeout=600) == 0, (tmp_path / "resume.log").read_text()[-4000:]
    log = (tmp_path / "resume.log").read_text()  # the console: the live view's plain lines, the final table
    assert "phase 3/6: search" in log and "phase 5/6: confirmation" in log
    log += (study / "logs" / "study.log").read_text()  # the rest: Ray's, Tune's and the workers' output

    # finished trials were kept (not run again), the interrupted one resumed from its checkpoint
    for name, mtime in finished_before.items():
        assert (study / "runs" / name / "summary.json").stat().st_mtime_ns == mtime
    trial_runs = sorted(p.parent.name for p in study.glob("runs/trial-*/summary.json"))
    superseded = moment != "confirm" and killed_run not in trial_runs
    if moment == "confirm":
        assert (study / "runs" / killed_run / "summary.json").is_file()
    if moment == "checkpoint":
        assert f"/train/{killed_run}/ckpt-" in log and "resuming from" in log and not superseded
    # exactly the budgeted trials completed, each with one run; Optuna kept its history across the
    # restart, and a trial Tune did not restore is closed as FAIL, not left RUNNING
    import optuna

    ot = optuna.load_study(study_name="smoke", storage=f"sqlite:///{study / 'optuna.db'}")
    complete = [t for t in ot.trials if t.state == optuna.trial.TrialState.COMPLETE]
    closed = [t for t in ot.trials if t.state != optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 3 and len(closed) == int(superseded)
    assert all(t.state == optuna.trial.TrialState.FAIL and "ia2ray_interrupted" in t.user_attrs for t in closed)
    assert len(trial_runs) == 3
    # selection never looked at the test split
    for name in trial_runs:
        summary = json.loads((study / "runs" / name / "summary.json").read_text())
        assert "test" not in summary and "val" in summary and summary["phase"] == "search"

    # the teacher ran once per key (1 seed x 2 sites), before the trials; the resume only found it cached
    events = [json.loads(line) for line in (study / "teacher.jsonl").read_text().splitlines()]
    computed = [e for e in events if e["computed"]]
    assert sorted(e["site"] for e in computed) == ["attn_out", "residual"]
    assert len({e["key"] for e in events}) == 2 and len(events) == 4
    assert len({e["similarity_key"] for e in events}) == 2  # each capture also took the validation rows' teacher
    assert len(list((study / "activations").rglob("manifest.json"))) == 4

    # confirmation + report: baselines and the best config on the test split
    with open(study / "report.csv") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"ICL", "IA2 -> SFT", "best-1"}
    for r in rows.values():
        assert 0.0 <= float(r["test_acc_mean"]) <= 1.0 and 0.0 <= float(r["test_ece_mean"]) <= 1.0
    report = (study / "report.md").read_text()
    assert "| best-1 | 0 |" in report and "Pareto front" in report
    for png in ("pareto.png", "reliability.png"):
        assert (study / png).read_bytes()[:4] == b"\x89PNG"
    assert "report: " + str(study / "report.md") in log and "| ICL | 0 |" in log
    check_mlflow(mlflow_server, study, killed_run if superseded else None)


def live_metrics(url: str, study: Path, run_name: str) -> dict:
    from ia2ray.study.records import study_runs

    (run,) = study_runs(url, study, f"attributes.run_name = '{run_name}'")
    assert run.info.status == "RUNNING"
    return run.data.metrics


def check_mlflow(url: str, study: Path, superseded: Optional[str]) -> None:
    """One parent run, one nested run per trial (a killed trial's run continued, not doubled), none
    left RUNNING; params, per-step metrics once per step, final metrics, tags and artifacts. The run
    of a `superseded` trial (not restored by Tune) is KILLED and tagged so."""
    from mlflow import MlflowClient

    from ia2ray.study.records import study_runs

    client = MlflowClient(url)
    runs = study_runs(url, study)
    killed = [r for r in runs if r.info.status != "FINISHED"]
    assert [r.info.run_name for r in killed] == ([superseded] if superseded else [])
    assert all(r.info.status == "KILLED" and r.data.tags["ia2ray.superseded"] == "true" for r in killed)
    runs = [r for r in runs if r.info.status == "FINISHED"]
    (parent,) = [r for r in runs if r.data.tags.get("ia2ray.role") == "study"]
    children = [r for r in runs if r is not parent]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert {r.info.status for r in runs} == {"FINISHED"} and not [r for r in runs if "ia2ray.error" in r.data.tags]
    names = sorted(r.info.run_name for r in children)
    trial_dirs = sorted(p.parent.name for p in study.glob("runs/trial-*/summary.json"))
    assert names == sorted(["confirm-ICL-s0", "confirm-IA2-SFT-s0", "confirm-best-1-s0", *trial_dirs])
    assert len({r.data.tags["ia2ray.trial_key"] for r in children}) == len(children) == 6

    search = {r.info.run_name: r for r in children if r.data.tags["ia2ray.phase"] == "search"}
    for name, run in search.items():
        summary = json.loads((study / "runs" / name / "summary.json").read_text())
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert tags["ia2ray.trial_id"] == name.removeprefix("trial-") and tags["ia2ray.task"] == "toy/polarity"
        assert tags["ia2ray.n"] == "4" and tags["ia2ray.seed"] == "0"
        assert tags["ia2ray.model_revision"].startswith("sha256:")
        assert tags["ia2ray.code_version"].startswith("ia2ray ") and len(tags["ia2ray.config_hash"]) == 64
        for key, value in summary["params"].items():  # the sampled values, flat and readable
            assert params[key] == (value if isinstance(value, str) else json.dumps(value))
        assert params["pipeline"] == "ia2->sft" and params["lr.sft"] == "0.003"
        assert metrics["val/acc"] == summary["val"]["acc"] and metrics["val/ece"] == summary["val"]["ece"]
        # no Tune bookkeeping (pid, timestamps, iterations) among the metrics
        assert {k.split("/")[0] for k in metrics} <= {"align", "sft", "val", "time", "objective", "sim"}
        for stage in ("align", "sft"):
            logged = [m.step for m in client.get_metric_history(run.info.run_id, f"{stage}/loss")]
            expected = [h["step"] for h in summary["history"] if h["stage"] == stage and "train_loss" in h]
            assert sorted(logged) == expected and len(set(logged)) == len(logged) and expected
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
            "adapter", "answers.json", "config.yaml", "reliability.png", "summary.json"}
        assert {a.path for a in client.list_artifacts(run.info.run_id, "adapter")} >= {
            "adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "study.yaml", "pareto.csv", "pareto.png", "report.md", "report.csv", "reliability.png"}
    with open(study / "report.csv") as fh:
        best = {r["method"]: r for r in csv.DictReader(fh)}["best-1"]
    assert parent.data.metrics["best-1/test/acc"] == pytest.approx(float(best["test_acc_mean"]), abs=1e-6)
    assert parent.data.params["study.num_trials"] == "3"


@pytest.mark.slow
def test_default_study_dry_run_in_a_fresh_process():
    out = subprocess.run([sys.executable, "-m", "ia2ray.tune", "--dry-run"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "study testbed" in out.stdout and "trials: 12" in out.stdout


def test_failing_trials_are_reported_and_the_scalar_study_still_finishes(ray_cluster, tmp_path, capsys):
    """In-process training (`train.num_workers=0`), the scalar objective, and trials that fail: a
    learning rate of 1e30 makes the align loss non-finite, so those trials error, Optuna records them
    as failed, and the study goes on with the others."""
    import optuna

    from ia2ray.tune import main

    storage = tmp_path / "studies"
    sets = ["train.num_workers=0", "study.objective=scalar", "study.sampler=random", "study.num_trials=6",
            "search.params={lr.align: {kind: choice, values: [1.0e-3, 1.0e+30]}}"]
    assert main(["--config", str(SMOKE), "--storage", str(storage), *[a for s in sets for a in ("--set", s)]]) == 0
    out = capsys.readouterr()
    ot = optuna.load_study(study_name="smoke", storage=f"sqlite:///{storage / 'smoke' / 'optuna.db'}")
    states = {t.number: (t.state, t.params["lr.align"]) for t in ot.trials}
    failed = [lr for state, lr in states.values() if state == optuna.trial.TrialState.FAIL]
    complete = [lr for state, lr in states.values() if state == optuna.trial.TrialState.COMPLETE]
    assert len(states) == 6 and failed and complete
    assert set(failed) == {1e30} and set(complete) == {1e-3}
    assert out.err.count("warning: trial") == len(failed) and "NonFiniteLossError" in out.err
    assert "| best-1 | 0 |" in (storage / "smoke" / "report.md").read_text()
    assert not (storage / "smoke" / "pareto.png").exists()  # one objective: no Pareto plot


def test_in_process_trials_keep_the_model_loaded_in_their_actor(ray_cluster, tmp_path):
    """`train.num_workers=0` with one trial at a time: Tune reuses the trial actor, which reads the
    weights for its first trial only; the confirmation (another actor) of the best config gives the
    validation metrics its search trial gave."""
    from ia2ray.tune import main

    storage = tmp_path / "studies"
    sets = ["train.num_workers=0", "study.max_concurrent=1", "study.confirm.baselines=[icl]"]
    assert main(["--config", str(SMOKE), "--storage", str(storage), "--tracking-uri", "none",
                 *[a for s in sets for a in ("--set", s)]]) == 0
    runs = {p.parent.name: json.loads(p.read_text()) for p in (storage / "smoke" / "runs").glob("*/summary.json")}
    search = sorted((s for s in runs.values() if s["phase"] == "search"), key=lambda s: s["trial_id"])
    confirm = [s for s in runs.values() if s["phase"] == "confirm"]
    assert len(search) == 3 and len(confirm) == 2
    assert sum(s["model_loads"] for s in search) == 1 and sum(s["model_loads"] for s in confirm) == 1
    best = next(s for s in confirm if s["label"] == "best-1")
    found = next(s for s in search if s["params"] == best["params"])
    assert best["val"] == found["val"]


def test_seed_robust_search_and_tuned_baselines_compare_paired(ray_cluster, tmp_path):
    """Search trials train and validate on two subsets and report the means; each trained baseline has
    its rate chosen on validation over a grid before confirmation; the report compares paired by seed.
    In-process trials, SQLite MLflow."""
    import optuna
    from mlflow import MlflowClient

    from ia2ray.core.stats import paired
    from ia2ray.study.confirm import pick_rates
    from ia2ray.study.records import study_runs
    from ia2ray.study.space import decode_point
    from ia2ray.tune import main

    storage = tmp_path / "studies"
    sets = ["train.num_workers=0", "study.num_trials=2", "study.search_seeds=[0, 1]", "study.confirm.seeds=[0, 1]",
            "study.confirm.baselines=[icl, sft]", "study.confirm.baseline_lrs=[1.0e-3, 1.0e-2]",
            "search.params={lr.align: {kind: loguniform, low: 1.0e-3, high: 1.0e-2, default: 1.0e-3}, "
            "lr.sft: {kind: loguniform, low: 1.0e-3, high: 1.0e-2, default: 1.0e-3}, "
            "pipeline: {kind: choice, values: [ia2, ia2->sft], default: ia2->sft}}"]
    assert main(["--config", str(SMOKE), "--storage", str(storage), *[a for s in sets for a in ("--set", s)]]) == 0
    study = storage / "smoke"
    runs = {p.parent.name: json.loads(p.read_text()) for p in (study / "runs").glob("*/summary.json")}

    # each search trial: one run per subset, the trial's summary holds their means, Optuna the same values
    ot = optuna.load_study(study_name="smoke", storage=f"sqlite:///{study / 'optuna.db'}")
    assert [t.state for t in ot.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for t in ot.trials:
        trial = next(s for s in runs.values() if s["phase"] == "search" and "seeds" in s
                     and s["params"] == decode_point(json_study(study), t.params))
        seeds = [runs[name] for name in trial["runs"]]
        assert [s["config"]["data"]["seed"] for s in seeds] == [0, 1]
        assert t.values[0] == pytest.approx(sum(s["val"]["acc"] for s in seeds) / 2)
        assert t.values[1] == pytest.approx(sum(s["val"]["ece"] for s in seeds) / 2)
        assert trial["val"]["acc"] == t.values[0]
        # conditional space: ia2 never samples lr.sft
        assert ("lr.sft" in t.params) == (t.params["pipeline"] == "ia2->sft")

    # the SFT baseline: both rates on both subsets, the best validation mean confirmed
    tuning = [s for s in runs.values() if s["phase"] == "baseline" and "seeds" in s]
    assert sorted(s["params"]["lr.sft"] for s in tuning) == [1e-3, 1e-2]
    results = [{"method": "sft", "lr": s["params"]["lr.sft"], "metrics": {f"val/{k}": v for k, v in s["val"].items()}}
               for s in tuning]
    best_lr = pick_rates(json_study(study), results, has_ece=True)["sft"]["lr"]
    confirmed = [s for s in runs.values() if s["phase"] == "confirm" and s["label"] == "SFT only"]
    assert len(confirmed) == 2 and all(s["config"]["lr"]["sft"] == best_lr for s in confirmed)
    assert all(s["tuned"].startswith("lr in {0.001, 0.01} -> ") for s in confirmed)

    # the report: tuned-over notes and paired comparisons equal to `paired` on the confirmation runs
    with open(study / "report.csv") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    by_seed = {label: {s["seed"]: s["test"]["acc"] for s in runs.values()
                       if s["phase"] == "confirm" and s["label"] == label} for label in ("best-1", "SFT only")}
    expected = paired([by_seed["best-1"][s] for s in (0, 1)], [by_seed["SFT only"][s] for s in (0, 1)])
    assert float(rows["best-1"]["vs_sft_test_acc_diff"]) == pytest.approx(expected.mean, abs=1e-6)
    assert rows["best-1"]["vs_sft_test_acc_verdict"] == expected.verdict
    assert rows["best-1"]["tuned"].startswith("2 tpe trials over")
    report = (study / "report.md").read_text()
    assert "## Paired differences on the test split" in report and "| best-1 | ICL | 2 |" in report

    # MLflow: one run per search trial with each subset's metrics under s<seed>/ and the means bare;
    # the parent holds the paired comparisons
    uri = f"sqlite:///{storage / 'mlflow.db'}"
    search = study_runs(uri, study, "tags.`ia2ray.phase` = 'search'")
    assert len(search) == 2
    for run in search:
        m = run.data.metrics
        assert m["val/acc"] == pytest.approx((m["s0/val/acc"] + m["s1/val/acc"]) / 2)
    (parent,) = study_runs(uri, study, "tags.`ia2ray.role` = 'study'")
    parent = MlflowClient(uri).get_run(parent.info.run_id)
    assert parent.data.metrics["best-1/vs_sft/test/acc_diff"] == pytest.approx(expected.mean, abs=1e-6)
    assert parent.data.tags["ia2ray.verdict.best-1.vs_sft.acc"] == expected.verdict


def test_a_study_with_every_pipeline_reports_similarity_and_overlap(ray_cluster, tmp_path):
    """Every pipeline in the space and every trained one confirmed (kd and sft->ia2 included): each run
    measures activation similarity (logged per layer), the report draws the similarity curves and the
    LoRA overlap heatmap and puts both into the study's MLflow run. In-process trials, SQLite MLflow."""
    from mlflow import MlflowClient

    from ia2ray.config.schema import PIPELINES
    from ia2ray.core.overlap import adapter_overlap, load_lora_b
    from ia2ray.study.records import study_runs
    from ia2ray.tune import main

    storage = tmp_path / "studies"
    methods = [p for p in PIPELINES if p not in ("ia2+sft", "sft-icl")]
    sets = ["train.num_workers=0", "study.num_trials=2", "study.sampler=random",
            f"study.confirm.baselines=[icl, {', '.join(methods)}]",
            f"search.params={{pipeline: {{kind: choice, values: [{', '.join(PIPELINES)}], default: ia2->sft}}, "
            "lr.align: {kind: loguniform, low: 1.0e-3, high: 1.0e-2, default: 1.0e-3}}"]
    assert main(["--config", str(SMOKE), "--storage", str(storage), *[a for s in sets for a in ("--set", s)]]) == 0
    study = storage / "smoke"
    runs = {p.parent.name: json.loads(p.read_text()) for p in (study / "runs").glob("*/summary.json")}
    confirmed = {s["label"]: s for s in runs.values() if s["phase"] == "confirm"}
    assert {"KD", "SFT -> IA2", "ICL"} <= set(confirmed) and len(confirmed) == len(methods) + 2
    assert [st["name"] for st in confirmed["SFT -> IA2"]["stages"]] == ["sft", "align"]
    assert [st["name"] for st in confirmed["KD"]["stages"]] == ["kd"]
    for s in runs.values():
        assert len(s["sim"]["layers"]) == 4 and s["sim"]["rows"] == 8, s["name"]

    # the report: similarity per method (the ICL row is the base model) and the overlap matrix
    report = (study / "report.md").read_text()
    assert "## Activation similarity to the ICL teacher" in report and "| base (no adapter) | 1 |" in report
    assert "## LoRA subspace overlap" in report
    for name in ("similarity.png", "overlap.png", "similarity.csv", "overlap.csv"):
        assert (study / name).stat().st_size > 0, name
    with open(study / "similarity.csv") as fh:
        sims = {(r["method"], int(r["layer"])): float(r["similarity_mean"]) for r in csv.DictReader(fh)}
    assert sims[("KD", 2)] == pytest.approx(confirmed["KD"]["sim"]["layers"][2], abs=1e-6)
    with open(study / "overlap.csv") as fh:
        pairs = {(r["method_a"], r["method_b"]): float(r["overlap_mean"]) for r in csv.DictReader(fh)}
    adapter = lambda label: load_lora_b(study / "runs" / confirmed[label]["name"] / "adapter")  # noqa: E731
    assert pairs[("SFT only", "IA2 only")] == pytest.approx(
        adapter_overlap(adapter("SFT only"), adapter("IA2 only"))["mean"], abs=1e-6)
    assert pairs[("KD", "KD")] == pytest.approx(1.0, abs=1e-6)

    # MLflow: every trial run has sim/mean and one key per layer; the study run the figures
    uri = f"sqlite:///{storage / 'mlflow.db'}"
    client = MlflowClient(uri)
    for run in study_runs(uri, study, "tags.`ia2ray.phase` = 'confirm'"):
        m = run.data.metrics
        assert {"sim/mean", "sim/layer_0", "sim/layer_3"} <= set(m)
        assert [h.step for h in client.get_metric_history(run.info.run_id, "sim/by_layer")] == [0, 1, 2, 3]
    (parent,) = study_runs(uri, study, "tags.`ia2ray.role` = 'study'")
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"similarity.png", "overlap.png", "overlap.csv"} <= names
    assert "KD/sim/mean" in client.get_run(parent.info.run_id).data.metrics


def json_study(study_dir: Path):
    from ia2ray.config.schema import StudyFile

    return StudyFile.model_validate(json.loads((study_dir / "study.json").read_text())["study"])
