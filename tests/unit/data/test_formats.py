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
    assert from_step_dpo({"prompt": "Q", "prefix": "a\nb", "chosen": "c", "rejected": "d"})[2] == ["a", "b"]
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
    assert rejects[0]["line"] == 2 and rejects[0]["reason"] == "missing_prompt"
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"prompt": "Q", "chosen": "x", "rejected": "y"}) for _ in range(3)))
    report = prepare([tmp_path / "b.jsonl"], tmp_path / "o2", PrepareOptions(format="trl", progress=False))
    assert report["counts"]["pairs_written"] == 1 and report["counts"]["duplicates_removed"] == 2
