"""`stepdpo demo`: the pair pipeline, and `--loop` (the README's main command, `launch/demo.sh`), end to end on CPU."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, child_env

pytestmark = pytest.mark.integration


def test_demo_learns_on_held_out_problems(tmp_path):
    res = subprocess.run([sys.executable, "-m", "stepdpo.cli", "demo", "--out", str(tmp_path / "demo")],
                         env=child_env(OMP_NUM_THREADS=2), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    before, after = summary["before"]["pair_accuracy"], summary["after"]["pair_accuracy"]
    assert 0.3 <= before <= 0.7, "an untrained model should be near chance"
    assert after >= 0.80
    assert set(summary["stages"]) == {"tiny_model", "synth", "prepare", "score", "eval_before", "train", "eval_after"}
    assert summary["total_seconds"] < 600
    assert (tmp_path / "demo" / "training_curves.png").stat().st_size > 1000
    assert "held-out pair accuracy" in res.stdout


def test_the_main_command_runs_the_loop_and_writes_its_summary(tmp_path):
    """`bash launch/demo.sh`, the README's main command, as shipped (set-up, then `stepdpo demo --loop`): every
    stage runs, held-out problems are unseen, and summary.json has answer accuracy before, after and for the
    control, the pairs mined and the time per stage."""
    res = subprocess.run(["bash", str(REPO / "launch" / "demo.sh"), "--out", str(tmp_path), "--no-progress"],
                         env=child_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert set(s["answer_accuracy"]) == {"before", "after", "control"}
    a = s["answer_accuracy"]
    assert 0.2 <= a["before"] <= 0.8 and a["after"] > a["before"] and 0 <= a["control"] <= 1  # room, and a rise
    assert f"{'A0: after sft':34s} {a['before']:10.3f}" in res.stdout
    assert f"{'A1: + mine + stepwise DPO':34s} {a['after']:10.3f}" in res.stdout
    assert s["mined_pairs"] == s["mine"]["pairs"] > 0 and s["held_out_problems"] == 177
    assert {"sft", "answers_before", "mine", "train", "answers_after", "control_sft", "answers_control"} <= set(s["stages"])
    # the control is trained like the DPO stage (steps, learning rate, schedule, batch); the one at the SFT stage's
    # learning rate is reported beside it
    def args(run):
        saved = json.loads((tmp_path / run / "final" / "stepdpo_config.json").read_text())
        return {k: saved[k] for k in ("max_steps", "learning_rate", "lr_scheduler_type", "per_device_train_batch_size")}

    assert args("control") == args("dpo") and args("dpo")["learning_rate"] == s["settings"]["dpo_lr"]
    assert args("control_sft_lr")["learning_rate"] == s["settings"]["sft_lr"] != s["settings"]["dpo_lr"]
    # RFT: as many steps again, on the policy's own right samples that `mine` wrote
    assert args("control_rft") == args("dpo")
    assert s["controls"]["rft"]["solutions"] == s["mine"]["solved_solutions"] > 0
    rft = json.loads((tmp_path / "control_rft" / "final" / "stepdpo_config.json").read_text())
    assert rft["train_data"] == str(tmp_path / "mine" / "solved.jsonl") and 0 <= s["controls"]["rft"]["accuracy"] <= 1
    assert s["controls"]["control"]["accuracy"] == s["answer_accuracy"]["control"]
    assert 0 <= s["controls"]["at_sft_lr"]["accuracy"] <= 1 and s["mine"]["error_rule"] == "max_drop"
    train = {json.loads(x)["problem"] for x in (tmp_path / "train.jsonl").read_text().splitlines()}
    test = {json.loads(x)["problem"] for x in (tmp_path / "test.jsonl").read_text().splitlines()}
    assert not train & test


def test_the_demo_runs_again_in_the_same_directory(tmp_path):
    """`stepdpo demo` twice: the second run replaces the first one's data instead of refusing."""
    from stepdpo.demo import run_demo

    first = run_demo(tmp_path, arch="mistral", problems=60, steps=2)
    again = run_demo(tmp_path, arch="mistral", problems=60, steps=2)
    assert again["data"] == first["data"] and again["before"] == first["before"]
