"""StepwiseDPOConfig: TRL options a step mode would ignore fail at config time; ModelConfig names; the
checkpointing option under either of its names."""

from __future__ import annotations

import warnings

import pytest

from stepdpo.errors import OptionsError
from stepdpo.plan import PlanOptions
from stepdpo.train.config import StepwiseDPOConfig
from stepdpo.train.sft import StepSFTConfig


def cfg(**kw):
    return StepwiseDPOConfig(output_dir="/tmp/unused", use_cpu=True, report_to="none", **kw)


@pytest.mark.parametrize("option", [{"loss_type": ["ipo"]}, {"ld_alpha": 0.5}, {"use_weighting": True},
                                    {"label_smoothing": 0.1}, {"f_divergence_type": "js_divergence"},
                                    {"loss_weights": [1.0]}])
@pytest.mark.parametrize("mode", ["step_weighted", "step_margin", "seed", "dpop"])
def test_step_modes_refuse_trl_loss_options_they_would_ignore(mode, option):
    name = next(iter(option))
    with pytest.raises(OptionsError, match=f"step_loss={mode} computes its own loss and would ignore {name}="):
        cfg(step_loss=mode, **option)


def test_dpop_lambda_belongs_to_dpop():
    assert cfg(step_loss="dpop", dpop_lambda=5.0).dpop_lambda == 5.0
    with pytest.raises(OptionsError, match="dpop_lambda=5.0 is read by step_loss=dpop only .*'dpo'"):
        cfg(dpop_lambda=5.0)
    with pytest.raises(OptionsError, match="dpop_lambda=-1.0: a penalty >= 0"):
        cfg(step_loss="dpop", dpop_lambda=-1.0)


def test_dpo_mode_takes_them():
    assert cfg(step_loss="dpo", loss_type=["ipo"]).loss_type == ["ipo"]


def test_model_config_names():
    c = cfg(load_in_4bit=True, lora_target_modules="q_proj, v_proj", dtype="bfloat16")
    assert c.use_peft is True and c.lora_target_modules == ["q_proj", "v_proj"] and c.dtype == "bfloat16"
    with pytest.raises(OptionsError, match="dtype='float8'"):
        cfg(dtype="float8")


@pytest.mark.parametrize("cls", [StepwiseDPOConfig, StepSFTConfig])
def test_checkpointing_takes_either_name_without_a_deprecation_warning(cls):
    # transformers 5 warned on every run: TRL sets the old name (gradient_checkpointing) itself
    def make(**kw):
        return cls(output_dir="/tmp/unused", use_cpu=True, report_to="none", **kw)

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        default = make()
        old = make(gradient_checkpointing=False, gradient_checkpointing_kwargs={"use_reentrant": True})
        new = make(activation_checkpointing=False)
        both = make(gradient_checkpointing=True, activation_checkpointing=False)  # transformers' rule: the new wins
    assert (default.activation_checkpointing, default.gradient_checkpointing) == (True, True)  # TRL's default
    assert (old.activation_checkpointing, old.gradient_checkpointing) == (False, False)
    assert old.activation_checkpointing_kwargs == old.gradient_checkpointing_kwargs == {"use_reentrant": True}
    assert (new.activation_checkpointing, new.gradient_checkpointing) == (False, False)
    assert (both.activation_checkpointing, both.gradient_checkpointing) == (False, False)


def test_plan_reads_either_name_from_a_recipe():
    plan = dict(model_name_or_path="mistralai/Mistral-7B-v0.1")
    assert PlanOptions(**plan).gradient_checkpointing is True
    assert PlanOptions(**plan, gradient_checkpointing=False).gradient_checkpointing is False
    assert PlanOptions(**plan, activation_checkpointing=False).gradient_checkpointing is False
