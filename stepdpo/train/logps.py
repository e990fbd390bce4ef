"""The one log-probability path: what the trainer's step-loss modes and `stepdpo eval` both compute.

A batch is what `StepPreferenceCollator` (TRL's preference collator) builds from tokenized pairs:
chosen rows then rejected rows, each `prompt + completion`, with `completion_mask` marking the
completion. The model answers TRL's fused-LM-head protocol (`model(..., labels, fused_lm_head=True)`
returns per-token log-probs; `prepare_for_logps` installs it: TRL's `add_fused_lm_head` for decoder-only
models, stepdpo.train.seq2seq for encoder-decoder ones). `step_loss=dpo` goes through TRL's own
`_compute_loss`, which makes the same call, so all modes and eval agree to the last bit.
"""

from __future__ import annotations

import torch

# Collator keys that are not model inputs.
NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")


def prepare_for_logps(model, prefix_sharing: str = "auto") -> None:
    """Give `model` (a base model, before PEFT wraps it) the fused-LM-head forward, with each pair's prompt
    computed once where the model can take it (stepdpo.train.prefix_sharing); idempotent."""
    from stepdpo.train import prefix_sharing as sharing
    from stepdpo.train.seq2seq import add_seq2seq_fused_head, is_encoder_decoder

    if getattr(model, "_stepdpo_fused_head", False):
        return
    if is_encoder_decoder(model):
        add_seq2seq_fused_head(model)
    else:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
    sharing.enable(model, prefix_sharing)
    model._stepdpo_fused_head = True


def sequence_logps(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected): summed log-probabilities of each completion, one value per pair."""
    model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
    model_kwargs["use_cache"] = False
    completion_mask = inputs["completion_mask"]
    labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
    outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
    seq_len = completion_mask.size(1) - 1
    return outputs.log_probs[:, -seq_len:].sum(dim=1).chunk(2, dim=0)
