"""Classification metrics: accuracy, expected calibration error (two schemes), Brier score, NLL.

ECE schemes (always state which one a number was computed with):

- ``"equal_mass"`` -- the IA2 reference's equal-count binning: examples are sorted by confidence
  (stable sort, so ties keep their input order), every bin holds ``n // n_bins`` examples and the
  last bin also takes the remainder. With fewer examples than bins, each example is its own bin.
- ``"equal_width"`` -- the classic scheme: bin ``b`` covers ``[b/n_bins, (b+1)/n_bins)``, computed
  as ``floor(conf * n_bins)``; a confidence of exactly 1.0 goes to the last bin. Empty bins are
  skipped.

In both, ``ECE = sum_b |b|/n * |acc_b - conf_b|`` where ``acc_b`` / ``conf_b`` are the bin's mean
correctness and mean confidence.

Inputs may be Python sequences, numpy arrays or torch tensors (any dtype, any device).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ECE_SCHEMES = ("equal_mass", "equal_width")
NLL_EPS = 1e-12


def _to_numpy(values: Any, name: str) -> np.ndarray:
    """Sequence / numpy array / torch tensor -> flat float64 array; reject empty or NaN input."""
    if hasattr(values, "detach"):  # torch.Tensor (bf16 has no numpy dtype: go through float64)
        values = values.detach().to("cpu").double().numpy()
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _confidences(confidences: Any) -> np.ndarray:
    conf = _to_numpy(confidences, "confidences")
    if conf.min() < 0.0 or conf.max() > 1.0:
        raise ValueError(
            f"confidences must lie in [0, 1], got range [{conf.min()}, {conf.max()}]"
        )
    return conf


def _correct(correct: Any) -> np.ndarray:
    corr = _to_numpy(correct, "correct")
    if not np.all((corr == 0.0) | (corr == 1.0)):
        raise ValueError("correct must contain only 0/1 or booleans")
    return corr


def _paired(confidences: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
    conf, corr = _confidences(confidences), _correct(correct)
    if conf.shape != corr.shape:
        raise ValueError(
            f"confidences and correct differ in length: {conf.size} vs {corr.size}"
        )
    return conf, corr


def _check_binning(n_bins: int, scheme: str) -> None:
    if scheme not in ECE_SCHEMES:
        raise ValueError(f"unknown ECE scheme {scheme!r}; expected one of {ECE_SCHEMES}")
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def reliability_bins(
    confidences: Any, correct: Any, n_bins: int = 15, scheme: str = "equal_mass"
) -> list[dict[str, float]]:
    """Per-bin statistics for ECE and reliability diagrams, in increasing confidence order.

    Each bin is ``{"count", "acc", "conf", "lo", "hi"}``: number of examples, mean correctness, mean
    confidence, and the bin's range. For ``equal_mass``, ``lo``/``hi`` are the smallest / largest
    confidence inside the bin; for ``equal_width`` they are the bin edges. Only non-empty bins are
    returned (equal_width bins can be empty; equal_mass bins never are).
    """
    _check_binning(n_bins, scheme)
    conf, corr = _paired(confidences, correct)
    n = conf.size
    bins: list[dict[str, float]] = []
    if scheme == "equal_mass":
        order = np.argsort(conf, kind="stable")
        conf, corr = conf[order], corr[order]
        if n < n_bins:
            bounds = list(range(n + 1))  # one example per bin
        else:
            size = n // n_bins
            bounds = [b * size for b in range(n_bins)] + [n]  # last bin takes the remainder
        for start, stop in zip(bounds[:-1], bounds[1:]):
            c, k = conf[start:stop], corr[start:stop]
            bins.append(
                {
                    "count": int(stop - start),
                    "acc": float(k.mean()),
                    "conf": float(c.mean()),
                    "lo": float(c.min()),
                    "hi": float(c.max()),
                }
            )
    else:
        index = np.minimum(np.floor(conf * n_bins).astype(np.int64), n_bins - 1)
        for b in range(n_bins):
            mask = index == b
            if not mask.any():
                continue
            bins.append(
                {
                    "count": int(mask.sum()),
                    "acc": float(corr[mask].mean()),
                    "conf": float(conf[mask].mean()),
                    "lo": b / n_bins,
                    "hi": (b + 1) / n_bins,
                }
            )
    return bins


def expected_calibration_error(
    confidences: Any, correct: Any, n_bins: int = 15, scheme: str = "equal_mass"
) -> float:
    """ECE = sum over bins of (bin size / n) * |bin accuracy - bin mean confidence|.

    ``scheme`` is ``"equal_mass"`` (IA2 reference, default) or ``"equal_width"``; see module doc.
    Raises ValueError for an unknown scheme, empty or mismatched inputs.
    """
    bins = reliability_bins(confidences, correct, n_bins=n_bins, scheme=scheme)
    n = sum(b["count"] for b in bins)
    return float(sum(b["count"] / n * abs(b["acc"] - b["conf"]) for b in bins))


def accuracy(correct: Any) -> float:
    """Fraction of correct predictions (``correct`` holds 0/1 or booleans)."""
    return float(_correct(correct).mean())


def brier_score(confidences: Any, correct: Any) -> float:
    """Top-label Brier score: mean of (confidence - correct)^2."""
    conf, corr = _paired(confidences, correct)
    return float(np.mean((conf - corr) ** 2))


def negative_log_likelihood(gold_probs: Any) -> float:
    """Mean of -log p(gold), with probabilities clamped below at 1e-12."""
    probs = _to_numpy(gold_probs, "gold_probs")
    if probs.min() < 0.0 or probs.max() > 1.0 + 1e-6:
        raise ValueError(
            f"gold_probs must lie in [0, 1], got range [{probs.min()}, {probs.max()}]"
        )
    return float(np.mean(-np.log(np.clip(probs, NLL_EPS, 1.0))))


def classification_metrics(
    confidences: Any,
    correct: Any,
    gold_probs: Any | None = None,
    n_bins: int = 15,
    scheme: str = "equal_mass",
) -> dict[str, Any]:
    """All metrics of one evaluation in a flat dict.

    Keys: ``acc``, ``ece``, ``brier``, ``n`` (number of examples), ``ece_scheme``, ``ece_bins``
    (the number of bins requested), ``reliability`` (the bins behind the ECE, for reliability
    diagrams), and ``nll`` when ``gold_probs`` is given.
    """
    conf, corr = _paired(confidences, correct)
    result: dict[str, Any] = {
        "acc": accuracy(corr),
        "ece": expected_calibration_error(conf, corr, n_bins=n_bins, scheme=scheme),
        "brier": brier_score(conf, corr),
        "n": int(conf.size),
        "ece_scheme": scheme,
        "ece_bins": int(n_bins),
        "reliability": reliability_bins(conf, corr, n_bins=n_bins, scheme=scheme),
    }
    if gold_probs is not None:
        probs = _to_numpy(gold_probs, "gold_probs")
        if probs.size != conf.size:
            raise ValueError(
                f"gold_probs and confidences differ in length: {probs.size} vs {conf.size}"
            )
        result["nll"] = negative_log_likelihood(probs)
    return result
