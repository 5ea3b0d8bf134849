"""The search space of a study file: validation of every candidate, Optuna distributions, the
conditional (define-by-run) space the sampler walks, and the mapping from a sampled point back to a
run config.

The space is conditional: a trial first samples `pipeline` (when it is searched), then only the
parameters that pipeline uses (`ia2ray.core.items.uses_key`): `loss.ce_weight` only for `ia2+sft`,
`lr.sft` only where an SFT stage trains, `align.*` only where a stage aligns activations. A
parameter a trial did not sample stays at its default (`apply_params`).

Optuna's categorical choices must be None/bool/int/float/str, so a non-scalar choice (an explicit
layer list such as `[0, 2]`, a list of layer weights, a list of LoRA targets) is presented to Optuna
as its JSON text and decoded again in the trial.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from ia2ray.config.load import ConfigError, _format_errors, set_dotted, study_defaults
from ia2ray.config.schema import RunConfig, SearchParam, StudyFile
from ia2ray.core.items import uses_key

SCALARS = (type(None), bool, int, float, str)

# keys a study may not search: they change the data split, the teacher (captured once per key before
# the trials), what the objective measures, or where and on what a trial runs
NOT_SEARCHABLE = ("name", "model.", "task.", "data.", "capture.", "eval.", "output.", "align.max_new_tokens",
                  "train.num_workers", "train.use_gpu", "train.cpus_per_worker", "train.storage", "train.device")


def encode_choice(value: Any) -> Any:
    return value if isinstance(value, SCALARS) else json.dumps(value)


def decode_choice(param: SearchParam, value: Any) -> Any:
    for original in param.values or []:
        if encode_choice(original) == value:
            return original
    return value


def candidates(param: SearchParam) -> list[tuple[str, Any]]:
    """(label, value) pairs that bound the parameter: every choice, or both ends of a range."""
    if param.kind == "choice":
        return [(f"values[{i}]", v) for i, v in enumerate(param.values)]
    cast = int if param.kind == "int" else float
    return [("low", cast(param.low)), ("high", cast(param.high))]


def check_space(study: StudyFile, where: dict | None = None, source: str = "study") -> RunConfig:
    """Validate the space: non-empty, integer bounds for `int`, and every candidate value (each choice,
    both range ends, the default) accepted by the run config with all other parameters at their
    defaults. Returns the base run config (searched parameters at their defaults); raises
    ConfigError naming `search.params.<key>.<field>` for every problem."""
    where = where or {}
    base = study_defaults(study, where, source)  # unknown keys and bad defaults are reported here
    errors = []
    if not study.search.params:
        errors.append("search.params: the search space is empty (a study needs at least one searched parameter)")
    base_tree = base.model_dump(mode="json")
    for key, param in study.search.params.items():
        if key in NOT_SEARCHABLE or key.startswith(tuple(k for k in NOT_SEARCHABLE if k.endswith("."))):
            errors.append(f"search.params.{key}: not searchable (data, teacher, evaluation and resource keys are "
                          "fixed for a whole study)")
            continue
        if param.kind == "int" and (param.low != int(param.low) or param.high != int(param.high)):
            errors.append(f"search.params.{key}: an int parameter needs integer `low` and `high` "
                          f"(got {param.low}, {param.high})")
            continue
        for label, value in candidates(param):
            tree = json.loads(json.dumps(base_tree))
            set_dotted(tree, key, value)
            try:
                RunConfig.model_validate(tree)
            except ValidationError as exc:
                for msg in _format_errors(exc, {}):
                    errors.append(f"search.params.{key}.{label} = {value!r}: {msg}")
    if errors:
        raise ConfigError(errors, source)
    return base


def distribution(p: SearchParam):
    """The Optuna distribution of one searched parameter."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if p.kind == "choice":
        return CategoricalDistribution([encode_choice(v) for v in p.values])
    if p.kind == "int":
        return IntDistribution(int(p.low), int(p.high))
    return FloatDistribution(p.low, p.high, log=p.kind == "loguniform")


def optuna_space(study: StudyFile) -> dict:
    """Dotted key -> Optuna distribution (the whole space, unconditioned)."""
    return {key: distribution(p) for key, p in study.search.params.items()}


def searched_pipelines(study: StudyFile) -> list[str]:
    """The pipelines a trial can run: the `pipeline` choices when searched, else the study's own."""
    param = study.search.params.get("pipeline")
    return list(param.values) if param is not None else [study.pipeline]


def sampled_keys(study: StudyFile, pipeline: str) -> list[str]:
    """The searched keys a trial of `pipeline` samples (in the study file's order)."""
    return [k for k in study.search.params if k == "pipeline" or uses_key(pipeline, k)]


class ConditionalSpace:
    """Ray's `OptunaSearch` define-by-run space: `pipeline` first, then each parameter that pipeline
    uses. A plain class (not a closure) because Tune pickles the searcher into its experiment."""

    def __init__(self, study: StudyFile):
        self.study = study

    def __call__(self, trial) -> None:
        params = self.study.search.params
        pipeline = self.study.pipeline
        if "pipeline" in params:
            pipeline = suggest(trial, "pipeline", params["pipeline"])
        for key in sampled_keys(self.study, pipeline):
            if key != "pipeline":
                suggest(trial, key, params[key])
        return None  # Tune takes the trial's sampled params


def suggest(trial, key: str, p: SearchParam):
    """Sample `key` through the trial's `suggest_*` methods (Ray's define-by-run captures those)."""
    d = distribution(p)
    if p.kind == "choice":
        return trial.suggest_categorical(key, list(d.choices))
    if p.kind == "int":
        return trial.suggest_int(key, d.low, d.high)
    return trial.suggest_float(key, d.low, d.high, log=d.log)


def decode_point(study: StudyFile, point: dict) -> dict[str, Any]:
    """A sampled point (dotted key -> Optuna value) -> dotted key -> config value."""
    params = study.search.params
    return {k: decode_choice(params[k], v) if params[k].kind == "choice" else v
            for k, v in point.items() if k in params}


def apply_params(base: RunConfig, params: dict[str, Any], **updates: Any) -> RunConfig:
    """`base` with searched values (dotted keys) and further dotted `updates` set; validated."""
    tree = base.model_dump(mode="json")
    for key, value in {**params, **updates}.items():
        set_dotted(tree, key, value)
    return RunConfig.model_validate(tree)


def describe(study: StudyFile) -> list[str]:
    """One line per searched parameter, `<key>: <distribution> (default ...)`, for `--dry-run`, the
    report and the study's MLflow params."""
    lines = []
    for key, p in study.search.params.items():
        shown = (f"choice {json.dumps(p.values)}" if p.kind == "choice"
                 else f"{p.kind} [{p.low:g}, {p.high:g}]")
        lines.append(f"{key}: {shown} (default {json.dumps(p.default)})")
    return lines


def describe_conditions(study: StudyFile) -> list[str]:
    """The keys each pipeline samples, for `--dry-run`."""
    lines = ["sampled per pipeline (a parameter only where it has an effect):"]
    for pipeline in searched_pipelines(study):
        keys = [k for k in sampled_keys(study, pipeline) if k != "pipeline"]
        lines.append(f"  {pipeline}: {', '.join(keys) or 'nothing else'}")
    return lines
