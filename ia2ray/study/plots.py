"""The study's figures: the search's Pareto plot, reliability diagrams, stage loss curves, per-layer activation similarity
curves and the LoRA subspace overlap heatmap (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pareto(trials: list[dict], front: list[dict], path: Path, pipeline: str = "",
                references: Optional[list[tuple[str, float, float]]] = None) -> list[str]:
    """Every completed search trial (validation ECE vs accuracy) coloured by its pipeline (`pipeline`: the
    study's when the pipeline is not searched), the whole Pareto front as a step line, and `references`
    (label, val ECE, val acc): the confirmed baselines, as labelled points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    groups: dict[str, list[dict]] = {}
    for t in trials:
        groups.setdefault(str(t["params"].get("pipeline", pipeline) or "trials"), []).append(t)
    for i, (name, members) in enumerate(sorted(groups.items())):
        ax.scatter([t["values"][1] for t in members], [t["values"][0] for t in members], s=28, alpha=0.75,
                   c=f"C{i}", label=f"{name} ({len(members)})")
    pts = sorted((f["values"]["val/ece"], f["values"]["val/acc"]) for f in front)
    if pts:
        ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", c="k", lw=1.4, label=f"Pareto front ({len(pts)})")
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=60, facecolors="none", edgecolors="k", lw=1.2)
    for i, (label, ece, acc) in enumerate(sorted(references or [], key=lambda r: r[1])):
        ax.scatter([ece], [acc], marker="*", s=150, c="0.25", zorder=3)
        ax.annotate(label, (ece, acc), textcoords="offset points", xytext=(6, 5 if i % 2 == 0 else -13), fontsize=8,
                    color="0.15")  # neighbours alternate above and below: baselines often tie in accuracy
    ax.set_xlabel("validation ECE (lower is better)")
    ax.set_ylabel("validation accuracy (higher is better)")
    ax.set_title("search: every trial, the Pareto front, and the confirmed baselines (*)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def pooled_bins(bins: list[dict], n_bins: int = 10) -> list[dict]:
    """Reliability bins of several seeds (or demo draws) pooled into `n_bins` equal-width confidence bins:
    each source bin goes, with its count, to the bin of its mean confidence. Returns the non-empty bins
    {"lo", "hi", "count", "acc", "conf"} (count-weighted means)."""
    sums = [[0, 0.0, 0.0] for _ in range(n_bins)]
    for b in bins:
        k = min(int(b["conf"] * n_bins), n_bins - 1)
        sums[k][0] += b["count"]
        sums[k][1] += b["acc"] * b["count"]
        sums[k][2] += b["conf"] * b["count"]
    return [{"lo": k / n_bins, "hi": (k + 1) / n_bins, "count": c, "acc": a / c, "conf": f / c}
            for k, (c, a, f) in enumerate(sums) if c]


def plot_reliability(runs: dict[str, list[dict]], path: Path, split: str = "test") -> list[str]:
    """One panel per method (ICL included): the split's reliability bins of all its seeds pooled into 10
    equal-width confidence bins, as bars of accuracy, the diagonal, and the gap to each bin's mean
    confidence shaded; the title gives the mean ECE over seeds (the report's number)."""
    plt = _pyplot()
    methods = [m for m, s in runs.items() if any(r.get(split, {}).get("reliability") for r in s)]
    if not methods:
        return []
    cols = min(len(methods), 4)
    rows = -(-len(methods) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 3.2 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    for ax, method in zip(axes.flat, methods):
        summaries = [r for r in runs[method] if r.get(split, {}).get("reliability")]
        bins = pooled_bins([b for r in summaries for b in r[split]["reliability"]])
        width = [b["hi"] - b["lo"] for b in bins]
        ax.bar([b["lo"] for b in bins], [b["acc"] for b in bins], width=width, align="edge", color="C0",
               edgecolor="white", label="accuracy")
        ax.bar([b["lo"] for b in bins], [b["conf"] - b["acc"] for b in bins], bottom=[b["acc"] for b in bins],
               width=width, align="edge", color="C3", alpha=0.3, hatch="//", edgecolor="C3", label="gap to confidence")
        ax.plot([0, 1], [0, 1], "--", c="0.3", lw=1)
        eces = [r[split]["ece"] for r in summaries if r[split].get("ece") is not None]
        ece = f"\nECE {sum(eces) / len(eces):.3f} (mean of {len(eces)})" if eces else ""
        ax.set_title(f"{method}{ece}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
    for row in axes:
        row[0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"reliability ({split} split, seeds pooled)", fontsize=10)
    return _save(fig, path)


def plot_losses(runs: dict[str, list[dict]], path: Path) -> list[str]:
    """One panel per trained method: each stage's training loss by step (mean over seeds; log scale, as
    alignment and cross-entropy losses differ by orders of magnitude) and its dev loss as points.
    Returns the figure's texts (none: nothing to draw, no file)."""
    curves: dict[str, dict[str, tuple[dict, dict]]] = {}
    for method, summaries in runs.items():
        for s in summaries:
            for h in s.get("history") or []:
                train, dev = curves.setdefault(method, {}).setdefault(h["stage"], ({}, {}))
                for key, store in (("train_loss", train), ("dev_loss", dev)):
                    if h.get(key) is not None:
                        store.setdefault(h["step"], []).append(h[key])
    if not curves:
        return []
    plt = _pyplot()
    cols = min(len(curves), 4)
    rows = -(-len(curves) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat[len(curves):]:
        ax.axis("off")
    for ax, (method, stages) in zip(axes.flat, curves.items()):
        for i, (stage, (train, dev)) in enumerate(stages.items()):
            steps = sorted(train)
            ax.plot(steps, [sum(train[k]) / len(train[k]) for k in steps], c=f"C{i}", lw=1.2, label=f"{stage} train")
            steps = sorted(dev)
            ax.plot(steps, [sum(dev[k]) / len(dev[k]) for k in steps], "o", c=f"C{i}", ms=3, label=f"{stage} dev")
        ax.set_yscale("log")
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("step (of each stage)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for row in axes:
        row[0].set_ylabel("loss (mean over seeds)")
    fig.suptitle("stage losses of the confirmation runs", fontsize=10)
    return _save(fig, path)
    return True


def plot_similarity(curves: dict[str, list[float]], path: Path, site: str, base: str = "base (no adapter)") -> list[str]:
    """One line per method: the mean (over seeds) token-wise cosine similarity to the ICL teacher per layer;
    with the base model's curve present, a second panel shows each method's change from it."""
    plt = _pyplot()
    ref = curves.get(base)
    fig, axes = plt.subplots(2 if ref else 1, 1, figsize=(7, 6.5 if ref else 4), sharex=True, squeeze=False)
    top = axes[0][0]
    for i, (method, layers) in enumerate(curves.items()):
        line = dict(c="k", ls="--") if method == base else dict(c=f"C{i}", marker="o", ms=3)
        top.plot(range(len(layers)), layers, label=method, **line)
        if ref and method != base:
            axes[1][0].plot(range(len(layers)), [a - b for a, b in zip(layers, ref)], label=method, **line)
    top.set_ylabel("cosine similarity to the ICL teacher")
    top.set_title(f"activation similarity ({site}, validation rows, mean over seeds)")
    top.legend(fontsize=8)
    if ref:
        axes[1][0].axhline(0, c="k", ls="--", lw=1)
        axes[1][0].set_ylabel(f"change from the {base.split(' (')[0]} model")
    for row in axes:
        row[0].grid(alpha=0.3)
    axes[-1][0].set_xlabel("layer")
    return _save(fig, path)


def plot_overlap(methods: list[str], matrix: list[list[float]], path: Path) -> list[str]:
    """Heatmap of the mean LoRA subspace overlap between methods' adapters (same seed, mean over seeds)."""
    plt = _pyplot()
    n = len(methods)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.0 * n + 1.8))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(n), methods, rotation=30, ha="right")
    ax.set_yticks(range(n), methods)
    for i in range(n):
        for j in range(n):
            v = matrix[i][j]
            ax.text(j, i, "-" if v != v else f"{v:.2f}", ha="center", va="center", c="w" if v < 0.6 else "k", fontsize=9)
    fig.colorbar(im, ax=ax, label="subspace overlap")
    ax.set_title("LoRA subspace overlap (B matrices)")
    return _save(fig, path)


def _save(fig, path: Path) -> list[str]:
    """Write the figure (atomically) and close it; returns every text drawn in it (titles, axis labels,
    legend entries, annotations), which the tests check."""
    from matplotlib.text import Text

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    texts = [t.get_text() for t in fig.findobj(Text) if t.get_text()]
    import matplotlib.pyplot as plt

    plt.close(fig)
    return texts
