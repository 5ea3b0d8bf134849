"""`python -m ia2ray.run`: one IA2 configuration end to end in one process (no Ray).

    python -m ia2ray.run [--config FILE] [--set key=value ...] [--json PATH] [--print-config]

FILE is a run config or a study file from search_spaces/ (searched parameters take their defaults).
Without --config the default config runs (the built-in testbed model on testbed/map2).
`--set train.num_workers=2` trains the stages as a Ray Train run with DeepSpeed ZeRO (stage from
`train.zero_stage` / `train.deepspeed`); 0, the default, trains in this process.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ia2ray.config import ConfigError, RunConfig, dump_yaml, load_run_config
from ia2ray.config.reference import cli_help, example_yaml
from ia2ray.fileio import write_json_atomic, write_text_atomic

console = Console(stderr=True)


def config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config / --set, shared by the entry points."""
    parser.add_argument("--config", metavar="FILE", help="YAML run config or study file (default: built-in default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set lora.rank=16 (repeatable)")


def load_config_or_exit(args: argparse.Namespace) -> RunConfig:
    """Load and validate; on any problem print all of them and exit with status 2."""
    try:
        return load_run_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _stage_progress(progress: Progress, cfg: RunConfig, n_train: int):
    """An on_log callback that drives one progress bar per stage (upper bound: max_epochs)."""
    steps_per_epoch = -(-n_train // cfg.train.batch_size)
    bars: dict[str, int] = {}

    def on_log(stage: str, metrics: dict) -> None:
        if stage not in bars:
            bars[stage] = progress.add_task(f"train {stage}", total=steps_per_epoch * cfg.train.max_epochs)
        if "train_loss" in metrics:
            progress.update(bars[stage], completed=metrics["step"], description=f"train {stage} loss={metrics['train_loss']:.4g}")

    return on_log


def print_summary(summary: dict) -> None:
    table = Table(title=f"{summary['name']}: {summary['pipeline']} on {summary['task']} (N={summary['n']}, seed={summary['seed']})")
    for col in ("model", "split", "acc", f"ece ({summary['ece_scheme']})", "nll", "brier"):
        table.add_column(col)
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    splits = ["val", "test", *sorted(k for k in summary if k.startswith("ood/"))]  # out-of-domain targets last
    rows = [("icl", s, summary["icl"][s]) for s in splits] if "icl" in summary else []
    rows += [(summary["pipeline"], s, summary[s]) for s in splits]
    for name, split, m in rows:
        table.add_row(name, split, fmt(m.get("acc")), fmt(m.get("ece")), fmt(m.get("nll")), fmt(m.get("brier")))
    Console().print(table)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ia2ray.run", description=__doc__.split("\n\n")[0],
                                     epilog=cli_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    config_arguments(parser)
    parser.add_argument("--json", metavar="PATH", help="also write the summary JSON here")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--example-config", action="store_true", help="print every key with its default and help, and exit")
    args = parser.parse_args(argv)
    if args.example_config:
        print(example_yaml(), end="")
        return 0
    cfg = load_config_or_exit(args)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    # Heavy imports only after the config is known to be valid.
    from ia2ray.core.pipeline import run_pipeline
    from ia2ray.core.rundata import prepare_data
    from ia2ray.core.teacher import cache_location
    from ia2ray.data.loaders import DataError
    from ia2ray.mirror import bucket_sync

    try:
        data = prepare_data(cfg)  # every bad data row is reported here, before any model loads
    except (DataError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    kwargs = {"sync": bucket_sync(cache_location(cfg))}
    if cfg.train.num_workers >= 1:  # Ray Train + DeepSpeed; 0 keeps the single-process loop
        from ia2ray.train.ray_stages import check_train_config, run_with_ray

        try:
            check_train_config(cfg)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        kwargs["runner"] = run_with_ray
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            on_log = _stage_progress(progress, cfg, len(data.splits.train))
            outcome = run_pipeline(cfg, data=data, on_log=on_log, **kwargs)
    except ConfigError as exc:  # model-dependent checks (preflight), raised before any weights load
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = outcome.summary

    out_dir = cfg.output.dir.format(name=cfg.name)
    write_text_atomic(f"{out_dir}/config.yaml", dump_yaml(cfg))
    write_text_atomic(f"{out_dir}/history.jsonl", "".join(json.dumps(h) + "\n" for h in outcome.history))
    outcome.save_adapter(f"{out_dir}/adapter")
    write_json_atomic(f"{out_dir}/answers.json", outcome.answers)
    summary["output_dir"] = out_dir
    write_json_atomic(f"{out_dir}/summary.json", summary)
    if args.json:
        write_json_atomic(args.json, summary)
    print_summary(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
