"""`stepdpo demo`, the README's main command, end to end on CPU."""

import json
import subprocess
import sys

import pytest

from tests.conftest import child_env

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
