"""`python -m ia2ray.tune`: an IA2 hyperparameter study with Ray Tune + Optuna.

    python -m ia2ray.tune [--config FILE] [--set key=value ...] [--storage DIR] [--tracking-uri URI]
                          [--resume] [--verbose] [--dry-run]

FILE is a study file (`search_spaces/*.yaml`); without --config the default study runs
(`search_spaces/testbed.yaml`, the built-in testbed model). The study connects to the Ray cluster in
RAY_ADDRESS (as under `ray job submit`) or starts a local one, captures the teacher once per key,
searches with Optuna (val/acc up, val/ece down), confirms the best configs and the baselines on the
test split over seeds, and writes `report.md` into `<storage>/<name>/`. MLflow gets one run per study
with a nested run per trial (see `ia2ray.study.records`). The terminal shows a live view (phase, runs
done / running / failed, time left, the best trials so far); everything else the study and Ray print
goes to `<storage>/<name>/logs/study.log` (with --verbose: to the terminal, as it comes).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Optional

from ia2ray.config import ConfigError, StudyFile
from ia2ray.config.reference import cli_help


def build_parser() -> argparse.ArgumentParser:
    """The command line (also used by the tests to check the cluster configs' entrypoints)."""
    parser = argparse.ArgumentParser(prog="python -m ia2ray.tune", description=__doc__.split("\n\n")[0],
                                     epilog=cli_help(StudyFile), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="study file (default: search_spaces/testbed.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key, e.g. --set study.num_trials=8 (repeatable)")
    parser.add_argument("--storage", metavar="DIR", help="parent folder of studies, or a bucket URI (s3://, gs://) "
                        "(default: study.storage)")
    parser.add_argument("--tracking-uri", metavar="URI",
                        help="MLflow tracking URI (default: study.tracking_uri, $MLFLOW_TRACKING_URI, else "
                             "sqlite:///<storage>/mlflow.db); `none` turns tracking off")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted study of the same name")
    parser.add_argument("--verbose", action="store_true",
                        help="print everything (Ray's and the workers' output, Tune's tables, every warning) "
                             "instead of the live view; without it that goes to <study>/logs/study.log")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate, print the search space, trial count and resources per trial; start nothing")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # Ray folds worker lines that differ only in numbers into one "[repeated Nx across cluster]" line,
    # printed seconds later: every run's line would be lost from the log, and the fold could land on the
    # terminal after the study. Read by Ray when it is imported, in this (the driver's) process.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from ia2ray.study.console import OutputLog, StudyView, ViewHandler, terminal
    from ia2ray.study.driver import dry_run_lines, local_resources, prepare_study, run_study
    from ia2ray.core.model import weight_bytes
    from ia2ray.study.plan import plan_trials
    from ia2ray.tracking import TrackingError

    view = None
    if not args.dry_run:
        out = terminal()
        view = StudyView(out, live=out.isatty() and not args.verbose)
        view.phase("checks")
    try:
        prepared = prepare_study(args.config, args.overrides, args.storage, args.resume, args.tracking_uri)
    except ConfigError as exc:
        if view:
            view.stop()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        plan = plan_trials(prepared.study, prepared.base, local_resources(), weight_bytes(prepared.base.model))
        print("\n".join(dry_run_lines(prepared, plan, "estimated from this machine; a cluster's own resources "
                                      "decide at start")))
        return 0
    if not args.verbose:  # from here everything but the view goes to a log (the study's logs/ once it exists)
        view.output = OutputLog()
        logging.getLogger("ia2ray").addHandler(handler := ViewHandler(view))
    try:
        try:
            outcome = run_study(prepared, args.resume, view)
        except BaseException:
            traceback.print_exc()  # into the log (or the terminal with --verbose)
            raise
        finally:
            if not args.verbose:
                logging.getLogger("ia2ray").removeHandler(handler)
            view.stop()
    except (ConfigError, TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: continue with --resume{where_logged(view)}", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - said plainly, with where the traceback is
        print(f"error: {type(exc).__name__}: {exc}{where_logged(view)}", file=sys.stderr)
        return 1
    print(outcome["table"], end="")
    for err in outcome["errors"]:
        print(f"warning: {err}", file=sys.stderr)
    for line in outcome["tracking"]:
        print(f"warning: MLflow: not logged: {line}", file=sys.stderr)
    print(f"report: {outcome['report']}")
    if view.log_path:
        print(f"log: {view.log_path}")
    return 0


def where_logged(view) -> str:
    return f"\nthe whole log, with the traceback and every worker's output: {view.log_path}" if view.log_path else ""


if __name__ == "__main__":
    raise SystemExit(main())
