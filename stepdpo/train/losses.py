"""Stepwise DPO losses. Every function returns the per-pair loss (mean it for the batch loss).

Notation, per pair:
    c, r    = log pi_theta(chosen step | prompt), log pi_theta(rejected step | prompt)   (sums over tokens)
    c0, r0  = the same under the reference model
    delta   = (c - c0) - (r - r0)                       the DPO implicit reward difference (/beta)
    dr      = sum(chosen_step_rewards) - sum(rejected_step_rewards)    the step-reward gap

`step_loss="dpo"` is not here: it is TRL's own `DPOTrainer` loss (every `loss_type` TRL offers),
applied unchanged to step pairs (Step-DPO).

Worked example used by the unit tests (beta = 0.1, gamma = 1):
    c, r, c0, r0 = -2.0, -3.0, -2.5, -2.5   ->  delta = 0.5 - (-0.5) = 1.0
    dr = 0.9 - 0.2 = 0.7
    dpo            -log sigmoid(0.1)                         = 0.644397
    step_weighted  sigmoid weight 2*sigmoid(0.7) = 1.336375  -> 1.336375 * 0.644397 = 0.861156
                   linear weight max(0.7, 0) = 0.7          -> 0.451078
    step_margin    -log sigmoid(0.1 * 1.0 - 1 * 0.7) = -log sigmoid(-0.6)           = 1.037488
    seed           -log sigmoid(0.7 * (-2.0 - -3.0)) = -log sigmoid(0.7)            = 0.403186
    dpop           the chosen step rose (c > c0): no penalty, the dpo number         = 0.644397
                   c, r, c0, r0 = -2.6, -3.5, -2.5, -2.5 (the chosen step fell by 0.1), lambda = 5:
                   delta = -0.1 - -1.0 = 0.9; -log sigmoid(0.1 * (0.9 - 5 * 0.1)) = -log sigmoid(0.04) = 0.673347
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STEP_LOSSES = ("dpo", "step_weighted", "step_margin", "seed", "dpop")
# the losses that read the step-reward gap, so the pairs must be scored (`stepdpo score`)
REWARD_LOSSES = ("step_weighted", "step_margin", "seed")
WEIGHT_FNS = ("sigmoid", "linear")


def implicit_delta(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
                   ref_rejected: torch.Tensor) -> torch.Tensor:
    """delta = (c - c0) - (r - r0): how much more the policy moved towards the chosen step than the rejected
    one, relative to the reference (the DPO implicit reward difference over beta)."""
    return (chosen - ref_chosen) - (rejected - ref_rejected)


def reward_weight(reward_gap: torch.Tensor, fn: str = "sigmoid", gamma: float = 1.0) -> torch.Tensor:
    """Weight of a pair from its step-reward gap.

    sigmoid: w = 2 * sigmoid(gamma * dr)  in (0, 2); w = 1 when the reward model sees no gap, so
             confidently-ranked pairs count more and pairs the reward model disagrees with count less.
    linear:  w = max(gamma * dr, 0); pairs the reward model ranks the other way get no weight.
    """
    if fn == "sigmoid":
        return 2.0 * torch.sigmoid(gamma * reward_gap)
    if fn == "linear":
        return torch.clamp(gamma * reward_gap, min=0.0)
    raise ValueError(f"step_weight_fn {fn!r} is not one of {WEIGHT_FNS}")


def step_weighted_loss(delta: torch.Tensor, reward_gap: torch.Tensor, beta: float, fn: str, gamma: float) -> torch.Tensor:
    """L = w(dr) * -log sigmoid(beta * delta). The weight carries no gradient (rewards are data)."""
    return reward_weight(reward_gap.detach(), fn, gamma) * -F.logsigmoid(beta * delta)


def step_margin_loss(delta: torch.Tensor, reward_gap: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """L = -log sigmoid(beta * delta - gamma * dr): the policy must beat the reference by at least the
    reward gap (a reward-derived margin, as in ODPO / Llama-2's margin loss)."""
    return -F.logsigmoid(beta * delta - gamma * reward_gap.detach())


def seed_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, reward_gap: torch.Tensor) -> torch.Tensor:
    """The original formula: L = -log sigmoid(dr * (c - r)). Reference-free: no reference model,
    no beta; the reward gap scales the log-likelihood difference (a negative gap pushes the other way)."""
    return -F.logsigmoid(reward_gap.detach() * (chosen_logps - rejected_logps))


def dpop_loss(delta: torch.Tensor, chosen_logps: torch.Tensor, ref_chosen_logps: torch.Tensor, beta: float,
              lam: float) -> torch.Tensor:
    """DPO-Positive (Pal et al., 2024, "Smaug", arXiv:2402.13228, eq. 3):
    L = -log sigmoid(beta * (delta - lambda * max(0, c0 - c))).

    DPO only asks the chosen step to gain on the rejected one, and on pairs that differ in a few tokens (a step
    pair here differs in one number) it can meet that by lowering both: the chosen step's likelihood falls, and
    with it the model's arithmetic elsewhere. The penalty is zero while the chosen step stays at least as likely
    as under the reference, and charges lambda for every nat it loses. Needs no step rewards."""
    return -F.logsigmoid(beta * (delta - lam * torch.clamp(ref_chosen_logps - chosen_logps, min=0.0)))
