"""benchmarks/gpu: the GPU check's dry mode, the same code on CPU at tiny sizes, so the kit cannot rot between the
sessions that are lent a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, child_env

pytestmark = [pytest.mark.integration, pytest.mark.deepspeed]


def test_the_dry_run_passes_every_check_it_can_run_on_cpu(tmp_path):
    res = subprocess.run([sys.executable, "-m", "benchmarks.gpu.check", "--dry", "--out", str(tmp_path / "out"),
                          "--work", str(tmp_path / "work")], cwd=REPO, env=child_env(OMP_NUM_THREADS=1),
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "gpu_report.json").read_text())
    assert report["passed"] and report["machine"]["dry"] is True
    checks = report["checks"]
    assert list(checks) == ["qlora_7b", "prefix_sharing_7b", "full_bf16_1b", "loop_smollm2"]
    q = checks["qlora_7b"]
    assert q["load_in_4bit"] and q["lora_r"] == 64 and q["gradient_checkpointing"]  # the shipped recipe's settings
    assert q["losses"][-1] < q["losses"][0] and q["plan_gib"] > 0
    assert checks["prefix_sharing_7b"]["logp_max_abs_diff"] < 1e-3  # float32 on CPU: far inside the bf16 bar
    assert checks["full_bf16_1b"]["zero_stage"] == 3 and len(checks["full_bf16_1b"]["losses"]) == 3
    assert checks["loop_smollm2"]["lines"][0][1].startswith("skipped")
    md = (tmp_path / "out" / "gpu_report.md").read_text()
    assert md.count("- PASS:") >= 4 and "FAIL" not in md and "dry run on CPU" in md


def test_run_sh_refuses_without_the_prepared_wheels(tmp_path):
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "run.sh")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2 and "bash benchmarks/gpu/prepare.sh" in res.stderr
