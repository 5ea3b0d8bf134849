"""Teacher activation capture: the model WITH demonstrations decodes greedily, and the site's
outputs at the G aligned positions (last prompt token + every generated token but the last) are
recorded per layer.

`capture_icl_activations` is the fast path (batched, KV cache). `capture_reference` is the IA2
reference procedure (one prompt at a time, full re-forward per generated token, no cache): slow,
kept as the ground truth the fast path is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ia2ray.core.generate import (
    Generated,
    encode_prompts,
    eos_token_ids,
    greedy_generate,
    hits_stop_string,
)
from ia2ray.core.sites import SITES, ActivationRecorder


def capture_icl_activations(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    *,
    site: str = "attn_out",
    batch_size: int = 8,
    stop_strings: Sequence[str] = (),
    layers: list[int] | None = None,
    progress: bool = False,
    top_k: int | None = None,
) -> list[Generated]:
    """Greedy responses and their activations [L, G_i, d] (fp32, CPU) for every prompt; with `top_k`
    also the teacher's top-k log-probabilities at each response position (for soft-label KD).

    `progress=True` shows a rich progress bar over prompts.
    """
    if not progress:
        return greedy_generate(
            model, tokenizer, prompts, max_new_tokens, stop_strings=stop_strings,
            batch_size=batch_size, site=site, layers=layers, top_k=top_k,
        )
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(f"capturing {site} activations", total=len(prompts))
        return greedy_generate(
            model, tokenizer, prompts, max_new_tokens, stop_strings=stop_strings,
            batch_size=batch_size, site=site, layers=layers, top_k=top_k,
            progress=lambda n_done: bar.update(task, completed=n_done),
        )


def capture_reference(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    *,
    site: str = "attn_out",
    stop_strings: Sequence[str] = (),
    layers: list[int] | None = None,
) -> list[Generated]:
    """The slow reference: per prompt, per token, a full forward over prompt + generated so far
    (no padding, no cache); the activation is the site output at the last position."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if site not in SITES:
        raise ValueError(f"unknown activation site {site!r}; expected one of {SITES}")
    device = next(model.parameters()).device
    eos_ids = eos_token_ids(model, tokenizer)
    results = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), ActivationRecorder(model, site, layers) as recorder:
            for prompt_ids in encode_prompts(tokenizer, prompts):
                generated: list[int] = []
                activations: list[torch.Tensor] = []
                for _ in range(max_new_tokens):
                    input_ids = torch.tensor([prompt_ids + generated], device=device)
                    logits = model(input_ids=input_ids, use_cache=False).logits
                    activations.append(recorder.stack()[:, 0, -1].float().cpu())  # [L, d]
                    token = int(logits[0, -1].argmax())
                    generated.append(token)
                    if token in eos_ids or hits_stop_string(tokenizer, generated, stop_strings):
                        break
                results.append(
                    Generated(torch.tensor(generated, dtype=torch.long), torch.stack(activations, dim=1))
                )
    finally:
        model.train(was_training)
    return results
