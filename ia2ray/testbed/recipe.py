"""The testbed recipe: tokenizer, a small Llama, and the pretraining loop that makes ICL emerge.

Read top to bottom: :class:`Recipe` (every knob, saved as ``recipe.json``), :func:`build_tokenizer`,
:func:`build_model`, :func:`encode_batch` (targets = answer tokens), :func:`pretrain` (the loop),
:func:`build` (everything, saved atomically).

Why it works (see also ia2ray/data/testbed.py):

- Loss only on the answer tokens (each item's label word(s) and the blank line or EOS after it).
  The input words of a task are uniform draws, so predicting them is noise; the answer positions
  carry all of the in-context signal, and every demo's answer is itself a k-shot prediction, so
  one sequence of 10 items trains 0..9-shot prediction at once (N = 8 prompts hold 7 demos). Every
  sequence has the same number of items, so a batch has little padding. The blank line / EOS
  after an answer is a target too, so multi-token answers stop where they should.
- A share of tasks (``mix.p_global`` = 30%) use one fixed class -> label mapping: that in-weights
  signal teaches the model which words form a class, which the in-context circuit (find a demo of
  the query's class, copy its label) needs before it can emerge. With random mappings only, a
  prototype of this model stayed at label chance for 5000 steps (DESIGN.md); with the mix, held-out
  ICL accuracy jumps from chance to ~0.8-0.9 between steps ~1000 and ~1300 of the 2000.
- AdamW (betas 0.9/0.95, weight decay on matrices only), lr 2e-3 with 100 warmup steps and cosine
  decay to 2e-4, gradient clipping at 1: the usual small-transformer settings; lr 2e-3 is the
  prototype's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from ia2ray.core.tiny import tiny_config, train_bpe_tokenizer
from ia2ray.data.testbed import CONCEPT_CLASSES, LABEL_WORDS, MixConfig, PretrainSequence, sample_sequence
from ia2ray.fileio import atomic_dir, write_json_atomic

IGNORE = -100


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the built model (with the code): saved as ``recipe.json``."""

    seed: int = 0
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 128
    max_vocab: int = 2048  # BPE stops earlier, once every word of the corpus is one token
    tokenizer_sequences: int = 3000
    steps: int = 2000
    batch_size: int = 64
    micro_batch: int = 32  # the batch is sorted by length and run in chunks of this size
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    mix: MixConfig = field(default_factory=MixConfig)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["mix"]["class_names"] = list(out["mix"]["class_names"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        data = dict(data)
        mix = dict(data.pop("mix", {}))
        if "class_names" in mix:
            mix["class_names"] = tuple(mix["class_names"])
        return cls(mix=MixConfig(**mix), **data)


def build_tokenizer(recipe: Recipe) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on sampled testbed sequences plus every word once per line, so each
    concept and label word is a single token after a space (checked in the tests)."""
    rng = random.Random(f"testbed-tokenizer:{recipe.seed}")
    corpus = [sample_sequence(rng, recipe.mix).text for _ in range(recipe.tokenizer_sequences)]
    words = [w for ws in CONCEPT_CLASSES.values() for w in ws] + list(LABEL_WORDS)
    corpus += ["Text: " + " ".join(words) + "\nLabel: " + " ".join(words)] * 50
    return train_bpe_tokenizer(corpus, vocab_size=recipe.max_vocab)


def build_model(recipe: Recipe, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A random-init Llama sized to the tokenizer, initialised from ``recipe.seed``."""
    config = tiny_config("llama", len(tokenizer), recipe.hidden_size, recipe.num_layers, recipe.num_heads,
                         intermediate_size=recipe.intermediate_size, max_position_embeddings=1024)
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config)


def encode_batch(tokenizer: PreTrainedTokenizerFast, seqs: list[PretrainSequence]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) [B, T], right-padded; labels are the token ids inside a sequence's
    target spans plus the appended EOS, IGNORE elsewhere (unshifted: the model shifts them)."""
    enc = tokenizer([s.text for s in seqs], add_special_tokens=False, return_offsets_mapping=True)
    eos = tokenizer.eos_token_id
    width = max(len(ids) for ids in enc["input_ids"]) + 1
    input_ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for row, (seq, ids, offsets) in enumerate(zip(seqs, enc["input_ids"], enc["offset_mapping"])):
        ids = list(ids) + [eos]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        for j, (start, _) in enumerate(offsets):
            if any(a <= start < b for a, b in seq.target_spans):
                labels[row, j] = ids[j]
        labels[row, len(ids) - 1] = eos
    return input_ids, labels


def lr_at(recipe: Recipe, step: int) -> float:
    """Linear warmup, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    t = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def pretrain(
    recipe: Recipe,
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    on_step: Optional[Callable[[int, float], None]] = None,
    device: str = "cpu",
) -> list[float]:
    """The pretraining loop (AdamW, cross-entropy on target tokens); returns the loss per step."""
    rng = random.Random(f"testbed-pretrain:{recipe.seed}")
    torch.manual_seed(recipe.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.95),
    )
    model.to(device).train()
    losses: list[float] = []
    for step in range(recipe.steps):
        seqs = [sample_sequence(rng, recipe.mix) for _ in range(recipe.batch_size)]
        seqs.sort(key=lambda s: len(s.text))  # chunks of similar length: less padding
        chunks = [encode_batch(tokenizer, seqs[i : i + recipe.micro_batch])
                  for i in range(0, len(seqs), recipe.micro_batch)]
        n_targets = sum(int((labels[:, 1:] != IGNORE).sum()) for _, labels in chunks)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for input_ids, labels in chunks:  # gradient accumulation: mean over all target tokens
            input_ids, labels = input_ids.to(device), labels.to(device)
            logits = model(input_ids=input_ids).logits
            chunk_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                         ignore_index=IGNORE, reduction="sum") / n_targets
            chunk_loss.backward()
            loss_sum += chunk_loss.item()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(recipe, step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        losses.append(loss_sum)
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


def build(
    recipe: Recipe,
    out_dir: str | Path,
    on_step: Optional[Callable[[int, float], None]] = None,
    evaluate_fn: Optional[Callable[[LlamaForCausalLM, PreTrainedTokenizerFast], dict]] = None,
    device: str = "cpu",
) -> Path:
    """Train the testbed per ``recipe`` and save it atomically into ``out_dir``: model and tokenizer
    (``save_pretrained``, safetensors), ``recipe.json`` and ``report.json`` (from ``evaluate_fn``,
    which also gets the build time). ``out_dir`` is either the old directory or the complete new one."""
    out_dir = Path(out_dir)
    started = time.perf_counter()
    tokenizer = build_tokenizer(recipe)
    model = build_model(recipe, tokenizer)
    losses = pretrain(recipe, model, tokenizer, on_step, device)
    train_seconds = time.perf_counter() - started
    report: dict[str, Any] = evaluate_fn(model, tokenizer) if evaluate_fn is not None else {}
    report["build"] = {"train_seconds": round(train_seconds, 1), "final_loss": round(sum(losses[-50:]) / min(50, len(losses)), 4),
                       "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer)}
    report["model_path"] = str(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.to("cpu").save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "recipe.json", recipe.to_dict())
        write_json_atomic(tmp / "report.json", report)
        tmp.chmod(0o755)  # temp files and dirs are private; the model is meant to be shared
        for path in tmp.iterdir():
            path.chmod(0o644)
    return out_dir


def read_recipe(model_dir: str | Path) -> Optional[Recipe]:
    """The recipe a model directory was built with, or None when it holds no complete build."""
    path = Path(model_dir)
    if not (path / "recipe.json").is_file() or not (path / "model.safetensors").is_file():
        return None
    return Recipe.from_dict(json.loads((path / "recipe.json").read_text()))
