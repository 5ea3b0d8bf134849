"""The study's MLflow record, through `ia2ray.tracking`.

One experiment per study name; in it one parent run per study (key tags `ia2ray.study_id`,
`ia2ray.role=study`) and one nested child run per trial (`mlflow.parentRunId`; key tags
`ia2ray.study_id`, `ia2ray.trial_key`): the Tune trial id for search trials, the run name for
confirmation runs. Children carry the resolved config as flat params, the stage losses per step, the
final split metrics, tags (study, trial, config hash, code version, model revision, task, N, seed) and
artifacts (config, summary, per-row answers, LoRA adapter, reliability diagram). The parent carries the study
settings, the study file, the Pareto front, the confirmation report and the confirmed methods'
test metrics.
"""

from __future__ import annotations

import json
import logging
import subprocess
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import ia2ray
from ia2ray.config.load import dump_yaml
from ia2ray.config.schema import RunConfig, StudyFile
from ia2ray.tracking import RunLog, TrackingError, find_runs, open_experiment
from ia2ray.tracking.runlog import PENDING_FILE, is_local_uri
from ia2ray.tracking.shape import flat_params, slug, sim_metrics, split_metrics, step_metrics, tag

log = logging.getLogger(__name__)

PARENT_ARTIFACTS = ("study.yaml", "report.md", "report.csv", "trials.csv", "pareto.csv", "pareto.png",
                    "reliability.png", "losses.png", "similarity.csv", "similarity.png", "overlap.csv", "overlap.png")


def code_version() -> str:
    """`ia2ray <version>`, plus the git commit (and `-dirty`) when running from a checkout."""
    root = Path(ia2ray.__file__).resolve().parents[1]
    version = f"ia2ray {ia2ray.__version__}"
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return version
    if sha.returncode != 0:
        return version
    return f"{version} ({sha.stdout.strip()}{'-dirty' if dirty.stdout.strip() else ''})"


def common_tags(study: StudyFile, base: RunConfig, study_id: str, task: str, fingerprint: str) -> dict[str, str]:
    """Tags of the study's runs; `fingerprint`: the model's (`ia2ray.core.teacher.model_fingerprint`)."""
    from ia2ray.core.model import model_dir

    revision = base.model.revision or "main"
    if Path(model_dir(base.model)).is_dir():  # local weights: by content
        revision = "sha256:" + fingerprint[:16]
    return {tag("study"): study.name, tag("study_id"): study_id, tag("code_version"): code_version(),
            tag("model"): base.model.path, tag("model_revision"): revision, tag("task"): task,
            tag("n"): str(base.data.n)}


def start_study_run(uri: str, study: StudyFile, base: RunConfig, study_dir: Path, study_id: str, task: str,
                    search_lines: list[str], fingerprint: str) -> tuple[RunLog, dict]:
    """Open the experiment and the study's parent run (found again on --resume). Raises TrackingError
    when MLflow cannot be reached: nothing has been computed yet. Returns the parent and what trials
    need to open their own runs (`TrialContext.tracking`)."""
    artifacts = None
    if is_local_uri(uri):  # with SQLite the artifacts go beside the database, not into the working directory
        artifacts = (study_dir.parent / "mlartifacts" / study.name).as_uri()
    hint = "start it, pass another --tracking-uri, or --tracking-uri none to run without tracking"
    try:
        experiment_id = open_experiment(uri, study.name, artifacts)
    except TrackingError as exc:
        raise TrackingError(f"{exc}\nMLflow cannot be reached: {hint}") from None
    tags = common_tags(study, base, study_id, task, fingerprint)
    parent = RunLog(uri, experiment_id, {tag("study_id"): study_id, tag("role"): "study"},
                    {**tags, tag("role"): "study"}, run_name=study.name)
    settings = study.study.model_dump(mode="json", exclude={"tracking_uri"})  # may change on --resume
    parent.log_params({**flat_params(settings, "study."),
                       **{f"search.{line.split(':', 1)[0]}": line.split(":", 1)[1].strip() for line in search_lines}})
    parent.log_artifact(study_dir / "study.yaml")
    if not parent.flush(force=True):
        raise TrackingError(f"MLflow at {uri} cannot be reached: {hint}")
    return parent, {"uri": uri, "experiment_id": experiment_id, "parent_run_id": parent.run_id, "tags": tags}


def trial_run(tracking: Optional[dict], key: str, cfg: RunConfig, phase: str, extra: dict) -> Optional[RunLog]:
    """The child run of one trial (created, or found by its key when the trial runs again)."""
    if not tracking:
        return None
    from ia2ray.core.fingerprint import content_hash

    resolved = cfg.model_dump(mode="json")
    config_hash = content_hash({k: v for k, v in resolved.items() if k != "name"})
    tags = {**tracking["tags"], "mlflow.parentRunId": tracking["parent_run_id"], tag("phase"): phase,
            tag("trial_key"): key, tag("config_hash"): config_hash, tag("seed"): str(cfg.data.seed),
            tag("pipeline"): cfg.pipeline, **{tag(k): str(v) for k, v in extra.items()}}
    run = RunLog(tracking["uri"], tracking["experiment_id"],
                 {tag("study_id"): tracking["tags"][tag("study_id")], tag("trial_key"): key}, tags, run_name=cfg.name)
    run.log_params(flat_params(resolved))
    return run


def running(run: Optional[RunLog], out_dir: Path):
    """End the trial's run FINISHED / FAILED / KILLED with it (no-op without tracking)."""
    return run.running(out_dir / PENDING_FILE) if run else nullcontext()


def log_history(run: Optional[RunLog], prefix: str = ""):
    """`on_log` for run_pipeline: each stage's history entry as `<prefix><stage>/loss`, `.../dev_loss`."""
    if run is None:
        return None
    return lambda stage, entry: run.log_metrics(step_metrics(prefix + stage, entry))


def log_result(run: Optional[RunLog], out_dir: Path, cfg: RunConfig, summary: dict, splits: tuple[str, ...],
               metrics: Optional[dict] = None, prefix: str = "") -> None:
    """A finished run's history, split metrics, timings and artifacts (config, summary, answers, adapter, reliability
    diagram of the last split); metric steps already logged are skipped. `prefix`: one subset of a search trial
    over several (`s<seed>/`): its metric keys and artifact folder start with it."""
    if run is None:
        return
    from ia2ray.fileio import write_text_atomic
    from ia2ray.study.plots import plot_reliability

    run.sync()  # Ray Train's rank 0 may have logged part of the history already
    items = [m for h in summary.get("history", []) for m in step_metrics(prefix + h["stage"], h)]
    finals = {**split_metrics(summary, splits), **(metrics or {}),
              **{f"time/{k}": v for k, v in (summary.get("timings") or {}).items()}}
    run.log_metrics(items + [(prefix + k, v, 0) for k, v in finals.items()]
                    + [(prefix + k, v, step) for k, v, step in sim_metrics(summary)])
    write_text_atomic(out_dir / "config.yaml", dump_yaml(cfg))
    plot_reliability({cfg.name: [summary]}, out_dir / "reliability.png", split=splits[-1])  # test, else val
    folder = prefix.rstrip("/") or None
    for name in ("config.yaml", "summary.json", "answers.json", "reliability.png"):
        if (out_dir / name).is_file():
            run.log_artifact(out_dir / name, folder)
    if (out_dir / "adapter").is_dir():
        run.log_artifact(out_dir / "adapter", prefix + "adapter")


def finish_study_run(parent: RunLog, study_dir: Path, table: list[dict], n_trials: int) -> None:
    """The parent's report artifacts, the confirmed methods' test metrics (mean and std over seeds) and
    their paired comparisons (`<method>/vs_<ref>/test/<metric>_{diff, ci_low, ci_high, p}`, the verdict
    as tag `ia2ray.verdict.<method>.vs_<ref>.<metric>`)."""
    import math

    metrics, verdicts = [("search/completed_trials", float(n_trials), 0)], {}
    for row in table:
        method = slug(row["method"])
        for key in ("acc", "ece"):
            if f"test_{key}_mean" in row:
                metrics += [(f"{method}/test/{key}", row[f"test_{key}_mean"], 0),
                            (f"{method}/test/{key}_std", row[f"test_{key}_std"], 0)]
        if "sim_mean" in row:
            metrics += [(f"{method}/sim/mean", row["sim_mean"], 0), (f"{method}/sim/mean_std", row["sim_std"], 0)]
        for col, value in row.items():
            if col.startswith("vs_") and col.endswith("_verdict"):  # vs_<ref>_test_<metric>_verdict
                ref, metric = col[len("vs_"):-len("_verdict")].split("_test_")
                verdicts[tag(f"verdict.{method}.vs_{ref}.{metric}")] = value
                for part in ("diff", "ci_low", "ci_high", "p"):
                    number = row[col[: -len("verdict")] + part]
                    if math.isfinite(number):
                        metrics.append((f"{method}/vs_{ref}/test/{metric}_{part}", number, 0))
    parent.log_metrics(metrics)
    if verdicts:
        parent.set_tags(verdicts)
    for name in PARENT_ARTIFACTS:
        if (study_dir / name).is_file():
            parent.log_artifact(study_dir / name)


def refresh_study_run(uri: str, study_dir: Path, table: list[dict], n_trials: int) -> tuple[Optional[str], list[str]]:
    """Log a rebuilt report (`python -m ia2ray.report`) onto the study's MLflow run, found by the study id
    in its study.json: the metrics, verdict tags and report artifacts of `finish_study_run`; the run
    keeps its status (FINISHED, or KILLED / FAILED for an interrupted study). Returns (the run's id or
    None, what could not be logged)."""
    saved = json.loads((Path(study_dir) / "study.json").read_text())
    try:
        found = find_runs(uri, saved["name"], {"study_id": saved["study_id"], "role": "study"})
    except Exception as exc:  # noqa: BLE001 - unreachable: the report stands without it
        return None, [f"MLflow at {uri} cannot be reached ({type(exc).__name__}: {str(exc)[:300]})"]
    if not found:
        return None, [f"no study run with {tag('study_id')} = {saved['study_id']} in experiment {saved['name']} at {uri}"]
    run = found[0]
    parent = RunLog(uri, run.info.experiment_id, {tag("study_id"): saved["study_id"], tag("role"): "study"},
                    run_name=saved["name"])
    finish_study_run(parent, Path(study_dir), table, n_trials)
    parent.end(run.info.status)  # attaching set it RUNNING
    return run.info.run_id, parent.close()


def study_runs(uri: str, study_dir: Path, where: str = "", order_by: Optional[list[str]] = None) -> list:
    """The MLflow runs (parent and children) of the study in `study_dir`, found by the study id kept in
    its `study.json`; `where` adds a filter clause (e.g. "tags.`ia2ray.phase` = 'search'")."""
    saved = json.loads((Path(study_dir) / "study.json").read_text())
    return find_runs(uri, saved["name"], {"study_id": saved["study_id"]}, where, order_by)
