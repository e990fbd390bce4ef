"""Pair -> token ids, shared by the trainer, `stepdpo eval` and the benchmarks.

Rendering comes from `stepdpo.data.pairs.render_pair`. Truncation is step-aware: when a pair does
not fit `max_length`, the oldest prefix steps are left out one at a time (the problem and the newest
steps stay); a chosen or rejected step is never cut. A pair that does not fit even without prefix
steps is dropped and counted, never silently shortened.
"""

from __future__ import annotations

from dataclasses import dataclass

from stepdpo.data.pairs import render_pair


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    dropped_prefix_steps: int


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _decoder_only(tokenizer, prompt: str, chosen: str, rejected: str):
    # The same procedure as trl.DPOTrainer: tokenize prompt and prompt+completion, split where they diverge.
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_c = tokenizer(prompt + chosen)["input_ids"]
    full_r = tokenizer(prompt + rejected)["input_ids"]
    n = min(_common_prefix(prompt_ids, full_c), _common_prefix(prompt_ids, full_r))
    return prompt_ids[:n], full_c[n:], full_r[n:]


def _encoder_decoder(tokenizer, prompt: str, chosen: str, rejected: str):
    # Encoder input with the tokenizer's special tokens (T5 ends it with </s>); decoder targets bare.
    prompt_ids = tokenizer(prompt)["input_ids"]
    chosen_ids = tokenizer(chosen, add_special_tokens=False)["input_ids"]
    rejected_ids = tokenizer(rejected, add_special_tokens=False)["input_ids"]
    return prompt_ids, chosen_ids, rejected_ids


def tokenize_texts(tokenizer, prompt: str, chosen: str, rejected: str, *, append_eos: bool = False,
                   encoder_decoder: bool = False) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) for already-rendered texts (e.g. TRL-format rows)."""
    if encoder_decoder:
        p, c, r = _encoder_decoder(tokenizer, prompt, chosen, rejected)
        if append_eos:
            c, r = c + [tokenizer.eos_token_id], r + [tokenizer.eos_token_id]
        return p, c, r
    if append_eos:  # as TRL does: the EOS token's text is appended to the completion
        eos = tokenizer.eos_token or ""
        chosen, rejected = chosen + eos, rejected + eos
    return _decoder_only(tokenizer, prompt, chosen, rejected)


def tokenize_pair(
    pair: dict,
    tokenizer,
    *,
    max_length: int | None = None,
    append_eos: bool = False,
    encoder_decoder: bool = False,
) -> TokenizedPair | None:
    """Token ids of a pair, or None when it cannot fit `max_length` without cutting a step."""
    for drop in range(len(pair["prefix_steps"]) + 1):
        prompt, chosen, rejected = render_pair(pair, drop_prefix_steps=drop)
        p, c, r = tokenize_texts(tokenizer, prompt, chosen, rejected, append_eos=append_eos,
                                 encoder_decoder=encoder_decoder)
        if encoder_decoder:
            fits = max_length is None or max(len(p), len(c), len(r)) <= max_length
        else:
            fits = max_length is None or len(p) + max(len(c), len(r)) <= max_length
        if fits:
            return TokenizedPair(p, c, r, drop)
    return None
