"""The confirmation: the best configs found (up to `study.confirm.top_k`) and the baselines, each over
`study.confirm.seeds`, evaluated on the held-out test split. Runs as a Tune experiment (`<study>/confirm`,
a grid over rows), so it uses the same resources and resumes the same way.

Before it, each trained baseline has its learning rate tuned (`study.confirm.baseline_lrs`): a Tune grid
(`<study>/baselines`) of (method, rate) trials scored like search trials, on validation, over the search
subsets. So every confirmed row was tuned on validation before the test split was looked at: the found
configs by the search, the baselines over the grid.
"""

from __future__ import annotations

import logging

from typing import Optional, Sequence

from ia2ray.config.schema import StudyFile
from ia2ray.study.plan import TrialPlan
from ia2ray.study.search import fit_experiment
from ia2ray.study.trial import TrialContext, baseline_trial, confirm_trial, objectives

log = logging.getLogger(__name__)

BASELINE_LABELS = {"icl": "ICL", "sft": "SFT only", "ia2": "IA2 only", "ia2->sft": "IA2 -> SFT", "ia2+sft": "IA2 + SFT",
                   "sft-icl": "SFT on ICL", "kd": "KD", "sft->ia2": "SFT -> IA2"}


def tuned_baselines(study: StudyFile) -> list[str]:
    """The baselines whose learning rate is tuned before confirmation (the trained ones)."""
    return [b for b in study.study.confirm.baselines if b != "icl"] if study.study.confirm.baseline_lrs else []


def baseline_grid(study: StudyFile) -> list[dict]:
    return [{"method": b, "lr": lr} for b in tuned_baselines(study) for lr in study.study.confirm.baseline_lrs]


def pick_rates(study: StudyFile, results: list[dict], has_ece: bool) -> dict[str, dict]:
    """method -> {"lr", "metrics"}: per baseline, the rate whose mean validation metrics are best by the
    study's objective (`pareto`: highest val/acc, then lowest val/ece; `scalar`: highest objective);
    ties go to the rate listed first. `results`: {"method", "lr", "metrics"} of finished grid trials."""
    order = {lr: i for i, lr in enumerate(study.study.confirm.baseline_lrs)}
    pairs = objectives(study, has_ece)

    def rank(r: dict) -> tuple:
        return (*(-r["metrics"][m] if mode == "max" else r["metrics"][m] for m, mode in pairs), order[r["lr"]])

    chosen: dict[str, dict] = {}
    for r in sorted(results, key=rank):
        chosen.setdefault(r["method"], {"lr": r["lr"], "metrics": r["metrics"]})
    return chosen


def tuned_note(study: StudyFile, method: str, chosen: Optional[dict]) -> str:
    """What a baseline row was tuned over, for the report."""
    grid = ", ".join(f"{lr:g}" for lr in study.study.confirm.baseline_lrs)
    seeds = " ".join(map(str, study.study.search_seeds))
    if chosen is None:
        return "defaults (no rate of the grid finished)" if grid else "defaults"
    return f"lr in {{{grid}}} -> {chosen['lr']:g} (validation, subsets {seeds})"


def run_baselines(study: StudyFile, ctx: TrialContext, plan: TrialPlan, resume: bool, has_ece: bool,
                  callbacks: Sequence = ()):
    """Tune the baselines' learning rates; returns (method -> chosen, errors)."""
    grid = baseline_grid(study)
    if not grid:
        return {}, []
    results = run_grid("baselines", baseline_trial, baseline_dirname, grid, ctx, plan, resume, callbacks)
    metric_keys = [m for m, _ in objectives(study, has_ece)]
    done = [{"method": r.config["row"]["method"], "lr": r.config["row"]["lr"], "metrics": r.metrics}
            for r in results if not r.error and all(m in (r.metrics or {}) for m in metric_keys)]
    errors = [f"baseline {r.config['row']['method']} lr {r.config['row']['lr']:g}: {r.error}" for r in results if r.error]
    return pick_rates(study, done, has_ece), errors


def confirmation_rows(study: StudyFile, front: list[dict], chosen: Optional[dict[str, dict]] = None,
                      n_trials: int = 0) -> list[dict]:
    """Rows {label, icl, params, seed, tuned}: the baselines (trained ones at their tuned rate), then
    the `best-<i>` configs of the search."""
    chosen = chosen or {}
    rows = []
    searched = ", ".join(study.search.params)
    for seed in study.study.confirm.seeds:
        for b in study.study.confirm.baselines:
            params, tuned = {}, "no training"
            if b != "icl":
                params = {"pipeline": b}
                if b in chosen:
                    params |= {"lr.align": chosen[b]["lr"], "lr.sft": chosen[b]["lr"]}
                tuned = tuned_note(study, b, chosen.get(b)) if tuned_baselines(study) else "defaults"
            rows.append({"label": BASELINE_LABELS[b], "icl": b == "icl", "params": params, "seed": seed,
                         "tuned": tuned})
        for i, cfg in enumerate(front[: study.study.confirm.top_k], start=1):
            rows.append({"label": f"best-{i}", "icl": False, "params": cfg["params"], "seed": seed,
                         "tuned": f"{n_trials} {study.study.sampler} trials over {searched} (validation, subsets "
                                  f"{' '.join(map(str, study.study.search_seeds))})"})
    return rows


def baseline_dirname(trial) -> str:
    return f"baseline-{trial.trial_id}"


def confirm_dirname(trial) -> str:
    return f"confirm-{trial.trial_id}"


def run_confirm(rows: list[dict], ctx: TrialContext, plan: TrialPlan, resume: bool, callbacks: Sequence = ()):
    return run_grid("confirm", confirm_trial, confirm_dirname, rows, ctx, plan, resume, callbacks)


def run_grid(name: str, fn, dirname, rows: list[dict], ctx: TrialContext, plan: TrialPlan, resume: bool,
             callbacks: Sequence = ()):
    """Run (or resume) the Tune experiment `<study>/<name>`: the function trainable `fn` once per row
    (`config["row"]`), with the trials' resources and concurrency; returns Tune's ResultGrid.
    `callbacks`: Tune callbacks (the live view)."""
    from ray import tune

    root = ctx.remote or ctx.study_dir  # Tune keeps its experiment in the bucket itself
    trainable = tune.with_resources(tune.with_parameters(fn, ctx=ctx), plan.pg_factory())
    return fit_experiment(f"{root}/{name}", trainable, resume, callbacks, lambda: tune.Tuner(
        trainable, param_space={"row": tune.grid_search(rows)},
        tune_config=tune.TuneConfig(max_concurrent_trials=plan.concurrency, reuse_actors=True,
                                    trial_dirname_creator=dirname),
        run_config=tune.RunConfig(name=name, storage_path=root, verbose=1, callbacks=list(callbacks),
                                  failure_config=tune.FailureConfig(max_failures=0)),
    ))
