"""The SLURM scripts on a real single-node cluster (slurm-wlm + munge), started and stopped here."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, child_env
from stepdpo.testing import vllm_available

pytestmark = [
    pytest.mark.integration, pytest.mark.slurm,
    pytest.mark.skipif(shutil.which("slurmctld") is None or os.geteuid() != 0,
                       reason="needs root and slurm-wlm + munge (launch/setup.sh --slurm)"),
]
RECIPE = REPO / "configs" / "recipes" / "tiny" / "mistral_cpu.yaml"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    out = subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "start", str(d)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    env = child_env(SLURM_CONF=d / "slurm.conf")
    yield env
    subprocess.run(["bash", str(REPO / "slurm" / "local_cluster.sh"), "stop", str(d)], timeout=60)


def job_field(env, job, field):
    out = subprocess.run(["scontrol", "show", "job", str(job), "-o"], env=env, capture_output=True, text=True).stdout
    m = re.search(rf"\b{field}=(\S+)", out)
    return m.group(1) if m else None


def wait_state(env, job, states=FINAL, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_field(env, job, "JobState")
        if state in states:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job} still {job_field(env, job, 'JobState')} after {timeout}s")


def sbatch(env, *args, **extra_env):
    e = dict(env, **{k: str(v) for k, v in extra_env.items()})
    res = subprocess.run(["sbatch", "--parsable", "--chdir", str(REPO), *map(str, args)], env=e, capture_output=True,
                         text=True, check=True)
    return res.stdout.strip().split(";")[0]


def losses(run_dir: Path) -> list[float]:
    s = json.loads((run_dir / "train_summary.json").read_text())
    return [h["loss"] for h in s["log_history"] if "loss" in h and "train_loss" not in h]


TRAIN_ARGS = ["--per_device_train_batch_size", 2]


@pytest.mark.parametrize("mode, tol", [("cpu-ddp", 3e-5), ("cpu-zero3", 1e-4)])  # as in test_distributed
def test_two_tasks_act_as_two_machines(mode, tol, cluster, tiny_mistral, synth_pairs, tmp_path):
    """train.sbatch with 2 tasks: machine ranks 0 and 1 (expanded on the node), rendezvous on the first
    node's address; one job of world size 2, with the same losses as one process with the same global batch."""
    run = tmp_path / "two"
    job = sbatch(cluster, "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", f"--output={tmp_path}/two.out",
                 REPO / "slurm" / "train.sbatch", "--model_name_or_path", tiny_mistral, "--train_pairs",
                 synth_pairs / "train" / "pairs.jsonl", "--max_steps", 4, *TRAIN_ARGS,
                 RECIPE=RECIPE, RUN_DIR=run, MODE=mode, PROCS=1)
    assert wait_state(cluster, job) == "COMPLETED", (tmp_path / "two.out").read_text()[-3000:]
    log = (tmp_path / "two.out").read_text()
    assert "machine_rank=0" in log and "machine_rank=1" in log and "2 machine(s), main 127.0.0.1:" in log
    one = subprocess.run(["bash", str(REPO / "launch" / "train.sh"), "--mode", "cpu", "--config", str(RECIPE),
                          "--no-preflight", "--", "--model_name_or_path", str(tiny_mistral), "--train_pairs",
                          str(synth_pairs / "train" / "pairs.jsonl"), "--output_dir", str(tmp_path / "one"),
                          "--max_steps", "4", "--per_device_train_batch_size", "4"], env=child_env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    assert losses(run) == pytest.approx(losses(tmp_path / "one"), abs=tol)


def test_preemption_saves_requeues_and_resumes(cluster, tiny_mistral, synth_pairs, tmp_path):
    args = ["--model_name_or_path", tiny_mistral, "--train_pairs", synth_pairs / "train" / "pairs.jsonl",
            "--max_steps", 120, "--per_device_train_batch_size", 8, "--save_strategy", "steps", "--save_steps", 40]
    env = dict(RECIPE=RECIPE, MODE="cpu-ddp", PROCS=1)
    straight = sbatch(cluster, "--ntasks=1", f"--output={tmp_path}/straight.out", REPO / "slurm" / "train.sbatch",
                      *args, RUN_DIR=tmp_path / "straight", **env)
    assert wait_state(cluster, straight) == "COMPLETED"

    out = tmp_path / "pre.out"
    job = sbatch(cluster, "--ntasks=1", f"--output={out}", REPO / "slurm" / "train.sbatch", *args,
                 RUN_DIR=tmp_path / "pre", **env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (tmp_path / "pre" / "checkpoint-40" / "COMPLETED").exists():
        time.sleep(0.3)  # well into training (its log shows a progress bar, not a line per step)
    # what SLURM does `--signal=B:USR1@N` before the time limit, sent now
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and int(job_field(cluster, job, "Restarts") or 0) < 1:
        time.sleep(0.5)
    assert int(job_field(cluster, job, "Restarts")) == 1, out.read_text()[-3000:]
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster)
    assert wait_state(cluster, job) == "COMPLETED", out.read_text()[-3000:]
    log = out.read_text()
    m = re.search(r"pre-emption requested; every rank saves a checkpoint and stops", log)
    assert m and "requeueing job" in log and "resuming from" in log
    saved = re.search(r"step (\d+): pre-emption requested", log).group(1)
    assert f"resuming from {tmp_path / 'pre'}/checkpoint-{saved}" in log
    summary = json.loads((tmp_path / "pre" / "train_summary.json").read_text())
    assert summary["global_step"] == 120
    assert losses(tmp_path / "pre")[-1] == pytest.approx(losses(tmp_path / "straight")[-1], abs=1e-6)
    assert losses(tmp_path / "pre") == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)


# The stepwise DPO recipes. sft's runs before the pipeline; the loop's trains on mined pairs and runs through
# slurm/loop.sh (test_loop_runs_sft_then_two_rounds_of_mine_and_train).
SEVEN_B = sorted(p for p in (REPO / "configs" / "recipes" / "mistral-7b").glob("*.yaml")
                 if "train_data:" not in p.read_text() and not p.stem.startswith("loop_"))


@pytest.mark.skipif(not vllm_available(), reason="no .venv-vllm: run launch/setup.sh --vllm")
@pytest.mark.parametrize("recipe", SEVEN_B, ids=lambda p: p.stem)
def test_pipeline_runs_each_7b_recipe_to_a_completed_eval(recipe, cluster, tiny_mistral, tiny_mistral_v1, request,
                                                          tmp_path):
    """slurm/pipeline.sh with each shipped Mistral-7B recipe, shrunk only by overrides (a tiny Mistral, CPU, two
    steps, one process): prepare -> reward server -> score -> train (ZeRO-3 on CPU) -> eval, all COMPLETED.
    The headline recipe (QLoRA) starts its own reward-server job; the others score on a server that is already
    running (`--reward-url`, the session's vLLM judge), which the pipeline must leave running."""
    from stepdpo.data.synthetic import SynthConfig, write_synthetic

    from stepdpo.data.synthetic import SynthOptions, synth

    write_synthetic(tmp_path / "prm.jsonl", SynthConfig(problems=80, seed=4, max_value=9))
    train_args = ("--use_cpu true --max_steps 2 --per_device_train_batch_size 2 --eval_steps 1 "
                  "--run_name 'a name with spaces'")
    answers, reward = [], ["--reward-model", str(tiny_mistral), "--time-reward", "00:20:00"]
    headline = recipe.stem == "qlora_zero3"
    if headline:  # the headline recipe also gets the answer-accuracy job (vLLM, merged adapter)
        synth(SynthOptions(out=str(tmp_path / "problems.jsonl"), kind="problems", problems=8, seed=5, max_value=9))
        answers = ["--answers", str(tmp_path / "problems.jsonl")]
    else:
        judge = request.getfixturevalue("vllm_judge")
        reward = ["--reward-model", str(tiny_mistral_v1), "--reward-url", judge.url]
    res = subprocess.run(["bash", str(REPO / "slurm" / "pipeline.sh"), "--run-dir", str(tmp_path / "run"), "--input",
                          str(tmp_path / "prm.jsonl"), "--model", str(tiny_mistral), *reward, "--recipe", str(recipe),
                          "--cpu", "--mode", "cpu-zero3", "--train-args", train_args, *answers],
                         env=cluster, capture_output=True, text=True, check=True)
    # the recipe states a global batch of 128; one CPU process with batch 2 x accumulation 4 or 8 is not that
    assert "warning:" in res.stderr and "states 128" in res.stderr
    ids = dict(kv.split("=") for kv in res.stdout.split("\n")[0].split())
    assert set(ids) == {"prepare", "score", "train", "eval"} | ({"reward_server", "answers"} if headline else set())
    logs = tmp_path / "run" / "logs"
    state = wait_state(cluster, ids["eval"], timeout=900)
    assert state == "COMPLETED", "\n".join(p.read_text()[-2500:] for p in sorted(logs.glob("*.out")))
    for stage in ("prepare", "score", "train"):
        assert job_field(cluster, ids[stage], "JobState") == "COMPLETED"
    if headline:  # the score stage stopped the server it started when it finished
        assert wait_state(cluster, ids["reward_server"], timeout=60) in {"CANCELLED", "COMPLETED"}
    else:  # and left alone the one it was given
        assert requests.get(f"{judge.url}/health", timeout=10).status_code == 200
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["pairs"] > 0 and "pair_accuracy_ref" in metrics
    assert metrics["settings"]["beta"] == 0.5 and metrics["settings"]["from"]["beta"] == "run"  # the recipe's
    # an adapter's reference is its own base with the adapter off; a full fine-tune's, the model it started from
    assert metrics["reference"] == ("adapter disabled" if "lora" in recipe.stem else str(tiny_mistral))
    report = json.loads((tmp_path / "run" / "scored" / "score_report.json").read_text())
    assert report["backend"] == "vllm" and report["scored"] == report["substeps"]
    if not headline:
        assert report["urls"] == [judge.url] and not (tmp_path / "run" / "reward_urls").exists()
    assert (tmp_path / "run" / "eval" / "training_curves.png").is_file()
    saved = json.loads((tmp_path / "run" / "train" / "final" / "stepdpo_config.json").read_text())
    assert saved["run_name"] == "a name with spaces"  # one argument, through sbatch, srun and train.sh
    assert saved["eval_pairs"] == str(tmp_path / "run" / "pairs" / "test" / "pairs.jsonl")
    if answers:
        assert wait_state(cluster, ids["answers"], timeout=600) == "COMPLETED", \
            "\n".join(p.read_text()[-2500:] for p in sorted(logs.glob("answers-*.out")))
        report = json.loads((tmp_path / "run" / "answers" / "graded" / "report.json").read_text())
        assert report["samples"] == 8 and 0 <= report["accuracy"] <= 1
        assert (tmp_path / "run" / "answers" / "merged" / "config.json").is_file()  # the adapter was merged


def test_train_sbatch_takes_overrides_after_a_double_dash(cluster, tiny_mistral, synth_pairs, tmp_path):
    run = tmp_path / "dd"
    job = sbatch(cluster, "--ntasks=1", f"--output={tmp_path}/dd.out", REPO / "slurm" / "train.sbatch", "--",
                 "--model_name_or_path", tiny_mistral, "--train_pairs", synth_pairs / "train" / "pairs.jsonl",
                 "--max_steps", 1, "--run_name", "two words", RECIPE=RECIPE, RUN_DIR=run, MODE="cpu", PROCS=1)
    assert wait_state(cluster, job) == "COMPLETED", (tmp_path / "dd.out").read_text()[-3000:]
    assert json.loads((run / "final" / "stepdpo_config.json").read_text())["run_name"] == "two words"


def test_failing_stage_cancels_its_dependents(cluster, tiny_mistral, tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("[{ not json")
    res = subprocess.run(["bash", str(REPO / "slurm" / "pipeline.sh"), "--run-dir", str(tmp_path / "run"), "--input",
                          str(bad), "--model", str(tiny_mistral), "--reward-model", str(tiny_mistral), "--recipe",
                          str(RECIPE), "--cpu"], env=cluster, capture_output=True, text=True, check=True)
    ids = dict(kv.split("=") for kv in res.stdout.split("\n")[0].split())
    assert wait_state(cluster, ids["prepare"]) == "FAILED"
    for stage in ("score", "train", "eval"):
        assert wait_state(cluster, ids[stage], timeout=60) == "CANCELLED"
    # and the reward server notices its scoring job is gone and stops
    assert wait_state(cluster, ids["reward_server"], timeout=120) in {"COMPLETED", "CANCELLED"}


def test_a_reward_server_that_fails_fails_scoring_at_once(cluster, tiny_mistral, tmp_path):
    """Before: the score job waited URL_TIMEOUT (an hour) for a URL the failed server would never write, or took the
    URL an earlier run's server had left in the run directory; and the failed server's job said COMPLETED."""
    from stepdpo.data.synthetic import SynthConfig, write_synthetic

    write_synthetic(tmp_path / "prm.jsonl", SynthConfig(problems=20, seed=4, max_value=9))
    stale = tmp_path / "run" / "reward_urls"
    stale.mkdir(parents=True)
    (stale / "0").write_text("http://127.0.0.1:9\n")  # an earlier run's server, long gone
    # the vLLM environment fails to set up, as a `module load` that is not there would
    res = subprocess.run(["bash", str(REPO / "slurm" / "pipeline.sh"), "--run-dir", str(tmp_path / "run"), "--input",
                          str(tmp_path / "prm.jsonl"), "--model", str(tiny_mistral), "--reward-model",
                          str(tiny_mistral), "--recipe", str(RECIPE), "--cpu", "--vllm-env", "cmd:exit 3"],
                         env=dict(cluster, URL_TIMEOUT="300"), capture_output=True, text=True, check=True)
    ids = dict(kv.split("=") for kv in res.stdout.split("\n")[0].split())
    assert wait_state(cluster, ids["reward_server"], timeout=120) == "FAILED"
    assert wait_state(cluster, ids["score"], timeout=400) == "FAILED"
    logs = tmp_path / "run" / "logs"
    log = (logs / f"score-{ids['score']}.out").read_text()
    assert (f"[stage] the reward server (job {ids['reward_server']}) ended before any replica wrote its URL to "
            f"{tmp_path / 'run' / 'reward_urls'}: FAILED; its log: {logs / ('reward-' + ids['reward_server'] + '.out')}"
            ) in log, log[-2000:]
    assert wait_state(cluster, ids["train"], timeout=60) == "CANCELLED"


def test_pipeline_validates_and_dry_runs(cluster, tiny_mistral, tmp_path):
    base = ["bash", str(REPO / "slurm" / "pipeline.sh"), "--run-dir", str(tmp_path / "r"), "--model", "m",
            "--reward-model", "r", "--recipe", str(RECIPE)]
    res = subprocess.run(base + ["--input", str(tmp_path / "missing.jsonl")], env=cluster, capture_output=True,
                         text=True)
    assert res.returncode == 2 and "missing.jsonl: no such file" in res.stderr
    (tmp_path / "d.jsonl").write_text("{}\n")
    res = subprocess.run(base + ["--input", str(tmp_path / "d.jsonl"), "--time-train", "tomorrow"], env=cluster,
                         capture_output=True, text=True)
    assert res.returncode == 2 and "not SLURM's" in res.stderr
    res = subprocess.run(base + ["--input", str(tmp_path / "d.jsonl"), "--nodes", "2", "--gpus-per-node", "8",
                                 "--partition", "gpu", "--dry-run"], env=cluster, capture_output=True, text=True)
    assert res.returncode == 0
    assert res.stderr.count("sbatch --parsable") == 5 and "--dependency afterok:\\<score\\>" in res.stderr
    assert "--nodes 2 --ntasks-per-node 1 --gpus-per-node 8" in res.stderr
    assert "squeue" not in res.stdout and not (tmp_path / "r" / "score_job_id").exists()
    # --reward-url: servers already running; no reward-server job, and the score job neither waits nor cancels
    given = base + ["--input", str(tmp_path / "d.jsonl"), "--reward-url", "http://n1:8100", "--reward-url",
                    "http://n2:8100", "--dry-run"]
    res = subprocess.run(given, env=cluster, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("prepare=<prepare> score=<score> train=")
    assert res.stderr.count("sbatch --parsable") == 4 and "reward_server.sbatch" not in res.stderr
    assert "--url\\ http://n1:8100\\ --url\\ http://n2:8100" in res.stderr
    assert "WAIT_URLS_DIR" not in res.stderr and "SERVER_JOB_ID" not in res.stderr
    for extra, message in [(["--reward-url", "n1:8100"], "not an http(s):// URL"),
                           (["--reward-url", "http://me:secret@n1:8100"], "--api-key-file"),
                           (["--reward-url", "http://n1:8100", "--serve-args", "--tp 2"], "--serve-args configures"),
                           (["--served-model-name", "rm"], "goes with --reward-url")]:
        res = subprocess.run(base + ["--input", str(tmp_path / "d.jsonl"), *extra], env=cluster, capture_output=True,
                             text=True)
        assert res.returncode == 2 and message in res.stderr and "secret" not in res.stderr, res.stderr


def test_loop_runs_sft_then_two_rounds_of_mine_and_train(cluster, solver, tmp_path):
    """slurm/loop.sh with the shipped loop recipes, shrunk by overrides (on CPU, two full-weight SFT steps from the
    demo's tiny step solver, so the policy solves some problems; two DPO steps per round, mining in-process): sft ->
    mine1 -> train1 -> mine2 -> train2, chained by afterok, all COMPLETED; round 2 mines with round 1's adapter
    merged into its base. With --rft-control, each round's RFT control trains on that round's right samples, beside
    the DPO job."""
    (tmp_path / "train.jsonl").write_text((solver / "train.jsonl").read_text())
    sft_args = ("--use_cpu true --max_steps 2 --learning_rate 5e-5 --per_device_train_batch_size 16 "
                "--gradient_accumulation_steps 1 --lr_scheduler_type constant --warmup_steps 0 --load_in_4bit false "
                "--use_peft false --dtype float32 --bf16 false --gradient_checkpointing false --save_strategy no")
    train_args = ("--use_cpu true --max_steps 2 --per_device_train_batch_size 2 --gradient_accumulation_steps 1 "
                  "--bnb_4bit_compute_dtype float32 --dtype float32 --bf16 false --gradient_checkpointing false")
    mine_args = "--samples 4 --rollouts 4 --max-new-tokens 64 --limit 40 --temperature 1.0 --batch-size 32"
    rft_args = sft_args
    res = subprocess.run(["bash", str(REPO / "slurm" / "loop.sh"), "--run-dir", str(tmp_path / "run"), "--model",
                          str(solver / "sft" / "final"), "--sft-data", str(tmp_path / "train.jsonl"), "--problems",
                          str(tmp_path / "train.jsonl"), "--rounds", "2", "--cpu", "--mine-backend", "hf",
                          "--sft-args", sft_args, "--train-args", train_args, "--mine-args", mine_args,
                          "--rft-control", "--rft-args", rft_args],
                         env=cluster, capture_output=True, text=True, check=True)
    ids = dict(kv.split("=") for kv in res.stdout.split("\n")[0].split())
    assert list(ids) == ["sft", "mine1", "train1", "rft1", "mine2", "train2", "rft2"]
    for later, earlier in (("mine1", "sft"), ("train1", "mine1"), ("rft1", "mine1"), ("mine2", "train1"),
                           ("train2", "mine2"), ("rft2", "mine2")):
        assert ids[earlier] in job_field(cluster, ids[later], "Dependency")
    assert "the RFT control's: " in res.stdout
    logs = tmp_path / "run" / "logs"
    for last in ("train2", "rft2"):
        state = wait_state(cluster, ids[last], timeout=900)
        assert state == "COMPLETED", "\n".join(p.read_text()[-2500:] for p in sorted(logs.glob("*.out")))
    run = tmp_path / "run"
    for r in (1, 2):
        report = json.loads((run / f"round{r}" / "mine" / "report.json").read_text())
        assert report["pairs"] > 0 and report["problems"] == 40
        assert (run / f"round{r}" / "train" / "final" / "adapter_model.safetensors").is_file()
    assert (run / "round1" / "mine" / "policy").resolve() == (run / "sft" / "final").resolve()  # a full model: as is
    assert (run / "round2" / "mine" / "policy").resolve() == (run / "round2" / "mine" / "merged").resolve()
    saved = json.loads((run / "round2" / "train" / "final" / "stepdpo_config.json").read_text())
    assert saved["loss_type"] == ["sigmoid", "sft"] and saved["model_name_or_path"] == str(run / "round2" / "mine" / "policy")
    for r in (1, 2):  # the control: the SFT recipe on the round's own right samples, from the policy that mined them
        rft = json.loads((run / f"round{r}" / "rft" / "final" / "stepdpo_config.json").read_text())
        assert rft["train_data"] == str(run / f"round{r}" / "mine" / "solved.jsonl")
        assert rft["model_name_or_path"] == str(run / f"round{r}" / "mine" / "policy")
        assert rft["max_steps"] == 2 and rft["learning_rate"] == 5e-5


def test_loop_validates_and_dry_runs_with_answer_jobs(cluster, tiny_mistral, tmp_path):
    (tmp_path / "p.jsonl").write_text("{}\n")
    bad = subprocess.run(["bash", str(REPO / "slurm" / "loop.sh"), "--run-dir", str(tmp_path / "run"), "--model", "m",
                          "--problems", str(tmp_path / "p.jsonl"), "--sft-data", str(tmp_path / "missing.jsonl")],
                         env=cluster, capture_output=True, text=True)
    assert bad.returncode == 2 and "--sft-data" in bad.stderr and "no such file" in bad.stderr
    res = subprocess.run(["bash", str(REPO / "slurm" / "loop.sh"), "--run-dir", str(tmp_path / "run"), "--model", "m",
                          "--problems", str(tmp_path / "p.jsonl"), "--held-out", str(tmp_path / "p.jsonl"),
                          "--skip-sft", "--rounds", "2", "--dry-run", "--nodes", "2", "--rft-control"],
                         env=cluster, capture_output=True, text=True, check=True)
    assert res.stdout.split("\n")[0].split() == [
        "mine1=<mine1>", "train1=<train1>", "answers1=<answers1>", "rft1=<rft1>", "answers-rft1=<answers-rft1>",
        "mine2=<mine2>", "train2=<train2>", "answers2=<answers2>", "rft2=<rft2>", "answers-rft2=<answers-rft2>"]
    assert res.stderr.count("slurm/mine.sbatch") == 2 and res.stderr.count("slurm/answers.sbatch") == 4
    assert "--dependency afterok:\\<rft2\\>" in res.stderr and "sft_qlora_zero3.yaml" in res.stderr
    lonely = subprocess.run(["bash", str(REPO / "slurm" / "loop.sh"), "--run-dir", str(tmp_path / "run"), "--model",
                             "m", "--problems", str(tmp_path / "p.jsonl"), "--skip-sft", "--rft-args", "--max_steps 9"],
                            env=cluster, capture_output=True, text=True)
    assert lonely.returncode == 2 and "--rft-args configures the --rft-control job; add --rft-control" in lonely.stderr
    assert "--gpus-per-node 8" in res.stderr and "--dependency afterok:\\<train1\\>" in res.stderr
