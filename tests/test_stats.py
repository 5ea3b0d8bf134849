"""Paired comparisons over seeds (ia2ray.core.stats): exact values."""

from __future__ import annotations

import math

import pytest

from ia2ray.core.stats import paired


def test_two_pairs_match_the_cauchy_tail():
    # differences 1 and 3: mean 2, std sqrt(2), t = 2 with 1 degree of freedom (a Cauchy variable)
    r = paired([1.0, 3.0], [0.0, 0.0])
    assert r.n == 2 and r.mean == 2.0 and r.std == pytest.approx(math.sqrt(2))
    assert r.p_value == pytest.approx(1 - 2 / math.pi * math.atan(2.0), rel=1e-9)
    assert r.verdict == "not distinguishable"
    assert (r.ci_low, r.ci_high) == (1.0, 3.0)  # the bootstrap means of two values lie in [1, 3], both ends drawn


def test_five_seeds_match_scipy_and_give_a_verdict():
    from scipy.stats import ttest_rel

    a, b = [0.71, 0.74, 0.69, 0.80, 0.77], [0.60, 0.66, 0.64, 0.70, 0.69]
    r = paired(a, b)
    assert r.mean == pytest.approx(0.084)
    assert r.p_value == pytest.approx(ttest_rel(a, b).pvalue, rel=1e-9)
    assert r.p_value < 0.05 and r.verdict == "better"
    assert r.ci_low <= r.mean <= r.ci_high and r.ci_low > 0
    assert paired(b, a).verdict == "worse"
    # for ECE lower is better: a lower a is "better"
    assert paired(b, a, higher_is_better=False).verdict == "better"
    assert paired(a, b) == paired(a, b)  # the bootstrap is seeded


def test_edge_cases():
    assert paired([0.5, 0.6], [0.5, 0.6]).p_value == 1.0  # no difference at all
    same_shift = paired([1.5, 2.5, 3.5], [1.0, 2.0, 3.0])  # exactly 0.5 each time
    assert same_shift.p_value == 0.0 and same_shift.verdict == "better"
    one = paired([0.7], [0.6])
    assert math.isnan(one.p_value) and one.verdict == "not distinguishable" and one.std == 0.0
    with pytest.raises(ValueError, match="2 values against 1"):
        paired([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="no pairs"):
        paired([], [])


def test_bootstrap_interval_is_fixed_by_its_seed():
    a, b = [0.71, 0.74, 0.69, 0.80, 0.77], [0.60, 0.66, 0.64, 0.70, 0.69]  # differences .11 .08 .05 .10 .08
    r = paired(a, b)
    # percentiles 2.5 / 97.5 of 10,000 seeded resample means; each is a mean of five differences
    assert (r.ci_low, r.ci_high) == pytest.approx((0.066, 0.102), abs=1e-12)
    assert (paired(a, b, seed=1).ci_low, paired(a, b, seed=1).ci_high) == pytest.approx((0.066, 0.100), abs=1e-12)
