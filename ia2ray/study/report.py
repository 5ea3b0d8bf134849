"""The study report: a table per method (mean and std over seeds of test accuracy and ECE, and of the
out-of-domain targets'), the Pareto front of the search, and reliability diagrams, written into the
study folder.

Files: `report.md`, `report.csv`, `trials.csv` (every completed search trial), `pareto.csv`, `pareto.png`,
`reliability.png`. Standard deviations are sample standard deviations (ddof=1; 0 for one seed).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from ia2ray.fileio import write_text_atomic
from ia2ray.study.plots import plot_pareto, plot_reliability


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def describe_params(params: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, float) else f'{v:.3g}'}" for k, v in params.items())


def load_confirm_runs(study_dir: Path, rows: list[dict]) -> dict[str, list[dict]]:
    """label -> the summaries of its confirmation runs (in seed order)."""
    from ia2ray.study.trial import run_name

    out: dict[str, list[dict]] = {}
    for row in rows:
        path = study_dir / "runs" / run_name(row["label"], row["seed"]) / "summary.json"
        if path.is_file():
            out.setdefault(row["label"], []).append(json.loads(path.read_text()))
    return out


def ood_targets(runs: dict[str, list[dict]]) -> list[str]:
    """The out-of-domain splits (`ood/<task>`) the confirmation runs were evaluated on."""
    return sorted({k for summaries in runs.values() for s in summaries for k in s if k.startswith("ood/")})


def summarise(runs: dict[str, list[dict]]) -> list[dict]:
    """One row per method: seeds, mean/std of test, val and out-of-domain acc/ECE, the params."""
    table = []
    for label, summaries in runs.items():
        row = {"method": label, "params": describe_params(summaries[0].get("params", {})),
               "seeds": " ".join(str(s["seed"]) for s in summaries), "n_seeds": len(summaries)}
        for split in ("test", "val", *ood_targets(runs)):
            for key in ("acc", "ece"):
                values = [s[split][key] for s in summaries if split in s and s[split].get(key) is not None]
                if values:
                    row[f"{split}_{key}_mean"], row[f"{split}_{key}_std"] = _mean_std(values)
        table.append(row)
    return table


COLUMNS = ["method", "n_seeds", "seeds", "test_acc_mean", "test_acc_std", "test_ece_mean", "test_ece_std",
           "val_acc_mean", "val_acc_std", "val_ece_mean", "val_ece_std", "params"]


def table_csv(table: list[dict]) -> str:
    buf = io.StringIO()
    ood = sorted({k for row in table for k in row if k.startswith("ood/")})
    writer = csv.DictWriter(buf, fieldnames=COLUMNS[:-1] + ood + COLUMNS[-1:], extrasaction="ignore")
    writer.writeheader()
    for row in table:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def _cell(row: dict, split: str, key: str) -> str:
    if f"{split}_{key}_mean" not in row:
        return "-"
    return f"{row[f'{split}_{key}_mean']:.4f} ± {row[f'{split}_{key}_std']:.4f}"


def table_markdown(table: list[dict], ece_scheme: str) -> str:
    lines = [f"| method | seeds | test acc | test ECE ({ece_scheme}) | val acc | val ECE | config |",
             "|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['method']} | {r['seeds']} | {_cell(r, 'test', 'acc')} | {_cell(r, 'test', 'ece')} | "
                     f"{_cell(r, 'val', 'acc')} | {_cell(r, 'val', 'ece')} | {r['params'] or 'defaults'} |")
    return "\n".join(lines) + "\n"


def ood_markdown(table: list[dict], targets: list[str], ece_scheme: str) -> str:
    """Out-of-domain results: one row per method, accuracy and ECE on each target's test rows."""
    head = " | ".join(f"{t[len('ood/'):]} acc | {t[len('ood/'):]} ECE ({ece_scheme})" for t in targets)
    lines = [f"| method | seeds | {head} |", "|---|---|" + "---|---|" * len(targets)]
    for r in table:
        cells = " | ".join(f"{_cell(r, t, 'acc')} | {_cell(r, t, 'ece')}" for t in targets)
        lines.append(f"| {r['method']} | {r['seeds']} | {cells} |")
    return "\n".join(lines) + "\n"


def trials_csv(trials: list[dict], metrics: list[str]) -> str:
    keys = sorted({k for t in trials for k in t["params"]})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["optuna_trial", *metrics, *keys])
    for t in trials:
        writer.writerow([t["number"], *t["values"], *[json.dumps(t["params"].get(k)) for k in keys]])
    return buf.getvalue()


def write_pareto_csv(study_dir: Path, front: list[dict], metrics: list[str]) -> None:
    """`pareto.csv`: the search's Pareto front (or, for one objective, every completed trial), best first."""
    rows = [{**f, "values": [f["values"][m] for m in metrics]} for f in front]
    write_text_atomic(study_dir / "pareto.csv", trials_csv(rows, metrics))


def write_report(study_dir: Path, name: str, study_lines: list[str], rows: list[dict], trials: list[dict],
                 front: list[dict], metrics: list[str], ece_scheme: str) -> tuple[str, list[dict]]:
    """Write report.md/csv, trials.csv and the plots; returns (markdown table, table rows)."""
    runs = load_confirm_runs(study_dir, rows)
    table, targets = summarise(runs), ood_targets(runs)
    md_table = table_markdown(table, ece_scheme)
    ood = ["## Out of domain: each target's test rows (mean ± std over seeds)", "",
           ood_markdown(table, targets, ece_scheme),
           "The ICL rows put demos of the trained task before each target query; no target row was used for "
           "training or selection.", ""] if targets else []
    write_text_atomic(study_dir / "report.csv", table_csv(table))
    write_text_atomic(study_dir / "trials.csv", trials_csv(trials, metrics))
    has_pareto = metrics[:2] == ["val/acc", "val/ece"]
    if has_pareto and trials:
        plot_pareto(trials, front, study_dir / "pareto.png")
    plot_reliability(runs, study_dir / "reliability.png")
    front_lines = [f"- best-{i}: " + ", ".join(f"{m} {v:.4f}" for m, v in f["values"].items())
                   + f" ({describe_params(f['params'])})" for i, f in enumerate(front, start=1)]
    text = "\n".join([
        f"# Study {name}", "", *study_lines, "",
        "## Confirmation on the test split (mean ± std over seeds)", "", md_table,
        "Selection used only the validation split; the test split was evaluated only here.", "", *ood,
        f"## Search: {len(trials)} completed trials; selected configs ({metrics and ', '.join(metrics)})", "",
        *(front_lines or ["(none)"]), "",
        *(["![Pareto front](pareto.png)", ""] if has_pareto and trials else []),
        "![Reliability diagrams (test split)](reliability.png)", "",
    ])
    write_text_atomic(study_dir / "report.md", text)
    return md_table, table
