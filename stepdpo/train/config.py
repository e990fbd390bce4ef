"""The training configuration: TRL's DPOConfig plus the stepwise fields. One dataclass serves YAML
recipes and CLI overrides (`stepdpo train --config R.yaml --learning_rate 1e-6`); every field's
`metadata["help"]` is its documentation.

Model-loading fields use `trl.ModelConfig`'s names (`model_revision`, `dtype`, `attn_implementation`,
`use_peft`, `lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules`, `load_in_4bit`,
`bnb_4bit_quant_storage`), so a TRL recipe's keys mean the same here. They are declared on this class
rather than by also parsing `trl.ModelConfig`: one dataclass keeps `--config` a single flat YAML and lets
`__post_init__` check the loading fields against the training ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig

from stepdpo.data.pairs import CHAT_MODES, DEFAULT_INSTRUCTION
from stepdpo.errors import OptionsError
from stepdpo.train import DPOP_LAMBDA
from stepdpo.train.losses import STEP_LOSSES, WEIGHT_FNS
# Fields that must never reach a saved config, a log or a checkpoint.
SECRET_FIELDS = ("hub_token",)
# TRL options that change TRL's own DPO loss. A step-reward mode computes its loss itself and would ignore
# them silently: name -> TRL's default.
_TRL_LOSS_OPTIONS = {"loss_type": ["sigmoid"], "loss_weights": None, "ld_alpha": None, "use_weighting": False,
                     "label_smoothing": 0.0, "f_divergence_type": "reverse_kl"}
DTYPE_CHOICES = ("float32", "bfloat16", "float16")


@dataclass
class ModelArgs:
    """The model, how to load it, how to render prompts for it, and how a run resumes: shared by the stepwise DPO
    and the SFT configs (trl.ModelConfig names). A mixin: each config validates it in its __post_init__."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Policy model: a local directory or a hub id (e.g. mistralai/Mistral-7B-v0.1, google/flan-t5-small)."},
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) of the model."})
    # ---- model loading (trl.ModelConfig names; see stepdpo/train/modeling.py)
    dtype: str = field(
        default="float32", metadata={"help": "Weights dtype: float32, bfloat16 or float16.", "choices": list(DTYPE_CHOICES)}
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "transformers attention implementation (eager, sdpa, flash_attention_2); default: the model's."}
    )
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter; the adapter-disabled base is the reference."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Module names to adapt, or all-linear (every linear layer but the LM head)."},
    )
    load_in_4bit: bool = field(
        default=False, metadata={"help": "QLoRA: load the base in bitsandbytes 4-bit (nf4, double quant); implies use_peft."}
    )
    bnb_4bit_compute_dtype: str = field(default="bfloat16", metadata={"help": "4-bit compute dtype: bfloat16 or float32."})
    bnb_4bit_quant_storage: str | None = field(
        default=None,
        metadata={"help": "Storage dtype of the packed 4-bit weights; default: dtype (ZeRO-3 requires them equal)."},
    )
    device_map: str | None = field(
        default=None,
        metadata={"help": "transformers device_map for single-process runs (e.g. auto); never with DeepSpeed ZeRO-3."},
    )
    hf_token_file: str | None = field(
        default=None, metadata={"help": "File holding a Hugging Face token (else HF_TOKEN, else the standard token file)."}
    )
    resume: str = field(
        default="auto",
        metadata={"help": "auto: resume from the newest complete checkpoint in output_dir; never; or a checkpoint path."},
    )
    preempt_flag_file: str | None = field(
        default=None,
        metadata={"help": "When this file appears (SLURM pre-emption), every rank saves a checkpoint together and stops."},
    )

    chat_template: str = field(
        default="auto",
        metadata={"help": "auto: render the problem through the tokenizer's chat template when it has one (instruct "
                  "models), else as plain text (base models); always; never. Steps follow the rendered prompt as they "
                  "are, never closed by an end-of-turn token.", "choices": ["auto", "always", "never"]},
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "Chat template: the system message (default: the template's own)."}
    )
    instruction: str = field(
        default=DEFAULT_INSTRUCTION,
        metadata={"help": "Chat template: the instruction after the problem in the user turn (Step-DPO's); empty for none."},
    )

    def _check_model_args(self):
        self._checkpointing_alias()
        if self.chat_template not in CHAT_MODES:
            raise OptionsError(f"chat_template={self.chat_template!r}: choose one of {', '.join(CHAT_MODES)}")
        if self.dtype not in DTYPE_CHOICES:
            raise OptionsError(f"dtype={self.dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
        if isinstance(self.lora_target_modules, str):  # a YAML scalar or "q_proj,v_proj"
            self.lora_target_modules = [t.strip() for t in self.lora_target_modules.split(",") if t.strip()]
        if self.load_in_4bit:
            self.use_peft = True
        if self.bf16 is None and (self.use_cpu or not _has_accelerator()):
            # TRL turns bf16 autocast on by default, even on CPU. On CPU stepdpo trains in fp32 unless
            # asked: exact, reproducible (resume == uninterrupted run) and no slower at tiny sizes.
            self.bf16 = False

    def _checkpointing_alias(self):
        """transformers 5 renamed `gradient_checkpointing(_kwargs)` to `activation_checkpointing(_kwargs)` and warns
        (FutureWarning, twice per process) whenever the old name is set, but TRL 1.16's configs set the old name
        themselves (default True), so every train and sft run warned whatever the recipe said. The old name stays
        accepted, as TRL and alignment-handbook recipes write it: it fills the new one when that is unset, which is
        transformers' own rule (TrainingArguments.__post_init__), without the warning. transformers then mirrors
        the new name into the old, so code reading either (TRL, PEFT, ours) sees the same value."""
        for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
            if getattr(self, new) is None and getattr(self, old) is not None:
                setattr(self, new, getattr(self, old))
            setattr(self, old, None)


@dataclass
class StepwiseDPOConfig(ModelArgs, DPOConfig):
    # ---- what to train on
    train_pairs: str | None = field(
        default=None, metadata={"help": "pairs.jsonl from `stepdpo prepare` (scored by `stepdpo score` for step-reward losses)."}
    )
    eval_pairs: str | None = field(default=None, metadata={"help": "Held-out pairs.jsonl evaluated every eval_steps."})
    max_train_pairs: int | None = field(default=None, metadata={"help": "Use only the first N training pairs (smoke runs)."})

    # ---- the stepwise loss
    step_loss: str = field(
        default="dpo",
        metadata={
            "help": "dpo: TRL's DPO loss (loss_type) on step pairs (Step-DPO). step_weighted: each pair's DPO loss "
            "weighted by w(step-reward gap). step_margin: the gap as a margin inside the sigmoid. seed: "
            "-log sigmoid(dr * (log p(chosen) - log p(rejected))), reference-free. dpop: DPO-Positive (Smaug), DPO "
            "that also charges dpop_lambda for every nat the chosen step falls below the reference; needs no "
            "step rewards.",
            "choices": list(STEP_LOSSES),
        },
    )
    step_reward_gamma: float = field(default=1.0, metadata={"help": "gamma: scale of the step-reward gap in the weight or margin."})
    step_weight_fn: str = field(
        default="sigmoid",
        metadata={"help": "step_weighted: w = 2*sigmoid(gamma*dr) (sigmoid) or max(gamma*dr, 0) (linear).", "choices": list(WEIGHT_FNS)},
    )
    dpop_lambda: float = field(
        default=DPOP_LAMBDA,
        metadata={"help": "step_loss=dpop: lambda, the penalty per nat the chosen step's log-probability falls below "
                  "the reference's (Smaug's value is 50)."},
    )
    append_eos: bool = field(
        default=False,
        metadata={"help": "Append EOS after the chosen/rejected step. Off by default: a step is not the end of an answer."},
    )
    prefix_sharing: str = field(
        default="auto",
        metadata={"help": "Compute each pair's prompt once: one row [prompt, chosen, rejected] with a 4D attention mask "
                  "(decoder-only; sdpa or eager attention), or one encoder pass per pair (encoder-decoder). Same "
                  "log-probabilities as two rows, less time and memory. auto: on where the model can take it, else "
                  "TRL's two-row layout (said once in the log); true: fail where it cannot; false: TRL's layout.",
                  "choices": ["auto", "true", "false"]},
    )
    max_nonfinite_steps: int = field(
        default=3, metadata={"help": "Abort after this many optimizer steps in a row with a non-finite loss or gradient."}
    )

    def __post_init__(self):
        if self.step_loss not in STEP_LOSSES:
            raise OptionsError(f"step_loss={self.step_loss!r}: choose one of {', '.join(STEP_LOSSES)}")
        if self.step_weight_fn not in WEIGHT_FNS:
            raise OptionsError(f"step_weight_fn={self.step_weight_fn!r}: choose one of {', '.join(WEIGHT_FNS)}")
        if self.step_loss != "dpop" and self.dpop_lambda != DPOP_LAMBDA:
            raise OptionsError(f"dpop_lambda={self.dpop_lambda} is read by step_loss=dpop only (step_loss is "
                               f"{self.step_loss!r}): remove it, or set step_loss=dpop")
        if self.dpop_lambda < 0:
            raise OptionsError(f"dpop_lambda={self.dpop_lambda}: a penalty >= 0 (0 is plain DPO)")
        if self.step_loss != "dpo":
            ignored = [f"{k}={getattr(self, k)!r}" for k, default in _TRL_LOSS_OPTIONS.items() if getattr(self, k) != default]
            if ignored:
                raise OptionsError(
                    f"step_loss={self.step_loss} computes its own loss and would ignore {', '.join(ignored)}: remove "
                    "them, or use step_loss=dpo to train with TRL's loss_type options."
                )
        if isinstance(self.prefix_sharing, bool):  # YAML `prefix_sharing: true`
            self.prefix_sharing = str(self.prefix_sharing).lower()
        if str(self.prefix_sharing).lower() not in ("auto", "true", "false"):
            raise OptionsError(f"prefix_sharing={self.prefix_sharing!r}: choose auto, true or false")
        self.prefix_sharing = str(self.prefix_sharing).lower()
        self._check_model_args()
        super().__post_init__()


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
