"""`stepdpo sft` then `stepdpo mine` on a tiny Mistral: the policy's own step pairs, with their provenance,
resumable from the cache."""

from __future__ import annotations

import json

import pytest

from stepdpo.data.pairs import validate_pair
from stepdpo.data.synthetic import SynthOptions, synth
from stepdpo.generate.answers import equivalent, locate_answer, parse_answer
from stepdpo.generate.mine import MineOptions, mine
from stepdpo.train.sft import read_solutions

pytestmark = pytest.mark.integration


def test_sft_teaches_the_step_format_and_to_stop(solver):
    from stepdpo.generate.generate import GenerateOptions, generate

    report = generate(GenerateOptions(problems=str(solver / "train.jsonl"), model=str(solver / "sft" / "final"),
                                      out=str(solver / "g"), limit=20, max_new_tokens=64, progress=False))
    rows = [json.loads(x) for x in (solver / "g" / "samples.jsonl").read_text().splitlines()]
    assert report["finish_reasons"].get("stop", 0) >= 15  # it ends with EOS after its answer
    assert sum(r["steps"][-1].startswith("The answer is") for r in rows if r["steps"]) >= 15


def test_mine_finds_errors_and_corrections_with_provenance(solver, tmp_path):
    opts = MineOptions(problems=str(solver / "train.jsonl"), model=str(solver / "sft" / "final"), out=str(tmp_path),
                       limit=60, samples=4, rollouts=4, temperature=1.0, max_new_tokens=64, progress=False)
    report = mine(opts)
    pairs = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert report["pairs"] == len(pairs) > 0 and report["errors_located"] > 0
    assert 0 < report["sample_accuracy"] < 1 and report["generations"] > report["samples"]
    samples = {json.loads(x)["key"]: json.loads(x) for x in (tmp_path / "mine_cache.jsonl").read_text().splitlines()}
    by_id = {s["id"]: s for s in samples.values() if "prefix_steps" not in s}
    for p in pairs:
        assert validate_pair(p) is None and p["chosen_steps"] != p["rejected_steps"]
        src = p["source"][0]
        assert src["locate"] == "rollout" and src["chosen_success_rate"] >= 0.5
        wrong = by_id[src["sample_id"]]  # the rejected step is the located step of the policy's own sample
        k = src["error_step"]
        assert wrong["steps"][k - 1] == p["rejected_steps"][0] and wrong["steps"][: k - 1] == p["prefix_steps"]
        assert src["rollout_success"][str(k)] == 0.0  # no continuation after it reached the answer
        assert all(v > 0 for j, v in src["rollout_success"].items() if int(j) < k)
    keys = [(p["problem"], tuple(p["prefix_steps"]), p["chosen_steps"][0], p["rejected_steps"][0]) for p in pairs]
    assert len(keys) == len(set(keys))  # deduplicated
    # the right first samples, for `sft` (RFT): each one a first sample that states the reference answer
    solved = [json.loads(x) for x in (tmp_path / "solved.jsonl").read_text().splitlines()]
    answers = {json.loads(x)["problem"]: json.loads(x)["answer"]
               for x in (solver / "train.jsonl").read_text().splitlines()}
    assert report["solved_solutions"] == len(solved) > 0 and read_solutions(tmp_path / "solved.jsonl")[1] == []
    for row in solved:
        assert by_id[row["id"]]["steps"] == row["steps"] and row["answer"] == answers[row["problem"]]
        said = locate_answer("\n".join(row["steps"]))[0]
        assert said is not None and equivalent(parse_answer(row["answer"]), parse_answer(said))
    assert len(solved) == round(report["sample_accuracy"] * report["samples"])  # every right sample, repeats too
    again = mine(opts)  # everything comes from the cache: nothing is generated twice
    assert again["generations"] == 0 and again["cache_hits"] == report["generations"]
    assert [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()] == pairs


def test_max_drop_blames_the_step_whose_success_rate_falls_most(solver, tmp_path):
    """--error-rule max_drop on the same samples and rollouts as first_zero (shared through the cache): the
    located step is the most negative change in success rate, never after first_zero's step."""
    import shutil

    common = dict(problems=str(solver / "train.jsonl"), model=str(solver / "sft" / "final"), limit=60, samples=4,
                  rollouts=4, temperature=1.0, max_new_tokens=64, progress=False)
    zero = mine(MineOptions(out=str(tmp_path / "zero"), **common))
    (tmp_path / "drop").mkdir()
    shutil.copy(tmp_path / "zero" / "mine_cache.jsonl", tmp_path / "drop" / "mine_cache.jsonl")
    drop = mine(MineOptions(out=str(tmp_path / "drop"), error_rule="max_drop", **common))
    assert zero["error_rule"] == "first_zero" and zero["located_before_first_zero"] == 0
    assert drop["error_rule"] == "max_drop" and drop["errors_located"] == zero["errors_located"]
    pairs = [json.loads(x) for x in (tmp_path / "drop" / "pairs.jsonl").read_text().splitlines()]
    assert pairs
    moved = set()
    for p in pairs:
        src = p["source"][0]
        rates = [src["sample_success"]] + [src["rollout_success"][str(j)] for j in range(1, len(src["rollout_success"]) + 1)]
        drops = [rates[j] - rates[j - 1] for j in range(1, len(rates))]
        k = src["error_step"]
        assert src["error_rule"] == "max_drop" and drops[k - 1] == min(drops) and drops.index(min(drops)) == k - 1
        assert len(p["prefix_steps"]) == k - 1 and rates[-1] == 0.0
        if k < len(rates) - 1:
            moved.add(src["sample_id"])
    assert 0 < len(moved) <= drop["located_before_first_zero"]  # seeded: some errors moved earlier
    # only the corrections of the moved errors were new: the samples and the locating rollouts came from the cache
    assert drop["generations"] < zero["generations"]


def test_mine_locates_the_first_false_equation(solver, tmp_path):
    """--locate equations: the rejected step is the first step of the policy's sample that states a false equation
    (wrong answers, and right answers reached through one), no earlier step states one, and no chosen step does."""
    from stepdpo.generate.equations import step_verdict

    report = mine(MineOptions(problems=str(solver / "train.jsonl"), model=str(solver / "sft" / "final"),
                              out=str(tmp_path), limit=60, samples=4, rollouts=4, temperature=1.0, locate="equations",
                              max_new_tokens=64, progress=False))
    pairs = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    rows = [json.loads(x) for x in (tmp_path / "mine_cache.jsonl").read_text().splitlines()]
    firsts = [r for r in rows if "prefix_steps" not in r]
    false_first = [r for r in firsts if any(step_verdict(s) == "wrong" for s in r["steps"])]
    assert report["locate"] == "equations" and "error_rule" not in report and report["pairs"] == len(pairs) > 0
    # the seeded tiny policy writes false equations in some right answers too: they are examined
    assert 0 < report["right_answers_examined"] < report["wrong_examined"]
    assert 0 < report["errors_located"] <= len(false_first)
    # locating asks for no continuation: every continuation drawn is a correction (from the prefix before a located
    # step) or a chosen step's check, so none starts after a false equation (the rollout locator's would, from each
    # prefix up to the error)
    continuations = [r for r in rows if "prefix_steps" in r]
    assert continuations and all(step_verdict(s) != "wrong" for r in continuations for s in r["prefix_steps"])
    by_id = {r["id"]: r for r in firsts}
    for p in pairs:
        src = p["source"][0]
        assert src["locate"] == "equations" and "rollout_success" not in src and src["chosen_success_rate"] >= 0.5
        sample, k = by_id[src["sample_id"]], src["error_step"]
        assert sample["steps"][k - 1] == p["rejected_steps"][0] and sample["steps"][: k - 1] == p["prefix_steps"]
        assert step_verdict(p["rejected_steps"][0]) == "wrong"
        assert all(step_verdict(s) != "wrong" for s in p["prefix_steps"])
        assert step_verdict(p["chosen_steps"][0]) != "wrong"


def test_mine_with_a_prm_locates_by_reward(solver, tiny_mistral, tmp_path):
    report = mine(MineOptions(problems=str(solver / "train.jsonl"), model=str(solver / "sft" / "final"),
                              out=str(tmp_path), limit=20, samples=2, rollouts=2, locate="prm",
                              reward_model=str(tiny_mistral), prm_threshold=1.0, chosen_min_success=0,
                              max_new_tokens=64, progress=False))
    # threshold 1.0: every step is below it, so the first step is the located error of every wrong sample
    pairs = [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert report["errors_located"] == report["wrong_examined"]
    assert all(p["source"][0]["error_step"] == 1 and p["prefix_steps"] == [] for p in pairs)
    assert all(len(p["source"][0]["step_rewards"]) >= 1 for p in pairs)


def test_sft_raises_held_out_answer_accuracy_far_above_the_untrained_model(solver, tiny_mistral, tmp_path):
    from stepdpo.generate.generate import GenerateOptions, generate
    from stepdpo.generate.grade import GradeOptions, grade

    synth(SynthOptions(out=str(tmp_path / "held_out.jsonl"), kind="problems", problems=60, seed=9, max_value=9))
    train = {json.loads(x)["problem"] for x in (solver / "train.jsonl").read_text().splitlines()}
    held = [x for x in (tmp_path / "held_out.jsonl").read_text().splitlines() if json.loads(x)["problem"] not in train]
    (tmp_path / "held_out.jsonl").write_text("\n".join(held) + "\n")
    accuracy = {}
    for name, model in (("untrained", tiny_mistral), ("sft", solver / "sft" / "final")):
        generate(GenerateOptions(problems=str(tmp_path / "held_out.jsonl"), model=str(model), out=str(tmp_path / name),
                                 max_new_tokens=64, progress=False))
        accuracy[name] = grade(GradeOptions(problems=str(tmp_path / "held_out.jsonl"), samples=str(tmp_path / name),
                                            out=str(tmp_path / name / "graded")))["accuracy"]
    assert accuracy["untrained"] == 0.0 and accuracy["sft"] >= 0.25, accuracy


def test_greedy_solutions_put_every_pair_at_an_error_greedy_decoding_makes(solver, tmp_path):
    """--sample-temperature 0: the one examined solution per problem is the policy's greedy one (what `generate`
    writes at temperature 0, cache key for cache key), every rejected step and prefix come from it, and the
    corrections are still sampled at --temperature. With max_drop, the empty prefix's rate comes from M
    continuations at --temperature, not from the greedy solution's 0 or 1."""
    from stepdpo.generate.generate import GenerateOptions, generate

    common = dict(problems=str(solver / "train.jsonl"), model=str(solver / "sft" / "final"), limit=60,
                  max_new_tokens=64, batch_size=32, progress=False)
    generate(GenerateOptions(out=str(tmp_path / "greedy"), temperature=0.0, **common))
    greedy = {r["problem_id"]: r["steps"] for r in map(json.loads, (tmp_path / "greedy" / "samples.jsonl").open())}
    greedy_keys = {json.loads(x)["key"] for x in (tmp_path / "greedy" / "generate_cache.jsonl").open()}
    report = mine(MineOptions(out=str(tmp_path / "eq"), samples=1, sample_temperature=0, rollouts=4, temperature=1.0,
                              locate="equations", **common))
    pairs = [json.loads(x) for x in (tmp_path / "eq" / "pairs.jsonl").read_text().splitlines()]
    assert report["sample_temperature"] == 0 and report["samples"] == 60 and report["pairs"] == len(pairs) > 0
    rows = [json.loads(x) for x in (tmp_path / "eq" / "mine_cache.jsonl").read_text().splitlines()]
    # every greedy solution is one mine examined; a whole solution besides them continues an error in step 1
    assert greedy_keys <= {r["key"] for r in rows if "prefix_steps" not in r}
    for p in pairs:
        src = p["source"][0]
        steps, k = greedy[src["problem_id"]], src["error_step"]
        assert steps[k - 1] == p["rejected_steps"][0] and steps[: k - 1] == p["prefix_steps"]
    by_prefix: dict = {}
    for r in rows:
        if "prefix_steps" in r:
            by_prefix.setdefault((r["problem_id"], tuple(r["prefix_steps"])), set()).add(r["text"])
    assert any(len(texts) > 1 for texts in by_prefix.values())  # sampled, not greedy: a prefix's continuations differ

    drop = mine(MineOptions(out=str(tmp_path / "drop"), samples=1, sample_temperature=0, rollouts=4, temperature=1.0,
                            locate="rollout", error_rule="max_drop", **common))
    pairs = [json.loads(x) for x in (tmp_path / "drop" / "pairs.jsonl").read_text().splitlines()]
    assert drop["pairs"] == len(pairs) > 0
    rows = [json.loads(x) for x in (tmp_path / "drop" / "mine_cache.jsonl").read_text().splitlines()]
    wholes = [r for r in rows if "prefix_steps" not in r]
    assert sum(r["key"] in greedy_keys for r in wholes) == 60
    gold = {json.loads(x)["problem"]: parse_answer(json.loads(x)["answer"])
            for x in (solver / "train.jsonl").read_text().splitlines()}
    empty: dict = {}  # the other whole solutions: the M continuations of the empty prefix
    for r in wholes:
        if r["key"] not in greedy_keys:
            empty.setdefault(r["problem_id"], []).append(r)
    for p in pairs:
        src = p["source"][0]
        said = [locate_answer(x["text"])[0] for x in empty[src["problem_id"]]]
        rate = sum(s is not None and equivalent(gold[p["problem"]], parse_answer(s)) for s in said) / 4
        assert len(said) == 4 and src["sample_success"] == rate
