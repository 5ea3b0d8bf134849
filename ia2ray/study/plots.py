"""The study's figures: the search's Pareto plot, reliability diagrams, per-layer activation similarity
curves and the LoRA subspace overlap heatmap (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

from pathlib import Path


def plot_pareto(trials: list[dict], front: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([t["values"][1] for t in trials], [t["values"][0] for t in trials], c="0.6", label="trials")
    pts = sorted((f["values"]["val/ece"], f["values"]["val/acc"]) for f in front)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", c="C3", label="Pareto front")
    ax.set_xlabel("validation ECE (lower is better)")
    ax.set_ylabel("validation accuracy")
    ax.legend()
    ax.set_title("search: accuracy vs calibration")
    _save(fig, path)


def plot_reliability(runs: dict[str, list[dict]], path: Path, split: str = "test") -> None:
    """One panel per method: the split's reliability bins of each seed against the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m, s in runs.items() if any("reliability" in r.get(split, {}) for r in s)]
    if not methods:
        return
    fig, axes = plt.subplots(1, len(methods), figsize=(3 * len(methods), 3.2), squeeze=False)
    for ax, method in zip(axes[0], methods):
        ax.plot([0, 1], [0, 1], "--", c="0.5", lw=1)
        for run in runs[method]:
            bins = run[split].get("reliability") or []
            ax.plot([b["conf"] for b in bins], [b["acc"] for b in bins], "o", ms=4, alpha=0.7, label=f"seed {run['seed']}")
        ax.set_title(method, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7)
    _save(fig, path)


def plot_similarity(curves: dict[str, list[float]], path: Path, site: str, base: str = "base (no adapter)") -> None:
    """One line per method: the mean (over seeds) token-wise cosine similarity to the ICL teacher per layer;
    with the base model's curve present, a second panel shows each method's change from it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    _save(fig, path)


def plot_overlap(methods: list[str], matrix: list[list[float]], path: Path) -> None:
    """Heatmap of the mean LoRA subspace overlap between methods' adapters (same seed, mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    _save(fig, path)


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
