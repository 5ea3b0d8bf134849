"""The student forward pass and the loss of each stage kind (align, sft, joint, kd).

The student runs the decoder stack only; logits are computed just at the response positions (the
LM head over the full sequence is never needed), and the alignment-only stage skips the head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ia2ray.core.batches import Batch
from ia2ray.core.losses import alignment_loss, answer_ce_loss, joint_loss, kd_loss
from ia2ray.core.sites import ActivationRecorder, base_model

STAGE_KINDS = ("align", "sft", "joint", "kd")


@dataclass(frozen=True)
class StageObjective:
    """What a stage optimises. `kind`: align (activation MSE only), sft (CE only), joint (both), kd (KL to
    the teacher's output distribution on its response tokens)."""

    kind: str
    site: str = "attn_out"
    layers: Optional[tuple[int, ...]] = None  # aligned layers (None: all)
    align_loss: str = "mse"
    layer_weights: Optional[tuple[float, ...]] = None
    ce_weight: float = 0.0
    stop_early: bool = True  # align: skip the layers above the deepest aligned one

    def __post_init__(self):
        if self.kind not in STAGE_KINDS:
            raise ValueError(f"unknown stage kind {self.kind!r}; expected one of {STAGE_KINDS}")

    @property
    def needs_teacher(self) -> bool:
        return self.kind in ("align", "joint")


def response_logits(model, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Logits [B, G, V] at the response positions from the decoder's final hidden states [B, T, d]."""
    index = batch.positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    picked = torch.gather(hidden, 1, index)
    logits = base_model(model).get_output_embeddings()(picked)
    cap = getattr(base_model(model).config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def student_activations(model, batch: Batch, site: str, layers: Optional[list[int]], stop_early: bool = False):
    """(decoder output, or None when `stop_early` cut the forward at the deepest recorded layer; the site's
    activations at the response positions [L, B, G, d]) of the student reading `batch`."""
    with ActivationRecorder(model, site, layers, stop_early=stop_early) as rec:
        out = rec.forward_until(base_model(model).get_decoder(), input_ids=batch.input_ids,
                                attention_mask=batch.attention_mask, use_cache=False)
        acts = rec.stack()  # [L, B, T, d]
    index = batch.positions[None, :, :, None].expand(acts.shape[0], -1, -1, acts.shape[-1])
    return out, torch.gather(acts, 2, index)


def stage_loss(model, batch: Batch, objective: StageObjective) -> torch.Tensor:
    """Loss of one batch for the stage (a scalar with graph)."""
    decoder = base_model(model).get_decoder()
    if not objective.needs_teacher:
        hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)[0]
        logits = response_logits(model, hidden, batch)
        if objective.kind == "kd":
            if batch.top_logp is None:
                raise ValueError("the kd stage needs the teacher's output distribution for every item")
            return kd_loss(logits, batch.top_ids, batch.top_logp, batch.position_mask)
        return answer_ce_loss(logits, batch.targets, batch.position_mask)
    if batch.teacher is None:
        raise ValueError(f"the {objective.kind} stage needs teacher activations for every item")
    layers = list(objective.layers) if objective.layers is not None else None
    # The align stage needs nothing above its deepest aligned layer: stop the forward there.
    stop_early = objective.kind == "align" and objective.stop_early
    out, student = student_activations(model, batch, objective.site, layers, stop_early)  # [L, B, G, d]
    weights = None if objective.layer_weights is None else torch.tensor(objective.layer_weights)
    align = alignment_loss(student, batch.teacher, batch.position_mask, objective.align_loss, weights)
    if objective.kind == "align":
        return align
    ce = answer_ce_loss(response_logits(model, out[0], batch), batch.targets, batch.position_mask)
    return joint_loss(align, ce, objective.ce_weight)
