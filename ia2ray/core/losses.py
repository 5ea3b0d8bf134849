"""IA2 losses: activation alignment, cross-entropy on answer tokens, their convex mix, and soft-label KD.

Shapes: activations are [L, B, G, d] (aligned layers, batch, aligned positions, hidden) with a
position mask [B, G] (rows have different G). Every loss is computed per example and then averaged
over the batch, so a batch of B equals B single-example steps with gradient accumulation (the
reference trains one example per forward pass).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

ALIGN_LOSSES = ("mse", "nmse", "cosine")


def masked_token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[..., B]: the mean of `values` [..., B, G] over each example's real positions (`mask` [B, G])."""
    m = mask.to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1).clamp_min(1)


def alignment_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "mse",
    layer_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-layer alignment error summed over layers (weighted), averaged over the batch.

    - `mse` (the paper's): mean squared error over tokens x hidden, summed over layers, i.e.
      `mse_loss(student[L,G,d], teacher[L,G,d]) * L` for one example.
    - `nmse`: each layer's MSE divided by the teacher's mean squared activation on that layer.
    - `cosine`: 1 - cosine similarity over the hidden dim, averaged over tokens.
    """
    if kind not in ALIGN_LOSSES:
        raise ValueError(f"unknown alignment loss {kind!r}; expected one of {ALIGN_LOSSES}")
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")
    student = student.float()
    teacher = teacher.float()
    m = mask.to(student.dtype)  # [B, G]
    tokens = m.sum(dim=1).clamp_min(1)  # [B]
    hidden = student.shape[-1]
    if kind == "cosine":
        per_layer = masked_token_mean(1 - F.cosine_similarity(student, teacher, dim=-1), mask)  # [L, B]
    else:
        sq = ((student - teacher) ** 2).sum(-1)  # [L, B, G]
        per_layer = (sq * m).sum(-1) / (tokens * hidden)
        if kind == "nmse":
            scale = ((teacher**2).sum(-1) * m).sum(-1) / (tokens * hidden)
            per_layer = per_layer / scale.clamp_min(1e-12)
    if layer_weights is None:
        per_example = per_layer.sum(0)
    else:
        per_example = (per_layer * layer_weights.to(per_layer).unsqueeze(1)).sum(0)
    return per_example.mean()


def answer_ce_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `targets` [B, G] under `logits` [B, G, V], mean over each example's tokens,
    then over the batch."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # [B, G]
    return masked_token_mean(nll, mask).mean()


def joint_loss(align: torch.Tensor, ce: torch.Tensor, ce_weight: float) -> torch.Tensor:
    """The ia2+sft objective: (1 - b) * align + b * CE (the reference's convex form)."""
    return (1 - ce_weight) * align + ce_weight * ce


def kd_loss(logits: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Soft-label knowledge distillation: KL(teacher || student) at each response position, over the
    teacher's top-k tokens with both distributions renormalised over them (with k the whole vocabulary,
    the exact KL), mean over each example's tokens, then over the batch. `logits` [B, G, V] are the
    student's; `top_ids` / `top_logp` [B, G, k] the teacher's k most likely tokens and log-probabilities."""
    student = torch.gather(logits.float().log_softmax(-1), -1, top_ids)  # [B, G, k]
    student = student - student.logsumexp(-1, keepdim=True)
    teacher = top_logp.float() - top_logp.float().logsumexp(-1, keepdim=True)
    per_token = (teacher.exp() * (teacher - student)).sum(-1)  # [B, G]
    return masked_token_mean(per_token, mask).mean()
