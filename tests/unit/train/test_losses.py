"""Stepwise losses against numbers worked out by hand (see the docstring of stepdpo.train.losses)."""

import math

import pytest
import torch

from stepdpo.train import losses

C, R, C0, R0 = torch.tensor([-2.0]), torch.tensor([-3.0]), torch.tensor([-2.5]), torch.tensor([-2.5])
DELTA = torch.tensor([1.0])  # (-2 - -2.5) - (-3 - -2.5), worked out by hand in the losses docstring
GAP = torch.tensor([0.9 - 0.2])  # 0.7


def test_implicit_delta_of_the_worked_example():
    # the trainer's step modes take delta from this function
    assert losses.implicit_delta(C, R, C0, R0).item() == 1.0
    assert losses.implicit_delta(C, R, C, R).item() == 0.0  # policy == reference
    assert losses.implicit_delta(R, C, R0, C0).item() == -1.0  # swapping the sides flips the sign


def test_step_weighted_sigmoid():
    # 2*sigmoid(0.7) = 1.336375; -log sigmoid(0.1) = 0.644397
    got = losses.step_weighted_loss(DELTA, GAP, beta=0.1, fn="sigmoid", gamma=1.0)
    assert got.item() == pytest.approx(0.861156, abs=1e-6)


def test_step_weighted_linear():
    got = losses.step_weighted_loss(DELTA, GAP, beta=0.1, fn="linear", gamma=1.0)
    assert got.item() == pytest.approx(0.7 * 0.644397, abs=1e-6)


def test_step_weighted_zero_gap_is_plain_dpo():
    got = losses.step_weighted_loss(DELTA, torch.tensor([0.0]), beta=0.1, fn="sigmoid", gamma=1.0)
    assert got.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.1))), abs=1e-7)


def test_linear_weight_ignores_negative_gap():
    assert losses.reward_weight(torch.tensor([-0.5]), "linear").item() == 0.0


def test_step_margin():
    # -log sigmoid(0.1*1.0 - 0.7) = -log sigmoid(-0.6) = 1.037488
    got = losses.step_margin_loss(DELTA, GAP, beta=0.1, gamma=1.0)
    assert got.item() == pytest.approx(1.037488, abs=1e-6)


def test_seed_is_reference_free():
    # -log sigmoid(0.7 * (-2 - -3)) = -log sigmoid(0.7) = 0.403186
    got = losses.seed_loss(C, R, GAP)
    assert got.item() == pytest.approx(0.403186, abs=1e-6)


def test_reward_gap_carries_no_gradient():
    gap = torch.tensor([0.7], requires_grad=True)
    delta = torch.tensor([1.0], requires_grad=True)
    losses.step_margin_loss(delta, gap, 0.1, 1.0).sum().backward()
    assert gap.grad is None and delta.grad is not None


def test_unknown_weight_fn():
    with pytest.raises(ValueError, match="step_weight_fn"):
        losses.reward_weight(GAP, "cubic")
