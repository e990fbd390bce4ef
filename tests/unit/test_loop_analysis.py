"""benchmarks.loop_analysis: what it reads of a loop run's pairs and solutions with the equation check (hand-computed
cases; the check itself: tests/unit/generate/test_equations.py)."""

from __future__ import annotations

import json

import pytest

from benchmarks.loop_analysis import analyse, pair_quality


def _pair(prefix, chosen, rejected):
    return {"prefix_steps": prefix, "chosen_steps": [chosen], "rejected_steps": [rejected]}


def test_a_pair_is_clean_when_only_its_rejected_step_is_false():
    pairs = [_pair([], "9 - 4 = 5", "9 - 4 = 4"),                  # clean
             _pair(["2 + 2 = 5"], "5 + 1 = 6", "5 + 1 = 7"),       # a false equation in the prefix
             _pair([], "6 + 2 = 9", "6 + 2 = 7"),                  # both false: the chosen one too
             _pair([], "6 + 2 = 8", "6 * 2 = 12"),                 # rejected is true (a wrong operation, unchecked)
             _pair([], "6 + 2 = 8", "is 8")]                       # nothing to check in the rejected step
    assert pair_quality(pairs) == {"pairs": 5, "clean": 1, "prefix_wrong": 1, "chosen_wrong": 1,
                                   "rejected_not_wrong": 1, "rejected_unchecked": 1}


def test_a_run_directory_is_read_as_the_loop_writes_it(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "pairs.jsonl").write_text(json.dumps(
        {**_pair([], "9 - 4 = 5", "9 - 4 = 4"), "source": [{"error_step": 1}]}) + "\n")
    (tmp_path / "answers_before").mkdir()
    rows = [{"text": "1 + 6 = 7\n7 + 2 = 10\nThe answer is 10.", "steps": ["1 + 6 = 7", "7 + 2 = 10", "x"]},
            {"text": "5 * 3 = 15", "steps": ["5 * 3 = 15"]}]
    (tmp_path / "answers_before" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dpo").mkdir()
    (tmp_path / "dpo" / "train_summary.json").write_text(json.dumps({"log_history": [
        {"loss": 0.69, "rewards/margins": 0.0, "step": 5}, {"train_runtime": 1.0, "step": 5}]}))
    a = analyse(tmp_path)
    assert a["pair_quality"]["clean"] == 1 and a["error_step"] == {"1": 1}
    assert a["solutions"] == {"A0": {"solutions": 2, "equations": 3, "false_equations": 1, "false_share": 0.3333,
                                     "steps_per_solution": 2.0, "no_answer_line": 1}}
    assert a["curves"] == {"dpo": [{"step": 5, "loss": 0.69, "rewards/margins": 0.0}]}


def test_each_split_s_solutions_are_read_from_their_own_file(tmp_path, capsys):
    from benchmarks.loop_analysis import main

    d = tmp_path / "answers_after"
    d.mkdir()
    (tmp_path / "summary.json").write_text(json.dumps({"task": {"evaluate": "test"}}))
    for name, text in (("samples_validation.jsonl", "2 + 2 = 5"), ("samples_test.jsonl", "2 + 2 = 4"),
                       ("samples.jsonl", "2 + 2 = 4")):  # the loop's copy of the split measured last
        (d / name).write_text(json.dumps({"text": text, "steps": [text]}) + "\n")
    assert analyse(tmp_path)["split"] == "test" and analyse(tmp_path)["solutions"]["A1"]["false_equations"] == 0
    validation = analyse(tmp_path, "validation")
    assert validation["split"] == "validation" and validation["solutions"]["A1"]["false_equations"] == 1
    assert main([str(tmp_path), "--split", "validation"]) == 0
    assert "(solutions to the validation problems)" in capsys.readouterr().out
    (d / "samples_validation.jsonl").unlink()
    with pytest.raises(SystemExit, match="no solutions to the validation problems .*--evaluate validation --reuse"):
        main([str(tmp_path), "--split", "validation"])


def test_the_results_table_shows_a_stopped_run_and_why():
    from benchmarks.loop import render

    a0 = {"accuracy": 0.02, "ci95": [0.01, 0.05]}
    doc = {"runs": [{"quick": False, "task": "gsm8k", "evaluate": "validation", "eval_problems": 150, "overrides": [],
                     "mined_pairs": 0, "accuracy": {"A0": a0}, "paired_tests": {}, "wall_s": 600.0, "note": "",
                     "stopped": "mine found no pair in 120 training problems"}]}
    table = render(doc)
    assert "| 1 | gsm8k | validation (150) | `as shipped` | 0 | 0.020 [0.01, 0.05] | - | - | - | - | - | - | 10 |" in table
    assert "- run 1: (stopped: mine found no pair in 120 training problems)" in table


def test_the_results_table_lists_configurations_that_did_not_finish():
    from benchmarks.loop import render

    attempt = {"task": "arith", "evaluate": "validation", "overrides": ["--mine_problems", "480"],
               "date": "2026-12-05", "measured": "A0 0.309; 156 pairs; lost during DPO"}
    doc = {"runs": [], "unfinished": [attempt]}
    table = render(doc)
    assert ("- arith, validation, `--mine_problems 480` (2026-12-05): A0 0.309; 156 pairs; lost during DPO"
            in table.split("Tried, not finished")[1])
    assert "Tried, not finished" not in render({"runs": []})
