"""Paired comparisons over seeds: two methods scored on the same N-shot subsets.

The paper compares methods with paired t-tests over its 5 seeds. `paired(a, b)` gives the mean
per-seed difference a - b, its spread, a bootstrap confidence interval, the two-sided paired t-test
p-value and a plain verdict word, so a table can say "better", "worse" or "not distinguishable".
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import asdict, dataclass
from typing import Sequence


@dataclass(frozen=True)
class Paired:
    n: int  # pairs (seeds)
    mean: float  # mean of a - b
    std: float  # sample std of a - b (0 with one pair)
    ci_low: float  # bootstrap confidence interval of the mean difference
    ci_high: float
    p_value: float  # two-sided paired t-test; nan with fewer than 2 pairs
    verdict: str  # "better", "worse" or "not distinguishable" (a against b, at `alpha`)

    def as_dict(self) -> dict:
        return asdict(self)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def paired(a: Sequence[float], b: Sequence[float], *, higher_is_better: bool = True, alpha: float = 0.05,
           confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> Paired:
    """Compare a against b, paired by position (the same seed in both lists)."""
    if len(a) != len(b):
        raise ValueError(f"paired: {len(a)} values against {len(b)}; each seed needs a value in both")
    if not a:
        raise ValueError("paired: no pairs")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    n, mean = len(diffs), statistics.fmean(diffs)
    std = statistics.stdev(diffs) if n > 1 else 0.0
    p = _paired_t_p(mean, std, n)
    low, high = _bootstrap_ci(diffs, confidence, resamples, seed)
    verdict = "not distinguishable"
    if p < alpha:  # nan compares False
        verdict = "better" if (mean > 0) == higher_is_better else "worse"
    return Paired(n=n, mean=mean, std=std, ci_low=low, ci_high=high, p_value=p, verdict=verdict)


def _paired_t_p(mean: float, std: float, n: int) -> float:
    if n < 2:
        return math.nan
    if std == 0.0:  # every seed moved by the same amount: certain unless that amount is zero
        return 1.0 if mean == 0.0 else 0.0
    from scipy.stats import t as student_t

    t = mean / (std / math.sqrt(n))
    return float(2.0 * student_t.sf(abs(t), df=n - 1))


def _bootstrap_ci(diffs: list[float], confidence: float, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap of the mean over seeds (seeded: the same input gives the same interval)."""
    if len(diffs) == 1:
        return diffs[0], diffs[0]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    tail = (1.0 - confidence) / 2.0
    return means[int(tail * (resamples - 1))], means[int(math.ceil((1.0 - tail) * (resamples - 1)))]
