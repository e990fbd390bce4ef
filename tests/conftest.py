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
