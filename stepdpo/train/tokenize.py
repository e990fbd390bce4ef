"""Pair -> token ids, shared by the trainer, `stepdpo eval` and the benchmarks.

Rendering comes from `stepdpo.data.pairs.render_pair`. Truncation is step-aware: when a pair does
not fit `max_length`, the oldest prefix steps are left out one at a time (the problem and the newest
steps stay); a chosen or rejected step is never cut. A pair that does not fit even without prefix
steps is dropped and counted, never silently shortened.
"""

from __future__ import annotations

from dataclasses import dataclass

from stepdpo.data.pairs import PLAIN, PromptStyle, render_pair


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


def _decoder_only(tokenizer, prompt: str, chosen: str, rejected: str, special: bool = True):
    # The same procedure as trl.DPOTrainer: tokenize prompt and prompt+completion, split where they diverge.
    prompt_ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    full_c = tokenizer(prompt + chosen, add_special_tokens=special)["input_ids"]
    full_r = tokenizer(prompt + rejected, add_special_tokens=special)["input_ids"]
    n = min(_common_prefix(prompt_ids, full_c), _common_prefix(prompt_ids, full_r))
    return prompt_ids[:n], full_c[n:], full_r[n:]


def _encoder_decoder(tokenizer, prompt: str, chosen: str, rejected: str, special: bool = True):
    # Encoder input with the tokenizer's special tokens (T5 ends it with </s>); decoder targets bare.
    prompt_ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    chosen_ids = tokenizer(chosen, add_special_tokens=False)["input_ids"]
    rejected_ids = tokenizer(rejected, add_special_tokens=False)["input_ids"]
    return prompt_ids, chosen_ids, rejected_ids


def tokenize_texts(tokenizer, prompt: str, chosen: str, rejected: str, *, append_eos: bool = False,
                   encoder_decoder: bool = False, special: bool = True) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) for already-rendered texts (e.g. TRL-format rows). `special=False`
    for a chat-rendered prompt, which carries its special tokens as text."""
    if encoder_decoder:
        p, c, r = _encoder_decoder(tokenizer, prompt, chosen, rejected, special)
        if append_eos:
            c, r = c + [tokenizer.eos_token_id], r + [tokenizer.eos_token_id]
        return p, c, r
    if append_eos:  # as TRL does: the EOS token's text is appended to the completion
        eos = tokenizer.eos_token or ""
        chosen, rejected = chosen + eos, rejected + eos
    return _decoder_only(tokenizer, prompt, chosen, rejected, special)


def tokenize_pair(
    pair: dict,
    tokenizer,
    *,
    max_length: int | None = None,
    append_eos: bool = False,
    encoder_decoder: bool = False,
    style: PromptStyle = PLAIN,
) -> TokenizedPair | None:
    """Token ids of a pair, or None when it cannot fit `max_length` without cutting a step."""
    for drop in range(len(pair["prefix_steps"]) + 1):
        prompt, chosen, rejected = render_pair(pair, drop_prefix_steps=drop, style=style)
        p, c, r = tokenize_texts(tokenizer, prompt, chosen, rejected, append_eos=append_eos,
                                 encoder_decoder=encoder_decoder, special=style.add_special_tokens)
        if encoder_decoder:
            fits = max_length is None or max(len(p), len(c), len(r)) <= max_length
        else:
            fits = max_length is None or len(p) + max(len(c), len(r)) <= max_length
        if fits:
            return TokenizedPair(p, c, r, drop)
    return None


@dataclass
class PairTokenizer:
    """Pair -> token ids exactly as training does it; the trainer, `stepdpo eval` and `stepdpo inspect` all use
    this one object, built from the same settings (a training config, or the one a run saved)."""

    tokenizer: object
    max_length: int | None = None
    append_eos: bool = False
    encoder_decoder: bool = False
    style: PromptStyle = PLAIN

    @classmethod
    def from_settings(cls, tokenizer, settings, encoder_decoder: bool = False) -> "PairTokenizer":
        """`settings`: an object or a mapping with max_length, append_eos, chat_template, system_prompt and
        instruction (missing ones take their defaults)."""
        from stepdpo.data.pairs import DEFAULT_INSTRUCTION, prompt_style

        get = settings.get if isinstance(settings, dict) else (lambda k, d=None: getattr(settings, k, d))
        style = prompt_style(tokenizer, get("chat_template") or "auto", get("system_prompt"),
                             get("instruction") if get("instruction") is not None else DEFAULT_INSTRUCTION)
        return cls(tokenizer, get("max_length"), bool(get("append_eos")), encoder_decoder, style)

    def __call__(self, pair: dict) -> TokenizedPair | None:
        return tokenize_pair(pair, self.tokenizer, max_length=self.max_length, append_eos=self.append_eos,
                             encoder_decoder=self.encoder_decoder, style=self.style)

    def texts(self, pair: dict, tp: TokenizedPair) -> tuple[str, str, str]:
        """The rendered (prompt, chosen, rejected) that `tp` was tokenized from."""
        return render_pair(pair, drop_prefix_steps=tp.dropped_prefix_steps, style=self.style)
