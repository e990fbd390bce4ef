"""The shipped accelerate and DeepSpeed configs say what the multi-node path needs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ACC = Path(__file__).resolve().parents[2] / "configs" / "accelerate"


@pytest.mark.parametrize("path", sorted(ACC.glob("*.yaml")), ids=lambda p: p.stem)
def test_deepspeed_configs_use_the_standard_multinode_launcher(path):
    cfg = yaml.safe_load(path.read_text())
    if cfg["distributed_type"] == "DEEPSPEED":
        # pdsh (accelerate's default) needs a hostfile; without one every node trains alone
        assert cfg["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"
