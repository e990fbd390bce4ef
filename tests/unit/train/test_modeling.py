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


def test_4bit_layers_keep_their_layout_through_an_evaluation_on_any_cpu():
    """bitsandbytes repacks a Linear4bit's weight in place on AVX512-BF16 CPUs during a no-grad eval forward, and a
    ZeRO-3 save then fails unpacking it (the SLURM QLoRA pipeline on an AMD EPYC): training keeps the generic
    layout, so a trainer's evaluation leaves the weight as it was on every CPU. On a CPU without AVX512-BF16 the
    layer is already generic (nothing to set)."""
    bnb = pytest.importorskip("bitsandbytes")
    import torch
    from bitsandbytes.functional import has_avx512bf16

    from stepdpo.train.modeling import generic_4bit_on_cpu

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    model = torch.nn.Sequential(layer)
    before = layer.weight.data.clone()
    assert generic_4bit_on_cpu(model) == (1 if has_avx512bf16() else 0)
    with torch.no_grad():
        model.eval()(torch.randn(2, 64))
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(layer.weight.data, before)
    assert torch.equal(model.state_dict()["0.weight"], before)
