"""What activation similarity costs a trial: its seconds against the run's compute (training + evaluation).

Two sources, both one process, no Ray:
- default: a study's trial shape (`--config`, default search_spaces/testbed.yaml: testbed/map4, N=8;
  validation only, no ICL baseline), run in process `--repeats` times per pipeline (`--pipelines`) after
  one warm-up; the teacher entries are captured by the warm-up, so the runs time what a study trial does.
- `--study DIR`: every run summary of a finished study folder (e.g. the SmolLM2 analysis study).

Writes bench/results/similarity-cpu.json (or `--out`): per run the similarity seconds, the training and
evaluation seconds, and the share sim_s / (train_stages_s + eval_s); the target is a share under 10%.

    python bench/bench_similarity.py
    python bench/bench_similarity.py --config search_spaces/smollm2-sst2.yaml --set task.path=../shared/data/sst2/train.jsonl \
        --set task.eval_path=../shared/data/sst2/validation.jsonl --pipelines ia2 --repeats 1 --out bench/results/similarity-smollm2-trial.json
    python bench/bench_similarity.py --study /tmp/studyruns-analysis/smollm2-sst2-analysis --out bench/results/similarity-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def share(timings: dict) -> dict:
    compute = timings.get("train_stages_s", 0.0) + timings.get("eval_s", 0.0)
    return {"sim_s": timings["sim_s"], "train_stages_s": timings.get("train_stages_s", 0.0),
            "eval_s": timings.get("eval_s", 0.0), "share": timings["sim_s"] / compute if compute else None}


def from_study(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.glob("runs/*/summary.json")):
        s = json.loads(path.read_text())
        if "sim_s" in (s.get("timings") or {}):
            out.append({"run": s["name"], "pipeline": s["pipeline"], **share(s["timings"])})
    return out


def from_study_config(config: Path, overrides: list[str], pipelines: list[str], repeats: int) -> list[dict]:
    """A study's trial shape (its run config, validation only, no ICL baseline), in this process."""
    sys.path.insert(0, str(ROOT))
    from ia2ray.config.load import load_study_file, study_defaults
    from ia2ray.core.pipeline import run_pipeline

    study, where = load_study_file(config, overrides)
    base = study_defaults(study, where)
    out = []
    with tempfile.TemporaryDirectory() as cache:
        for pipeline in pipelines:
            cfg = base.model_copy(update={"pipeline": pipeline, "capture": base.capture.model_copy(update={"cache_dir": cache}),
                                          "eval": base.eval.model_copy(update={"icl_baseline": False})})
            run_pipeline(cfg, progress=False, splits=("val",), keep_model=True)  # warm-up: teacher capture, model load
            for i in range(repeats):
                s = run_pipeline(cfg, progress=False, splits=("val",), keep_model=True).summary
                out.append({"run": f"{pipeline}-{i}", "pipeline": pipeline, **share(s["timings"])})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, help="a finished study folder to read the run summaries of")
    ap.add_argument("--config", type=Path, default=ROOT / "search_spaces" / "testbed.yaml",
                    help="the study whose trial shape is timed (default: the default study)")
    ap.add_argument("--set", action="append", default=[], help="config override, as for python -m ia2ray.tune")
    ap.add_argument("--pipelines", default="sft,ia2,ia2->sft")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "similarity-cpu.json")
    args = ap.parse_args()
    runs = (from_study(args.study) if args.study
            else from_study_config(args.config, args.set, args.pipelines.split(","), args.repeats))
    if not runs:
        print("no run with similarity timings found", file=sys.stderr)
        return 1
    shares = [r["share"] for r in runs if r["share"] is not None]
    result = {"source": str(args.study) if args.study else f"{args.config} run config {args.set}, in process",
              "command": "python " + " ".join(sys.argv),
              "runs": runs, "median_share": statistics.median(shares), "max_share": max(shares),
              "median_sim_s": statistics.median(r["sim_s"] for r in runs)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(runs)} runs: similarity takes a median {100 * result['median_share']:.1f}% (max "
          f"{100 * result['max_share']:.1f}%) of training + evaluation; median {result['median_sim_s']:.3f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
