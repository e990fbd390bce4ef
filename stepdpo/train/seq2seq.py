"""Encoder-decoder models (flan-t5) inside TRL's DPOTrainer.

TRL 1.16 computes DPO log-probabilities by calling `model(input_ids, attention_mask, labels,
fused_lm_head=True)` on the *concatenated* prompt+completion sequence and reading per-token fields
(`log_probs`, `entropy`, `mean_logits`, `is_top1`) of shape (batch, seq_len - 1), aligned so that
index j-1 scores token j. Those fields are zero where the label is -100.

`add_seq2seq_fused_head` gives an encoder-decoder model a forward that speaks that protocol: it
splits each row into the prompt (label -100, attention 1: the encoder input) and the completion
(label != -100: the decoder targets), runs the real encoder-decoder forward, and scatters the
per-token results back to the positions TRL expects. Everything downstream (every TRL loss type,
the reference model, PEFT adapter disabling, precomputed reference log-probs, metrics) then works
unchanged. The protocol is TRL-internal, hence the tight `trl==1.16.*` pin; the t5 training tests
fail if it moves.
"""

from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutput
from trl.trainer.utils import FusedCausalLMOutput


def split_concatenated(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, pad_id: int):
    """Concatenated rows (prompt, completion, right padding) -> encoder inputs and decoder labels.

    Returns (enc_ids, enc_mask, dec_labels, positions, valid) where positions[b, t] is the index in the
    concatenated row of completion token t, and valid marks real (non-padding) decoder positions.
    """
    prompt_mask = (attention_mask == 1) & (labels == -100)
    completion_mask = labels != -100
    enc_len = prompt_mask.sum(dim=1)
    dec_len = completion_mask.sum(dim=1)
    te = max(int(enc_len.max()), 1)
    td = max(int(dec_len.max()), 1)
    enc_mask = prompt_mask[:, :te]
    enc_ids = input_ids[:, :te].masked_fill(~enc_mask, pad_id)
    steps = torch.arange(td, device=input_ids.device).unsqueeze(0)
    positions = (enc_len.unsqueeze(1) + steps).clamp(max=input_ids.size(1) - 1)
    valid = steps < dec_len.unsqueeze(1)
    dec_labels = labels.gather(1, positions).masked_fill(~valid, -100)
    return enc_ids, enc_mask.long(), dec_labels, positions, valid


def _scatter_back(values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, width: int) -> torch.Tensor:
    """Per decoder-token values -> (batch, width) at index position-1 (TRL's next-token alignment)."""
    out = values.new_zeros(values.size(0), width)
    # scatter_add: padded decoder slots carry zeros and may share an index with a real token.
    return out.scatter_add(1, (positions - 1).clamp(min=0), values.masked_fill(~valid, 0))


def add_seq2seq_fused_head(model) -> None:
    """Patch `model.forward` (an encoder-decoder *ForConditionalGeneration) in place; see module doc."""
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    cls_forward = type(model).forward

    @functools.wraps(cls_forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            if labels is not None:
                kwargs["labels"] = labels
            return cls_forward(self, *args, **kwargs)
        input_ids = kwargs.pop("input_ids", args[0] if args else None)
        attention_mask = kwargs.pop("attention_mask")
        kwargs.pop("use_cache", None)
        kwargs.pop("output_router_logits", None)
        enc_ids, enc_mask, dec_labels, positions, valid = split_concatenated(input_ids, attention_mask, labels, pad_id)
        pair_rows = getattr(self, "_stepdpo_prefix_sharing", False) and same_encoder_inputs(enc_ids, enc_mask)
        if pair_rows and "encoder_outputs" not in kwargs:
            # Prefix sharing: a pair's chosen and rejected rows have the same encoder input (the prompt), so the
            # encoder runs once per pair and both decoder rows attend to that one output. Gradients from both rows
            # reach the encoder through the concatenation, as they do through two encoder runs.
            self._stepdpo_shared_calls = getattr(self, "_stepdpo_shared_calls", 0) + 1
            half = enc_ids.size(0) // 2
            encoded = self.get_encoder()(input_ids=enc_ids[:half], attention_mask=enc_mask[:half], return_dict=True)
            kwargs["encoder_outputs"] = BaseModelOutput(last_hidden_state=torch.cat([encoded.last_hidden_state] * 2))
        out = cls_forward(self, input_ids=enc_ids, attention_mask=enc_mask, labels=dec_labels, use_cache=False, **kwargs)
        logits = out.logits
        log_probs_all = F.log_softmax(logits.float(), dim=-1)
        targets = dec_labels.clamp(min=0)
        token_logps = log_probs_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        width = input_ids.size(1) - 1
        with torch.no_grad():
            probs = log_probs_all.exp()
            entropy = -(probs * log_probs_all).sum(-1)
            mean_logits = logits.float().mean(-1)
            is_top1 = (logits.argmax(-1) == targets).float()
            log_sum_sq = torch.logsumexp(2 * log_probs_all, dim=-1)
        fields = [token_logps, entropy, log_sum_sq, mean_logits, is_top1]
        log_probs, entropy, log_sum_sq, mean_logits, is_top1 = (
            _scatter_back(x, positions, valid, width) for x in fields
        )
        label_mask = _scatter_back(valid.float(), positions, valid, width).bool()
        n = label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / n,
            log_probs=log_probs,
            entropy=entropy,
            log_sum_sq_probs=log_sum_sq,
            mean_logits=mean_logits,
            is_top1=is_top1.bool(),
            label_mask=label_mask,
        )

    model.forward = types.MethodType(forward, model)


def same_encoder_inputs(enc_ids: torch.Tensor, enc_mask: torch.Tensor) -> bool:
    """Whether row i and row B+i (a pair's chosen and rejected rows) have the same encoder input."""
    n = enc_ids.size(0)
    if n % 2:
        return False
    half = n // 2
    return torch.equal(enc_mask[:half], enc_mask[half:]) and torch.equal(enc_ids[:half], enc_ids[half:])


def is_encoder_decoder(model) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "is_encoder_decoder", False))
