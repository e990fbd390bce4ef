"""Accuracy with its uncertainty, and paired comparisons of two models on the same problems.

* `wilson_interval`: the 95% Wilson score interval of k right out of n. Unlike the normal approximation it stays
  inside [0, 1] and is sane at 0/n and n/n, which matters for small models near their floor.
* `mcnemar_exact`: the exact (binomial) McNemar test. Two models answered the same problems; only the problems
  where they disagree carry information: b where the first is right and the second wrong, c the other way. Under
  the null hypothesis (equal accuracy) each disagreement goes either way with probability 1/2, so the two-sided
  p-value is 2 * P(Binomial(b + c, 1/2) <= min(b, c)), capped at 1.
Standard library only; exact to float precision (integer binomial sums).
"""

from __future__ import annotations

import math
from typing import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for k successes in n trials (95% by default); (0.0, 1.0) when n is 0."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denominator = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    # at k = 0 and k = n one end is exactly 0 or 1; float rounding would leave 1e-17 or 0.9999999999999999
    return (0.0 if k == 0 else center - half), (1.0 if k == n else center + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b and c."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)


def accuracy_summary(correct: Sequence[bool]) -> dict:
    """accuracy, its 95% interval and the counts, for a list of per-problem outcomes."""
    k, n = sum(bool(x) for x in correct), len(correct)
    low, high = wilson_interval(k, n)
    return {"accuracy": k / n if n else 0.0, "ci95": [round(low, 4), round(high, 4)], "correct": k, "problems": n}


def paired_comparison(a: dict[str, bool], b: dict[str, bool]) -> dict:
    """McNemar's exact test of model A against model B on the problems both answered (keyed by problem id):
    the discordant counts, the accuracy difference A - B, and the two-sided p-value."""
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError("the two models answered no problem in common")
    a_only = sum(1 for p in shared if a[p] and not b[p])
    b_only = sum(1 for p in shared if b[p] and not a[p])
    return {"problems": len(shared), "a_right_b_wrong": a_only, "a_wrong_b_right": b_only,
            "difference": (a_only - b_only) / len(shared), "p_value": mcnemar_exact(a_only, b_only)}
