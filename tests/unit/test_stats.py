"""stepdpo.stats: numbers worked out by hand (or from the closed forms in the docstrings)."""

import pytest

from stepdpo.stats import accuracy_summary, mcnemar_exact, paired_comparison, wilson_interval


def test_wilson_interval_matches_the_closed_form():
    # 7 of 10, z = 1.96: center (0.7 + z²/20) / (1 + z²/10) = 0.644490, half-width 0.247861 -> [0.3968, 0.8922]
    low, high = wilson_interval(7, 10)
    assert low == pytest.approx(0.396778, abs=1e-6) and high == pytest.approx(0.892209, abs=1e-6)
    # 0 of 10: the upper end is z² / (n + z²) = 3.841459 / 13.841459 = 0.277533, the lower end exactly 0
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.277533, abs=1e-6))
    assert wilson_interval(10, 10) == (pytest.approx(0.722467, abs=1e-6), 1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_mcnemar_exact_is_the_two_sided_binomial_tail():
    # b = 1, c = 9: 2 * (C(10,0) + C(10,1)) / 2^10 = 2 * 11 / 1024
    assert mcnemar_exact(1, 9) == 22 / 1024 == mcnemar_exact(9, 1)
    assert mcnemar_exact(0, 6) == 2 / 64  # 2 * C(6,0) / 2^6
    assert mcnemar_exact(0, 5) == 2 / 32
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0  # capped at 1; no disagreement at all
    assert mcnemar_exact(2, 3) == 1.0  # 2 * (1 + 5 + 10) / 32 = 1.0


def test_paired_comparison_counts_only_the_problems_both_answered():
    a = {"p1": True, "p2": True, "p3": False, "p4": True, "only-a": True}
    b = {"p1": True, "p2": False, "p3": False, "p4": False, "only-b": False}
    got = paired_comparison(a, b)
    assert got == {"problems": 4, "a_right_b_wrong": 2, "a_wrong_b_right": 0, "difference": 0.5,
                   "p_value": 2 * 1 / 4}
    with pytest.raises(ValueError):
        paired_comparison({"x": True}, {"y": True})


def test_accuracy_summary():
    s = accuracy_summary([True, False, True, True, False, True, True, False, True, True])
    assert s["accuracy"] == 0.7 and s["correct"] == 7 and s["problems"] == 10 and s["ci95"] == [0.3968, 0.8922]
