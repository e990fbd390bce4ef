"""`stepdpo plan`: memory per GPU and per node, from the model config alone (meta device, no weights).

Model states follow DeepSpeed's own accounting (bf16 mixed precision + Adam: 2 bytes of 16-bit
weights, 2 of 16-bit gradients, and 16 of fp32 master weights, gradients, momentum and variance
folded into DeepSpeed's "18 bytes per parameter"), with the same formulas as
`estimate_zero2/zero3_model_states_mem_needs` (the `_all_cold` variants, which take parameter counts,
not a live model; the `_all_live` ones miscount meta tensors). With LoRA/QLoRA those formulas apply
to the trainable adapter parameters, and the frozen base adds its weights only (bf16, or nf4 with
double quantisation for QLoRA: 0.5 byte per weight + about 0.0159 for the quantisation constants;
embeddings and the LM head stay bf16).

Reference model: full fine-tuning keeps a frozen bf16 copy (sharded under ZeRO-3); LoRA/QLoRA use
the adapter-disabled base (no copy); `precompute_ref_log_probs` removes it from training entirely.

Activations are an estimate (bf16, SDPA/flash attention, no s^2 term): per layer and token
16*h + 6*f bytes without gradient checkpointing (attention, SwiGLU MLP, norms), 2*h with it plus one
layer recomputed; DPO runs 2 sequences (chosen, rejected) per pair. Logits are not materialised
(TRL's fused LM head); the line is shown for reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from stepdpo.options import check, check_choice, opt

MODES = ("full", "lora", "qlora")
GIB = 1024**3
BUNDLED = Path(__file__).parent / "model_configs"
BUFFER = 1.5  # DeepSpeed's additional_buffer_factor
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # nf4 + 8-bit absmax per 64 + fp32 per 256 blocks (double quant)


def load_config(model: str):
    """A local directory, the hub cache, a bundled copy of the headline models' configs, or the hub, in that order.
    The bundled copies come before the hub: they are the published configs of fixed releases, and a login node
    without network spent about 25 s in huggingface_hub's retries before falling back to them."""
    from transformers import AutoConfig, MistralConfig, T5Config

    from stepdpo.models import load_config as load_model_config, model_ref

    ref = model_ref(model)
    if ref.is_gguf or ref.is_local:  # a GGUF file's config is in its header
        return load_model_config(model)
    try:
        return AutoConfig.from_pretrained(model, local_files_only=True)
    except Exception:  # not cached (or not a valid id): the bundled copy, else the hub
        pass
    bundled = BUNDLED / (model.replace("/", "__") + ".json")
    if bundled.is_file():
        data = json.loads(bundled.read_text())
        cls = {"mistral": MistralConfig, "t5": T5Config}[data["model_type"]]
        return cls(**{k: v for k, v in data.items() if k not in ("model_type", "architectures")})
    try:
        return AutoConfig.from_pretrained(model)
    except Exception as e:
        raise SystemExit(f"stepdpo plan: cannot read the config of {model} ({type(e).__name__}) and no bundled copy "
                         "exists; pass a local directory with config.json") from None


def count_parameters(config, lora_r: int) -> dict:
    """Totals from a model built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config)
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    head = model.get_output_embeddings()
    linear_in_blocks, lora, embed_head = 0, 0, 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m is not head:
            linear_in_blocks += m.weight.numel()
            lora += lora_r * (m.in_features + m.out_features)
    embed_head = total - linear_in_blocks
    return {"total": total, "largest_layer": largest_layer, "linear": linear_in_blocks,
            "embed_norm_head": embed_head, "lora": lora}


def zero_model_states(params: int, largest_layer: int, gpus_per_node: int, nodes: int, zero: int,
                      offload: str) -> tuple[int, int]:
    """(per-GPU bytes, per-node CPU bytes) for `params` trainable parameters: DeepSpeed's formulas."""
    total_gpus = gpus_per_node * nodes
    if zero == 3:
        layer = 4 * largest_layer
        if offload == "all":
            return layer, int(params * 18 / nodes * BUFFER)
        if offload == "optimizer":
            return layer + int(2 * params / total_gpus), int(params * 16 / nodes * BUFFER)
        return layer + int(18 * params / total_gpus), int(largest_layer * 4 * gpus_per_node * BUFFER)
    if offload != "none":
        return 2 * params, int(params * max(4 * total_gpus, 16) * BUFFER)
    return 2 * params + int(18 * params / total_gpus), int(params * 4 * gpus_per_node * BUFFER)


def make_plan(model: str, *, nodes: int = 1, gpus_per_node: int = 8, mode: str = "qlora", zero: int = 3,
              offload: str = "none", seq_len: int = 1024, micro_batch: int = 2, lora_r: int = 16,
              gradient_checkpointing: bool = True) -> dict:
    config = load_config(model)
    counts = count_parameters(config, lora_r)
    total_gpus = nodes * gpus_per_node
    shard = total_gpus if zero == 3 else 1  # ZeRO-3 shards the (frozen) weights too; ZeRO-2 replicates them
    gpu: dict[str, float] = {}
    cpu: dict[str, float] = {}
    load_peak = None
    if mode == "full":
        states_gpu, states_cpu = zero_model_states(counts["total"], counts["largest_layer"], gpus_per_node, nodes,
                                                   zero, offload)
        gpu["model_states (weights+grads+optimizer)"] = states_gpu
        cpu["model_states"] = states_cpu
        ref = 2 * counts["total"] / shard
        if zero == 3 and offload == "all":
            cpu["reference_model"] = 2 * counts["total"] / nodes
            ref = 0
        gpu["reference_model (frozen bf16 copy)"] = ref
        trainable = counts["total"]
    else:
        base_linear = counts["linear"] * (NF4_BYTES if mode == "qlora" else 2)
        base_rest = counts["embed_norm_head"] * 2
        gpu["frozen_base_weights"] = (base_linear + base_rest) / shard
        states_gpu, states_cpu = zero_model_states(counts["lora"], 0, gpus_per_node, nodes, zero, offload)
        gpu["lora_states (weights+grads+optimizer)"] = states_gpu
        cpu["lora_states"] = states_cpu
        gpu["reference_model"] = 0  # the adapter-disabled base
        trainable = counts["lora"]
        if mode == "qlora" and zero == 3:
            # bitsandbytes quantises while loading, so every rank holds the whole 4-bit model until
            # DeepSpeed shards it: a load-time peak, freed before the first step.
            load_peak = base_linear + base_rest
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = getattr(text, "hidden_size", None) or getattr(text, "d_model")
    f = getattr(text, "intermediate_size", None) or getattr(text, "d_ff")
    layers = getattr(text, "num_hidden_layers", None) or (text.num_layers + getattr(text, "num_decoder_layers", 0))
    vocab = text.vocab_size
    tokens = 2 * micro_batch * seq_len  # chosen + rejected
    full_layer = tokens * (16 * h + 6 * f)
    act_no_ckpt = layers * full_layer
    act_ckpt = layers * tokens * 2 * h + full_layer
    gpu["activations"] = act_ckpt if gradient_checkpointing else act_no_ckpt
    total_gpu = sum(gpu.values())
    return {
        "model": model,
        "parameters": counts["total"],
        "largest_layer_parameters": counts["largest_layer"],
        "trainable_parameters": trainable,
        "mode": mode, "zero": zero, "offload": offload, "nodes": nodes, "gpus_per_node": gpus_per_node,
        "seq_len": seq_len, "micro_batch_pairs": micro_batch, "lora_r": lora_r if mode != "full" else None,
        "per_gpu_gib": {k: round(v / GIB, 3) for k, v in gpu.items()},
        "per_gpu_total_gib": round(total_gpu / GIB, 2),
        "per_gpu_load_peak_gib": round(load_peak / GIB, 2) if load_peak else None,
        "per_node_cpu_gib": {k: round(v / GIB, 2) for k, v in cpu.items()},
        "activations_gib": {"with_gradient_checkpointing": round(act_ckpt / GIB, 3),
                            "without_gradient_checkpointing": round(act_no_ckpt / GIB, 3)},
        "logits_if_materialised_gib": round(tokens * vocab * 4 / GIB, 3),
        "fits": {f"{g} GB GPU": total_gpu * 1.1 < g * 1e9 for g in (24, 40, 80)},
    }


def format_plan(p: dict) -> str:
    lines = [
        f"{p['model']}: {p['parameters']:,} parameters ({p['trainable_parameters']:,} trainable), mode={p['mode']}, "
        f"ZeRO-{p['zero']}, offload={p['offload']}, {p['nodes']} node(s) x {p['gpus_per_node']} GPUs, "
        f"seq_len {p['seq_len']}, {p['micro_batch_pairs']} pairs/GPU",
        "per GPU:",
    ]
    lines += [f"  {k:42s} {v:9.2f} GiB" for k, v in p["per_gpu_gib"].items()]
    lines.append(f"  {'total':42s} {p['per_gpu_total_gib']:9.2f} GiB")
    if p.get("per_gpu_load_peak_gib"):
        lines.append(f"  {'load-time peak (whole 4-bit model per rank)':42s} {p['per_gpu_load_peak_gib']:9.2f} GiB")
    lines.append("per node (CPU RAM):")
    lines += [f"  {k:42s} {v:9.2f} GiB" for k, v in p["per_node_cpu_gib"].items()]
    a = p["activations_gib"]
    lines.append(f"activations: {a['with_gradient_checkpointing']:.2f} GiB with gradient checkpointing, "
                 f"{a['without_gradient_checkpointing']:.2f} GiB without; full logits would add "
                 f"{p['logits_if_materialised_gib']:.2f} GiB (TRL's fused LM head avoids them)")
    lines.append("fits (10% headroom): " + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in p["fits"].items()))
    return "\n".join(lines)


@dataclass
class PlanOptions:
    """Field names follow the training recipe's, so `stepdpo plan --config RECIPE.yaml` reads the model, LoRA
    rank, sequence length, batch, 4-bit/LoRA and gradient checkpointing from the recipe itself (other recipe
    keys are ignored); flags override."""

    model_name_or_path: str = field(default=None, metadata={
        "help": "Model directory or hub id (only config.json is read; Mistral-7B-v0.1 and flan-t5-small are bundled).",
        "aliases": ["--model"]})
    nodes: int = opt(1, "Nodes.")
    gpus_per_node: int = opt(8, "GPUs per node.")
    mode: str | None = opt(None, "full, lora or qlora (default: from the recipe's load_in_4bit/use_peft, else qlora).",
                           choices=MODES)
    zero: int = opt(3, "DeepSpeed ZeRO stage.", choices=(2, 3))
    offload: str = opt("none", "ZeRO CPU offload: optimizer states, or optimizer states and parameters.",
                       choices=("none", "optimizer", "all"))
    max_length: int = field(default=1024, metadata={"help": "Sequence length (prompt + step).", "aliases": ["--seq-len"]})
    per_device_train_batch_size: int = field(default=2, metadata={
        "help": "Pairs per GPU per step (DPO runs 2 sequences each).", "aliases": ["--micro-batch"]})
    lora_r: int = opt(16, "LoRA rank.")
    gradient_checkpointing: bool = opt(True, "Activation memory with gradient checkpointing.")
    activation_checkpointing: bool | None = opt(
        None, "transformers 5's name for gradient_checkpointing (a recipe may use either); wins when set.")
    use_peft: bool = opt(False, "From a recipe: LoRA (mode lora unless load_in_4bit).")
    load_in_4bit: bool = opt(False, "From a recipe: QLoRA (mode qlora).")
    json: bool = opt(False, "Machine-readable output.")

    def __post_init__(self):
        check(bool(self.model_name_or_path), "model", "is required (or model_name_or_path in --config)")
        if self.activation_checkpointing is not None:
            self.gradient_checkpointing = self.activation_checkpointing
        if self.mode is None:
            self.mode = "qlora" if self.load_in_4bit else "lora" if self.use_peft else "qlora"
        check_choice(self.mode, "mode", MODES)
        check_choice(self.zero, "zero", (2, 3))
        check_choice(self.offload, "offload", ("none", "optimizer", "all"))
        for name in ("nodes", "gpus_per_node", "max_length", "per_device_train_batch_size", "lora_r"):
            check(getattr(self, name) >= 1, name, f"must be a positive whole number, got {getattr(self, name)}")


def run_plan(options: PlanOptions) -> dict:
    """Memory per GPU and per node for a training setting, from the model config alone (meta device, no
    weights): weights, gradients, optimizer states (DeepSpeed's own ZeRO formulas), LoRA, the reference
    model and activations."""
    plan = make_plan(options.model_name_or_path, nodes=options.nodes, gpus_per_node=options.gpus_per_node,
                     mode=options.mode, zero=options.zero, offload=options.offload, seq_len=options.max_length,
                     micro_batch=options.per_device_train_batch_size, lora_r=options.lora_r,
                     gradient_checkpointing=options.gradient_checkpointing)
    print(json.dumps(plan, indent=2) if options.json else format_plan(plan))
    return plan
