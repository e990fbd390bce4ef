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


def test_solved_solutions_are_the_right_samples_as_step_lists():
    """mine's OUT/solved.jsonl: the K first samples that state the reference answer, repeats included, in the
    step-list format `sft` reads (the demo's RFT control trains on it)."""
    from stepdpo.generate.answers import parse_answer
    from stepdpo.generate.mine import _reaches, solved_solutions
    from stepdpo.generate.problems import Problem
    from stepdpo.train.sft import _solution_from

    def sample(pid, i, steps):
        return {"id": f"{pid}#{i}", "text": "\n".join(steps), "steps": steps}

    right = ["2 + 3 = 5", "5 * 2 = 10", "The answer is 10."]
    lucky = ["2 + 3 = 6", "6 * 2 = 10", "The answer is 10."]  # a wrong step, the right answer: kept, as RFT keeps it
    problems = [Problem("a", "Start with 2. Add 3, then multiply by 2.", "10"), Problem("b", "Start with 1.", "1")]
    first = [[sample("a", 0, right), sample("a", 1, ["2 + 3 = 5", "The answer is 5."]), sample("a", 2, right),
              sample("a", 3, lucky)],
             [sample("b", 0, ["The answer is 2."]), sample("b", 1, [])]]
    rows = [row for p, samples in zip(problems, first)  # graded as mine grades them
            for row in solved_solutions(p, samples, [_reaches(parse_answer(p.answer), (), x["text"]) for x in samples])]
    assert rows == [{"id": f"a#{i}", "problem": problems[0].text, "answer": "10", "steps": steps}
                    for i, steps in ((0, right), (2, right), (3, lucky))]
    assert _solution_from(rows[0], "auto") == (problems[0].text, right)


@pytest.mark.parametrize("fields, message", [
    (dict(sample_temperature=0, samples=4), "--samples: 4 greedy solutions per problem would be one solution 4 "
                                            "times: with --sample-temperature 0 set --samples 1"),
    (dict(sample_temperature=-0.5), "--sample-temperature: -0.5: a temperature >= 0"),
])
def test_greedy_solutions_need_one_sample_and_a_temperature_is_never_negative(fields, message):
    with pytest.raises(StepdpoError, match=message):
        MineOptions(problems="p.jsonl", model="m", out="o", **fields)


def test_the_solutions_temperature_changes_only_the_solutions_settings():
    """The K solutions are drawn with --sample-temperature and the continuations with --temperature; left unset,
    both use --temperature (and so the cache keys of runs before the option stay as they were)."""
    from stepdpo.generate.generate import policy_identity, with_settings

    o = MineOptions(problems="p.jsonl", model="m", out="o", samples=1, temperature=1.0, sample_temperature=0)
    assert o.sampling_settings()["temperature"] == 1.0 and o.solution_settings()["temperature"] == 0
    assert {k: v for k, v in o.solution_settings().items() if k != "temperature"} == \
        {k: v for k, v in o.sampling_settings().items() if k != "temperature"}
    assert MineOptions(problems="p.jsonl", model="m", out="o").solution_settings() == \
        MineOptions(problems="p.jsonl", model="m", out="o").sampling_settings()
    identity = policy_identity("model@abc", o.sampling_settings(), "plain", "vllm")
    assert with_settings(identity, o.sampling_settings()) == identity
    assert with_settings(identity, o.solution_settings()) == policy_identity("model@abc", o.solution_settings(),
                                                                              "plain", "vllm")
