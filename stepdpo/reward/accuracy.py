"""How often a reward model agrees with the labels, on scored pairs."""

from __future__ import annotations


def reward_accuracy(pairs: list[dict]) -> dict | None:
    """The reward model's agreement with the labels on scored pairs (None when no pair is scored).

    per_step: the first step after the shared prefix, chosen reward > rejected reward;
    summed:   sum of chosen step rewards > sum of rejected step rewards. Ties count one half.
    """
    scored = [p for p in pairs if "chosen_step_rewards" in p and "rejected_step_rewards" in p]
    if not scored:
        return None

    def acc(values):
        return sum(1.0 if v > 0 else 0.5 if v == 0 else 0.0 for v in values) / len(values)

    return {
        "pairs": len(scored),
        "per_step": acc([p["chosen_step_rewards"][0] - p["rejected_step_rewards"][0] for p in scored]),
        "summed": acc([sum(p["chosen_step_rewards"]) - sum(p["rejected_step_rewards"]) for p in scored]),
    }
