"""`python -m ia2ray.testbed`: build (or reuse) the ICL testbed model and report held-out metrics.

    python -m ia2ray.testbed [--report-json PATH] [--seed S] [--out DIR] [--rebuild] [--device D]

Which model: ``--out DIR`` if given; else the shipped model (ia2ray/testbed/model) when it was built
with this recipe and seed; else a cache directory ($IA2RAY_HOME/models/testbed-seed<S>). A complete
build of the same recipe there is reused; otherwise (or with ``--rebuild``) the recipe trains a
new model into it (~7 minutes on 2 CPU cores). ``--rebuild`` without ``--out`` never overwrites the
shipped model: it builds into the cache directory. Then the model is loaded through the normal
path and evaluated on the held-out tasks (zero-shot vs ICL at N = 2, 4, 8).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ia2ray.fileio import ia2ray_home, write_json_atomic
from ia2ray.testbed import testbed_model_path
from ia2ray.testbed.recipe import Recipe, build, read_recipe

console = Console(stderr=True)


def target_dir(recipe: Recipe, out: Optional[str], rebuild: bool) -> Path:
    """Where the model for ``recipe`` lives or will be built (see the module docstring)."""
    if out is not None:
        return Path(out)
    shipped = testbed_model_path()
    if not rebuild and read_recipe(shipped) == recipe:
        return shipped
    return ia2ray_home() / "models" / f"testbed-seed{recipe.seed}"


def ensure_model(recipe: Recipe, out_dir: Path, rebuild: bool, device: str = "cpu") -> bool:
    """Build ``recipe`` into ``out_dir`` unless a complete build of it is there; True if built.

    A non-empty ``out_dir`` that is not a testbed build is never overwritten (ValueError)."""
    found = read_recipe(out_dir)
    if found == recipe and not rebuild:
        return False
    if found is None and out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty and holds no testbed build; refusing to overwrite it")
    from ia2ray.testbed.report import heldout_report

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("pretraining", total=recipe.steps)

        def on_step(step: int, loss: float) -> None:
            progress.update(bar, completed=step + 1, description=f"pretraining loss={loss:.3f}")

        build(recipe, out_dir, on_step, lambda model, tok: heldout_report(model, tok, device=device), device)
    return True


def evaluate_dir(model_dir: Path, device: str) -> dict[str, Any]:
    """Load ``model_dir`` through the library's model path and compute the held-out report."""
    from ia2ray.config.schema import ModelConfig
    from ia2ray.core.model import load_model
    from ia2ray.testbed.report import heldout_report

    model, tokenizer = load_model(ModelConfig(path=str(model_dir)), device)
    return heldout_report(model, tokenizer, device=device)


def print_report(report: dict[str, Any]) -> None:
    """The per-N table of held-out label-task averages, and the multi-token accuracies."""
    table = Table(title=f"held-out tasks ({', '.join(report['averaged_over'])}): zero-shot vs ICL")
    for col in ("N", "zero-shot acc", "zero-shot ECE", "ICL acc", "ICL ECE", "label chance", "copy-majority acc"):
        table.add_column(col, justify="right")
    for n in report["icl_acc"]:
        table.add_row(n, *(f"{report[k][n]:.3f}" for k in ("zero_shot_acc", "zero_shot_ece", "icl_acc", "icl_ece",
                                                           "label_chance", "copy_majority_acc")))
    console.print(table)
    for name, accs in report["multi_token_acc"].items():
        console.print(f"{name} (multi-token, accuracy): " + ", ".join(f"{k}: {v:.3f}" for k, v in accs.items()))
    console.print(f"model: {report['model_path']}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ia2ray.testbed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--report-json", metavar="PATH", help="write the held-out report here")
    parser.add_argument("--seed", type=int, default=Recipe().seed, help="recipe seed (default: the shipped one)")
    parser.add_argument("--out", metavar="DIR", help="model directory to reuse or build into")
    parser.add_argument("--rebuild", action="store_true", help="train a new model even if one is present")
    parser.add_argument("--device", default="cpu", help="torch device for training and evaluation (default cpu)")
    args = parser.parse_args(argv)

    recipe = Recipe(seed=args.seed)
    out_dir = target_dir(recipe, args.out, args.rebuild)
    started = time.perf_counter()
    try:
        built = ensure_model(recipe, out_dir, args.rebuild, args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    console.print(f"{'built' if built else 'reusing'} testbed model in {out_dir} ({time.perf_counter() - started:.0f} s)")
    saved = json.loads((out_dir / "report.json").read_text())
    # a fresh build already evaluated its model (report.json); a reused one is evaluated as loaded
    report = saved if built else evaluate_dir(out_dir, args.device)
    report = {**report, "model_path": str(out_dir.resolve()), "reused": not built, "recipe": recipe.to_dict(),
              "build": saved.get("build", {})}
    print_report(report)
    if args.report_json:
        write_json_atomic(args.report_json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
