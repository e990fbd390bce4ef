"""`stepdpo problems`: selection by reference step count and a seeded split by problem, on GSM8K's real training
split (read in place, written only to tmp_path)."""

import json

import pytest

from stepdpo.errors import StepdpoError
from stepdpo.generate.problems import ProblemsOptions, read_problems, reference_step_count, select_problems


def _ids(path):
    return [p.id for p in read_problems(path)[0]]


def test_two_step_gsm8k_problems_split_by_problem(gsm8k_train, tmp_path):
    report = select_problems(ProblemsOptions(input=str(gsm8k_train), out=str(tmp_path / "a"), max_steps=2,
                                             held_out=300, validation=0.05, seed=3))
    assert report["problems"] == 7473 and report["selected"] == 1961
    assert report["files"] == {"train": 1961 - 300 - 98, "validation": 98, "test": 300}
    assert report["steps_per_problem"]["2"] == 1961 and report["steps_per_problem"]["9"] == 13
    train, val, test = (set(_ids(tmp_path / "a" / f)) for f in ("train.jsonl", "validation.jsonl", "test.jsonl"))
    assert not train & val and not train & test and not val & test
    # records are written as they were read: every stage reads them as GSM8K
    rows = [json.loads(x) for x in (tmp_path / "a" / "test.jsonl").read_text().splitlines()]
    assert all(set(r) == {"question", "answer"} and reference_step_count(r) == 2 for r in rows)
    # seeded: the same seed gives the same split, another seed another one
    select_problems(ProblemsOptions(input=str(gsm8k_train), out=str(tmp_path / "b"), max_steps=2, held_out=300,
                                    validation=0.05, seed=3))
    assert (tmp_path / "a" / "test.jsonl").read_bytes() == (tmp_path / "b" / "test.jsonl").read_bytes()
    select_problems(ProblemsOptions(input=str(gsm8k_train), out=str(tmp_path / "c"), max_steps=2, held_out=300,
                                    validation=0.05, seed=4))
    assert set(_ids(tmp_path / "c" / "test.jsonl")) != test
    # train can be capped; an earlier split is not overwritten silently
    capped = select_problems(ProblemsOptions(input=str(gsm8k_train), out=str(tmp_path / "a"), min_steps=8,
                                             held_out=10, validation=5, train=20, overwrite=True))
    assert capped["selected"] == 103 and capped["files"] == {"train": 20, "validation": 5, "test": 10}
    with pytest.raises(StepdpoError, match="pass --overwrite"):
        select_problems(ProblemsOptions(input=str(gsm8k_train), out=str(tmp_path / "a"), max_steps=2))


def test_selection_errors_name_the_input(tmp_path):
    src = tmp_path / "math.jsonl"
    src.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    with pytest.raises(StepdpoError, match=r"math.jsonl:1: no reference steps to count"):
        select_problems(ProblemsOptions(input=str(src), out=str(tmp_path / "o"), max_steps=2))
    with pytest.raises(StepdpoError, match="none is left to train on"):
        select_problems(ProblemsOptions(input=str(src), out=str(tmp_path / "o"), held_out=1, validation=0))
    with pytest.raises(StepdpoError, match="--max-steps: must be >= --min-steps"):
        ProblemsOptions(input="x", out="y", min_steps=3, max_steps=2)


def test_reference_step_count_of_a_step_list():
    assert reference_step_count({"problem": "p", "steps": ["1 + 2 = 3", "3 * 2 = 6", "The answer is 6."]}) == 2
    assert reference_step_count({"problem": "p", "answer": "6"}) is None
