"""Checks that need the model's config or tokenizer, run before any weights load.

Layer ranges (`align.layers`, `lora.layers`), layer weights and single-token label words of the task
and of its out-of-domain targets are checked together and reported as one ConfigError.
"""

from __future__ import annotations

from ia2ray.config.load import ConfigError
from ia2ray.config.schema import RunConfig
from ia2ray.core.evaluate import label_token_ids
from ia2ray.core.model import load_tokenizer, model_depth, model_dir, resolve_layers
from ia2ray.core.rundata import RunData
from ia2ray.data.examples import format_query


def preflight(cfg: RunConfig, data: RunData) -> None:
    """Every problem at once, as a ConfigError naming the keys, before any weights are loaded."""
    try:
        path = model_dir(cfg.model)  # a builtin or GGUF model is built or converted here, once
        n_layers = model_depth(cfg.model)
    except (FileNotFoundError, ImportError, ValueError, OSError) as exc:
        raise ConfigError([str(exc)], "model.path") from None
    errors, layers = [], None
    try:
        layers = resolve_layers(cfg.align.layers, n_layers)
    except ValueError as exc:
        errors.append(str(exc))
    weights = cfg.align.layer_weights
    if layers is not None and weights is not None and len(weights) != len(layers):
        errors.append(f"align.layer_weights: {len(weights)} weights for the {len(layers)} layers that "
                      f"align.layers={cfg.align.layers!r} selects ({layers})")
    if cfg.lora.layers is not None:
        try:
            resolve_layers(cfg.lora.layers, n_layers, key="lora.layers")
        except ValueError as exc:
            errors.append(str(exc))
    if data.spec.answer_type == "label":
        tokenizer = load_tokenizer(cfg.model)
        own = "task.label_words" if cfg.task.label_words else "task.define" if cfg.task.define else "task.name"
        checks = [(own, data.spec, data.splits.train[0])]
        checks += [(f"task.ood.{name}", target, rows[0]) for name, (target, rows) in data.ood.items()]
        for key, spec, example in checks:
            try:
                label_token_ids(tokenizer, spec, format_query(spec, example))
            except ValueError as exc:
                errors.append(f"{key}: {exc}")
    if errors:
        raise ConfigError(errors, f"the config (checked against {path})")
