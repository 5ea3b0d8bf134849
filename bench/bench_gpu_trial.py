"""One `ia2->sft` trial as a study runs it, on a Llama-3.2-1B-shaped model with random weights: where the
time goes, training tokens/s, peak GPU memory and MFU.

    python bench/bench_gpu_trial.py [--shape llama-1b] [--workers 1] [--n 8] [--epochs 10]
                                    [--peak-tflops 989] [--out bench/results/gpu-trial.json]

Meant for a GPU machine (the `device` tool when a task has one). It builds a random-weight checkpoint of the
shape (bf16 on a GPU; nothing is downloaded; a small BPE tokenizer whose ids the big vocabulary covers),
then runs `run_pipeline` with the Ray Train runner exactly as a search trial does: the teacher captured by
a Ray task, the trial driver loading no weights, one Ray Train run whose worker loads the model once,
trains align then sft on DeepSpeed ZeRO-2 and evaluates on its GPU. `--shape tiny` runs the same code on a
CPU in under a minute (the test suite does that).

Reported: the wall time split (capture, driver setup, worker start, model load, DeepSpeed init, training
per stage, evaluation), training tokens/s (the tokens of every optimiser step's batch over the stages'
training seconds, dev checks included in the time), peak GPU memory of the worker, and MFU = model FLOPs
of the training tokens per training second / `--peak-tflops` (989: dense bf16 of an H100/H200 SXM).
Model FLOPs per token are `bench_align_throughput.model_flops_per_token` at the batches' mean length.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_align_throughput import SHAPES, model_flops_per_token  # noqa: E402
from ia2ray.fileio import write_json_atomic  # noqa: E402


def build_checkpoint(shape: str, out: Path, dtype: torch.dtype) -> None:
    """A random-weight Llama of `shape` with a small BPE tokenizer (its ids lie inside the vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ia2ray.core.tiny import default_corpus, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(default_corpus(), 400)
    cfg = LlamaConfig(**{**SHAPES[shape], "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0})
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (GPUs)")
    parser.add_argument("--n", type=int, default=8, help="N-shot training examples")
    parser.add_argument("--epochs", type=int, default=10, help="train.max_epochs (patience is set out of reach)")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--out", default="bench/results/gpu-trial.json")
    args = parser.parse_args()

    from transformers import AutoConfig

    from ia2ray.config import load_run_config
    from ia2ray.core.model import add_lora
    from ia2ray.core.pipeline import run_pipeline
    from ia2ray.train.launch import ensure_ray
    from ia2ray.train.ray_stages import run_with_ray

    on_gpu = torch.cuda.is_available()
    dtype = "bfloat16" if on_gpu else "float32"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / f"random-{args.shape}"
        start = time.perf_counter()
        build_checkpoint(args.shape, folder, getattr(torch, dtype))
        build_s = time.perf_counter() - start
        sets = [f"model.path={folder}", f"model.dtype={dtype}", "task.name=toy/polarity", f"data.n={args.n}",
                "data.val_size=64", "data.test_size=256", "pipeline=ia2->sft", f"train.num_workers={args.workers}",
                f"train.max_epochs={args.epochs}", "train.patience=1000", "eval.icl_baseline=true",
                "eval.icl_draws=2", f"capture.cache_dir={tmp}/cache", f"train.storage={tmp}/train",
                f"output.dir={tmp}/runs/{{name}}", f"train.use_gpu={str(on_gpu).lower()}", "name=gpu-trial"]
        cfg = load_run_config(None, sets)
        start = time.perf_counter()
        ensure_ray()
        ray_init_s = time.perf_counter() - start
        start = time.perf_counter()
        outcome = run_pipeline(cfg, runner=run_with_ray, progress=False)
        wall = time.perf_counter() - start
        s, w = outcome.summary, outcome.summary["workers"]

        # training tokens: every optimiser step's batch (the stages' items, as the driver built them)
        from ia2ray.core.items import stage_work
        from ia2ray.core.model import load_tokenizer
        from ia2ray.core.rundata import prepare_data
        from ia2ray.core.teacher import cached_teacher_tokens

        tokenizer = load_tokenizer(cfg.model)
        data = prepare_data(cfg)
        _, teacher = cached_teacher_tokens(cfg, tokenizer, data)
        layers = list(range(AutoConfig.from_pretrained(folder).num_hidden_layers))
        works = stage_work(cfg, tokenizer, data, layers, teacher)
        lengths = [len(it.query_ids) + len(it.target_ids) for work in works for it in work.train_items]
        mean_len = sum(lengths) / len(lengths)
        tokens = sum(st["steps"] * cfg.train.batch_size * mean_len for st in s["stages"])
        train_s = sum(st["timings"]["train_s"] for st in s["stages"])
        shape_cfg = AutoConfig.from_pretrained(folder)
        model = add_lora(_meta_model(shape_cfg), cfg.lora)
        lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
        flops = model_flops_per_token(model, shape_cfg, int(round(mean_len)), lora)
        tokens_per_s = tokens / train_s
        achieved = flops * tokens_per_s
        report = {
            "command": "python bench/bench_gpu_trial.py " + " ".join(sys.argv[1:]),
            "device": torch.cuda.get_device_name(0) if on_gpu else f"cpu ({os.cpu_count()} cores, {platform.processor()})",
            "shape": args.shape, "dtype": dtype, "workers": args.workers, "n": args.n,
            "params": sum(p.numel() for p in model.parameters()), "lora_params": lora,
            "wall_s": round(wall, 2), "ray_init_s": round(ray_init_s, 2), "build_checkpoint_s": round(build_s, 2),
            "split_s": {"driver_setup": s["timings"]["setup_s"] + s["timings"]["load_s"],
                        "teacher_and_items": s["timings"]["prepare_s"],
                        "worker_start": w["worker_start_s"], "model_load": w["load_model_s"],
                        "deepspeed_init": sum(st["timings"]["deepspeed_init_s"] for st in s["stages"]),
                        **{f"train_{st['name']}": st["timings"]["train_s"] for st in s["stages"]},
                        "eval": w["eval_s"], "fit_total": s["timings"]["train_stages_s"]},
            "steps": {st["name"]: st["steps"] for st in s["stages"]}, "mean_tokens_per_example": round(mean_len, 1),
            "train_tokens": int(tokens), "train_tokens_per_s": round(tokens_per_s, 1),
            "model_flops_per_token": flops, "achieved_tflops": achieved / 1e12,
            "mfu": achieved / (args.peak_tflops * 1e12) if on_gpu else None, "peak_tflops": args.peak_tflops,
            "peak_gpu_mb": w.get("peak_gpu_mb"), "worker_rss_end_mb": w.get("rss_end_mb"),
            "driver_model_loads": s["driver_model_loads"], "model_loads": s["model_loads"],
            "val_acc": s["val"]["acc"], "test_acc": s["test"]["acc"], "icl_test_acc": s["icl"]["test"]["acc"],
        }
    write_json_atomic(args.out, report)
    mfu = f", MFU {report['mfu']:.2%}" if report["mfu"] is not None else ""
    print(f"{args.shape} {dtype}: trial {wall:.1f} s, {tokens_per_s:,.0f} training tokens/s{mfu}; wrote {args.out}")


def _meta_model(config):
    """The shape's model without memory (for counting parameters and FLOPs)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


if __name__ == "__main__":
    main()
