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


def test_serve_reward_names_a_missing_model_directory_at_once(tmp_path):
    # Before, a missing local directory reached vLLM as a hub id and failed after its start-up, with a traceback
    # about repo ids; a hub id (org/name) still goes through as it is.
    missing = tmp_path / "no-such-model"
    res = subprocess.run(["bash", str(REPO / "launch/serve_reward.sh"), str(missing), "--cpu"], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2
    assert res.stderr == (f"serve_reward.sh: model directory {missing} does not exist; give a saved model directory "
                          "or a hub id (org/name)\n")


def test_loop_without_sft_or_rft_jobs_does_not_resolve_the_sft_recipe(tmp_path):
    # --skip-sft without --rft-control submits no job that reads --sft-recipe, so it is never checked; resolving
    # its path anyway printed "cd: ...: No such file or directory" among the dry run's sbatch lines.
    (tmp_path / "p.jsonl").write_text("{}\n")
    res = subprocess.run(["bash", str(REPO / "slurm/loop.sh"), "--run-dir", str(tmp_path / "run"), "--model", "m",
                          "--problems", str(tmp_path / "p.jsonl"), "--skip-sft", "--sft-recipe",
                          str(tmp_path / "no-such-dir" / "sft.yaml"), "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[0].split() == ["mine1=<mine1>", "train1=<train1>", "mine2=<mine2>", "train2=<train2>"]
    assert "No such file" not in res.stderr and res.stderr.count("sbatch --parsable") == 4
