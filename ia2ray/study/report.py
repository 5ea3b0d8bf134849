"""The study report: a table per method (mean and std over seeds of test accuracy and ECE, and of the
out-of-domain targets'), paired comparisons against SFT only and ICL, the Pareto front of the search,
and reliability diagrams, written into the study folder.

Files: `report.md`, `report.csv`, `trials.csv` (every completed search trial), `pareto.csv`, `pareto.png`,
`reliability.png`, `losses.png` (the confirmation runs' stage losses), and the analyses of `ia2ray.study.analysis` (activation similarity, LoRA overlap). Standard deviations are sample standard deviations (ddof=1; 0 for one seed). A paired
comparison takes the per-seed differences on the seeds both methods have (the same N-shot subset):
their mean, a bootstrap 95% interval (10,000 resamples, seed 0), the two-sided paired t-test p-value
and a verdict at 0.05 (`ia2ray.core.stats.paired`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from ia2ray.config.schema import StudyFile
from ia2ray.core.stats import mean_std, paired
from ia2ray.fileio import write_text_atomic
from ia2ray.study.analysis import write_analysis
from ia2ray.study.plots import plot_losses, plot_pareto, plot_reliability

REFERENCES = {"SFT only": "sft", "ICL": "icl"}  # methods every other method is compared against, by column prefix
PAIRED_METRICS = (("acc", True), ("ece", False))  # (metric, higher is better) on the test split


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
               "tuned": summaries[0].get("tuned", ""),
               "seeds": " ".join(str(s["seed"]) for s in summaries), "n_seeds": len(summaries)}
        for split in ("test", "val", *ood_targets(runs)):
            for key in ("acc", "ece"):
                values = [s[split][key] for s in summaries if split in s and s[split].get(key) is not None]
                if values:
                    row[f"{split}_{key}_mean"], row[f"{split}_{key}_std"] = mean_std(values)
        sims = [s["sim"]["mean"] for s in summaries if s.get("sim")]
        if sims:
            row["sim_mean"], row["sim_std"] = mean_std(sims)
        table.append(row)
    add_paired(table, runs)
    return table


def per_seed(summaries: list[dict], key: str) -> dict[int, float]:
    return {s["seed"]: s["test"][key] for s in summaries if s.get("test", {}).get(key) is not None}


def add_paired(table: list[dict], runs: dict[str, list[dict]]) -> None:
    """Each method against each reference (`REFERENCES`) present: `vs_<ref>_test_<metric>_{diff, ci_low,
    ci_high, p, verdict, n}` on the seeds both have."""
    for row in table:
        for ref, short in REFERENCES.items():
            if row["method"] == ref or ref not in runs:
                continue
            for key, higher in PAIRED_METRICS:
                a, b = per_seed(runs[row["method"]], key), per_seed(runs[ref], key)
                seeds = sorted(set(a) & set(b))
                if not seeds:
                    continue
                r = paired([a[s] for s in seeds], [b[s] for s in seeds], higher_is_better=higher)
                col = f"vs_{short}_test_{key}"
                row.update({f"{col}_diff": r.mean, f"{col}_ci_low": r.ci_low, f"{col}_ci_high": r.ci_high,
                            f"{col}_p": r.p_value, f"{col}_verdict": r.verdict, f"{col}_n": r.n})


COLUMNS = ["method", "n_seeds", "seeds", "test_acc_mean", "test_acc_std", "test_ece_mean", "test_ece_std",
           "val_acc_mean", "val_acc_std", "val_ece_mean", "val_ece_std", "sim_mean", "sim_std"]
PAIRED_COLUMNS = [f"vs_{short}_test_{key}_{part}" for short in REFERENCES.values() for key, _ in PAIRED_METRICS
                  for part in ("diff", "ci_low", "ci_high", "p", "verdict", "n")]


def table_csv(table: list[dict]) -> str:
    buf = io.StringIO()
    ood = sorted({k for row in table for k in row if k.startswith("ood/")})
    writer = csv.DictWriter(buf, fieldnames=COLUMNS + ood + PAIRED_COLUMNS + ["tuned", "params"], extrasaction="ignore")
    writer.writeheader()
    for row in table:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def mean_cell(row: dict, split: str, key: str) -> str:
    """`mean ± std` of a table row's split metric, `-` where the row has none."""
    if f"{split}_{key}_mean" not in row:
        return "-"
    return f"{row[f'{split}_{key}_mean']:.4f} ± {row[f'{split}_{key}_std']:.4f}"


def table_markdown(table: list[dict], ece_scheme: str) -> str:
    lines = [f"| method | seeds | test acc | test ECE ({ece_scheme}) | val acc | val ECE | config | tuned |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['method']} | {r['seeds']} | {mean_cell(r, 'test', 'acc')} | {mean_cell(r, 'test', 'ece')} | "
                     f"{mean_cell(r, 'val', 'acc')} | {mean_cell(r, 'val', 'ece')} | {r['params'] or 'defaults'} | "
                     f"{r.get('tuned') or '-'} |")
    return "\n".join(lines) + "\n"


def _paired_cells(row: dict, col: str) -> str:
    if f"{col}_diff" not in row:
        return "- | - | -"
    p = row[f"{col}_p"]
    return (f"{row[f'{col}_diff']:+.4f} [{row[f'{col}_ci_low']:+.4f}, {row[f'{col}_ci_high']:+.4f}] | "
            f"{'n/a' if math.isnan(p) else f'{p:.3g}'} | {row[f'{col}_verdict']}")


def paired_markdown(table: list[dict]) -> str:
    """Per method and reference: the paired test differences (accuracy: higher is better; ECE: lower)."""
    lines = ["| method | against | seeds | acc diff [95% CI] | p | verdict | ECE diff [95% CI] | p | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        for ref, short in REFERENCES.items():
            col = f"vs_{short}_test"
            if f"{col}_acc_n" in r:
                lines.append(f"| {r['method']} | {ref} | {r[f'{col}_acc_n']} | {_paired_cells(r, f'{col}_acc')} | "
                             f"{_paired_cells(r, f'{col}_ece')} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def ood_markdown(table: list[dict], targets: list[str], ece_scheme: str) -> str:
    """Out-of-domain results: one row per method, accuracy and ECE on each target's test rows."""
    head = " | ".join(f"{t[len('ood/'):]} acc | {t[len('ood/'):]} ECE ({ece_scheme})" for t in targets)
    lines = [f"| method | seeds | {head} |", "|---|---|" + "---|---|" * len(targets)]
    for r in table:
        cells = " | ".join(f"{mean_cell(r, t, 'acc')} | {mean_cell(r, t, 'ece')}" for t in targets)
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


def references(table: list[dict]) -> list[tuple[str, float, float]]:
    """The confirmed baselines' (label, mean val ECE, mean val acc), for the Pareto plot."""
    return [(r["method"], r["val_ece_mean"], r["val_acc_mean"]) for r in table
            if not r["method"].startswith("best-") and "val_ece_mean" in r and "val_acc_mean" in r]


def write_report(study_dir: Path, name: str, study_lines: list[str], rows: list[dict], trials: list[dict],
                 front: list[dict], top_k: int, metrics: list[str], ece_scheme: str,
                 pipeline: str = "") -> tuple[str, list[dict]]:
    """Write report.md/csv, trials.csv and the plots; returns (markdown table, table rows). `front`: the
    whole Pareto front (best first), of which the first `top_k` were confirmed; `pipeline`: the study's,
    for trials whose pipeline was not searched."""
    runs = load_confirm_runs(study_dir, rows)
    table, targets = summarise(runs), ood_targets(runs)
    md_table, paired_md = table_markdown(table, ece_scheme), paired_markdown(table)
    ood = ["## Out of domain: each target's test rows (mean ± std over seeds)", "",
           ood_markdown(table, targets, ece_scheme),
           "The ICL rows put demos of the trained task before each target query; no target row was used for "
           "training or selection.", ""] if targets else []
    write_text_atomic(study_dir / "report.csv", table_csv(table))
    write_text_atomic(study_dir / "trials.csv", trials_csv(trials, metrics))
    has_pareto = metrics[:2] == ["val/acc", "val/ece"]
    if has_pareto and trials:
        plot_pareto(trials, front, study_dir / "pareto.png", pipeline, references(table))
    has_reliability = bool(plot_reliability(runs, study_dir / "reliability.png"))
    has_losses = bool(plot_losses(runs, study_dir / "losses.png"))
    analysis = write_analysis(study_dir, runs, rows)
    selected = front[:top_k] or front
    front_lines = [f"- best-{i}: " + ", ".join(f"{m} {v:.4f}" for m, v in f["values"].items())
                   + f" ({describe_params(f['params'])})" for i, f in enumerate(selected, start=1)]
    text = "\n".join([
        f"# Study {name}", "", *study_lines, "",
        "## Confirmation on the test split (mean ± std over seeds)", "",
        md_table if table else "(no confirmation run has finished)\n",
        "Selection used only the validation split; the test split was evaluated only here. `tuned`: what each "
        "row's configuration was chosen over, on validation.", "",
        *(["## Paired differences on the test split (method minus reference, per seed)", "", paired_md,
           "A verdict says `better` or `worse` where the paired t-test gives p < 0.05, else `not distinguishable`; "
           "with few seeds the intervals are wide and the test has little power.", ""] if paired_md else []),
        *ood,
        *analysis,
        f"## Search: {len(trials)} completed trials, {len(front)} on the front; selected configs "
        f"({metrics and ', '.join(metrics)})", "",
        *(front_lines or ["(none)"]), "",
        *(["![Pareto front](pareto.png)", ""] if has_pareto and trials else []),
        *(["![Reliability diagrams (test split)](reliability.png)", ""] if has_reliability else []),
        *(["![Stage losses](losses.png)", ""] if has_losses else []),
    ])
    write_text_atomic(study_dir / "report.md", text)
    return md_table, table


CONFIRM_FILE = "confirm.json"  # the confirmation rows, written before they run (the report reads them)


def build_report(study_dir: Path, study: StudyFile, has_ece: bool, lines: list[str], ece_scheme: str,
                 pipeline: str = "") -> tuple[str, list[dict], int]:
    """Every report file from what the study folder holds: Optuna's trials (`optuna.db`), the confirmation
    rows (`confirm.json`) and their runs' summaries. The study calls it at its end; `python -m
    ia2ray.report` calls it again on a finished or interrupted study, with the same result. Returns (the
    markdown table, its rows, the number of completed search trials)."""
    from ia2ray.study.search import completed_trials, optuna_url, pareto_front
    from ia2ray.study.trial import objectives

    metrics = [m for m, _ in objectives(study, has_ece)]
    trials, front = [], []
    if (study_dir / "optuna.db").is_file() and study_exists(optuna_url(study_dir), study.name):
        trials = completed_trials(study, study_dir)
        front = pareto_front(study, study_dir, has_ece) if trials else []
    saved = study_dir / CONFIRM_FILE
    rows = json.loads(saved.read_text())["rows"] if saved.is_file() else []
    md_table, table = write_report(study_dir, study.name, lines, rows, trials, front, study.study.confirm.top_k,
                                   metrics, ece_scheme, pipeline)
    write_pareto_csv(study_dir, front, metrics)
    return md_table, table, len(trials)


def study_exists(url: str, name: str) -> bool:
    import optuna

    return any(s.study_name == name for s in optuna.get_all_study_summaries(storage=url))
