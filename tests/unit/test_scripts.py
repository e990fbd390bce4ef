"""The shell entry points (launch/, slurm/): `--help` prints the script's whole header comment."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPTS = ["launch/serve_reward.sh", "launch/train.sh", "slurm/loop.sh", "slurm/pipeline.sh"]


def header(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines()[1:]:  # after the shebang, up to the first line of code
        if not line.startswith("#"):
            break
        lines.append(line[2:] if line.startswith("# ") else line[1:])
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_the_whole_header_and_nothing_else(script):
    # The usage text used to be a fixed line range: pipeline.sh's lost its last line (--dry-run, --help) when
    # options were added, and train.sh's and serve_reward.sh's printed lines of code after the header.
    res = subprocess.run(["bash", str(REPO / script), "--help"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout == header(REPO / script)
    assert "set -euo" not in res.stdout and len(res.stdout.splitlines()) > 3


@pytest.mark.parametrize("script, given, hint", [
    # the stages take --reward_model and --reward-model alike; the scripts only the dashed form
    ("slurm/pipeline.sh", "--reward_model", " (did you mean --reward-model?)"),
    ("launch/train.sh", "--Main_Address", " (did you mean --main-address?)"),
    # a value after "=": these scripts take it as the next argument
    ("slurm/loop.sh", "--mode=cpu", " (write --mode VALUE: the value is the next argument, not after '=')"),
    # the start of options: all of them (no abbreviations here)
    ("slurm/loop.sh", "--round", " (did you mean --rounds?)"),
    ("slurm/pipeline.sh", "--time",
     " (did you mean --time-eval, --time-prepare, --time-reward, --time-score or --time-train?)"),
    # spelling, compared without the dashes every option has: --reward_model is not near --max-model-len
    ("launch/serve_reward.sh", "--max-model-length", " (did you mean --max-model-len?)"),
    ("launch/serve_reward.sh", "--reward_model", ""),
    ("launch/train.sh", "--frobnicate", ""),
])
def test_an_unknown_option_is_refused_with_the_nearest_real_one(script, given, hint):
    """Before: "unknown option --reward_model (see --help)" and nothing more, though the Python stages, which take
    underscores, suggest the name."""
    args = ["m"] if script.endswith("serve_reward.sh") else []  # its first argument is the model
    res = subprocess.run(["bash", str(REPO / script), *args, given], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert res.stderr == f"{Path(script).name}: unknown option {given}{hint}; see --help\n"


def test_serve_reward_names_a_missing_model_directory_at_once(tmp_path):
    # Before, a missing local directory reached vLLM as a hub id and failed after its start-up, with a traceback
    # about repo ids; a hub id (org/name) still goes through as it is.
    missing = tmp_path / "no-such-model"
    res = subprocess.run(["bash", str(REPO / "launch/serve_reward.sh"), str(missing), "--cpu"], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2
    assert res.stderr == (f"serve_reward.sh: model directory {missing} does not exist; give a saved model directory "
                          "or a hub id (org/name)\n")


def test_serve_reward_check_starts_nothing_and_names_a_bad_argument(tmp_path):
    serve = ["bash", str(REPO / "launch/serve_reward.sh"), "org/reward-model"]
    # --check stops before anything starts: VLLM_PYTHON would fail at once if it were run
    res = subprocess.run(serve + ["--method", "prm", "--tp", "8", "--check"], capture_output=True, text=True,
                         timeout=30, env={"PATH": "/usr/bin:/bin", "VLLM_PYTHON": "/bin/false"})
    assert res.returncode == 0 and res.stdout == res.stderr == ""
    for args, message in ((["--tp", "eight"], "--tp must be a positive integer, got 'eight'"),
                          (["--port", "70000"], "--port must be in 1..65535, got '70000'"),
                          (["--max-model-len", "4k"], "--max-model-len must be a positive integer, got '4k'"),
                          (["--prm-head", "cls"], "--prm-head must be lm or classifier")):
        res = subprocess.run(serve + [*args, "--check"], capture_output=True, text=True, timeout=30)
        assert res.returncode == 2 and res.stderr == f"serve_reward.sh: {message}\n", args


def test_loop_without_sft_or_rft_jobs_does_not_resolve_the_sft_recipe(tmp_path):
    # --skip-sft without --rft-control submits no job that reads --sft-recipe, so it is never checked; resolving
    # its path anyway printed "cd: ...: No such file or directory" among the dry run's sbatch lines.
    (tmp_path / "p.jsonl").write_text("{}\n")
    res = subprocess.run(["bash", str(REPO / "slurm/loop.sh"), "--run-dir", str(tmp_path / "run"), "--model", "m",
                          "--problems", str(tmp_path / "p.jsonl"), "--skip-sft", "--sft-recipe",
                          str(tmp_path / "no-such-dir" / "sft.yaml"), "--dry-run"],
                         capture_output=True, text=True, timeout=300)  # a hang guard: `stepdpo check` took >60 s
    # on a 2-core machine running two other jobs
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[0].split() == ["mine1=<mine1>", "train1=<train1>", "mine2=<mine2>", "train2=<train2>"]
    assert "No such file" not in res.stderr and res.stderr.count("sbatch --parsable") == 4


def test_loop_and_pipeline_check_every_jobs_options_before_submitting(tmp_path):
    # Before, a misspelt override or recipe key was found when its job started: --train-args after the SFT job
    # and the first mining job had run (a day on the 7B recipes), --rft-args likewise.
    (tmp_path / "p.jsonl").write_text("{}\n")
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text((REPO / "configs/recipes/mistral-7b/loop_dpo_qlora_zero3.yaml").read_text() + "bta: 0.2\n")
    loop = ["bash", str(REPO / "slurm/loop.sh"), "--run-dir", str(tmp_path / "run"), "--model", "m", "--problems",
            str(tmp_path / "p.jsonl"), "--sft-data", str(tmp_path / "p.jsonl"), "--rft-control", "--dry-run"]
    res = subprocess.run(loop + ["--recipe", str(recipe), "--mine-args", "--samples 4 --rollout 2",
                                 "--rft-args", "--max_stpes 3"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.splitlines() == [
        "loop.sh: nothing submitted: fix these options (the recipes' keys or the --*-args overrides)",
        f"stepdpo check: train: --config {recipe}: unknown key 'bta' (did you mean beta?); `stepdpo train --help` "
        "lists every option (keys are option names)",
        "stepdpo check: sft: unknown option --max_stpes (did you mean --max_steps?); `stepdpo sft --help` lists every "
        "option"]  # --rollout is argparse's prefix of --rollouts: taken, as the job would take it
    assert not (tmp_path / "run").exists()
    res = subprocess.run(["bash", str(REPO / "slurm/pipeline.sh"), "--run-dir", str(tmp_path / "pipe"), "--input",
                          str(tmp_path / "p.jsonl"), "--model", "m", "--reward-model", "r", "--recipe",
                          str(REPO / "configs/recipes/mistral-7b/qlora_zero3.yaml"), "--train-args",
                          "--lr_scheduler_type cosin", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "sbatch" not in res.stderr and not (tmp_path / "pipe").exists()
    assert res.stderr.splitlines()[-1].startswith(
        "stepdpo check: train: argument --lr_scheduler_type/--lr-scheduler-type: invalid choice: 'cosin' (choose from")
    # --serve-args go to launch/serve_reward.sh in the reward-server job: before, a misspelt one failed that job,
    # and the score job waited an hour (URL_TIMEOUT) for a URL before the chain failed
    res = subprocess.run(["bash", str(REPO / "slurm/pipeline.sh"), "--run-dir", str(tmp_path / "pipe"), "--input",
                          str(tmp_path / "p.jsonl"), "--model", "m", "--reward-model", "r", "--recipe",
                          str(REPO / "configs/recipes/mistral-7b/qlora_zero3.yaml"), "--serve-args",
                          "--dtype bfloat16 --max-model-length 4096", "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and not (tmp_path / "pipe").exists()
    assert res.stderr.splitlines()[-2:] == [  # after the recipe's global-batch warning
        "serve_reward.sh: unknown option --max-model-length (did you mean --max-model-len?); see --help",
        "pipeline.sh: --serve-args '--dtype bfloat16 --max-model-length 4096': see above; nothing submitted"]
    # a node where the jobs' environment cannot be set up: said, and the submission goes ahead
    res = subprocess.run(loop + ["--env", "cmd:false"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines()[0] == ("loop.sh: warning: the --env set-up failed on this node; options not "
                                          "checked before submitting")
