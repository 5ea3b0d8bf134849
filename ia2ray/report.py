"""`python -m ia2ray.report`: rebuild the report of a study from its folder; compare studies.

    python -m ia2ray.report STUDY [STUDY ...] [--tracking-uri URI]

STUDY is a study folder (`<storage>/<name>`; for a study in a bucket, the study driver's local copy,
which `python -m ia2ray.tune` prints). For each, report.md, report.csv, trials.csv, pareto.csv and the
plots are written again from what the folder holds (Optuna's trials, the confirmation rows and their
runs' summaries), by the same code the study ran at its end: a finished study gets the same
report.csv. An interrupted study gets what it has so far (the search without confirmation, or part of
the confirmation). Where the study's MLflow run can be reached, it gets the rebuilt report files,
metrics and verdicts too (its status stays). With several studies, their test results are printed
side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from ia2ray.config.schema import StudyFile

UNFINISHED = ("- rebuilt from the folder by `python -m ia2ray.report`; the study has not finished (no timings.json): "
              "what is here is what it had done")


class StudyFolderError(ValueError):
    """A path that is not a study folder."""


def load_saved(folder: Path) -> tuple[StudyFile, dict]:
    """The study of `folder` (its study.json) and that file's other fields."""
    if "://" in str(folder):
        raise StudyFolderError(f"{folder}: give the study's local folder (a bucket study's local copy, printed by "
                               "`python -m ia2ray.tune` as `local copy:`), not a bucket URI")
    saved = folder / "study.json"
    if not saved.is_file():
        raise StudyFolderError(f"{folder}: not a study folder (no study.json; a study folder is <storage>/<name>)")
    try:
        data = json.loads(saved.read_text())
        return StudyFile.model_validate(data["study"]), data
    except (ValueError, KeyError) as exc:
        raise StudyFolderError(f"{saved}: not a study's study.json ({exc})") from None


def has_ece_of(folder: Path, study: StudyFile, saved: dict) -> bool:
    """Whether the study's task has val/ece: kept in study.json; for a study written before that, the
    number of objectives of its Optuna study."""
    if "has_ece" in saved:
        return bool(saved["has_ece"])
    import optuna

    from ia2ray.study.search import optuna_url

    return study.study.objective != "scalar" and len(
        optuna.load_study(study_name=study.name, storage=optuna_url(folder)).directions) > 1


def rebuild(folder: Path, study: StudyFile, saved: dict) -> tuple[str, list[dict], int]:
    """Write the report files of the study in `folder` (its study and study.json, `load_saved`) again;
    returns (markdown table, table rows, completed search trials)."""
    from ia2ray.study.report import build_report

    timings = folder / "timings.json"
    lines = json.loads(timings.read_text()).get("report_lines") if timings.is_file() else None
    return build_report(folder, study, has_ece_of(folder, study, saved), lines or [UNFINISHED],
                        saved.get("ece_scheme") or study.eval.ece_scheme, study.pipeline)


def side_by_side(names: list[str], tables: list[list[dict]]) -> str:
    """One row per method (in order of first appearance), test accuracy and ECE of each study."""
    from ia2ray.study.report import mean_cell

    methods = list(dict.fromkeys(r["method"] for t in tables for r in t))
    head = " | ".join(f"{n} test acc | {n} test ECE" for n in names)
    lines = [f"| method | {head} |", "|---|" + "---|---|" * len(names)]
    for m in methods:
        rows = [next((r for r in t if r["method"] == m), {}) for t in tables]
        lines.append(f"| {m} | " + " | ".join(f"{mean_cell(r, 'test', 'acc')} | {mean_cell(r, 'test', 'ece')}"
                                               for r in rows) + " |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ia2ray.report", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", metavar="STUDY", help="study folder(s)")
    parser.add_argument("--tracking-uri", metavar="URI",
                        help="MLflow server (or sqlite:///...) whose study run gets the rebuilt report, metrics and "
                             "verdicts (default: the one the study logged to, kept in its study.json); `none`: "
                             "leave MLflow alone")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    folders = [Path(s).expanduser().resolve() for s in args.studies]
    try:
        loaded = [load_saved(folder) for folder in folders]  # every folder checked before any is rebuilt
    except StudyFolderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names, tables = [], []
    for folder, (study, saved) in zip(folders, loaded):
        table, rows, n_trials = rebuild(folder, study, saved)
        names.append(folder.name if [f.name for f in folders].count(folder.name) == 1 else str(folder))
        tables.append(rows)
        if len(folders) == 1:
            print(table, end="")
        print(f"report: {folder / 'report.md'}")
        uri = args.tracking_uri or saved.get("tracking_uri")
        if uri and uri != "none":
            from ia2ray.study.records import refresh_study_run

            run_id, problems = refresh_study_run(uri, folder, rows, n_trials)
            if run_id:
                print(f"MLflow: {uri}, study run {run_id} updated")
            for line in problems:
                print(f"warning: MLflow: not logged: {line}", file=sys.stderr)
    if len(folders) > 1:
        print(side_by_side(names, tables), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
