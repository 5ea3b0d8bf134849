"""The trial drivers: Ray Tune function trainables that run one configuration each.

A search trial samples its parameters, trains through `ia2ray.core.pipeline.run_pipeline` (stages on
Ray Train workers when `train.num_workers >= 1`, else in the trial's own process), evaluates on the
validation split only and reports the objective once, at the end: Optuna sees only a trial's last
report. A confirmation trial runs one (method, seed) row on the validation and test splits.

Ray Train runs are named after the trial (`trial-<tune trial id>`, `confirm-<method>-s<seed>`), so a
trial restarted by `--resume` resumes its Train run from the last complete checkpoint. Each run's
summary (with the stage histories) and adapter go to `<study>/runs/<run name>/`, and, unless tracking is
off, into the trial's MLflow run (`ia2ray.study.records`), which a rerun of the trial continues.
"""

from __future__ import annotations

import json
import logging
import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator, Optional

from ia2ray.config.schema import RunConfig, StudyFile
from ia2ray.core.stats import mean_std
from ia2ray.fileio import require_visible, write_json_atomic
from ia2ray.mirror import local_copy, pull, push
from ia2ray.study.space import apply_params, decode_point
from ia2ray.study.records import log_history, log_result, running, trial_run
from ia2ray.tracking import RunLog

log = logging.getLogger(__name__)


@dataclass
class TrialContext:
    """What every trial of a study shares (shipped to trials with `tune.with_parameters`)."""

    study_dir: str
    base: dict  # the run config every trial starts from (JSON), study paths filled in
    study: dict  # the study file (JSON), for decoding sampled points and the objective
    tracking: Optional[dict] = None  # MLflow target of the trials' runs (`records.start_study_run`); None: off
    remote: Optional[str] = None  # the study folder's bucket URI (trials then work in their node's copy)
    fingerprint: Optional[str] = None  # the model's, computed once by the study (`core.teacher.model_fingerprint`)

    def folder(self) -> Path:
        """The study folder as this node sees it: its local copy of a bucket study, else the folder."""
        return local_copy(self.remote) if self.remote else Path(self.study_dir)


def objectives(study: StudyFile, has_ece: bool) -> list[tuple[str, str]]:
    """(metric, mode) pairs Optuna optimises."""
    if study.study.objective == "scalar":
        return [("objective", "max")]
    return [("val/acc", "max"), ("val/ece", "min")] if has_ece else [("val/acc", "max")]


def objective_metrics(summaries: list[dict], study: StudyFile) -> dict:
    """A search trial's report from its runs' summaries, one per `study.search_seeds` subset: the mean
    of each validation metric (`val/acc`, `val/ece`, `val/nll`, `val/brier`), its sample std
    (`val/acc_std`, ...; 0 for one subset), the scalar objective mean(acc) - lambda * mean(ECE), and the
    mean activation similarity (`sim/mean`, `sim/mean_std`) when the runs measured it."""
    out: dict = {}
    for key in ("acc", "ece", "nll", "brier"):
        values = [s["val"][key] for s in summaries if s["val"].get(key) is not None]
        if len(values) == len(summaries):
            out[f"val/{key}"], out[f"val/{key}_std"] = mean_std(values)
    out["objective"] = out["val/acc"] - study.study.ece_weight * out.get("val/ece", 0.0)
    sims = [s["sim"]["mean"] for s in summaries if s.get("sim")]
    if sims and len(sims) == len(summaries):  # reported and logged, never optimised
        out["sim/mean"], out["sim/mean_std"] = mean_std(sims)
    return out


def run_dir(ctx: TrialContext, name: str) -> Path:
    """`<study>/runs/<run name>/`: the run's summary, adapter, config and plots."""
    return ctx.folder() / "runs" / name


@contextmanager
def run_folder(ctx: TrialContext, name: str) -> Iterator[Path]:
    """The run's folder (`run_dir`). In a bucket study it is fetched first (a resumed trial may find
    its finished result there) and uploaded at the end, also when the trial fails (its MLflow pending
    file goes with it). Otherwise the study folder must be visible on this node."""
    out = run_dir(ctx, name)
    if not ctx.remote:
        require_visible(Path(ctx.study_dir) / "study.json", "the study folder's")
        yield out
        return
    pull(ctx.remote, f"runs/{name}")
    try:
        yield out
    finally:
        push(ctx.remote, f"runs/{name}")


def run_and_save(cfg: RunConfig, out: Path, splits: tuple[str, ...], extra: dict, icl: bool = False,
                 run: Optional[RunLog] = None, fingerprint: Optional[str] = None, prefix: str = "") -> dict:
    """Train and evaluate `cfg` (teacher from the cache only), or with `icl` evaluate only the ICL
    baseline; write summary.json (with the stage histories), answers.json and adapter/ into `out`
    (`run_dir`). The stage losses go to the MLflow `run` as they happen. With `train.num_workers >= 1`
    the Ray Train workers train and evaluate, and this process loads no weights; with 0 the trial
    trains in its own process, which keeps the base model loaded for its actor's next trial. `prefix`:
    where the MLflow run holds several runs (a search trial's subsets), their metric keys' prefix."""
    from ia2ray.core.pipeline import run_in_process, run_pipeline
    from ia2ray.core.rundata import prepare_data
    from ia2ray.core.teacher import cache_location
    from ia2ray.mirror import bucket_sync

    start = time.perf_counter()
    resolved = cfg.model_dump(mode="json")
    done = out / "summary.json"
    if done.is_file():  # a resumed trial whose run had finished: same config, same result
        previous = json.loads(done.read_text())
        if previous.get("config") == resolved:
            log.info("run %s already finished; reusing %s", cfg.name, done)
            return previous
    on_log, runner = log_history(run, prefix), run_in_process
    warm = cfg.train.num_workers == 0  # the trial trains in this process, with the CPUs and memory it reserved:
    if warm:  # as many torch threads as CPUs (Ray set OMP_NUM_THREADS from the request), and the base model
        import torch  # stays loaded in this Tune actor for its next trial (`load_model(keep=True)`)

        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    else:  # the Train workers log the stage losses live (rank 0), except one subset of several (`prefix`):
        from ia2ray.train.ray_stages import run_with_ray  # `log_result` logs its history afterwards

        runner, on_log = partial(run_with_ray, tracking=run.target() if run and not prefix else None), None
    outcome = run_pipeline(cfg, data=prepare_data(cfg), progress=False, runner=runner, splits=splits,
                           cached_teacher_only=True, on_log=on_log, keep_model=warm, icl_only=icl,
                           sync=bucket_sync(cache_location(cfg)), fingerprint=fingerprint)
    summary = outcome.summary | {"history": outcome.history}
    if not icl:
        outcome.save_adapter(out / "adapter")
    write_json_atomic(out / "answers.json", outcome.answers)
    summary.update(extra, seconds=round(time.perf_counter() - start, 3), config=resolved, driver_node=_node_id(),
                   driver_rss_mb=round(_peak_rss_mb(), 1))
    write_json_atomic(out / "summary.json", summary)
    print(run_line(cfg.name, summary), flush=True)  # the study's log (logs/study.log): Ray streams it to the driver
    return summary


def run_line(name: str, summary: dict) -> str:
    """One line on a finished run: its splits' accuracy and ECE, and its seconds."""
    parts = [f"{split} acc {m['acc']:.4f}" + (f" ECE {m['ece']:.4f}" if m.get("ece") is not None else "")
             for split, m in summary.items() if isinstance(m, dict) and m.get("acc") is not None
             and split in ("val", "test")]
    return f"run {name} finished in {summary['seconds']:.1f} s: {', '.join(parts) or 'no metrics'}"


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _node_id() -> Optional[str]:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def score_params(ctx: TrialContext, study: StudyFile, params: dict, key: str, phase: str, extra: dict) -> dict:
    """Train and validate `params` on every `study.search_seeds` subset; returns the objective metrics
    (`objective_metrics`). With one subset the run is named `key`; with several, `<key>-s<seed>`
    each, and `runs/<key>/summary.json` holds the means. One MLflow run (key `key`) holds them all,
    each subset's metrics and artifacts under `s<seed>/`, the means without a prefix."""
    seeds = study.study.search_seeds
    base = RunConfig.model_validate(ctx.base)
    cfgs = [apply_params(base, params, name=key if len(seeds) == 1 else f"{key}-s{seed}",
                         **{"data.seed": seed, "eval.icl_baseline": False, "task.ood": {}})  # no OOD in selection
            for seed in seeds]
    run = trial_run(ctx.tracking, key, cfgs[0], phase, {**extra, "search_seeds": " ".join(map(str, seeds))})
    info = {**extra, "params": params, "phase": phase}
    with run_folder(ctx, key) as top, running(run, top):
        summaries = []
        for seed, cfg in zip(seeds, cfgs):
            prefix = "" if cfg.name == key else f"s{seed}/"
            with nullcontext(top) if cfg.name == key else run_folder(ctx, cfg.name) as out:
                summary = run_and_save(cfg, out, ("val",), info, run=run, fingerprint=ctx.fingerprint, prefix=prefix)
                log_result(run, out, cfg, summary, ("val",), None if prefix else objective_metrics([summary], study),
                           prefix=prefix)
            summaries.append(summary)
        metrics = objective_metrics(summaries, study)
        if len(cfgs) > 1:
            write_json_atomic(top / "summary.json", {**info, "seeds": list(seeds), "runs": [c.name for c in cfgs],
                                                     "val": {k[len("val/"):]: v for k, v in metrics.items()
                                                             if k.startswith("val/")}, "objective": metrics["objective"]})
            if run:
                run.log_metrics([(k, v, 0) for k, v in metrics.items()])
    return metrics


def search_trial(config: dict, ctx: TrialContext) -> None:
    """Tune function trainable of the search: the sampled point, scored on every search subset."""
    from ray import tune

    study = StudyFile.model_validate(ctx.study)
    trial_id = tune.get_context().get_trial_id()
    params = decode_point(study, config)
    tune.report(score_params(ctx, study, params, f"trial-{trial_id}", "search", {"trial_id": trial_id}))


def baseline_trial(config: dict, ctx: TrialContext) -> None:
    """Tune function trainable of the baselines' tuning: one (method, learning rate), scored like a
    search trial."""
    from ray import tune

    study = StudyFile.model_validate(ctx.study)
    row = config["row"]
    params = {"pipeline": row["method"], "lr.align": row["lr"], "lr.sft": row["lr"]}
    key = f"baseline-{re.sub(r'[^A-Za-z0-9]+', '-', row['method']).strip('-')}-lr{row['lr']:g}"
    metrics = score_params(ctx, study, params, key, "baseline", {"trial_id": tune.get_context().get_trial_id()})
    tune.report({**metrics, "method": row["method"], "lr": row["lr"]})


def run_name(label: str, seed: int) -> str:
    return f"confirm-{re.sub(r'[^A-Za-z0-9]+', '-', label).strip('-')}-s{seed}"


def confirm_trial(config: dict, ctx: TrialContext) -> None:
    """Tune function trainable of the confirmation: one row `{label, icl, params, seed}` on the
    validation and test splits."""
    from ray import tune

    row = config["row"]
    cfg = apply_params(RunConfig.model_validate(ctx.base), row["params"], name=run_name(row["label"], row["seed"]),
                       **{"data.seed": row["seed"], "eval.icl_baseline": row["icl"]})
    tags = {"label": row["label"], "trial_id": tune.get_context().get_trial_id(),
            **({"pipeline": "icl"} if row["icl"] else {})}
    from ia2ray.core.rundata import ood_split

    run = trial_run(ctx.tracking, cfg.name, cfg, "confirm", tags)
    evaluated = ("val", *(ood_split(name) for name in cfg.task.ood), "test")  # test last: its reliability plot
    with run_folder(ctx, cfg.name) as out, running(run, out):
        summary = run_and_save(cfg, out, ("val", "test"), {"label": row["label"], "params": row["params"],
                               "tuned": row.get("tuned", ""), "phase": "confirm"}, icl=row["icl"], run=run,
                               fingerprint=ctx.fingerprint)
        log_result(run, out, cfg, summary, evaluated)
    tune.report({f"{split}/{key}": summary[split][key] for split in evaluated for key in ("acc", "ece")
                 if summary[split].get(key) is not None})
