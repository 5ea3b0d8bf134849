"""The search: a Ray Tune experiment (`<study>/search`) driven by Optuna through `OptunaSearch`.

Optuna's study lives in `<study>/optuna.db` (SQLite) under the study's name, so the Pareto front can be
queried with plain Optuna and survives restarts (a bucket study keeps it in the study driver's local
copy and uploads it after every finished trial). `--resume` restores the Tune experiment: finished
trials are kept, unfinished ones run again under the same trial id (their Ray Train runs resume from
the last checkpoint), and the searcher keeps its history.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from ray.tune import Callback

from ia2ray.config.schema import StudyFile
from ia2ray.mirror import push
from ia2ray.study.plan import TrialPlan
from ia2ray.study.space import ConditionalSpace, decode_point
from ia2ray.study.trial import TrialContext, objectives, search_trial

log = logging.getLogger(__name__)


def optuna_url(study_dir: Path) -> str:
    return f"sqlite:///{study_dir / 'optuna.db'}"


def trial_dirname(trial) -> str:
    return f"trial-{trial.trial_id}"


def make_searcher(study: StudyFile, study_dir: Path, has_ece: bool):
    import optuna
    from optuna.storages import RDBStorage
    from ray.tune.search.optuna import OptunaSearch

    samplers = {"tpe": lambda: tpe_sampler(study.study.seed),
                "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=study.study.seed),
                "random": lambda: optuna.samplers.RandomSampler(seed=study.study.seed)}
    pairs = objectives(study, has_ece)
    metric, mode = [m for m, _ in pairs], [d for _, d in pairs]
    if len(pairs) == 1:
        metric, mode = metric[0], mode[0]
    return OptunaSearch(space=ConditionalSpace(study), metric=metric, mode=mode, sampler=samplers[study.study.sampler](),
                        storage=RDBStorage(optuna_url(study_dir)), study_name=study.name)


def tpe_sampler(seed: int):
    """Multivariate TPE over groups of parameters sampled together (the conditional space's branches),
    with a constant liar so that trials running at once do not all sample the same point. Optuna 5.1
    turns multivariate TPE on by default for one objective only, not for the Pareto objective, so it is
    set here; its `group` option still warns as experimental, which is silenced."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)


def run_search(study: StudyFile, ctx: TrialContext, plan: TrialPlan, has_ece: bool, resume: bool,
               callbacks: Sequence[Callback] = ()):
    """Run (or resume) the search; returns Tune's ResultGrid. `callbacks`: more Tune callbacks (the live view)."""
    from ray import tune

    study_dir = Path(ctx.study_dir)
    root = ctx.remote or str(study_dir)  # Tune keeps its experiment in the bucket itself
    trainable = tune.with_resources(tune.with_parameters(search_trial, ctx=ctx), plan.pg_factory())
    callbacks = [*callbacks, *([UploadAfterTrial(ctx.remote, "optuna.db")] if ctx.remote else [])]
    return fit_experiment(f"{root}/search", trainable, resume, callbacks, lambda: tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(study, study_dir, has_ece), num_samples=study.study.num_trials,
            max_concurrent_trials=plan.concurrency, reuse_actors=True,
            time_budget_s=study.study.time_budget_s, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name="search", storage_path=root, verbose=1, callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    ))


class UploadAfterTrial(Callback):
    """Uploads a file of a bucket study's local copy after every finished trial (the Optuna database:
    Optuna writes it in this process, between trials)."""

    def __init__(self, remote: str, rel: str):
        self.remote, self.rel = remote, rel

    def on_trial_complete(self, iteration, trials, trial, **info):
        push(self.remote, self.rel)

    def on_trial_error(self, iteration, trials, trial, **info):
        push(self.remote, self.rel)


def fit_experiment(path: str, trainable, resume: bool, callbacks: Sequence[Callback], new_tuner):
    """Restore the Tune experiment at `path` with --resume when it exists (finished trials kept,
    unfinished ones run again, errored ones left as they are), else start `new_tuner()`; run it.
    A restored experiment keeps its own callbacks but `callbacks`' (the live view's) are handed over."""
    from ray import tune

    if resume and tune.Tuner.can_restore(path):
        log.info("resuming %s", path)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False)
        tuner._local_tuner._run_config.callbacks = [*(tuner._local_tuner._run_config.callbacks or []), *callbacks]
    else:
        tuner = new_tuner()
    return tuner.fit()


INTERRUPTED = ("interrupted: Tune did not restore this trial after the study was killed (it started after Tune's "
               "last experiment snapshot) and ran another trial in its place")


def close_stale_trials(study: StudyFile, study_dir: Path) -> int:
    """After the search, no trial runs: an Optuna trial still RUNNING belonged to a trial that a kill
    interrupted and Tune did not restore. Close it as FAIL (user attr `ia2ray_interrupted` says why),
    so the study's record holds only what happened; returns how many."""
    import optuna
    from optuna.storages import RDBStorage

    storage = RDBStorage(optuna_url(study_dir))
    ot = optuna.load_study(study_name=study.name, storage=storage)
    stale = ot.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in stale:
        storage.set_trial_user_attr(t._trial_id, "ia2ray_interrupted", INTERRUPTED)
        storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    if stale:
        log.warning("Optuna: %d trial(s) interrupted by a kill and not restored closed as FAIL: %s", len(stale),
                    ", ".join(str(t.number) for t in stale))
    return len(stale)


def pareto_front(study: StudyFile, study_dir: Path, has_ece: bool) -> list[dict]:
    """Completed Optuna trials on the Pareto front (or by the scalar objective), best first:
    [{"number", "params" (config values), "values": {metric: value}}]."""
    import optuna

    ot = optuna.load_study(study_name=study.name, storage=optuna_url(study_dir))
    pairs = objectives(study, has_ece)
    best = ot.best_trials if len(pairs) > 1 else [t for t in ot.trials if t.state == optuna.trial.TrialState.COMPLETE]
    rows = [{"number": t.number, "params": decode_point(study, t.params),
             "values": {m: v for (m, _), v in zip(pairs, t.values)}} for t in best]
    first, sign = pairs[0][0], -1 if pairs[0][1] == "max" else 1
    rows.sort(key=lambda r: (sign * r["values"][first], r["number"]))
    return rows


def completed_trials(study: StudyFile, study_dir: Path) -> list[dict]:
    """Every completed Optuna trial with its params and values (for the Pareto plot and trials.csv)."""
    import optuna

    ot = optuna.load_study(study_name=study.name, storage=optuna_url(study_dir))
    return [{"number": t.number, "params": decode_point(study, t.params), "values": list(t.values)}
            for t in ot.trials if t.state == optuna.trial.TrialState.COMPLETE]
