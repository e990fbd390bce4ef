import json

import pytest

from stepdpo.data.formats import from_step_dpo, from_steps, from_trl, split_steps
from stepdpo.data.prepare import PrepareOptions, prepare
from stepdpo.data.prm800k import RecordError


def test_step_dpo_row():
    row = {"prompt": "Q", "initial_reason_steps": "Let's think.\nStep 1: a\nStep 2: b\n", "chosen": "Step 3: c",
           "rejected": "Step 3: d"}
    assert from_step_dpo(row) == ("step", "Q", ["Let's think.", "Step 1: a", "Step 2: b"], ["Step 3: c"], ["Step 3: d"])


def test_step_dpo_multiline_step_kept_whole():
    assert split_steps("Step 1: x\ny\nStep 2: z") == ["Step 1: x\ny", "Step 2: z"]


def test_step_dpo_prefix_key_and_empty_rejected():
    # Step-DPO concatenates with nothing in between: the last line of the prefix starts the compared step
    assert from_step_dpo({"prompt": "Q", "prefix": "a\nb", "chosen": "c", "rejected": "d"})[2:] == (["a"], ["bc"], ["bd"])
    with pytest.raises(RecordError) as e:
        from_step_dpo({"prompt": "Q", "prefix": "", "chosen": "c", "rejected": ""})
    assert e.value.reason == "empty_rejected"


def test_steps_common_prefix_and_kind():
    assert from_steps({"prompt": "Q", "chosen": ["a", "b"], "rejected": ["a", "c"]}) == ("step", "Q", ["a"], ["b"], ["c"])
    assert from_steps({"prompt": "Q", "chosen": ["b", "x"], "rejected": ["c"]})[0] == "solution"
    with pytest.raises(RecordError):
        from_steps({"prompt": "Q", "chosen": ["a"], "rejected": ["a", "b"]})


def test_trl_rows():
    assert from_trl({"prompt": "Q", "chosen": "a\nb", "rejected": "a\nc"}) == ("step", "Q", ["a"], ["b"], ["c"])
    with pytest.raises(RecordError) as e:
        from_trl({"prompt": [{"role": "user", "content": "Q"}], "chosen": "a", "rejected": "b"})
    assert e.value.reason == "conversational"


def test_prepare_json_array_and_jsonl(tmp_path):
    rows = [{"prompt": "Q", "chosen": ["a"], "rejected": ["b"]}, {"prompt": "", "chosen": ["a"], "rejected": ["b"]}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    report = prepare([tmp_path / "a.json"], tmp_path / "o", PrepareOptions(format="steps", progress=False))
    assert report["counts"]["pairs_written"] == 1 and report["counts"]["rejected"] == 1
    rejects = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    # the array is on one line: `line` is where the value starts, `index` its position in the array
    assert rejects[0]["line"] == 1 and rejects[0]["index"] == 2 and rejects[0]["reason"] == "missing_prompt"
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"prompt": "Q", "chosen": "x", "rejected": "y"}) for _ in range(3)))
    report = prepare([tmp_path / "b.jsonl"], tmp_path / "o2", PrepareOptions(format="trl", progress=False))
    assert report["counts"]["pairs_written"] == 1 and report["counts"]["duplicates_removed"] == 2


STEP_DPO_ROWS = [
    # Step-DPO's own layout: initial_reason_steps ends with the next header, chosen/rejected are its body
    {"prompt": "What is $2+3\\cdot 4$?", "initial_reason_steps": "Let's think step by step.\nStep 1: $3\\cdot 4=12$.\n"
     "Step 2:", "chosen": " $2+12=14$.\nThe answer is: 14", "rejected": " $2+12=15$.\nThe answer is: 15"},
    {"prompt": "Q", "initial_reason_steps": "Step 1:", "chosen": " a", "rejected": " b"},  # the first step
    {"prompt": "Q", "initial_reason_steps": "", "chosen": "Step 1: a", "rejected": "Step 1: b"},  # no prefix
    {"prompt": "Q", "initial_reason_steps": "Step 1: x\n\nmore x\n\nStep 2: y\n\nStep 3:",  # blank lines kept
     "chosen": " z ", "rejected": "  w\n"},
    {"prompt": "Q", "initial_reason_steps": "\nStep 1:", "chosen": " a", "rejected": " b"},  # leading newline
    {"prompt": "Q", "initial_reason_steps": "free text\n\nmore\n", "chosen": "next", "rejected": "other"},
]


@pytest.mark.parametrize("row", STEP_DPO_ROWS)
def test_step_dpo_rows_render_to_step_dpos_exact_text(row):
    """prompt + initial_reason_steps + chosen, byte for byte (Step-DPO's train.py, qwen2-boxed: no separator)."""
    from stepdpo.data.pairs import make_pair, render_pair, validate_pair

    kind, problem, prefix, chosen, rejected = from_step_dpo(row)
    pair = make_pair(kind, problem, prefix, chosen, rejected, [])
    assert validate_pair(pair) is None
    prompt, c, r = render_pair(pair)
    head = "Problem: " + row["prompt"] + "\nSolution:\n"  # the plain problem text; chat templates: test_render
    assert prompt + c == head + row["initial_reason_steps"] + row["chosen"]
    assert prompt + r == head + row["initial_reason_steps"] + row["rejected"]
