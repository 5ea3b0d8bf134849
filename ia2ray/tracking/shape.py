"""The shape of ia2ray's MLflow runs: flat params, metric names with the stage as prefix, tags.

Params are the resolved run config flattened to dotted keys (`lora.rank`, `align.layers`, `lr.align`,
`pipeline`); lists and null are JSON text. Per-step training metrics are `<stage>/loss` and
`<stage>/dev_loss` with the stage's optimizer step as MLflow step; final metrics are `<split>/<metric>`
(`val/acc`, `val/ece`, `test/acc`, ...) at step 0. ia2ray's own tags start with `ia2ray.`.
"""

from __future__ import annotations

import json
import math
import re

TAG = "ia2ray."
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def slug(text: str) -> str:
    """A metric-name-safe form of a label: `IA2 -> SFT` -> `IA2-SFT`."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-")


def flat_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"lora": {"rank": 8}, "pipeline": "ia2"} -> {"lora.rank": "8", "pipeline": "ia2"}."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value)
        out[name] = text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."
    return out


HISTORY_METRICS = {"train_loss": "loss", "dev_loss": "dev_loss"}


def step_metrics(stage: str, entry: dict) -> list[tuple[str, float, int]]:
    """One history entry of a stage ({"step", "train_loss"?, "dev_loss"?}) -> (key, value, step)."""
    return [(f"{stage}/{name}", float(entry[field]), int(entry["step"]))
            for field, name in HISTORY_METRICS.items() if entry.get(field) is not None]


COUNTS = {"n", "draws", "ece_bins"}  # sizes and settings in a split's metrics, not measurements


def split_metrics(summary: dict, splits: tuple[str, ...]) -> dict[str, float]:
    """Every finite measurement of each split: {"val/acc": ..., "val/ece": ..., "test/acc": ...}."""
    out = {}
    for split in splits:
        for key, value in (summary.get(split) or {}).items():
            if key in COUNTS or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[f"{split}/{key}"] = float(value)
    return out


def sim_metrics(summary: dict) -> list[tuple[str, float, int]]:
    """A run's activation similarity (`summary["sim"]`): `sim/mean`, `sim/layer_<k>` (one key per layer:
    columns of MLflow's compare table) and `sim/by_layer` with the layer as its step (a curve per run in
    MLflow's charts)."""
    sim = summary.get("sim")
    if not sim:
        return []
    width = len(str(len(sim["layers"]) - 1))
    return ([("sim/mean", float(sim["mean"]), 0)]
            + [(f"sim/layer_{k:0{width}d}", float(v), 0) for k, v in enumerate(sim["layers"])]
            + [("sim/by_layer", float(v), k) for k, v in enumerate(sim["layers"])])


def tag(name: str) -> str:
    return f"{TAG}{name}"
