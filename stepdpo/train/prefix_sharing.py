"""Prefix sharing: a step pair's prompt is computed once, not twice.

A step pair is a long prompt (problem + earlier steps) and two short steps. TRL's DPO forward runs
`[prompt + chosen]` and `[prompt + rejected]` as two rows, so the prompt, most of the tokens, goes through
the policy twice and the reference twice. Here each pair becomes one row

    [prompt | chosen | rejected]      positions 0..p+c-1, then p..p+r-1 (restarting where the prompt ends)

with a 4D attention mask in which the rejected step sees the prompt and itself but not the chosen step.
Every token then sees exactly the keys, at exactly the relative positions, it sees in its own unshared row,
so the log-probabilities are the same (up to float summation order).

It is installed as the outermost layer of the model's fused-LM-head forward (TRL's protocol:
`model(input_ids, attention_mask, labels, fused_lm_head=True)`, see stepdpo.train.logps). It takes TRL's
padded `[chosen rows; rejected rows]` batch as it is and returns TRL's per-token fields in TRL's layout
(zero where the label is -100), so TRL's `_compute_loss` (every loss_type), the step-reward modes, the live
and precomputed reference, PEFT adapter disabling, DDP and DeepSpeed all run unchanged. Only completion
positions go through the LM head (TRL projects every position on devices without Triton).

A batch it cannot share (a row whose prompt differs from its partner's, as after TRL's keep_end
truncation; an odd number of rows) goes through the unshared forward. Encoder-decoder models share
differently: the encoder runs once per pair (stepdpo.train.seq2seq).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import types

import torch

from stepdpo.errors import StepdpoError

logger = logging.getLogger("stepdpo.train")

MODES = ("auto", "true", "false")
# Attention implementations that take an arbitrary mask: sdpa as 4D booleans, eager as an additive float mask,
# flex attention as a BlockMask built from the same booleans.
MASKABLE = ("sdpa", "eager", "flex_attention")


class PrefixSharingUnavailable(StepdpoError, ValueError):
    """prefix_sharing=true was asked for a model or setting that cannot take the shared layout."""


def attn_implementation(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def unsupported_reason(model, args) -> str | None:
    """Why the decoder-only shared layout cannot be used here, or None."""
    impl = attn_implementation(model)
    if impl not in MASKABLE:
        return (f"attn_implementation={impl!r} cannot take the 4D mask the shared layout needs "
                f"(use {' or '.join(MASKABLE)})")
    if args is not None and getattr(args, "padding_free", False):
        return "padding_free packs rows itself"
    if getattr(model.config.get_text_config(), "output_router_logits", False):
        return "MoE router losses are computed over padded rows"
    return None


def resolve(mode: str, model, args, encoder_decoder: bool) -> bool:
    """auto|true|false -> on or off. auto falls back to TRL's layout where sharing is impossible, and says so
    once; true fails there."""
    mode = str(mode).lower()
    if mode == "false":
        return False
    if encoder_decoder:
        return True
    reason = unsupported_reason(model, args)
    if reason is None:
        return True
    if mode == "true":
        raise PrefixSharingUnavailable(f"prefix_sharing=true: {reason}; set prefix_sharing=auto or false")
    logger.warning("prefix_sharing=auto: off, %s; every pair runs as two rows (TRL's layout)", reason)
    return False


def _fused_head_settings(forward) -> dict | None:
    """TRL's add_fused_lm_head settings (temperature, logit scale, softcapping, outputs, backbone), read from the
    forward it installed, so the shared head computes exactly what TRL's would. None if the forward is not
    TRL's (another layer wraps it, or TRL changed)."""
    func = getattr(forward, "__func__", forward)
    names = getattr(getattr(func, "__code__", None), "co_freevars", ())
    cells = getattr(func, "__closure__", None) or ()
    values = {}
    for name, cell in zip(names, cells):
        try:
            values[name] = cell.cell_contents
        except ValueError:
            pass
    needed = ("temperature", "cast_lm_head_to_fp32", "outputs", "final_logit_softcapping", "logit_scale", "backbone_attr")
    if not all(k in values for k in needed):
        return None
    return {k: values[k] for k in needed}


def shared_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
    """TRL's padded [chosen rows; rejected rows] -> (prompt_len, chosen_len, rejected_len) per pair, or None when the
    batch cannot be shared: an odd number of rows, a row that is not prompt-then-completion-then-padding, a prompt
    that differs from its partner's, or an empty prompt."""
    n, width = input_ids.shape
    if n % 2 or attention_mask is None or attention_mask.dim() != 2:
        return None
    b = n // 2
    real = attention_mask.bool()
    completion = labels != -100
    prompt_len = (real & ~completion).sum(dim=1)
    comp_len = completion.sum(dim=1)
    idx = torch.arange(width, device=input_ids.device).unsqueeze(0)
    expect_prompt = idx < prompt_len.unsqueeze(1)
    expect_comp = (idx >= prompt_len.unsqueeze(1)) & (idx < (prompt_len + comp_len).unsqueeze(1))
    if not (torch.equal(real & ~completion, expect_prompt) and torch.equal(completion, expect_comp)):
        return None
    if not torch.equal(prompt_len[:b], prompt_len[b:]) or bool((prompt_len[:b] == 0).any()):
        return None
    if not torch.equal(input_ids[:b].masked_fill(~expect_prompt[:b], 0), input_ids[b:].masked_fill(~expect_prompt[b:], 0)):
        return None
    return prompt_len[:b].tolist(), comp_len[:b].tolist(), comp_len[b:].tolist()


def build_shared_batch(input_ids: torch.Tensor, lengths, sliding_window: int | None, mask_kind: str, dtype):
    """The shared rows, their position ids, the 4D mask, and where each scored token's predictor sits.

    Returns (ids [B, T], position_ids [B, T], mask [B, 1, T, T], pred_batch [N], pred_pos [N]) where entry k of
    pred_* is the hidden state that predicts the k-th completion token of the unshared batch in row-major order
    (chosen rows, then rejected rows), i.e. the order of `labels[:, 1:][labels[:, 1:] != -100]`.
    """
    p_lens, c_lens, r_lens = lengths
    b = len(p_lens)
    device = input_ids.device
    total = max(p + c + r for p, c, r in zip(p_lens, c_lens, r_lens))
    ids = input_ids.new_zeros(b, total)
    pos = torch.arange(total, device=device).repeat(b, 1)
    segment = torch.full((b, total), -1, dtype=torch.long, device=device)  # 0 prompt, 1 chosen, 2 rejected, -1 pad
    chosen_pred, rejected_pred = [], []
    for i, (p, c, r) in enumerate(zip(p_lens, c_lens, r_lens)):
        ids[i, : p + c] = input_ids[i, : p + c]
        ids[i, p + c : p + c + r] = input_ids[b + i, p : p + r]
        pos[i, p + c : p + c + r] = torch.arange(p, p + r, device=device)
        segment[i, :p] = 0
        segment[i, p : p + c] = 1
        segment[i, p + c : p + c + r] = 2
        # Token t of a completion is predicted by the hidden state before it; the rejected step's first token
        # by the prompt's last one.
        chosen_pred += [(i, t - 1) for t in range(p, p + c)]
        rejected_pred += [(i, p - 1 if j == 0 else p + c + j - 1) for j in range(r)]
    pred = torch.tensor(chosen_pred + rejected_pred, dtype=torch.long, device=device).reshape(-1, 2)
    q = torch.arange(total, device=device)
    allowed = (q.view(1, -1, 1) >= q.view(1, 1, -1)) & (segment.unsqueeze(1) >= 0)  # causal, real keys
    allowed &= ~((segment.unsqueeze(2) == 2) & (segment.unsqueeze(1) == 1))  # rejected never sees chosen
    if sliding_window:  # Mistral: distance in positions, as in the unshared row
        allowed &= (pos.unsqueeze(2) - pos.unsqueeze(1)) < sliding_window
    allowed |= torch.eye(total, dtype=torch.bool, device=device).unsqueeze(0)  # padding rows: no all-masked softmax
    mask = allowed.unsqueeze(1)
    if mask_kind == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b_, h_, q_, kv_):
            return allowed[b_, q_, kv_]

        return ids, pos, create_block_mask(mask_mod, b, None, total, total, device=device), pred[:, 0], pred[:, 1]
    if mask_kind == "eager":
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    return ids, pos, mask, pred[:, 0], pred[:, 1]


def install(model) -> bool:
    """Wrap `model`'s TRL fused-LM-head forward (add_fused_lm_head must have run) with the shared layout.
    Idempotent. Returns False, changing nothing, when the installed forward is not TRL's."""
    inner = model.forward
    if getattr(inner, "_stepdpo_shared", False):
        return True
    settings = _fused_head_settings(inner)
    if settings is None:
        logger.warning("prefix sharing: the model's forward is not TRL's fused LM head; pairs run unshared")
        return False
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, FusedCausalLMOutput, maybe_gather_lm_head_ctx

    text_config = model.config.get_text_config()
    sliding_window = getattr(text_config, "sliding_window", None)
    if getattr(text_config, "use_sliding_window", True) is False:
        sliding_window = None

    @functools.wraps(type(model).forward)  # keep the signature: generate() checks its kwargs against it
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        input_ids = kwargs.get("input_ids")
        shareable = (fused_lm_head and not args and labels is not None and shift_labels is None and input_ids is not None
                     and kwargs.get("inputs_embeds") is None and kwargs.get("position_ids") is None
                     and not kwargs.get("output_router_logits"))
        lengths = shared_rows(input_ids, kwargs.get("attention_mask"), labels) if shareable else None
        if lengths is None:
            return inner(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                         num_items_in_batch=num_items_in_batch, **kwargs)
        self._stepdpo_shared_calls = getattr(self, "_stepdpo_shared_calls", 0) + 1  # what tests and logs can check
        backbone = getattr(self, settings["backbone_attr"])
        lm_head = self.get_output_embeddings()
        impl = attn_implementation(self)
        ids, pos, mask, pred_b, pred_t = build_shared_batch(
            input_ids, lengths, sliding_window, impl if impl in ("eager", "flex_attention") else "sdpa",
            self.get_input_embeddings().weight.dtype if impl == "eager" else None)
        rest = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "use_cache")}
        hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **rest).last_hidden_state
        shifted = labels[:, 1:]
        label_mask = shifted != -100
        hidden = hidden[pred_b, pred_t].to(lm_head.weight.device)
        targets = shifted[label_mask].to(lm_head.weight.device)
        weight, bias = lm_head.weight, lm_head.bias
        autocast_ctx = torch.autocast(hidden.device.type, enabled=False) if settings["cast_lm_head_to_fp32"] else None
        if autocast_ctx is not None:
            hidden = hidden.float()
        with (autocast_ctx or contextlib.nullcontext()), maybe_gather_lm_head_ctx(weight, bias):
            per_token = ChunkedLogProbFunction.apply(
                hidden, weight, bias, targets, settings["temperature"], _CHUNKED_LOGPROB_CHUNK_SIZE,
                settings["final_logit_softcapping"], settings["logit_scale"], settings["outputs"])
        label_mask = label_mask.to(lm_head.weight.device)
        log_probs, entropy, log_sum_sq, mean_logits, is_top1 = (
            None if x is None else x.new_zeros(label_mask.shape).masked_scatter(label_mask, x) for x in per_token)
        n = label_mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / n, log_probs=log_probs, entropy=entropy,
                                   log_sum_sq_probs=log_sum_sq, mean_logits=mean_logits, is_top1=is_top1,
                                   label_mask=label_mask)

    forward._stepdpo_shared = True
    model.forward = types.MethodType(forward, model)
    return True


def enable(model, mode: str = "auto", args=None) -> bool:
    """Turn prefix sharing on for a model whose fused LM head is installed (stepdpo.train.logps), by `mode`
    (auto|true|false). Returns whether it is on."""
    from stepdpo.train.seq2seq import is_encoder_decoder

    enc_dec = is_encoder_decoder(model)
    if not resolve(mode, model, args, enc_dec):
        return False
    if enc_dec:
        model._stepdpo_prefix_sharing = True  # read by the encoder-decoder forward (seq2seq.py)
        return True
    return install(model)

