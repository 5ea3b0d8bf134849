"""Losses with exact expected values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ia2ray.core.losses import alignment_loss, answer_ce_loss, joint_loss


def test_mse_is_the_papers_mean_times_layers_for_one_example():
    torch.manual_seed(0)
    s, t = torch.randn(3, 1, 4, 5), torch.randn(3, 1, 4, 5)
    mask = torch.ones(1, 4)
    expected = F.mse_loss(s[:, 0], t[:, 0]) * 3
    assert torch.allclose(alignment_loss(s, t, mask), expected)


def test_masked_positions_are_ignored_and_examples_are_averaged():
    s = torch.zeros(1, 2, 3, 2)
    t = torch.zeros(1, 2, 3, 2)
    t[0, 0, 0] = torch.tensor([1.0, 3.0])  # example 0, one real token: mse = (1 + 9) / 2 = 5
    t[0, 1, :2] = 2.0  # example 1, two real tokens: mse = 4
    t[0, 1, 2] = 100.0  # padding: must not count
    mask = torch.tensor([[1, 0, 0], [1, 1, 0]])
    t[0, 0, 1:] = 50.0  # padding of example 0
    assert alignment_loss(s, t, mask).item() == pytest.approx((5 + 4) / 2)


def test_layer_weights_scale_each_layer():
    s = torch.zeros(2, 1, 1, 1)
    t = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)  # layer mses 1 and 4
    mask = torch.ones(1, 1)
    assert alignment_loss(s, t, mask).item() == pytest.approx(5.0)
    assert alignment_loss(s, t, mask, layer_weights=torch.tensor([0.5, 0.25])).item() == pytest.approx(1.5)


def test_nmse_and_cosine():
    t = torch.tensor([[[[2.0, 0.0]]]])  # [1,1,1,2]; mean square 2
    s = torch.tensor([[[[0.0, 2.0]]]])  # mse = (4 + 4) / 2 = 4; cosine 0
    mask = torch.ones(1, 1)
    assert alignment_loss(s, t, mask, "nmse").item() == pytest.approx(2.0)
    assert alignment_loss(s, t, mask, "cosine").item() == pytest.approx(1.0)
    assert alignment_loss(t, t, mask, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="unknown alignment loss"):
        alignment_loss(s, t, mask, "l1")
    with pytest.raises(ValueError, match="shapes differ"):
        alignment_loss(s, t[..., :1], mask)


def test_ce_averages_tokens_then_examples_and_joint_is_convex():
    logits = torch.zeros(2, 2, 4)
    logits[0, 0, 1] = 10.0
    targets = torch.tensor([[1, 3], [2, 0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    lp = torch.log_softmax(logits, -1)
    ex0 = -(lp[0, 0, 1] + lp[0, 1, 3]) / 2
    ex1 = -lp[1, 0, 2]
    ce = answer_ce_loss(logits, targets, mask)
    assert ce.item() == pytest.approx(((ex0 + ex1) / 2).item())
    assert joint_loss(torch.tensor(2.0), torch.tensor(4.0), 0.25).item() == pytest.approx(0.75 * 2 + 0.25 * 4)
