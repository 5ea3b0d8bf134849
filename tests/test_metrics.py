"""Metrics tests: every expected value below is worked out by hand in the comments."""

import math

import numpy as np
import pytest
import torch

from ia2ray.core.metrics import (
    accuracy,
    brier_score,
    classification_metrics,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)

TIGHT = dict(rel=1e-12, abs=1e-12)


def _thirty_examples() -> tuple[list[float], list[int]]:
    """n=30: 15 pairs, pair k has confidence 0.05 + 0.06k, correctness cycles (1,1), (1,0), (0,0).

    Returned in a scrambled (but fixed) order so that the sort inside ECE matters.
    """
    conf, corr = [], []
    pattern = [(1, 1), (1, 0), (0, 0)]
    for k in range(15):
        c = round(0.05 + 0.06 * k, 10)
        conf += [c, c]
        corr += list(pattern[k % 3])
    perm = np.random.default_rng(0).permutation(30)
    return [conf[i] for i in perm], [corr[i] for i in perm]


def test_equal_mass_thirty_examples_fifteen_bins():
    conf, corr = _thirty_examples()
    # bin size 30 // 15 = 2, so bin k is exactly pair k. |acc_k - conf_k| per bin:
    # acc cycles 1, .5, 0 ; conf = .05, .11, .17, ..., .89
    diffs = [0.95, 0.39, 0.17, 0.77, 0.21, 0.35, 0.59, 0.03, 0.53, 0.41, 0.15, 0.71, 0.23, 0.33,
             0.89]
    expected = sum(2 / 30 * d for d in diffs)  # = 6.71 / 15
    assert expected == pytest.approx(6.71 / 15, **TIGHT)
    assert expected_calibration_error(conf, corr) == pytest.approx(expected, **TIGHT)
    bins = reliability_bins(conf, corr)
    assert [b["count"] for b in bins] == [2] * 15
    assert [b["acc"] for b in bins[:3]] == [1.0, 0.5, 0.0]
    assert bins[0]["lo"] == bins[0]["hi"] == pytest.approx(0.05)


def test_equal_mass_remainder_goes_to_last_bin():
    # n=17, 5 bins -> size 17 // 5 = 3, bins hold 3, 3, 3, 3, 5 (NOT 4, 4, 3, 3, 3).
    conf = [i / 20 for i in range(1, 18)]  # .05 .10 ... .85
    corr = [1] * 12 + [1, 0, 1, 0, 0]
    # bin means .10 .25 .40 .55 (acc 1) and .75 (acc .4): diffs .90 .75 .60 .45 .35
    expected = (3 * 0.90 + 3 * 0.75 + 3 * 0.60 + 3 * 0.45 + 5 * 0.35) / 17  # 9.85 / 17
    reversed_input = (conf[::-1], corr[::-1])
    assert expected_calibration_error(conf, corr, n_bins=5) == pytest.approx(expected, **TIGHT)
    assert expected_calibration_error(*reversed_input, n_bins=5) == pytest.approx(expected, **TIGHT)
    bins = reliability_bins(conf, corr, n_bins=5)
    assert [b["count"] for b in bins] == [3, 3, 3, 3, 5]
    assert bins[-1]["lo"] == pytest.approx(0.65) and bins[-1]["hi"] == pytest.approx(0.85)
    assert bins[-1]["acc"] == pytest.approx(0.4) and bins[-1]["conf"] == pytest.approx(0.75)


def test_equal_mass_fewer_examples_than_bins_uses_one_bin_each():
    # each example its own bin: ECE = mean |correct - conf| = (.1 + .6 + .2) / 3
    conf, corr = [0.9, 0.6, 0.2], [1, 0, 0]
    assert expected_calibration_error(conf, corr, n_bins=15) == pytest.approx(0.3, **TIGHT)
    assert [b["count"] for b in reliability_bins(conf, corr, n_bins=15)] == [1, 1, 1]


def test_equal_mass_ties_keep_input_order():
    # 2 bins of 2. Sorting is stable: tied confidences stay in input order.
    # correct of the .5s = 1,1,0 -> bins [1,1 | 0,(.9:1)] -> .5*|1-.5| + .5*|.5-.7| = .35
    conf = [0.5, 0.5, 0.5, 0.9]
    assert expected_calibration_error(conf, [1, 1, 0, 1], n_bins=2) == pytest.approx(0.35, **TIGHT)
    # correct of the .5s = 0,1,1 -> bins [0,1 | 1,(.9:1)] -> .5*0 + .5*|1-.7| = .15
    assert expected_calibration_error(conf, [0, 1, 1, 1], n_bins=2) == pytest.approx(0.15, **TIGHT)


@pytest.mark.parametrize("scheme", ["equal_mass", "equal_width"])
def test_perfect_calibration_is_zero(scheme):
    conf = [0.25] * 4 + [0.75] * 4
    corr = [1, 0, 0, 0] + [1, 1, 0, 1]
    assert expected_calibration_error(conf, corr, n_bins=2, scheme=scheme) == 0.0
    assert expected_calibration_error(conf, corr, n_bins=10, scheme="equal_width") == 0.0
    assert expected_calibration_error([1.0] * 5, [1] * 5, scheme=scheme) == 0.0


def test_schemes_differ():
    conf, corr = [0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]
    # equal_mass, 2 bins: [.1,.2] acc 0 conf .15 ; [.3,.4] acc 1 conf .35 -> .5*.15 + .5*.65 = .4
    assert expected_calibration_error(conf, corr, n_bins=2, scheme="equal_mass") == pytest.approx(
        0.4, **TIGHT
    )
    # equal_width, 2 bins: all four in [0, .5): acc .5, conf .25 -> .25
    assert expected_calibration_error(conf, corr, n_bins=2, scheme="equal_width") == pytest.approx(
        0.25, **TIGHT
    )


def test_equal_width_edges_and_empty_bins():
    # 4 bins [0,.25) [.25,.5) [.5,.75) [.75,1]; 1.0 goes to the last bin.
    conf, corr = [0.0, 0.25, 0.5, 1.0], [0, 1, 1, 1]
    # per-example diffs 0, .75, .5, 0 -> ECE = 1.25 / 4
    assert expected_calibration_error(conf, corr, n_bins=4, scheme="equal_width") == pytest.approx(
        0.3125, **TIGHT
    )
    bins = reliability_bins([1.0, 0.95], [1, 0], n_bins=10, scheme="equal_width")
    assert len(bins) == 1  # empty bins are skipped
    assert bins[0] == {"count": 2, "acc": 0.5, "conf": pytest.approx(0.975), "lo": 0.9, "hi": 1.0}
    assert expected_calibration_error([1.0, 0.95], [1, 0], n_bins=10, scheme="equal_width") == (
        pytest.approx(0.475, **TIGHT)
    )


@pytest.mark.parametrize(
    "convert",
    [
        lambda c, k: (c, k),
        lambda c, k: (np.array(c, dtype=np.float32), np.array(k, dtype=bool)),
        lambda c, k: (torch.tensor(c), torch.tensor(k, dtype=torch.bool)),
        lambda c, k: (torch.tensor(c, dtype=torch.bfloat16), torch.tensor(k)),
        lambda c, k: (torch.tensor(c, dtype=torch.float64).view(2, 4), torch.tensor(k).view(2, 4)),
    ],
)
def test_input_types(convert):
    # values exactly representable in bf16 / float32, so every input type gives the same numbers
    conf = [0.25, 0.5, 0.75, 1.0, 0.125, 0.375, 0.625, 0.875]
    corr = [0, 1, 1, 1, 0, 0, 1, 1]
    c, k = convert(conf, corr)
    for scheme in ("equal_mass", "equal_width"):
        assert expected_calibration_error(c, k, n_bins=3, scheme=scheme) == pytest.approx(
            expected_calibration_error(conf, corr, n_bins=3, scheme=scheme), **TIGHT
        )
    assert accuracy(k) == 0.625
    assert brier_score(c, k) == pytest.approx(brier_score(conf, corr), **TIGHT)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(confidences=[0.5], correct=[1], scheme="quantile"), "unknown ECE scheme"),
        (dict(confidences=[], correct=[]), "empty"),
        (dict(confidences=np.array([]), correct=np.array([])), "empty"),
        (dict(confidences=torch.tensor([]), correct=torch.tensor([])), "empty"),
        (dict(confidences=[0.5, 0.6], correct=[1]), "differ in length"),
        (dict(confidences=[1.5], correct=[1]), r"\[0, 1\]"),
        (dict(confidences=[float("nan")], correct=[1]), "NaN"),
        (dict(confidences=[0.5], correct=[2]), "0/1"),
        (dict(confidences=[0.5], correct=[1], n_bins=0), "n_bins"),
    ],
)
def test_invalid_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        expected_calibration_error(**kwargs)


def test_accuracy_brier_nll():
    conf, corr = [0.9, 0.6, 0.2], [1, 0, 0]
    assert accuracy(corr) == pytest.approx(1 / 3, **TIGHT)
    # (.1^2 + .6^2 + .2^2) / 3 = .41 / 3
    assert brier_score(conf, corr) == pytest.approx(0.41 / 3, **TIGHT)
    # -log 1 = 0, -log .5 = ln 2, p=0 clamped at 1e-12 -> 12 ln 10
    expected_nll = (math.log(2) + 12 * math.log(10)) / 3
    assert negative_log_likelihood([1.0, 0.5, 0.0]) == pytest.approx(expected_nll, **TIGHT)
    with pytest.raises(ValueError):
        negative_log_likelihood([])
    with pytest.raises(ValueError):
        negative_log_likelihood([-0.1])


def test_classification_metrics():
    conf, corr = [0.9, 0.6, 0.2], [1, 0, 0]
    m = classification_metrics(conf, corr, gold_probs=torch.tensor([0.9, 0.4, 0.8]))
    assert set(m) == {"acc", "ece", "nll", "brier", "n", "ece_scheme", "ece_bins", "reliability"}
    assert m["reliability"] == reliability_bins(conf, corr)
    assert m["n"] == 3 and m["ece_scheme"] == "equal_mass" and m["ece_bins"] == 15
    assert m["ece"] == pytest.approx(0.3, **TIGHT)
    assert m["acc"] == pytest.approx(1 / 3, **TIGHT)
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.8)) / 3, rel=1e-6)
    m2 = classification_metrics(conf, corr, n_bins=2, scheme="equal_width")
    assert "nll" not in m2 and m2["ece_scheme"] == "equal_width" and m2["ece_bins"] == 2
    # equal_width 2 bins: [.2] -> .2 ; [.9, .6] acc .5 conf .75 -> .25 ; ECE = (.2 + 2*.25)/3
    assert m2["ece"] == pytest.approx(0.7 / 3, **TIGHT)
    with pytest.raises(ValueError, match="gold_probs"):
        classification_metrics(conf, corr, gold_probs=[0.5])
