"""Training items and padded batches for the align, sft and joint stages.

One item is a query (no demos) followed by a response of G tokens: the teacher's generated tokens
(align, joint, kd, sft on ICL responses) or the gold answer (sft). The student reads
`query + response[:-1]`; position `len(query) - 1 + j` predicts response token j, and for alignment it
is matched to the teacher's position that produced token j.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class TrainItem:
    query_ids: list[int]
    target_ids: list[int]
    teacher: Optional[torch.Tensor] = None  # [L_all, G, d], G == len(target_ids)
    top_ids: Optional[torch.Tensor] = None  # [G, k] the teacher's k most likely tokens at each response position
    top_logp: Optional[torch.Tensor] = None  # [G, k] their log-probabilities

    def __post_init__(self):
        if not self.target_ids:
            raise ValueError("a training item needs at least one response token")
        if self.top_logp is not None and self.top_logp.shape[0] != len(self.target_ids):
            raise ValueError(f"the teacher's distribution covers {self.top_logp.shape[0]} positions but the response "
                             f"has {len(self.target_ids)} tokens")
        if self.teacher is not None and self.teacher.shape[1] != len(self.target_ids):
            raise ValueError(
                f"teacher activations cover {self.teacher.shape[1]} positions but the response has "
                f"{len(self.target_ids)} tokens"
            )


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, G] index of the position predicting each response token
    position_mask: torch.Tensor  # [B, G] 1 for real response tokens
    targets: torch.Tensor  # [B, G] response token ids (0 where masked)
    teacher: Optional[torch.Tensor]  # [L_sel, B, G, d] or None
    top_ids: Optional[torch.Tensor] = None  # [B, G, k] the teacher's top-k token ids (kd), or None
    top_logp: Optional[torch.Tensor] = None  # [B, G, k] their log-probabilities (0 where masked)

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


def collate(items: list[TrainItem], pad_id: int, layers: Optional[list[int]] = None) -> Batch:
    """Right-pad a list of items into one batch; `layers` selects teacher layers (all when None)."""
    seqs = [it.query_ids + it.target_ids[:-1] for it in items]
    width = max(len(s) for s in seqs)
    g_max = max(len(it.target_ids) for it in items)
    b = len(items)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width), dtype=torch.long)
    positions = torch.zeros((b, g_max), dtype=torch.long)
    position_mask = torch.zeros((b, g_max), dtype=torch.long)
    targets = torch.zeros((b, g_max), dtype=torch.long)
    for i, (it, seq) in enumerate(zip(items, seqs)):
        g = len(it.target_ids)
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
        positions[i, :g] = torch.arange(len(it.query_ids) - 1, len(it.query_ids) - 1 + g)
        position_mask[i, :g] = 1
        targets[i, :g] = torch.tensor(it.target_ids)
    teacher = None
    if all(it.teacher is not None for it in items):
        first = items[0].teacher
        sel = list(range(first.shape[0])) if layers is None else layers
        teacher = torch.zeros((len(sel), b, g_max, first.shape[-1]), dtype=first.dtype)
        for i, it in enumerate(items):
            teacher[:, i, : it.teacher.shape[1]] = it.teacher[sel]
    top_ids = top_logp = None
    if all(it.top_logp is not None for it in items):
        k = items[0].top_logp.shape[-1]
        top_ids = torch.zeros((b, g_max, k), dtype=torch.long)
        top_logp = torch.zeros((b, g_max, k), dtype=torch.float32)
        for i, it in enumerate(items):
            top_ids[i, : it.top_ids.shape[0]] = it.top_ids.long()
            top_logp[i, : it.top_logp.shape[0]] = it.top_logp.float()
    return Batch(input_ids, attention_mask, positions, position_mask, targets, teacher, top_ids, top_logp)
