"""`stepdpo demo`: the pair pipeline, and `--loop` (the README's main command, `launch/demo.sh`), end to end on CPU.
The numbers the README prints for both are what these runs print: a drift fails here."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, child_env

pytestmark = pytest.mark.integration


def readme_block(first: str) -> list[str]:
    """The lines of the README's fenced block whose first line starts with `first` (the demo's printed results)."""
    block, inside = None, False
    for line in (REPO / "README.md").read_text().split("\n"):
        if line.startswith("```"):
            if inside and block and block[0].startswith(first):
                return block
            inside, block = not inside, []
        elif inside:
            block.append(line)
    raise AssertionError(f"README.md has no fenced block starting {first!r}")


def test_demo_learns_on_held_out_problems(tmp_path):
    res = subprocess.run([sys.executable, "-m", "stepdpo.cli", "demo", "--out", str(tmp_path / "demo"), "--no-progress"],
                         env=child_env(OMP_NUM_THREADS=2), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    before, after = summary["before"]["pair_accuracy"], summary["after"]["pair_accuracy"]
    assert 0.3 <= before <= 0.7, "an untrained model should be near chance"
    assert after >= 0.80
    assert set(summary["stages"]) == {"tiny_model", "synth", "prepare", "score", "eval_before", "train", "eval_after"}
    assert (tmp_path / "demo" / "training_curves.png").stat().st_size > 1000
    # standard output is the results, exactly the README's block; each stage's time is a line on standard error
    assert res.stdout.lstrip("\n").rstrip("\n").split("\n") == readme_block("stepdpo demo (t5")
    assert [x.split()[1] for x in res.stderr.splitlines() if x.startswith("[demo] ")] == list(summary["stages"])
    assert (tmp_path / "demo" / "demo.log").stat().st_size > 0


def test_the_main_command_runs_the_loop_and_prints_the_readmes_numbers(demo_loop):
    """`bash launch/demo.sh`, the README's main command, as shipped (set-up, then `stepdpo demo --loop`): every
    stage runs, held-out problems are unseen, summary.json has every accuracy with its interval, the paired tests,
    the pairs mined and the time per stage, and standard output is the README's block, byte for byte."""
    out, res = demo_loop
    assert res.stdout.lstrip("\n").rstrip("\n").split("\n") == readme_block("stepdpo loop (tiny")
    s = json.loads((out / "summary.json").read_text())
    a = s["accuracy"]
    assert set(a) == {"A0", "A1", "sft", "rft", "sft_at_sft_lr"}
    assert 0.2 <= a["A0"]["accuracy"] <= 0.8 and a["A1"]["accuracy"] > a["A0"]["accuracy"]  # room, and a rise
    assert all(r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] and r["problems"] == 177 for r in a.values())
    assert set(s["paired_tests"]) == {"A1_vs_A0", "A1_vs_sft", "A1_vs_rft", "A1_vs_sft_at_sft_lr", "sft_vs_A0",
                                      "rft_vs_A0", "sft_at_sft_lr_vs_A0"}
    for name in ("A1", "sft", "rft", "sft_at_sft_lr"):  # each paired difference is the accuracies' difference
        test = s["paired_tests"][f"{name}_vs_A0"] if name != "A1" else s["paired_tests"]["A1_vs_A0"]
        assert test["difference"] == pytest.approx(a[name]["accuracy"] - a["A0"]["accuracy"], abs=1e-12)
    assert s["mined_pairs"] == s["mine"]["pairs"] > 0 and s["task"]["eval_problems"] == 177
    assert s["generations"]["mine"] == s["mine"]["generations"] > 0
    assert {"sft", "answers A0", "mine", "train (stepwise DPO)", "answers A1", "control sft",
            "answers sft"} <= set(s["seconds"]["stages"])
    # standard error: one line per stage with its time (no progress bars with --no-progress), nothing else
    assert [x for x in res.stderr.splitlines() if x.startswith("[loop] ")] and all(
        x.startswith(("[loop] ", "[setup] ", "stage seconds: ")) for x in res.stderr.splitlines() if x.strip())
    assert "Warning" not in res.stderr and "warnings.warn" in (out / "loop.log").read_text()

    # each control is trained like the DPO stage (steps, learning rate, schedule, batch); the one at the SFT stage's
    # learning rate is reported beside it
    def args(run):
        saved = json.loads((out / run / "final" / "stepdpo_config.json").read_text())
        return {k: saved[k] for k in ("max_steps", "learning_rate", "lr_scheduler_type", "per_device_train_batch_size",
                                      "warmup_steps", "model_name_or_path")}

    assert args("control_sft") == args("dpo") and args("dpo")["learning_rate"] == s["settings"]["dpo_lr"]
    assert args("control_sft_at_sft_lr")["learning_rate"] == s["settings"]["sft_lr"] != s["settings"]["dpo_lr"]
    # RFT: as many steps again, on the policy's own right samples that `mine` wrote
    assert args("control_rft") == args("dpo")
    rft = json.loads((out / "control_rft" / "final" / "stepdpo_config.json").read_text())
    assert rft["train_data"] == str(out / "mine" / "solved.jsonl") and s["mine"]["solved_solutions"] > 0
    train = {json.loads(x)["problem"] for x in (out / "problems" / "train.jsonl").read_text().splitlines()}
    test = {json.loads(x)["problem"] for x in (out / "problems" / "test.jsonl").read_text().splitlines()}
    assert not train & test


def test_the_demo_runs_again_in_the_same_directory(tmp_path):
    """`stepdpo demo` twice: the second run replaces the first one's data instead of refusing."""
    from stepdpo.demo import run_demo

    first = run_demo(tmp_path, arch="mistral", problems=60, steps=2)
    again = run_demo(tmp_path, arch="mistral", problems=60, steps=2)
    assert again["data"] == first["data"] and again["before"] == first["before"]
