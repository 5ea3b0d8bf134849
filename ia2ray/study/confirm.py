"""The confirmation: the best configs found (up to `study.confirm.top_k`) and the baselines, each over
`study.confirm.seeds`, evaluated on the held-out test split. Runs as a second Tune experiment
(`<study>/confirm`, a grid over rows), so it uses the same resources and resumes the same way.
Selection happened before, on validation metrics only.
"""

from __future__ import annotations

import logging

from ia2ray.config.schema import StudyFile
from ia2ray.study.plan import TrialPlan
from ia2ray.study.search import fit_experiment
from ia2ray.study.trial import TrialContext, confirm_trial

log = logging.getLogger(__name__)

BASELINE_LABELS = {"icl": "ICL", "sft": "SFT only", "ia2": "IA2 only", "ia2->sft": "IA2 -> SFT"}


def confirmation_rows(study: StudyFile, front: list[dict]) -> list[dict]:
    """Rows {label, icl, params, seed}: baselines at the study's defaults, then `best-<i>` configs."""
    rows = []
    for seed in study.study.confirm.seeds:
        for b in study.study.confirm.baselines:
            params = {} if b == "icl" else {"pipeline": b}
            rows.append({"label": BASELINE_LABELS[b], "icl": b == "icl", "params": params, "seed": seed})
        for i, cfg in enumerate(front[: study.study.confirm.top_k], start=1):
            rows.append({"label": f"best-{i}", "icl": False, "params": cfg["params"], "seed": seed})
    return rows


def confirm_dirname(trial) -> str:
    return f"confirm-{trial.trial_id}"


def run_confirm(rows: list[dict], ctx: TrialContext, plan: TrialPlan, resume: bool):
    from ray import tune

    root = ctx.remote or ctx.study_dir  # Tune keeps its experiment in the bucket itself
    trainable = tune.with_resources(tune.with_parameters(confirm_trial, ctx=ctx), plan.pg_factory())
    return fit_experiment(f"{root}/confirm", trainable, resume, lambda: tune.Tuner(
        trainable, param_space={"row": tune.grid_search(rows)},
        tune_config=tune.TuneConfig(max_concurrent_trials=plan.concurrency, reuse_actors=True,
                                    trial_dirname_creator=confirm_dirname),
        run_config=tune.RunConfig(name="confirm", storage_path=root, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    ))
