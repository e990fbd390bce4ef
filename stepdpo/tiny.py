"""Tiny offline models: a tokenizer trained here and random-weight models of real architectures.

Nothing is downloaded. `build_tiny_model` trains a byte-level BPE tokenizer on arithmetic text that the
package generates, builds `T5ForConditionalGeneration` (flan-t5-small's architecture, gated-gelu,
untied head, shrunk) or `MistralForCausalLM` (grouped-query attention, shrunk) with random weights,
and saves both with `save_pretrained`, so every later stage loads them through the real
`from_pretrained` path exactly as it would load `google/flan-t5-small` or `mistralai/Mistral-7B-v0.1`.

Same seed, same bytes: the corpus, the tokenizer and the weights depend only on the seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

ARCHS = ("t5", "mistral")

# Words the reward judge needs as single tokens ("yes"/"no"), and the PRM step tag.
_JUDGE_WORDS = ["yes", "no", "Yes", "No"]
PRM_STEP_TAG = " ки"  # math-shepherd's step tag; kept as one token in tiny tokenizers


@dataclass(frozen=True)
class TinySize:
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 32  # vLLM's CPU attention needs head_dim >= 32
    ffn: int = 256
    vocab: int = 512


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    """Arithmetic text like the synthetic problems, plus the judge and template words."""
    from stepdpo.data.synthetic import SynthConfig, generate_records

    rng = random.Random(seed)
    texts: list[str] = []
    for record in generate_records(SynthConfig(problems=lines // 8, seed=seed)):
        texts.append(record["question"]["problem"])
        for step in record["label"]["steps"]:
            texts.extend(c["text"] for c in step["completions"])
    for _ in range(lines // 4):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        texts.append(f"{a} + {b} = {a + b}. {a} - {b} = {a - b}. {a} * {b} = {a * b}.")
    templates = ["Problem:", "Solution:", "Step:", "Is this step correct? Answer:", "The answer is"]
    for word in _JUDGE_WORDS:
        texts.extend(f"{t} {word}" for t in templates)
    return texts


def build_tokenizer(seed: int = 0, vocab_size: int = 512, arch: str = "mistral"):
    """Byte-level BPE with single-digit tokens (like Llama/Mistral), so any text round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if arch == "t5":
        # T5 conventions: pad=0, eos=1, unk=2; the encoder input ends with </s>, there is no BOS.
        specials = ["<pad>", "</s>", "<unk>"]
    else:
        # Llama/Mistral conventions: unk=0, bos=1, eos=2; inputs start with <s>.
        specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    # The PRM step tag must be one token; added as a normal (not special) token so it decodes as text.
    tok.add_tokens([PRM_STEP_TAG])
    if arch == "t5":
        eos_id = tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
        )
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",  # Mistral ships no pad token; unk is the usual stand-in
        model_max_length=512,
    )


def build_model(arch: str, tokenizer, size: TinySize = TinySize(), seed: int = 0):
    import torch
    from transformers import MistralConfig, MistralForCausalLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    vocab = len(tokenizer)
    if arch == "t5":
        config = T5Config(
            vocab_size=vocab,
            d_model=size.hidden,
            d_kv=size.head_dim,
            d_ff=size.ffn,
            num_layers=size.layers,
            num_decoder_layers=size.layers,
            num_heads=size.heads,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",  # flan-t5 (T5 v1.1)
            tie_word_embeddings=False,  # flan-t5 unties the LM head
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
        model = T5ForConditionalGeneration(config)
    elif arch == "mistral":
        config = MistralConfig(
            vocab_size=vocab,
            hidden_size=size.hidden,
            intermediate_size=size.ffn,
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.kv_heads,  # grouped-query attention, as in Mistral-7B (32 q / 8 kv)
            head_dim=size.head_dim,
            max_position_embeddings=512,
            sliding_window=None,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = MistralForCausalLM(config)
    else:
        raise ValueError(f"unknown --arch {arch!r}: choose one of {', '.join(ARCHS)}")
    model.eval()
    return model


def build_tiny_model(arch: str, out: str | Path, seed: int = 0, size: TinySize = TinySize()) -> Path:
    """Build and save a tiny model + tokenizer to `out`; returns the directory."""
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}: choose one of {', '.join(ARCHS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(seed=seed, vocab_size=size.vocab, arch=arch)
    model = build_model(arch, tokenizer, size=size, seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "stepdpo_tiny.json").write_text(
        json.dumps({"arch": arch, "seed": seed, "size": size.__dict__}, indent=2, sort_keys=True) + "\n"
    )
    return out
