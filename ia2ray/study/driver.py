"""A whole study, top to bottom: validate -> teacher capture -> search -> baselines' learning rates ->
confirmation -> report.

Everything that can be wrong with the input (config keys, the search space, layer indices beyond the
model's depth, label tokens, data rows, the storage path, an existing study without --resume) is
reported by `prepare_study` before Ray starts and before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from ia2ray.config.load import ConfigError, dump_yaml, load_study_file
from ia2ray.config.schema import RunConfig, StudyFile
from ia2ray.fileio import write_json_atomic, write_text_atomic
from ia2ray.mirror import check_remote, is_remote, join, local_copy, pull, push, read_text
from ia2ray.mirror import exists as exists_remote
from ia2ray.study.cluster import check_cluster, cluster_shape
from ia2ray.study.console import StudyView
from ia2ray.study.plan import TrialPlan, plan_trials
from ia2ray.study.space import candidates, check_space, describe, describe_conditions
from ia2ray.study.trial import TrialContext, objectives
from ia2ray.tracking import close_orphans, replay_pending, resolve_uri
from ia2ray.tracking.runlog import PENDING_FILE

log = logging.getLogger(__name__)


@dataclass
class PreparedStudy:
    study: StudyFile
    base: RunConfig  # the trials' starting config: searched keys at defaults, study paths filled in
    study_dir: Path
    has_ece: bool
    source: str
    tracking_uri: Optional[str] = None  # MLflow; None: tracking off
    remote: Optional[str] = None  # the study folder's bucket URI; study_dir is then this node's copy
    fingerprint: Optional[str] = None  # the model's, computed once when the study runs

    @property
    def location(self) -> str:
        """Where the study lives: its bucket URI or its folder."""
        return self.remote or str(self.study_dir)


# parts of a bucket study that Ray Tune and Ray Train write to the bucket themselves, and the teacher
# cache, whose entries are copied one by one: never copied as part of the study folder
REMOTE_ONLY = ("search", "baselines", "confirm", "train", "activations")


def default_study_path() -> Path:
    """search_spaces/testbed.yaml beside the package (a source checkout or `--working-dir .`)."""
    here = Path(__file__).resolve().parents[2] / "search_spaces" / "testbed.yaml"
    return here if here.is_file() else Path("search_spaces/testbed.yaml")


def check_storage(storage: str) -> list[str]:
    if "://" in storage:
        problem = check_remote(storage)
        return [f"--storage / study.storage = {storage!r}: {problem}"] if problem else []
    if not Path(storage).expanduser().is_absolute() and _job_working_dir():
        return [f"--storage / study.storage = {storage!r}: a relative path inside a Ray job with a working_dir "
                "would put the study in the job's temporary copy of that folder; give an absolute path"]
    p = Path(storage).expanduser().resolve()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return [f"--storage / study.storage = {storage!r}: {probe} is a file, not a folder"]
    if not os.access(probe, os.W_OK | os.X_OK):
        return [f"--storage / study.storage = {storage!r}: {probe} is not writable"]
    try:  # permissions can say yes where the file system says no (/proc, a read-only mount, root's view)
        os.rmdir(tempfile.mkdtemp(prefix=".ia2ray-probe-", dir=probe))
    except OSError as exc:
        return [f"--storage / study.storage = {storage!r}: cannot create a folder in {probe} ({exc.strerror or exc})"]
    return []


def _job_working_dir() -> Optional[str]:
    """The working_dir of the Ray job this process is the entrypoint of (`ray job submit`), if any."""
    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    return (json.loads(job).get("runtime_env") or {}).get("working_dir") if job else None


def _diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict) and k != "params":
            keys += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


def _absolute(path: Optional[str]) -> Optional[str]:
    return str(Path(path).expanduser().resolve()) if path and Path(path).expanduser().exists() else path


def check_layers(study: StudyFile, depth: int, source: str) -> None:
    """Every align.layers / lora.layers choice must select layers that exist in a `depth`-layer model."""
    from ia2ray.core.model import resolve_layers

    errors = []
    for key in ("align.layers", "lora.layers"):
        param = study.search.params.get(key)
        for label, value in candidates(param) if param is not None and param.kind == "choice" else []:
            if value is None:
                continue
            try:
                resolve_layers(value, depth, key=key)
            except ValueError as exc:
                errors.append(f"search.params.{key}.{label}: {exc}")
    if errors:
        raise ConfigError(errors, f"{source}: {depth} layers")


def check_model(study: StudyFile, base: RunConfig, source: str) -> bool:
    """Model- and data-dependent checks: every align.layers / lora.layers candidate within the model's
    depth, label words single tokens, data rows valid. Returns whether val/ece exists (label task)."""
    from transformers import AutoConfig

    from ia2ray.core.model import model_dir
    from ia2ray.core.preflight import preflight
    from ia2ray.core.rundata import prepare_data
    from ia2ray.data.loaders import DataError

    try:
        data = prepare_data(base)
    except (DataError, ValueError, KeyError) as exc:
        raise ConfigError([str(exc)], source) from None
    preflight(base, data)
    kw = dict(revision=base.model.revision, trust_remote_code=base.model.trust_remote_code)
    depth = AutoConfig.from_pretrained(model_dir(base.model), **kw).num_hidden_layers
    check_layers(study, depth, f"{source} (checked against {model_dir(base.model)})")
    return data.spec.answer_type == "label"


def prepare_study(config: Optional[str], overrides: list[str], storage: Optional[str], resume: bool,
                  tracking_uri: Optional[str] = None) -> PreparedStudy:
    """Load and check everything; raises ConfigError. Writes nothing."""
    path = Path(config) if config else default_study_path()
    source = str(path)
    study, where = load_study_file(path, overrides)
    base = check_space(study, where, source)
    storage = storage or study.study.storage
    errors = check_storage(storage)
    if errors:
        raise ConfigError(errors, source)
    remote = join(storage, study.name) if is_remote(storage) else None
    study_dir = local_copy(remote) if remote else Path(storage).expanduser().resolve() / study.name
    location = remote or str(study_dir)
    try:  # a bucket study's default SQLite store stays on this machine, beside its copies of studies
        tracking_uri = resolve_uri(tracking_uri or study.study.tracking_uri,
                                   local_copy(storage) if remote else study_dir.parent)
    except ValueError as exc:
        raise ConfigError([f"--tracking-uri / study.tracking_uri: {exc}"], source) from None
    saved = saved_study(remote, study_dir)
    if saved is not None and not resume:
        raise ConfigError([f"name: a study named {study.name!r} already exists in {location}; pass --resume to "
                           "continue it, or choose another `name` or --storage"], source)
    if resume and saved is None:
        raise ConfigError([f"--resume: no study named {study.name!r} in {location}"], source)
    if resume:
        # Tune restores an experiment with its original settings (trial count, concurrency), so a
        # resumed study must be the same study
        changed = [k for k in _diff(json.loads(saved)["study"], study.model_dump(mode="json"))
                   if k != "study.tracking_uri"]  # where the runs are logged may change
        if changed:
            raise ConfigError([f"--resume: {k} differs from the study in {location}/study.json" for k in changed],
                              source)
    tree = base.model_dump(mode="json")
    tree["model"]["path"] = _absolute(tree["model"]["path"])  # trials run in other working directories
    tree["task"]["path"], tree["task"]["eval_path"] = _absolute(tree["task"]["path"]), _absolute(tree["task"]["eval_path"])
    tree["task"]["ood"] = {name: target.model_copy(update={"path": _absolute(target.path)}).model_dump(mode="json")
                           for name, target in base.task.ood.items()}
    tree["capture"]["cache_dir"] = join(location, "activations")  # in the bucket for a bucket study
    tree["train"]["storage"] = join(location, "train")
    base = RunConfig.model_validate(tree)
    has_ece = check_model(study, base, source)
    return PreparedStudy(study, base, study_dir, has_ece, source, tracking_uri, remote)


def saved_study(remote: Optional[str], study_dir: Path) -> Optional[str]:
    """The text of the study's study.json (in the bucket for a bucket study), None when there is none."""
    if remote:
        return read_text(join(remote, "study.json")) if exists_remote(join(remote, "study.json")) else None
    saved = study_dir / "study.json"
    return saved.read_text() if saved.is_file() else None


def local_resources() -> dict[str, float]:
    """This machine's CPUs, GPUs (if torch sees any) and the memory a local Ray would offer (70% of
    what is available: Ray keeps about 30% for its object store), for --dry-run without a cluster."""
    import psutil

    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - a dry run only estimates
        pass
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus),
            "memory": float(int(psutil.virtual_memory().available * 0.7))}


def dry_run_lines(p: PreparedStudy, plan: TrialPlan, cluster_note: str) -> list[str]:
    from ia2ray.study.teacher import teacher_variants

    s = p.study.study
    lines = [f"study {p.study.name}: {p.source}", f"folder: {p.location}"]
    if p.remote:
        lines.append(f"local copy: {p.study_dir}")
    lines.append("search space:")
    lines += [f"  {line}" for line in [*describe(p.study), *describe_conditions(p.study)]]
    metrics = [f"{m} ({d})" for m, d in objectives(p.study, p.has_ece)]
    lines += [f"objective: {', '.join(metrics)} (ECE {p.base.eval.ece_scheme}, {p.base.eval.ece_bins} bins)",
              f"trials: {s.num_trials} (sampler {s.sampler}{SAMPLER_NOTES.get(s.sampler, '')}, seed {s.seed}), each "
              f"on subsets {' '.join(map(str, s.search_seeds))} (data.seed; the objective takes the means)",
              f"resources ({cluster_note}):", *[f"  {line}" for line in plan.describe()],
              f"teacher captures before the trials: {len(teacher_variants(p.base, p.study))}"
              + (" (each with its validation rows' teacher for activation similarity)" if p.base.eval.similarity else ""),
              f"MLflow: {p.tracking_uri}, experiment {p.study.name}" if p.tracking_uri else "MLflow: off",
              *baseline_lines(p.study),
              f"confirmation: top {s.confirm.top_k} configs + baselines {', '.join(s.confirm.baselines)} "
              f"x seeds {s.confirm.seeds}, on the test split"]
    return lines


SAMPLER_NOTES = {"tpe": ": multivariate over the conditional space's groups, constant liar for concurrent trials"}


def baseline_lines(study: StudyFile) -> list[str]:
    from ia2ray.study.confirm import tuned_baselines

    methods = tuned_baselines(study)
    if not methods:
        return ["baselines: confirmed at the defaults (study.confirm.baseline_lrs is empty)"]
    grid = ", ".join(f"{lr:g}" for lr in study.study.confirm.baseline_lrs)
    return [f"baselines' learning rate: {', '.join(methods)} each over {{{grid}}} on validation "
            f"({len(methods) * len(study.study.confirm.baseline_lrs)} runs of {len(study.study.search_seeds)} subsets)"]


def study_id(study_dir: Path) -> str:
    """The study's id: kept in study.json, so a resumed study keeps it (and finds its MLflow runs)."""
    saved = study_dir / "study.json"
    known = json.loads(saved.read_text()).get("study_id") if saved.is_file() else None
    return known or uuid.uuid4().hex[:16]


def run_study(p: PreparedStudy, resume: bool, view: Optional[StudyView] = None) -> dict:
    """Run the study (Ray must be reachable); returns {"table", "report", "errors", "timings", "rows",
    "tracking"}. Raises ConfigError / TrackingError before any compute when the cluster or MLflow
    does not fit. `view`: the live view to keep up to date (none: nothing is shown)."""
    from ia2ray.core.teacher import model_fingerprint
    from ia2ray.study.records import start_study_run
    from ia2ray.train.launch import ensure_ray, pin_train_helpers

    view = view or StudyView()
    ensure_ray()
    check_cluster(p.remote or str(p.study_dir.parent), p.study.study.shared_storage, p.tracking_uri,
                  cluster_shape())
    pin_train_helpers()
    if p.remote:
        if not resume:  # a copy left from a study deleted in the bucket
            shutil.rmtree(p.study_dir, ignore_errors=True)
        fetched = pull(p.remote, skip=(*REMOTE_ONLY, "runs")) + download_runs(p)
        log.info("study folder %s, local copy %s (%d files fetched)", p.remote, p.study_dir, fetched)
    p.fingerprint = model_fingerprint(p.base)  # once per study: trials and captures get it passed down
    sid = study_id(p.study_dir)
    p.study_dir.mkdir(parents=True, exist_ok=True)
    view.study(p.study.name, p.location, p.study_dir)
    write_text_atomic(p.study_dir / "study.yaml", dump_yaml(p.study))
    parent, tracking = None, None
    if p.tracking_uri:
        left, _ = replay_pending([f for f in [p.study_dir / PENDING_FILE] if f.is_file()])  # from a killed session
        for line in left:
            log.warning("MLflow: not logged: %s", line)
        parent, tracking = start_study_run(p.tracking_uri, p.study, p.base, p.study_dir, sid,
                                           p.base.task.name, describe(p.study), p.fingerprint)
        log.info("MLflow: %s, experiment %s, study run %s", p.tracking_uri, p.study.name, parent.run_id)
    write_json_atomic(p.study_dir / "study.json", {"name": p.study.name, "study": p.study.model_dump(mode="json"),
                                                    "source": p.source, "started": time.time(), "study_id": sid,
                                                    "has_ece": p.has_ece, "ece_scheme": p.base.eval.ece_scheme,
                                                    "tracking_uri": p.tracking_uri})
    upload(p)
    try:
        if parent is None:
            return _run(p, resume, None, None, view)
        with parent.running(p.study_dir / PENDING_FILE):
            try:
                outcome = _run(p, resume, parent, tracking, view)
            finally:  # also when the study fails or is interrupted: no trial run is left RUNNING
                download_runs(p)
                problems = close_trial_runs(p.study_dir, tracking)
            outcome["tracking"] = problems
        outcome["tracking"] += [f"{p.study.name} (study run): {line}" for line in parent.unlogged]
        return outcome
    finally:
        upload(p)


def upload(p: PreparedStudy) -> None:
    """A bucket study: copy what the study driver wrote (study.json, the Optuna database, reports, ...)
    to the bucket."""
    if p.remote:
        push(p.remote, skip=REMOTE_ONLY)


def download_runs(p: PreparedStudy, adapters_of: Iterable[dict] = ()) -> int:
    """A bucket study: fetch what the study driver reads of the trials' `runs/<run>/` folders, which
    trials on other nodes uploaded (their summaries and MLflow pending files; the adapters only of the
    confirmation rows `adapters_of`, for the report's LoRA overlap)."""
    if not p.remote:
        return 0
    from ia2ray.study.trial import run_name

    count = pull(p.remote, "runs", names=("summary.json", PENDING_FILE))
    for row in adapters_of:
        if not row["icl"]:
            count += pull(p.remote, f"runs/{run_name(row['label'], row['seed'])}/adapter")
    return count


def close_trial_runs(study_dir: Path, tracking: dict) -> list[str]:
    """After the trials: replay what trials left buffered (`runs/*/mlflow-pending.json`), then mark
    KILLED any trial run still RUNNING whose ending is not waiting in such a file (its trial was
    killed and did not run again). Returns what could not be logged."""
    problems, waiting = replay_pending(sorted(study_dir.glob(f"runs/*/{PENDING_FILE}")))
    try:
        stuck = close_orphans(tracking["uri"], tracking["experiment_id"], tracking["parent_run_id"],
                              "the study was interrupted and this trial did not run again", keep=waiting)
        if stuck:
            log.warning("MLflow: %d run(s) of interrupted trials marked KILLED", stuck)
    except Exception as exc:  # noqa: BLE001 - MLflow down at the end: reported, the study stands
        problems.append(f"could not check for trial runs left RUNNING: {exc}"[:500])
    return problems


def _run(p: PreparedStudy, resume: bool, parent, tracking: Optional[dict], view: StudyView) -> dict:
    import ray

    from ia2ray.core.model import weight_bytes
    from ia2ray.study.confirm import baseline_grid, confirmation_rows, run_baselines, run_confirm
    from ia2ray.study.report import CONFIRM_FILE, build_report
    from ia2ray.study.search import close_stale_trials, completed_trials, pareto_front, run_search
    from ia2ray.study.teacher import capture_all, teacher_variants
    from ia2ray.study.records import finish_study_run

    timings: dict[str, float] = {}
    start = time.perf_counter()
    plan = plan_trials(p.study, p.base, ray.cluster_resources(), weight_bytes(p.base.model))
    for line in plan.describe():
        log.info("%s", line)
    ctx = TrialContext(str(p.study_dir), p.base.model_dump(mode="json"), p.study.model_dump(mode="json"), tracking,
                       p.remote, p.fingerprint)
    variants = teacher_variants(p.base, p.study)
    view.phase("teacher capture", len(variants))
    t = time.perf_counter()
    capture_all(variants, p.study_dir, plan.use_gpu, p.fingerprint)
    timings["teacher"] = time.perf_counter() - t
    view.done = len(variants)

    view.phase("search", p.study.study.num_trials)
    t = time.perf_counter()
    grid = run_search(p.study, ctx, plan, p.has_ece, resume, [view.tune_callback()])
    close_stale_trials(p.study, p.study_dir)
    timings["search"] = time.perf_counter() - t
    download_runs(p)
    errors = [f"trial {r.metrics.get('trial_id', '?')}: {r.error}" for r in grid if r.error]
    metrics = [m for m, _ in objectives(p.study, p.has_ece)]
    trials = completed_trials(p.study, p.study_dir)
    if not trials:
        raise RuntimeError("no search trial completed:\n" + "\n".join(errors))
    front = pareto_front(p.study, p.study_dir, p.has_ece)

    if grid_size := len(baseline_grid(p.study)):
        view.phase("baselines' learning rates", grid_size)
    t = time.perf_counter()
    chosen, failed = run_baselines(p.study, ctx, plan, resume, p.has_ece, [view.tune_callback()])
    download_runs(p)
    errors += failed
    timings["baselines"] = time.perf_counter() - t

    t = time.perf_counter()
    rows = confirmation_rows(p.study, front, chosen, len(trials))
    write_json_atomic(p.study_dir / CONFIRM_FILE, {"rows": rows})
    view.phase("confirmation", len(rows))
    confirm = run_confirm(rows, ctx, plan, resume, [view.tune_callback()]) if rows else []
    download_runs(p, adapters_of=rows)
    timings["confirm"] = time.perf_counter() - t
    errors += [f"confirmation {r.config['row']['label']} seed {r.config['row']['seed']}: {r.error}"
               for r in confirm if r.error]
    timings["total"] = time.perf_counter() - start
    lines = [f"- config: {p.source}; {len(trials)} trials; objective {', '.join(metrics)}",
             f"- trial resources: {'; '.join(plan.describe())}",
             "- wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())]
    if tracking:
        lines.append(f"- MLflow: {tracking['uri']}, experiment {p.study.name}, study run {tracking['parent_run_id']}")
    view.phase("report")
    write_json_atomic(p.study_dir / "timings.json", {**timings, "trials": len(trials), "errors": errors,
                                                     "report_lines": lines})
    table, rows_out, _ = build_report(p.study_dir, p.study, p.has_ece, lines, p.base.eval.ece_scheme, p.base.pipeline)
    if parent is not None:
        finish_study_run(parent, p.study_dir, rows_out, len(trials))
    return {"table": table, "report": f"{p.location}/report.md", "errors": errors, "timings": timings,
            "rows": rows_out, "tracking": []}
