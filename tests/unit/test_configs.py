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



STAGE_CONFIGS = sorted((ACC.parent / "stages").rglob("*.yaml"))


@pytest.mark.parametrize("path", STAGE_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_stage_configs_parse_as_their_stage(path, tmp_path):
    """configs/stages/<model>/<stage>.yaml are `--config` files of one stage (what slurm/loop.sh passes): every key
    is an option of that stage and arrives with its value."""
    from stepdpo.cli import parse

    options, _ = parse(path.stem, ["--config", str(path), "--problems", "p.jsonl", "--model", "m",
                                   "--out", str(tmp_path)])
    given = yaml.safe_load(path.read_text())
    assert given and {k: getattr(options, k) for k in given} == given


RECIPES = sorted((ACC.parent / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_shipped_recipe_passes_the_submit_time_check(path):
    """What slurm/pipeline.sh and loop.sh check before submitting, on this CPU machine too: the 7B recipes' bf16
    cannot be parsed in full without a GPU, but every key's name, type and choices can. The real-model loop recipes
    (configs/recipes/smollm2-135m/) are `stepdpo loop`'s."""
    from stepdpo.cli import check_options

    keys = yaml.safe_load(path.read_text())
    stage = "loop" if "dpo_steps" in keys else "sft" if "train_data" in keys else "train"  # loop: stepdpo loop's
    check_options(stage, ["--config", str(path)])
