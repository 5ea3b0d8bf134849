"""The study report's analyses of the confirmed methods: activation similarity to the ICL teacher per
layer (`ia2ray.core.similarity`, measured in each confirmation run) and the LoRA subspace overlap of
their adapters (`ia2ray.core.overlap`, computed here from `runs/<run>/adapter/`).

Files: `similarity.csv` (method, layer, mean and std over seeds), `similarity.png`, `overlap.csv`
(method pairs: mean over seeds of the adapters' overlap on the same seed, and per layer), `overlap.png`.
The ICL row has no adapter: its similarity is the base model's, drawn as "base (no adapter)".
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from ia2ray.core.stats import mean_std
from ia2ray.fileio import write_text_atomic
from ia2ray.study.plots import plot_overlap, plot_similarity

BASE = "base (no adapter)"


def curve_label(label: str) -> str:
    return BASE if label == "ICL" else label


def similarity_curves(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """label -> {"layers": per-layer mean over seeds, "layers_std", "mean", "mean_std", "n", "site"} for
    every method whose runs measured similarity."""
    out = {}
    for label, summaries in runs.items():
        sims = [s["sim"] for s in summaries if s.get("sim")]
        if not sims or len({len(x["layers"]) for x in sims}) != 1:
            continue
        per_layer = [mean_std([x["layers"][k] for x in sims]) for k in range(len(sims[0]["layers"]))]
        m, sd = mean_std([x["mean"] for x in sims])
        out[curve_label(label)] = {"layers": [a for a, _ in per_layer], "layers_std": [b for _, b in per_layer],
                                   "mean": m, "mean_std": sd, "n": len(sims), "site": sims[0].get("site", "")}
    return out


def similarity_markdown(curves: dict[str, dict]) -> str:
    lines = ["| method | seeds | mean similarity | least similar layer | most similar layer |", "|---|---|---|---|---|"]
    for label, c in curves.items():
        lo = min(range(len(c["layers"])), key=c["layers"].__getitem__)
        hi = max(range(len(c["layers"])), key=c["layers"].__getitem__)
        lines.append(f"| {label} | {c['n']} | {c['mean']:.4f} ± {c['mean_std']:.4f} | {lo} ({c['layers'][lo]:.3f}) | "
                     f"{hi} ({c['layers'][hi]:.3f}) |")
    return "\n".join(lines) + "\n"


def similarity_csv(curves: dict[str, dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "layer", "similarity_mean", "similarity_std", "n_seeds", "site"])
    for label, c in curves.items():
        for k, (m, sd) in enumerate(zip(c["layers"], c["layers_std"])):
            w.writerow([label, k, f"{m:.6f}", f"{sd:.6f}", c["n"], c["site"]])
    return buf.getvalue()


def overlap_matrix(study_dir: Path, rows: list[dict]) -> tuple[list[str], list[list[float]], dict]:
    """(methods, matrix, per_pair): the mean over seeds of the overlap between two methods' adapters
    trained on the same seed (NaN where no seed has both); `per_pair[(a, b)]` = {"mean", "std", "n",
    "layers"} for a before b in `methods`."""
    from ia2ray.core.overlap import adapter_overlap, load_lora_b
    from ia2ray.study.trial import run_name

    adapters: dict[str, dict[int, dict]] = {}
    for row in rows:
        if row["icl"]:
            continue
        path = study_dir / "runs" / run_name(row["label"], row["seed"]) / "adapter"
        try:
            adapters.setdefault(row["label"], {})[row["seed"]] = load_lora_b(path)
        except FileNotFoundError:
            continue
    methods = list(adapters)
    matrix = [[math.nan] * len(methods) for _ in methods]
    per_pair: dict = {}
    for i, a in enumerate(methods):
        for j in range(i, len(methods)):
            b = methods[j]
            seeds = sorted(set(adapters[a]) & set(adapters[b]))
            if not seeds:
                continue
            results = [adapter_overlap(adapters[a][s], adapters[b][s]) for s in seeds]
            m, sd = mean_std([r["mean"] for r in results])
            layers = sorted({k for r in results for k in r["layers"]})
            per_pair[(a, b)] = {"mean": m, "std": sd, "n": len(seeds),
                                "layers": {k: sum(r["layers"].get(k, 0.0) for r in results) / len(results) for k in layers}}
            matrix[i][j] = matrix[j][i] = m
    return methods, matrix, per_pair


def overlap_markdown(methods: list[str], matrix: list[list[float]]) -> str:
    lines = ["| | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for name, row in zip(methods, matrix):
        lines.append(f"| {name} | " + " | ".join("-" if math.isnan(v) else f"{v:.3f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def overlap_csv(per_pair: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    layers = sorted({k for p in per_pair.values() for k in p["layers"]})
    w.writerow(["method_a", "method_b", "overlap_mean", "overlap_std", "n_seeds", *[f"layer_{k}" for k in layers]])
    for (a, b), p in per_pair.items():
        w.writerow([a, b, f"{p['mean']:.6f}", f"{p['std']:.6f}", p["n"],
                    *[f"{p['layers'][k]:.6f}" if k in p["layers"] else "" for k in layers]])
    return buf.getvalue()


def write_analysis(study_dir: Path, runs: dict[str, list[dict]], rows: list[dict]) -> list[str]:
    """Write the similarity and overlap files and figures; returns the report's markdown lines."""
    lines: list[str] = []
    curves = similarity_curves(runs)
    if curves:
        site = next(iter(curves.values()))["site"]
        write_text_atomic(study_dir / "similarity.csv", similarity_csv(curves))
        plot_similarity({k: c["layers"] for k, c in curves.items()}, study_dir / "similarity.png", site)
        lines += ["## Activation similarity to the ICL teacher (validation rows, mean over seeds)", "",
                  similarity_markdown(curves),
                  f"Token-wise cosine similarity at `{site}` between each model's activations on a query without demos "
                  "and the base model's with N-1 demos, at the response positions; 1 = identical. The base model "
                  "(no adapter) is what training starts from.", "", "![Activation similarity](similarity.png)", ""]
    methods, matrix, per_pair = overlap_matrix(study_dir, rows)
    if len(methods) >= 2:
        write_text_atomic(study_dir / "overlap.csv", overlap_csv(per_pair))
        plot_overlap(methods, matrix, study_dir / "overlap.png")
        lines += ["## LoRA subspace overlap between the methods' adapters (same seed, mean over seeds)", "",
                  overlap_markdown(methods, matrix),
                  "(1/r)·||U1ᵀU2||²_F of the top-r left singular vectors of the two LoRA B matrices, per adapted "
                  "module, averaged over modules; r = the smaller rank. 1: the same column space, 0: orthogonal; "
                  "per-layer values in overlap.csv.", "", "![LoRA subspace overlap](overlap.png)", ""]
    return lines
