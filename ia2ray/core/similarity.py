"""Activation similarity: how close a model's activations on a query WITHOUT demos are to the base
model's (the teacher's) on the same query WITH N-1 demos.

Per validation row the teacher's greedy response and its activations are captured once per subset
(`ia2ray.core.teacher.capture_teacher(which="val")`). The model under test then reads the bare query
followed by that response (as a training item does) and its activations at the aligned positions (the
positions that predict each response token) are compared with the teacher's: the cosine similarity
over the hidden dimension, averaged over each row's tokens, then over rows, per layer. `mean` is the
mean over layers. Identical activations give 1; the base model without an adapter gives the baseline
an adapter is compared against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ia2ray.core.batches import TrainItem, collate
from ia2ray.core.losses import masked_token_mean
from ia2ray.core.objective import student_activations


@dataclass
class SimilarityRef:
    """What an evaluation plan says about similarity: the teacher's cache entry of the similarity rows,
    the site, and each row's (query ids, teacher response ids). Activations are read where the model is."""

    cache_root: str
    key: str
    site: str
    rows: list[tuple[list[int], list[int]]]


def token_cosines(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, L]: per example and layer, the cosine similarity of `student` and `teacher` activations
    [L, B, G, d] over the hidden dim, averaged over the example's real positions (`mask` [B, G])."""
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")
    cos = F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-12)  # [L, B, G]
    return masked_token_mean(cos, mask).transpose(0, 1)


@torch.no_grad()
def row_similarities(model, items: list[TrainItem], site: str, pad_id: int, device, batch_size: int = 16) -> list[list[float]]:
    """Per item, per layer: the mean token-wise cosine between the model's activations at `site` and the
    item's teacher activations (one forward per batch, no gradients, the model's current adapter)."""
    was_training = model.training
    model.eval()
    out: list[list[float]] = []
    try:
        for start in range(0, len(items), batch_size):
            batch = collate(items[start : start + batch_size], pad_id).to(device)
            _, student = student_activations(model, batch, site, None)
            out += token_cosines(student, batch.teacher, batch.position_mask).tolist()
    finally:
        model.train(was_training)
    return out


def summarize(rows: list[list[float]]) -> dict:
    """{"mean", "layers" (per layer, mean over rows), "rows"} from `row_similarities`."""
    per_layer = torch.tensor(rows, dtype=torch.float64).mean(0)
    return {"mean": float(per_layer.mean()), "layers": [round(float(v), 6) for v in per_layer], "rows": len(rows)}


def items_from(ref: SimilarityRef, records: list) -> list[TrainItem]:
    """The similarity rows as items with the teacher's activations (`records`: the cache entry's)."""
    if len(records) != len(ref.rows):
        raise ValueError(f"similarity teacher {ref.key} holds {len(records)} records, the plan {len(ref.rows)} rows")
    return [TrainItem(q, t, rec.activations) for (q, t), rec in zip(ref.rows, records)]
