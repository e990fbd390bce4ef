"""`stepdpo loop`: the same command gives the same bytes twice, --reuse keeps what it may, and the real-model recipe
runs end to end (SmolLM2-135M-Instruct's real GGUF file) at its --quick size."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, child_env

pytestmark = pytest.mark.integration

# the demo's loop at a reduced size: every stage runs (sft, mine, DPO, three controls), in about half a minute
REDUCED = ["--sft-steps", "150", "--train-problems", "120", "--mine-problems", "60", "--test-problems", "40",
           "--dpo-steps", "10", "--validation-problems", "20"]


def _loop(out, *args, **env):
    res = subprocess.run([sys.executable, "-m", "stepdpo.cli", "loop", "--out", str(out), "--no-progress", *args],
                         env=child_env(OMP_NUM_THREADS=2, **env), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same command twice, into two directories (--reuse has nothing to reuse in a new one); the reuse test
    then runs again in the first, so the suite pays for two reduced runs and a DPO, not three runs."""
    root = tmp_path_factory.mktemp("loop")
    return root, [_loop(root / name, *REDUCED, "--reuse") for name in ("a", "b")]


@pytest.mark.xdist_group("loop")  # one worker builds two_runs
def test_the_same_command_gives_the_same_summary_twice(two_runs):
    """Thread count, seeds and sampling order fixed: two runs into two directories print the same bytes and write
    the same summary but for the seconds (the only thing in it that may differ)."""
    root, runs = two_runs
    assert runs[0].stdout == runs[1].stdout and "stepdpo loop (tiny, " in runs[0].stdout
    summaries = [json.loads((root / name / "summary.json").read_text()) for name in ("a", "b")]
    for s in summaries:
        assert s.pop("seconds")["total"] > 0
    assert summaries[0] == summaries[1]
    assert summaries[0]["mined_pairs"] > 0 and set(summaries[0]["accuracy"]) == {"A0", "A1", "sft", "rft",
                                                                                    "sft_at_sft_lr"}


@pytest.mark.xdist_group("loop")
def test_reuse_keeps_what_an_earlier_run_trained_with_the_same_settings(two_runs):
    """--reuse: a second run with DPO's rate changed and its steps set by --dpo-epochs keeps the SFT model and every
    cached generation, and trains DPO and the controls (which match DPO's rate and steps) again; a run directory
    moved elsewhere keeps every model."""
    run = two_runs[0] / "a"
    sft_weights = (run / "sft" / "final" / "model.safetensors").stat().st_mtime_ns
    # a model trained when the loop logged every 25 steps is the same model: reporting settings do not count
    config = run / "sft" / "final" / "stepdpo_config.json"
    saved = json.loads(config.read_text())
    assert saved["logging_steps"] == 5
    config.write_text(json.dumps(dict(saved, logging_steps=25, disable_tqdm=not saved["disable_tqdm"])))
    # one DPO setting changed, and the steps set by --dpo-epochs from the pairs mined (REDUCED's --dpo-steps yields)
    changed = ["--reuse", "--controls", "sft", "--dpo-lr", "1e-4", "--dpo-epochs", "1"]
    _loop(run, *REDUCED, *changed)
    log = (run / "loop.log").read_text()
    assert (run / "sft" / "final" / "model.safetensors").stat().st_mtime_ns == sft_weights
    assert log.count(f"reused {run / 'sft' / 'final'}") == 1 and "reused " + str(run / "dpo") not in log
    s = json.loads((run / "summary.json").read_text())
    assert s["settings"]["dpo_lr"] == 1e-4 and s["mine"]["generations"] == 0  # every sample came from the cache
    assert set(s["accuracy"]) == {"A0", "A1", "sft"}
    saved = json.loads((run / "control_sft" / "final" / "stepdpo_config.json").read_text())
    assert saved["learning_rate"] == 1e-4
    steps = -(-s["mined_pairs"] // s["settings"]["batch"])  # one epoch: ceil(pairs / batch)
    assert s["settings"]["dpo_steps"] == steps != 10 and f"{steps} steps for DPO and each control" in log
    assert saved["max_steps"] == steps == json.loads((run / "dpo" / "final" / "stepdpo_config.json").read_text())[
        "max_steps"]
    # the same settings measured on the validation problems (the README's protocol: choose there, then measure the
    # test problems with --reuse): every trained model is kept, DPO's included, and only answers are generated
    weights = {stage: (run / stage / "final" / "model.safetensors").stat().st_mtime_ns
               for stage in ("sft", "dpo", "control_sft")}
    res = _loop(run, *REDUCED, *changed, "--evaluate", "validation")
    assert {stage: (run / stage / "final" / "model.safetensors").stat().st_mtime_ns for stage in weights} == weights
    this_run = res.stdout + (run / "loop.log").read_text().split("===== loop: model")[-1]
    assert all(f"reused {run / stage / 'final'}" in this_run for stage in weights), this_run[-3000:]
    assert json.loads((run / "summary.json").read_text())["task"]["evaluate"] == "validation"
    # both splits' numbers stay: the validation run wrote its own copy and left the test run's alone
    assert (run / "summary_validation.json").read_text() == (run / "summary.json").read_text()
    assert json.loads((run / "summary_test.json").read_text()) == s
    # and so do both splits' samples: samples.jsonl is the split measured last
    for d in ("answers_before", "answers_after", "answers_control_sft"):
        samples = {split: (run / d / f"samples_{split}.jsonl").read_text() for split in ("validation", "test")}
        assert samples["validation"] != samples["test"] and samples["validation"] == (run / d / "samples.jsonl").read_text()
    # the run directory moved: every model is the same model trained from the same model and data (by content), so
    # each is kept. Before, the saved paths differed and every stage trained again; then DPO still did, because the
    # mined pairs name their problem file's new path (provenance, which the pairs' fingerprint now leaves out).
    moved = run.with_name("a-moved")
    run.rename(moved)
    res = _loop(moved, *REDUCED, *changed, "--evaluate", "validation")
    this_run = res.stdout + (moved / "loop.log").read_text().split("===== loop: model")[-1]
    assert all(f"reused {moved / stage / 'final'}" in this_run for stage in weights), this_run[-3000:]
    assert {stage: (moved / stage / "final" / "model.safetensors").stat().st_mtime_ns for stage in weights} == weights
    assert str(moved / "problems") in (moved / "mine" / "pairs.jsonl").read_text()  # the provenance did change


def test_the_real_model_recipe_quick(smollm2_gguf, tmp_path):
    """configs/recipes/smollm2-135m/loop_arith.yaml at --quick through the benchmark's own entry (what CI runs of the
    long experiment), on one-operation problems with one-digit numbers, sampled at temperature 0.3 from the 20 likeliest
    tokens, so that a few of them are enough to mine pairs from (two SFT steps teach nothing; greedy, SmolLM2 solves
    about half of these, and at 0.7 a CI run drew no right sample in 12, so no pair): the registry model
    converted, SFT, A0, mine, stepwise DPO, A1, the SFT and RFT controls; a summary with intervals and tests. (The
    GSM8K recipe cannot show the path at this size: two SFT steps leave SmolLM2 at 0 of a few GSM8K problems, and
    mine finds nothing to pair; its stages are each tested on GSM8K in test_models.py.)"""
    results = tmp_path / "loop_results.json"
    res = subprocess.run([sys.executable, "-m", "benchmarks.loop", "--task", "arith", "--quick", "--backend", "hf",
                          "--out", str(tmp_path / "run"), "--results", str(results), "--",
                          "--synth-max-value", "9", "--synth-min-ops", "1", "--synth-max-ops", "1",
                          "--temperature", "0.3", "--top-k", "20"],
                         cwd=REPO, env=child_env(OMP_NUM_THREADS=2), capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["model"] == "registry:smollm2-135m-instruct" and s["settings"]["quick"] is True
    assert s["settings"]["dpo_steps"] == 2 and s["mined_pairs"] > 0
    assert (tmp_path / "run" / "model" / "stepdpo_provenance.json").is_file()
    assert set(s["accuracy"]) == {"A0", "A1", "sft", "rft"} and set(s["paired_tests"]) == {
        "A1_vs_A0", "A1_vs_sft", "A1_vs_rft", "sft_vs_A0", "rft_vs_A0"}
    for row in s["accuracy"].values():
        assert row["problems"] == s["task"]["eval_problems"] > 0 and 0 <= row["ci95"][0] <= row["ci95"][1] <= 1
    assert s["generations"]["mine"] > 0 and {"sft", "mine", "train (stepwise DPO)"} <= set(s["seconds"]["stages"])
    # the recipe's prompt: SmolLM2's chat template with an instruction asking for one step per line
    first = json.loads((tmp_path / "run" / "answers_before" / "samples.jsonl").read_text().splitlines()[0])
    measured = tmp_path / "run" / "problems" / f"{s['task']['evaluate']}.jsonl"  # benchmarks.loop: validation
    assert s["task"]["evaluate"] == "validation" and first["problem"] in measured.read_text()
    recorded = json.loads(results.read_text())["runs"][-1]
    assert recorded["quick"] is True and recorded["task"] == "arith" and recorded["accuracy"]["A1"] == s["accuracy"]["A1"]
    assert recorded["overrides"][:2] == ["--synth-max-value", "9"]


def test_a_loop_whose_mining_finds_no_pair_stops_with_what_it_measured(tmp_path):
    """The untrained tiny model solves nothing, so `mine` has no correct continuation to pair: the loop stops with
    one line saying why and how to get pairs, and summary.json keeps A0 and the mining report (a GSM8K run at its
    floor, or at --quick, ends so; before, it left no summary). Mined with --locate equations and greedy solutions
    (--sample-temperature 0), which the loop passes on to mine."""
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "stepdpo.cli", "loop", "--out", str(out), "--no-progress",
                          "--sft-steps", "0", "--train-problems", "8", "--mine-problems", "4", "--test-problems", "6",
                          "--samples", "1", "--sample-temperature", "0", "--rollouts", "2", "--max-new-tokens", "8",
                          "--dpo-steps", "1", "--locate", "equations"],
                         env=child_env(OMP_NUM_THREADS=2), capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert "mine found no pair in 4 training problems" in res.stderr and "summary.json" in res.stderr
    assert "Traceback" not in res.stderr
    s = json.loads((out / "summary.json").read_text())
    assert json.loads((out / "summary_test.json").read_text()) == s
    assert s["stopped"].startswith("mine found no pair") and s["mined_pairs"] == 0
    assert set(s["accuracy"]) == {"A0"} and s["paired_tests"] == {} and "after" not in s["answer_accuracy"]
    assert s["mine"]["problems"] == 4 and s["generations"]["mine"] > 0 and "mine" in s["seconds"]["stages"]
    assert s["settings"]["locate"] == s["mine"]["locate"] == "equations"  # the loop's --locate reaches mine
    assert s["settings"]["sample_temperature"] == s["mine"]["sample_temperature"] == 0  # and so does this
