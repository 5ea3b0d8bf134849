"""Alignment-stage throughput (tokens/s) and model FLOP utilisation under DeepSpeed ZeRO-2.

    python bench/bench_align_throughput.py [--shape llama-1b] [--precision bf16] [--batch 8] [--seq 512]
                                           [--steps 20] [--out bench/results/align-throughput-gpu.json]

Meant for a GPU machine: a Llama-3.2-1B-shaped model with random weights (nothing is downloaded),
LoRA rank 8 on q, k, o, all 16 layers aligned to random teacher activations at the last G positions
of each sequence, the same `stage_loss` and DeepSpeed engine the Ray Train workers use (one process,
world size 1). `--shape tiny --precision fp32` runs the same code on a CPU in seconds (the test
suite does that).

Reported: median step time over `--steps` timed steps after 3 warm-up steps; tokens/s = batch x seq
/ step time; model FLOPs per token = 4 x (frozen parameters touched by the forward, embeddings
excluded) + LoRA FLOPs + attention (2 x 2 x seq x hidden per layer forward, doubled for backward).
The factor is 4, not the usual 6: the base weights are frozen, so the backward computes activation
gradients but no weight gradients (LoRA's are counted in its own term). MFU = achieved FLOP/s /
peak dense bf16 FLOP/s of the GPU (`--peak-tflops`, default 989 for an H100/H200 SXM).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ia2ray.config.schema import LoraConfig, TrainConfig  # noqa: E402
from ia2ray.core.batches import TrainItem, collate  # noqa: E402
from ia2ray.core.model import add_lora  # noqa: E402
from ia2ray.core.objective import StageObjective, stage_loss  # noqa: E402
from ia2ray.fileio import write_json_atomic  # noqa: E402

SHAPES = {  # Llama-3.2-1B and a CPU-sized stand-in
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}


def model_flops_per_token(model, cfg, seq: int, lora_params: int) -> float:
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lora_" not in n
               and "norm" not in n)
    attention = 2 * 2 * seq * cfg.hidden_size * cfg.num_hidden_layers  # QK^T and AV, forward, per token
    return 4 * body + 6 * lora_params + 2 * attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--g", type=int, default=1, help="aligned positions per sequence (G)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--out", default="bench/results/align-throughput-gpu.json")
    args = parser.parse_args()

    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    on_gpu = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")

    cfg = LlamaConfig(**SHAPES[args.shape])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16 if args.precision == "bf16" else torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    model = add_lora(model, LoraConfig(rank=8, alpha=8, targets=["q_proj", "k_proj", "o_proj"]), seed=0)
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops_per_token = model_flops_per_token(model, cfg, args.seq, lora_params)

    train = TrainConfig(batch_size=args.batch, precision=args.precision, zero_stage=2)
    from ia2ray.train.dsconfig import deepspeed_config

    ds = deepspeed_config(train, world_size=1, on_gpu=on_gpu)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, dist_init_required=False)

    layers = tuple(range(cfg.num_hidden_layers))
    objective = StageObjective(kind="align", layers=layers)
    gen = torch.Generator().manual_seed(0)
    query = args.seq - args.g + 1
    items = [TrainItem(torch.randint(3, cfg.vocab_size, (query,), generator=gen).tolist(),
                       torch.randint(3, cfg.vocab_size, (args.g,), generator=gen).tolist(),
                       torch.randn(cfg.num_hidden_layers, args.g, cfg.hidden_size, generator=gen))
             for _ in range(args.batch)]
    batch = collate(items, 0, list(layers)).to(device)
    tokens = batch.input_ids.numel()

    def step() -> float:
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = stage_loss(engine.module, batch, objective)
        engine.backward(loss)
        engine.step()
        if on_gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(3):
        step()
    times = [step() for _ in range(args.steps)]
    median = statistics.median(times)
    tokens_per_s = tokens / median
    achieved = flops_per_token * tokens_per_s
    report = {
        "command": "python bench/bench_align_throughput.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(0) if on_gpu else f"cpu ({os.cpu_count()} cores, {platform.processor()})",
        "shape": args.shape, "params": sum(p.numel() for p in model.parameters()), "lora_params": lora_params,
        "precision": args.precision, "zero_stage": 2, "batch": args.batch, "seq": tokens // args.batch, "g": args.g,
        "aligned_layers": len(layers), "step_s_median": median, "step_s_all": times, "tokens_per_s": tokens_per_s,
        "model_flops_per_token": flops_per_token, "achieved_tflops": achieved / 1e12,
        "mfu": achieved / (args.peak_tflops * 1e12) if on_gpu else None, "peak_tflops": args.peak_tflops,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
    }
    write_json_atomic(args.out, report)
    mfu = f", MFU {report['mfu']:.1%}" if report["mfu"] is not None else ""
    print(f"{args.shape} {args.precision}: {tokens_per_s:,.0f} tokens/s, {achieved / 1e12:.2f} TFLOP/s{mfu}; wrote {args.out}")


if __name__ == "__main__":
    main()
