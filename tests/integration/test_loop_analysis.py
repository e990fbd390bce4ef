"""benchmarks.loop_analysis --policy-preference on the tiny solver: where the policy that mined stands on each pair,
read from its own greedy first steps (the tokens it would pick) and from the same pairs swapped."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks.loop_analysis import main

pytestmark = pytest.mark.integration


def test_the_policys_greedy_step_is_its_argmax_and_the_swapped_pair_its_rejected(solver, tmp_path, capsys):
    from stepdpo.data.pairs import make_pair, write_jsonl
    from stepdpo.generate.generate import GenerateOptions, generate

    generate(GenerateOptions(problems=str(solver / "train.jsonl"), model=str(solver / "sft" / "final"),
                             out=str(tmp_path / "greedy"), limit=40, temperature=0.0, max_new_tokens=64,
                             progress=False))
    pairs = []
    for row in map(json.loads, (tmp_path / "greedy" / "samples.jsonl").open()):
        first = row["steps"][0] if row["steps"] else ""
        m = re.fullmatch(r"(.*= )(\d+)", first)
        if m:  # the greedy first step against the same step with its result one larger
            wrong = m.group(1) + str(int(m.group(2)) + 1)
            pairs.append(make_pair("step", row["problem"], [], [first], [wrong], [{"sample_id": row["id"]}]))
    assert len(pairs) >= 20
    swapped = [make_pair("step", p["problem"], [], p["rejected_steps"], p["chosen_steps"], p["source"]) for p in pairs]
    # a run directory as the loop writes it: the SFT model mined, with the loop's prompt settings
    run = tmp_path / "run"
    (run / "mine").mkdir(parents=True)
    (run / "sft").symlink_to(solver / "sft")
    settings = {"model": "tiny", "sft_steps": 700, "chat_template": "auto", "system_prompt": None,
                "instruction": GenerateOptions.__dataclass_fields__["instruction"].default}
    (run / "summary.json").write_text(json.dumps({"task": {"evaluate": "validation"}, "settings": settings}))
    write_jsonl(run / "mine" / "pairs.jsonl", pairs + swapped)
    assert main([str(run), "--policy-preference", "--json", str(tmp_path / "a.json")]) == 0
    q = json.loads((tmp_path / "a.json").read_text())["policy_preference"]
    n = len(pairs)
    assert q["model"] == str(run / "sft" / "final") and q["pairs"] == 2 * n and q["argmax"]["prefix"] == 0
    # each greedy step is the argmax (chosen) once, and once the rejected step of its swapped pair
    assert q["argmax"] == {"chosen": n, "rejected": n, "other": 0, "prefix": 0}
    assert f"the chosen one in {n} of {2 * n} pairs, the rejected one in {n}, another in 0" in capsys.readouterr().out
