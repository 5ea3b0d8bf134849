"""Batched greedy decoding with a KV cache, optionally recording per-step site activations.

The loop pads on the left, passes an explicit attention mask and position ids (so padded rows get
the same positions as when run alone), and feeds one token per row per step through the cache.
Activation j of a sequence is the site output at the position whose next-token prediction
produced generated token j: the last prompt token for j = 0, generated token j-1 afterwards.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ia2ray.core.sites import SITES, ActivationRecorder, base_model


@dataclass
class Generated:
    """One greedy continuation: token ids (G,) and, if recorded, activations [L, G, d] (fp32, CPU) and the
    output distribution at each generated position as its top-k log-probabilities (`top_logp` [G, k] fp32,
    their token ids `top_ids` [G, k]; k = the whole vocabulary when it is smaller than the k asked for).

    Unpacks as a tuple: `token_ids, activations = generated`.
    """

    token_ids: torch.LongTensor
    activations: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logp: torch.Tensor | None = None

    def __iter__(self):
        return iter((self.token_ids, self.activations))


def eos_token_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """Ids that end a sequence: the tokenizer's EOS plus the model's generation_config EOS id(s)."""
    ids: set[int] = set()
    config = getattr(base_model(model), "generation_config", None)
    for value in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    return ids


def hits_stop_string(tokenizer, token_ids: Sequence[int], stop_strings: Iterable[str]) -> bool:
    """True if the decoded text of `token_ids` contains any of `stop_strings`."""
    stop_strings = tuple(stop_strings)
    if not stop_strings:
        return False
    text = tokenizer.decode(list(token_ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return any(stop in text for stop in stop_strings)


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt with the tokenizer's default special tokens; empty -> ValueError."""
    encoded = [list(tokenizer(prompt)["input_ids"]) for prompt in prompts]
    empty = [i for i, ids in enumerate(encoded) if not ids]
    if empty:
        raise ValueError(f"prompts {empty} tokenize to no tokens")
    return encoded


def ids_in_context(tokenizer, prefix: str, continuation: str) -> list[int] | None:
    """Token ids of `continuation` inside the encoding of ``prefix + continuation``, or None when the two
    merge across the boundary (the prefix's own encoding is not a prefix of the joint one), e.g. a
    byte-level tokenizer that keeps a punctuation mark with the letters after it."""
    head = list(tokenizer(prefix)["input_ids"])
    joint = list(tokenizer(prefix + continuation)["input_ids"])
    return joint[len(head) :] if joint[: len(head)] == head else None


def continuation_ids(tokenizer, prefix: str, continuation: str) -> list[int]:
    """Token ids of `continuation` as it tokenizes right after `prefix` (e.g. an answer after its
    query), so training targets and label tokens match what the model sees in demonstrations.

    With SentencePiece-style tokenizers a text tokenizes differently on its own (leading "▁", BOS)
    than in context; the ids are taken from the joint encoding when the prefix's own encoding is a
    prefix of it, else (a merge across the boundary) from the continuation encoded on its own, which
    is what follows the prefix when the model generates after it.
    """
    ids = ids_in_context(tokenizer, prefix, continuation)
    if ids is not None:
        return ids
    return list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (input_ids, attention_mask, position_ids), each [B, T].

    Every row's last token sits at position -1; pads get position 0 and real tokens 0..n-1, so a
    padded row sees the same positions as when it runs alone.
    """
    rows, width = len(prompt_ids), max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    for r, ids in enumerate(prompt_ids):
        input_ids[r, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[r, width - len(ids) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the forward's KV-cache argument: "cache" (transformers >= 5.x) or "past_key_values"."""
    params = inspect.signature(base_model(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def greedy_generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    *,
    stop_strings: Sequence[str] = (),
    batch_size: int = 8,
    site: str | None = None,
    layers: list[int] | None = None,
    progress: Callable[[int], None] | None = None,
    top_k: int | None = None,
) -> list[Generated]:
    """Greedy-decode every prompt; see the module docstring. Results are in `prompts` order.
    With `top_k`, each step's top-k log-probabilities are kept too (`Generated.top_logp`).

    A sequence stops after emitting EOS (kept), once its decoded generated text contains a stop
    string (the completing token kept), or after `max_new_tokens`. Prompts are batched in order of
    length to limit padding. `progress(n_done)` is called after each batch.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if site is not None and site not in SITES:
        raise ValueError(f"unknown activation site {site!r}; expected one of {SITES}")
    encoded = encode_prompts(tokenizer, prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[Generated | None] = [None] * len(prompts)
    recorder = (
        ActivationRecorder(model, site, layers, last_position_only=True) if site is not None else nullcontext()
    )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), recorder:
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                outputs = _generate_batch(
                    model, tokenizer, [encoded[i] for i in batch], max_new_tokens, stop_strings,
                    recorder if site is not None else None, top_k,
                )
                for i, generated in zip(batch, outputs):
                    results[i] = generated
                if progress is not None:
                    progress(start + len(batch))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def _generate_batch(
    model: torch.nn.Module,
    tokenizer,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    stop_strings: Sequence[str],
    recorder: ActivationRecorder | None,
    top_k: int | None = None,
) -> list[Generated]:
    """Decode one batch of tokenized prompts; returns one Generated per prompt."""
    device = next(model.parameters()).device
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)
    rows = len(prompt_ids)

    input_ids, attention_mask, position_ids = (t.to(device) for t in left_pad(prompt_ids, pad_id))
    cache = DynamicCache(config=base_model(model).config)
    cache_arg = cache_kwarg(model)

    tokens: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    step_activations: list[torch.Tensor] = []  # per step: [L, rows, d] on device
    step_top: list[tuple[torch.Tensor, torch.Tensor]] = []  # per step: ([rows, k] ids, [rows, k] log-probs)
    for _ in range(max_new_tokens):
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=True, logits_to_keep=1, **{cache_arg: cache},
        )
        next_tokens = out.logits[:, -1].argmax(-1)
        if recorder is not None:
            step_activations.append(recorder.stack()[:, :, -1])
        if top_k is not None:
            logp = out.logits[:, -1].float().log_softmax(-1)
            values, ids = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
            step_top.append((ids.to(torch.int32), values))
        for r, token in enumerate(next_tokens.tolist()):
            if done[r]:
                continue  # finished rows are fed pad tokens; their outputs are ignored
            tokens[r].append(token)
            done[r] = token in eos_ids or hits_stop_string(tokenizer, tokens[r], stop_strings)
        if all(done):
            break
        # Next step: one new token per row, appended to the mask, at the next position.
        finished = torch.tensor(done, device=device)
        input_ids = torch.where(finished, pad_id, next_tokens)[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((rows, 1))], dim=-1)
        position_ids = position_ids[:, -1:] + 1

    activations = torch.stack(step_activations, dim=2).float().cpu() if step_activations else None
    top_ids = torch.stack([i for i, _ in step_top], dim=1).cpu() if step_top else None  # [rows, steps, k]
    top_logp = torch.stack([v for _, v in step_top], dim=1).cpu() if step_top else None
    return [
        Generated(
            token_ids=torch.tensor(tokens[r], dtype=torch.long),
            activations=None if activations is None else activations[:, r, : len(tokens[r])].clone(),
            top_ids=None if top_ids is None else top_ids[r, : len(tokens[r])].clone(),
            top_logp=None if top_logp is None else top_logp[r, : len(tokens[r])].clone(),
        )
        for r in range(rows)
    ]
