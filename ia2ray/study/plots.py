"""The study's figures: the search's Pareto plot and reliability diagrams (matplotlib, Agg backend,
written atomically)."""

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


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
