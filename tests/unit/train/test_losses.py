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


def test_dpop_is_dpo_while_the_chosen_step_does_not_fall():
    # c = -2.0 > c0 = -2.5: the penalty is zero, and the loss is DPO's -log sigmoid(0.1 * 1.0) = 0.644397
    got = losses.dpop_loss(DELTA, C, C0, beta=0.1, lam=5.0)
    assert got.item() == pytest.approx(0.644397, abs=1e-6)


def test_dpop_charges_the_chosen_steps_fall():
    # c, r, c0, r0 = -2.6, -3.5, -2.5, -2.5: delta = 0.9, the chosen step fell 0.1;
    # -log sigmoid(0.1 * (0.9 - 5 * 0.1)) = -log sigmoid(0.04) = 0.673347 (the losses docstring)
    c, r = torch.tensor([-2.6], requires_grad=True), torch.tensor([-3.5])
    delta = losses.implicit_delta(c, r, C0, R0)
    got = losses.dpop_loss(delta, c, C0, beta=0.1, lam=5.0)
    assert got.item() == pytest.approx(0.673347, abs=1e-6)
    got.sum().backward()
    # d/dc = -(1 - sigmoid(0.04)) * 0.1 * (1 + 5): the penalty makes raising the chosen step six times as urgent
    assert c.grad.item() == pytest.approx(-(1 - 1 / (1 + math.exp(-0.04))) * 0.1 * 6, abs=1e-7)
    # lambda = 0 is DPO: -log sigmoid(0.09)
    assert losses.dpop_loss(delta, c, C0, beta=0.1, lam=0.0).item() == pytest.approx(
        math.log(1 + math.exp(-0.09)), abs=1e-7)
