"""Core benchmarks on small random models (CPU by default), all ratios measured in one run.

    python bench/bench_core.py [--out bench/results/core-cpu.json] [--quick]

1. Teacher capture: batched KV-cached decoding (`capture_icl_activations`) against the slow reference
   procedure (`capture_reference`: one prompt at a time, full re-forward per generated token), for
   16 prompts of 40-120 tokens, batch size 8, over G and two model sizes.
2. One optimiser step of the alignment stage against one SFT step on the same batch (teacher cached).
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ia2ray.fileio import write_json_atomic  # noqa: E402
from ia2ray.config.schema import LoraConfig  # noqa: E402
from ia2ray.core.batches import TrainItem, collate  # noqa: E402
from ia2ray.core.capture import capture_icl_activations, capture_reference  # noqa: E402
from ia2ray.core.model import add_lora  # noqa: E402
from ia2ray.core.objective import StageObjective, stage_loss  # noqa: E402
from ia2ray.core.tiny import default_corpus, tiny_config, train_bpe_tokenizer  # noqa: E402


def no_eos_tokenizer(base: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Same vocabulary, but no EOS: every prompt decodes exactly G tokens."""
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer)
    tok.pad_token = base.eos_token
    return tok


def random_model(vocab: int, hidden: int, layers: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_config("llama", vocab, hidden_size=hidden, num_layers=layers, num_heads=max(4, hidden // 64))
    cfg.eos_token_id = None
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = None
    return model


def prompts_of_lengths(tok, n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    """`n` prompts whose token counts are spread over [lo, hi]."""
    rng = random.Random(seed)
    words = " ".join(default_corpus(200, seed)).split()
    out = []
    for i in range(n):
        target = lo + (hi - lo) * i // max(n - 1, 1)
        text = ""
        while len(tok(text)["input_ids"]) < target:
            text += rng.choice(words) + " "
        out.append(text)
    return out


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_capture(tok, sizes, gs, quick: bool) -> list[dict]:
    rows = []
    prompts = prompts_of_lengths(tok, 16, 40, 120)
    for hidden, layers in sizes:
        model = random_model(len(tok), hidden, layers)
        for g in gs:
            capture_icl_activations(model, tok, prompts[:2], 2, batch_size=2)  # warm-up
            fast = timed(lambda: capture_icl_activations(model, tok, prompts, g, batch_size=8))
            slow = timed(lambda: capture_reference(model, tok, prompts, g))  # both timed once
            rows.append({"hidden": hidden, "layers": layers, "G": g, "prompts": len(prompts), "batch_size": 8,
                         "fast_s": round(fast, 3), "reference_s": round(slow, 3), "speedup": round(slow / fast, 2)})
            print(f"capture hidden={hidden} layers={layers} G={g}: fast {fast:.2f}s, reference {slow:.2f}s, "
                  f"x{slow / fast:.1f}", flush=True)
    return rows


def bench_steps(tok, hidden: int, layers: int, g: int, repeat: int, model=None, prompts=None) -> dict:
    """Median wall time of one optimiser step (forward, backward, Adam) for align vs sft (on a random
    model of that shape, or on `model` with `prompts`)."""
    model = model if model is not None else random_model(len(tok), hidden, layers)
    prompts = prompts or prompts_of_lengths(tok, 4, 40, 80, seed=1)
    teacher = capture_icl_activations(model, tok, prompts, g)
    items = [TrainItem(tok(p)["input_ids"], t.token_ids.tolist(), t.activations) for p, t in zip(prompts, teacher)]
    peft = add_lora(model, LoraConfig(rank=8), seed=0)
    opt = torch.optim.Adam([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
    peft.train()
    result = {"hidden": hidden, "layers": layers, "G": g, "batch": len(items)}
    objectives = {"align": StageObjective("align"), "sft": StageObjective("sft"),
                  "align_layer0": StageObjective("align", layers=(0,))}  # stops after layer 0
    times = {kind: [] for kind in objectives}
    batches = {kind: collate(items, tok.pad_token_id, list(obj.layers) if obj.layers else None)
               for kind, obj in objectives.items()}
    for i in range(repeat * len(objectives) + len(objectives)):  # interleaved: drift affects all alike
        kind = list(objectives)[i % len(objectives)]
        t0 = time.perf_counter()
        loss = stage_loss(peft, batches[kind], objectives[kind])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= len(objectives):  # the first round is warm-up
            times[kind].append(time.perf_counter() - t0)
    for kind, ts in times.items():
        result[f"{kind}_step_ms"] = round(1000 * statistics.median(ts), 2)
    result["align_over_sft"] = round(result["align_step_ms"] / result["sft_step_ms"], 3)
    result["align_layer0_over_align"] = round(result["align_layer0_step_ms"] / result["align_step_ms"], 3)
    print(f"step hidden={hidden} layers={layers} G={g}: align {result['align_step_ms']} ms, "
          f"sft {result['sft_step_ms']} ms, ratio {result['align_over_sft']}; align on layer 0 only "
          f"{result['align_layer0_step_ms']} ms", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results/core-cpu.json")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    tok = no_eos_tokenizer(train_bpe_tokenizer(default_corpus(400, 0), vocab_size=400))

    gs = [8, 64] if args.quick else [1, 8, 16, 32, 64]
    sizes = [(256, 4)] if args.quick else [(256, 4), (512, 8)]
    capture = bench_capture(tok, sizes, gs, args.quick)
    steps = [bench_steps(tok, 256, layers, g, 5 if args.quick else 20)
             for layers, g in ([(4, 1)] if args.quick else [(4, 1), (4, 16), (8, 16)])]
    report = {
        "command": "python bench/bench_core.py" + (" --quick" if args.quick else ""),
        "machine": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "device": "cpu"},
        "capture": capture,
        "steps": steps,
    }
    write_json_atomic(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
