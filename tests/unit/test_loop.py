"""stepdpo.loop's options and problem split: a recipe's sizes fit problem files of any size (GSM8K's real splits)."""

from __future__ import annotations

import json

import pytest

from stepdpo.cli import parse
from stepdpo.errors import OptionsError
from stepdpo.loop import LoopOptions, _problems, dpo_steps_for
from tests.conftest import REPO

GSM8K_RECIPE = REPO / "configs" / "recipes" / "smollm2-135m" / "loop_gsm8k.yaml"


def _lines(path) -> int:
    return sum(1 for x in path.read_text().splitlines() if x.strip())


def _split(problems, out):
    options, _ = parse("loop", ["--config", str(GSM8K_RECIPE), "--problems", str(problems), "--out", str(out)])
    files = _problems(options, out)
    return {name: _lines(out / "problems" / f"{name}.jsonl") for name in ("train", "validation", "test", "mine")}, files


def test_the_gsm8k_recipe_splits_gsm8k_train_into_its_stated_counts(gsm8k_train, tmp_path):
    # 1,961 two-step problems: the fractions give exactly the 300 held-out and 150 validation problems the README
    # states, 480 of the rest train and the first 120 of those are mined
    counts, files = _split(gsm8k_train, tmp_path)
    assert counts == {"train": 480, "validation": 150, "test": 300, "mine": 120}
    assert files["eval"] == tmp_path / "problems" / "test.jsonl"


def test_the_gsm8k_recipe_runs_on_a_smaller_file_in_proportion(gsm8k_train, tmp_path):
    """A real split the project has never seen (GSM8K's test split has 1,319 problems, about a quarter of them two
    steps) is too small for 300 + 150 + 480: the recipe's fractions scale, where counts stopped the run."""
    small = tmp_path / "small.jsonl"
    small.write_text("".join(gsm8k_train.read_text().splitlines(keepends=True)[:1319]))
    counts, _ = _split(small, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "problems" / "report.json").read_text())
    selected = report["selected"]
    assert 250 < selected < 450  # about a quarter of 1,319
    assert counts["test"] == round(0.153 * selected) and counts["validation"] == round(0.0765 * selected)
    assert counts["train"] == selected - counts["test"] - counts["validation"] and counts["mine"] == 120


def test_sizes_are_counts_or_fractions_of_a_problem_file():
    assert LoopOptions(test_problems=300.0).test_problems == 300 and isinstance(
        LoopOptions(test_problems=300.0).test_problems, int)
    with pytest.raises(OptionsError, match="--test-problems: 0.2: --problems synth generates a whole count"):
        LoopOptions(test_problems=0.2)
    with pytest.raises(OptionsError, match="--validation-problems: 1.5: a whole count, or for a problem file"):
        LoopOptions(problems="file.jsonl", validation_problems=1.5)
    # --quick takes its own few problems, not a fraction of the file (hundreds of GSM8K's)
    quick = LoopOptions(problems="file.jsonl", test_problems=0.153, validation_problems=0.0765, quick=True)
    assert (quick.test_problems, quick.validation_problems, quick.train_problems) == (6, 4, 8)
    assert LoopOptions(quick=True, sft_steps=0).sft_steps == 0 and LoopOptions(quick=True).sft_steps == 2


def test_dpo_epochs_set_the_steps_from_the_pairs_mined():
    # Step-DPO's 8 epochs: 39 pairs in batches of 8 are 39 steps (run 1 took 40 by hand); 7 pairs are 7 steps, where
    # the recipe's fixed 40 gave GSM8K's 7 pairs 46 epochs; 137 pairs once each are 18 steps, the last one partial
    assert dpo_steps_for(39, 8, 8) == 39 and dpo_steps_for(7, 8, 8) == 7 and dpo_steps_for(137, 1, 8) == 18
    assert dpo_steps_for(3, 0.5, 16) == 1  # never no step
    assert dpo_steps_for(137, 1, 8, cap=2) == 2  # --quick's few steps
    with pytest.raises(OptionsError, match="--dpo-epochs: -1.0: a number of epochs >= 0"):
        LoopOptions(dpo_epochs=-1.0)


def test_dpop_takes_the_dpo_stage_and_no_trl_loss_type():
    from stepdpo.loop import _dpo_loss

    dpop = LoopOptions(step_loss="dpop", dpop_lambda=5.0, loss_type=["sigmoid"], loss_weights=[1.0])
    assert _dpo_loss(dpop) == {"step_loss": "dpop", "dpop_lambda": 5.0}
    assert _dpo_loss(LoopOptions()) == {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]}
    # the default loss types carry the NLL term, which DPOP does not take: said, not dropped
    with pytest.raises(OptionsError, match=r"--loss-type: \['sigmoid', 'sft'\] with --step-loss dpop.*"
                                           "set --loss-type sigmoid --loss-weights 1"):
        LoopOptions(step_loss="dpop")
    with pytest.raises(OptionsError, match="--dpop-lambda: is read by --step-loss dpop only"):
        LoopOptions(dpop_lambda=5.0)
    # the recipe's loss is DPOP's, so `--step-loss dpop` is all a recipe run needs
    options, _ = parse("loop", ["--config", str(REPO / "configs" / "recipes" / "smollm2-135m" / "loop_arith.yaml"),
                                "--step-loss", "dpop", "--out", "/tmp/unused"])
    assert _dpo_loss(options) == {"step_loss": "dpop", "dpop_lambda": 50.0}


def test_greedy_mining_is_checked_before_the_run_starts():
    """The loop builds MineOptions only after A0 is trained: a greedy setting it would refuse fails at once."""
    with pytest.raises(OptionsError, match="--samples: 4 greedy solutions per problem .* set --samples 1"):
        LoopOptions(sample_temperature=0, samples=4)
    with pytest.raises(OptionsError, match="--sample-temperature: -1.0: a temperature >= 0"):
        LoopOptions(sample_temperature=-1.0)
    options, _ = parse("loop", ["--sample-temperature", "0", "--samples", "1", "--out", "/tmp/unused"])
    assert options.sample_temperature == 0 and options.samples == 1
