"""StepwiseDPOConfig: TRL options a step mode would ignore fail at config time; ModelConfig names."""

from __future__ import annotations

import pytest

from stepdpo.errors import OptionsError
from stepdpo.train.config import StepwiseDPOConfig


def cfg(**kw):
    return StepwiseDPOConfig(output_dir="/tmp/unused", use_cpu=True, report_to="none", **kw)


@pytest.mark.parametrize("option", [{"loss_type": ["ipo"]}, {"ld_alpha": 0.5}, {"use_weighting": True},
                                    {"label_smoothing": 0.1}, {"f_divergence_type": "js_divergence"},
                                    {"loss_weights": [1.0]}])
@pytest.mark.parametrize("mode", ["step_weighted", "step_margin", "seed"])
def test_step_modes_refuse_trl_loss_options_they_would_ignore(mode, option):
    name = next(iter(option))
    with pytest.raises(OptionsError, match=f"step_loss={mode} computes its own loss and would ignore {name}="):
        cfg(step_loss=mode, **option)


def test_dpo_mode_takes_them():
    assert cfg(step_loss="dpo", loss_type=["ipo"]).loss_type == ["ipo"]


def test_model_config_names():
    c = cfg(load_in_4bit=True, lora_target_modules="q_proj, v_proj", dtype="bfloat16")
    assert c.use_peft is True and c.lora_target_modules == ["q_proj", "v_proj"] and c.dtype == "bfloat16"
    with pytest.raises(OptionsError, match="dtype='float8'"):
        cfg(dtype="float8")
