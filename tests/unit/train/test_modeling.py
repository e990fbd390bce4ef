"""Incompatible loading combinations fail before training, naming the fix."""

from types import SimpleNamespace

import pytest

from stepdpo.train.modeling import (ModelConfigError, check_compatibility, quantization_config,
                                    reentrant_checkpointing_for_peft_zero3)


def args(stage=3, **kw):
    base = dict(model_name_or_path="m", device_map=None, load_in_4bit=False, bnb_4bit_quant_storage=None,
                dtype="bfloat16", bnb_4bit_compute_dtype="bfloat16", use_cpu=True,
                deepspeed_plugin=SimpleNamespace(zero_stage=stage) if stage else None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_device_map_with_zero3():
    with pytest.raises(ModelConfigError, match="Remove device_map"):
        check_compatibility(args(device_map="auto"), SimpleNamespace())
    check_compatibility(args(stage=0, device_map="auto"), SimpleNamespace())


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_prequantised_checkpoint_with_zero3(method):
    cfg = SimpleNamespace(quantization_config={"quant_method": method, "bits": 4})
    with pytest.raises(ModelConfigError, match="load_in_4bit=true"):
        check_compatibility(args(), cfg)
    check_compatibility(args(stage=2), cfg)


def test_storage_dtype_must_match_model_dtype_under_zero3():
    with pytest.raises(ModelConfigError, match="bnb_4bit_quant_storage=float32 differs from dtype=bfloat16"):
        check_compatibility(args(load_in_4bit=True, bnb_4bit_quant_storage="float32"), SimpleNamespace())


def test_storage_follows_model_dtype_by_default():
    import torch

    q = quantization_config(args(load_in_4bit=True))
    assert q.bnb_4bit_quant_storage == torch.bfloat16 and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant


@pytest.mark.parametrize("stage, peft, on, kwargs, expected", [
    (3, True, True, None, {"use_reentrant": True}),
    (3, True, True, {"use_reentrant": False, "every_n_layers": 2}, {"use_reentrant": True, "every_n_layers": 2}),
    (3, False, True, None, None),  # full fine-tuning: nothing frozen, transformers' default stands
    (2, True, True, None, None),
    (0, True, True, None, None),
    (3, True, False, None, None),  # checkpointing off
])
def test_reentrant_checkpointing_only_for_peft_under_zero3(stage, peft, on, kwargs, expected):
    a = args(stage, activation_checkpointing=on, activation_checkpointing_kwargs=kwargs)
    reentrant_checkpointing_for_peft_zero3(a, object(), peft_config=object() if peft else None)
    assert a.activation_checkpointing_kwargs == expected
