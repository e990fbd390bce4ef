"""Every shipped recipe parses, and trains a step on CPU shrunk only by overrides: another model (a tiny
one of the same architecture), other paths, one step, CPU. Everything else (beta, schedule, warmup,
LoRA, 4-bit, dtype, gradient checkpointing, eval and save settings, TensorBoard) is the recipe's own."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from stepdpo.cli import parse
from stepdpo.train.run import train
from stepdpo.train.sft import sft_main

pytestmark = pytest.mark.integration
# training recipes (train, sft); the real-model loop's recipes (configs/recipes/smollm2-135m/) are `stepdpo loop`'s,
# run at their --quick size in test_loop.py and checked key by key in tests/unit/test_configs.py
RECIPES = sorted(p for p in (Path(__file__).resolve().parents[2] / "configs" / "recipes").rglob("*.yaml")
                 if "dpo_steps:" not in p.read_text())


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    from stepdpo.data.synthetic import SynthOptions, synth

    path = tmp_path_factory.mktemp("sft") / "solutions.jsonl"
    synth(SynthOptions(out=str(path), kind="problems", problems=20, seed=0, max_value=9))
    return path


def test_recipes_exist():
    assert len(RECIPES) >= 7


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_trains_a_step_shrunk_by_overrides(recipe, tiny_mistral, tiny_t5, synth_pairs, sft_data, tmp_path):
    stage = "sft" if "train_data:" in recipe.read_text() else "train"
    # as shipped, it parses (on this GPU-less machine TrainingArguments refuses bf16 without use_cpu)
    config, _ = parse(stage, ["--config", str(recipe), "--use_cpu", "true"])
    model = tiny_t5 if "t5" in config.model_name_or_path else tiny_mistral
    data = ["--train_pairs", str(synth_pairs / "train" / "pairs.jsonl")] if stage == "train" else \
        ["--train_data", str(sft_data)]
    overrides = ["--model_name_or_path", str(model), *data,
                 "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--per_device_train_batch_size", "2",
                 "--use_cpu", "true", "--resume", "never", "--disable_tqdm", "true"]
    if getattr(config, "eval_pairs", None):
        overrides += ["--eval_pairs", str(synth_pairs / "test" / "pairs.jsonl")]
    config, _ = parse(stage, ["--config", str(recipe), *overrides])
    summary = train(config) if stage == "train" else sft_main(config)
    assert summary["global_step"] == 1
    losses = [h.get("loss", h.get("train_loss")) for h in summary["log_history"] if "loss" in h or "train_loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)
    assert (tmp_path / "run" / "final" / "COMPLETED").is_file()
    if config.report_to and "tensorboard" in config.report_to:
        assert list((tmp_path / "run").rglob("events.out.tfevents.*")), "no TensorBoard log written"
