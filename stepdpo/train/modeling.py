"""Model loading in one place: dtype, QLoRA (bitsandbytes 4-bit), LoRA, ZeRO-3 compatibility.

Rules that are checked before any training starts (each error names the fix):
* ZeRO-3 shards parameters itself: a `device_map` is refused.
* ZeRO-3 + 4-bit: `bnb_4bit_quant_storage` must equal the model dtype so the packed 4-bit weights
  are ordinary tensors of that dtype that ZeRO-3 can partition.
* A checkpoint already quantised with GPTQ/AWQ cannot be sharded by ZeRO-3.
* bf16 where the hardware does not support it.
"""

from __future__ import annotations

import logging

import torch

from stepdpo.models import dtypes

logger = logging.getLogger("stepdpo.train")

DTYPES = dtypes()


class ModelConfigError(ValueError):
    """An incompatible loading combination, detected before training."""


def zero_stage(training_args) -> int:
    plugin = getattr(training_args, "deepspeed_plugin", None)
    if plugin is not None:
        return int(plugin.zero_stage)
    return 0


def reentrant_checkpointing_for_peft_zero3(args, model, peft_config=None) -> None:
    """Re-entrant activation checkpointing for a PEFT model under ZeRO-3, set where transformers 5 reads it.

    Non-re-entrant checkpointing crashed with frozen parameters under ZeRO-3 (`CheckpointError: Recomputed values
    ... have different metadata`, huggingface/transformers#47254; fixed in deepspeedai/DeepSpeed#8148, which not
    every DeepSpeed 0.19 has). TRL 1.16's trainers force `use_reentrant=True` there (huggingface/trl#6356), but
    they write it to `args.gradient_checkpointing_kwargs` after the config is built, while transformers 5's
    Trainer turns checkpointing on from `activation_checkpointing_kwargs`. So SFT ran non-re-entrant throughout,
    and DPO for its first step (TRL's re-enable after each reference pass reads the old name). Call before the
    trainer's __init__."""
    from peft import PeftModel

    if (peft_config is not None or isinstance(model, PeftModel)) and zero_stage(args) == 3 \
            and args.activation_checkpointing:
        args.activation_checkpointing_kwargs = {**(args.activation_checkpointing_kwargs or {}), "use_reentrant": True}


def check_compatibility(args, model_config) -> None:
    stage = zero_stage(args)
    if stage == 3 and args.device_map is not None:
        raise ModelConfigError(
            "DeepSpeed ZeRO-3 is not compatible with a device_map: ZeRO-3 places and shards the weights itself. "
            "Remove device_map (stepdpo never sets one under DeepSpeed)."
        )
    storage = args.bnb_4bit_quant_storage
    if args.load_in_4bit and stage == 3 and storage is not None and storage != args.dtype:
        raise ModelConfigError(
            f"bnb_4bit_quant_storage={storage} differs from dtype={args.dtype}: ZeRO-3 shards the packed "
            "4-bit weights only when they are stored in the model dtype. Remove bnb_4bit_quant_storage (it then "
            "follows dtype) or set it to the model dtype."
        )
    quant = getattr(model_config, "quantization_config", None)
    method = (quant or {}).get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if stage == 3 and method in ("gptq", "awq"):
        raise ModelConfigError(
            f"{args.model_name_or_path} is pre-quantised with {method.upper()}, which ZeRO-3 cannot shard. "
            "Use the unquantised checkpoint with load_in_4bit=true (QLoRA), or ZeRO-2 / DDP."
        )
    if args.dtype == "bfloat16" and not args.use_cpu and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ModelConfigError(
            "dtype=bfloat16 but this GPU does not support bf16 (pre-Ampere). Use dtype=float16 with "
            "fp16=true, or float32."
        )
    if args.load_in_4bit and args.bnb_4bit_compute_dtype not in ("bfloat16", "float32", "float16"):
        raise ModelConfigError(f"bnb_4bit_compute_dtype={args.bnb_4bit_compute_dtype!r}: use bfloat16 or float32")


def quantization_config(args):
    """QLoRA: nf4 + double quant; storage dtype = model dtype (required for ZeRO-3 sharding)."""
    if not args.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[args.bnb_4bit_compute_dtype],
        bnb_4bit_quant_storage=DTYPES[args.bnb_4bit_quant_storage or args.dtype],
    )


def lora_config(args, encoder_decoder: bool):
    if not args.use_peft:
        return None
    from peft import LoraConfig

    targets = list(args.lora_target_modules)
    target_modules = "all-linear" if targets == ["all-linear"] else targets
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target_modules,
        task_type="SEQ_2_SEQ_LM" if encoder_decoder else "CAUSAL_LM",
    )


def load_tokenizer(name: str, revision: str | None = None, token: str | None = None):
    from stepdpo.models import load_tokenizer as load

    return load(name, revision, token)


def load_model(args, token: str | None = None, for_training: bool = True):
    """Load the policy as configured. Returns (model, peft_config or None)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from stepdpo.models import load_config, load_pretrained

    name = args.model_name_or_path
    model_config = load_config(name, revision=args.model_revision, token=token)
    check_compatibility(args, model_config)
    encoder_decoder = bool(getattr(model_config, "is_encoder_decoder", False))
    cls = AutoModelForSeq2SeqLM if encoder_decoder else AutoModelForCausalLM
    kwargs = {"revision": args.model_revision, "token": token, "dtype": DTYPES[args.dtype],
              "trust_remote_code": args.trust_remote_code}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    quant = quantization_config(args)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if args.device_map is not None:  # refused under ZeRO-3 by check_compatibility
        kwargs["device_map"] = args.device_map
    model = load_pretrained(cls, name, **kwargs)
    if quant is not None and for_training:
        generic_4bit_on_cpu(model)
    if quant is not None and for_training and zero_stage(args) != 3:
        # Single-process / DDP QLoRA: PEFT's usual preparation (norms and embeddings upcast to fp32 for
        # stability). Not under ZeRO-3: PEFT's documented z3-QLoRA recipe loads with dtype equal to the quant
        # storage dtype and leaves the rest to Trainer/TRL (TRL enables input grads; re-entrant checkpointing is
        # reentrant_checkpointing_for_peft_zero3's); the fp32 upcast would give ZeRO-3 mixed-dtype parameters
        # and double their memory.
        # https://huggingface.co/docs/peft/accelerate/deepspeed#use-peft-qlora-and-deepspeed-with-zero3-for-finetuning-large-models-on-multiple-gpus
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=args.activation_checkpointing,
            # PEFT's default is re-entrant; outside ZeRO-3 (this branch) non-re-entrant works and is faster
            gradient_checkpointing_kwargs=args.activation_checkpointing_kwargs or {"use_reentrant": False},
        )
    return model, lora_config(args, encoder_decoder)


def generic_4bit_on_cpu(model) -> int:
    """Keep bitsandbytes' 4-bit layers on their generic CPU kernels while training. On a CPU with AVX512-BF16,
    bitsandbytes 0.50's Linear4bit repacks its weight in place, into a layout of its own, the first time it runs
    in eval mode without gradients (the trainer's evaluation), and its state_dict() unpacks it again; under ZeRO-3
    that unpacking meets a weight that is no longer uint8 (`assert packed_weight.dtype == torch.uint8` in
    _convert_weight_packed_for_cpu_inverse) and the run dies when it saves, on those CPUs only: the SLURM QLoRA
    ZeRO-3 pipeline failed on an AMD EPYC with AVX512-BF16 and passed on a Xeon without. (bitsandbytes
    nn/modules.py, Linear4bit.forward and _save_to_state_dict.) A no-op on GPUs. Returns how many layers it set."""
    n = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


# Module attributes that hold a dropout probability as a plain float (read at forward time), e.g. T5Attention's
# `self.dropout = config.dropout_rate` and Mistral's `self.attention_dropout`.
_DROPOUT_FLOATS = ("dropout", "attention_dropout", "dropout_rate", "attn_dropout", "dropout_p")


def disable_dropout(model) -> int:
    """Every dropout off, not only `nn.Dropout` modules: TRL's `disable_dropout_in_model` sets `nn.Dropout.p`
    and misses T5's attention dropout, a float read from the config at init (flan-t5-small: 0.1), so the first
    DPO loss was not ln 2. Like TRL's, it includes LoRA's dropout. Returns how many were set."""
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p, n = 0.0, n + 1
        for attr in _DROPOUT_FLOATS:
            if isinstance(getattr(module, attr, None), float) and getattr(module, attr) != 0.0:
                setattr(module, attr, 0.0)
                n += 1
    from transformers import PretrainedConfig

    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    config = getattr(inner, "config", None)
    if isinstance(config, PretrainedConfig):  # for code that reads the rate from the config at forward time
        for key, value in config.to_dict().items():
            if "dropout" in key and isinstance(value, float):
                setattr(config, key, 0.0)
    return n

