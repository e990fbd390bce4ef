"""Where `mine --locate rollout` puts the error, from the success rates of the continuations (hand-computed)."""

from __future__ import annotations

import pytest

from stepdpo.errors import StepdpoError
from stepdpo.generate.mine import MineOptions, _max_drop


@pytest.mark.parametrize("rates, start, step", [
    # drops: 0.25 - 1.0 = -0.75 (step 1), 0.0 - 0.25 = -0.25 (step 2): a wrong first step followed by a lucky
    # continuation; first_zero would blame step 2
    ({1: 0.25, 2: 0.0}, 1.0, 1),
    # drops: +0.25, +0.25, -0.75: the last step is the error, as first_zero says
    ({1: 0.5, 2: 0.75, 3: 0.0}, 0.25, 3),
    # drops: -0.5, -0.5: a tie goes to the earlier step
    ({1: 0.5, 2: 0.0}, 1.0, 1),
    # a problem no sample solved: drops +0.5 (step 1), -0.5 (step 2)
    ({1: 0.5, 2: 0.0}, 0.0, 2),
    ({1: 0.0}, 0.5, 1),
])
def test_max_drop_is_the_most_negative_change_in_success_rate(rates, start, step):
    assert _max_drop(rates, start) == step


def test_an_unknown_error_rule_names_the_field_and_the_choices():
    with pytest.raises(StepdpoError, match="--error-rule: .largest. is not one of first_zero, max_drop"):
        MineOptions(problems="p.jsonl", model="m", out="o", error_rule="largest")
