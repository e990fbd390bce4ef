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

from stepdpo.options import REQUIRED, check, check_choice, opt

ARCHS = ("t5", "mistral")
BUNDLED_CONFIGS = Path(__file__).parent / "model_configs"
# The real model each tiny architecture stands in for: every config value is copied from it except the sizes.
REAL_CONFIGS = {"t5": "google__flan-t5-small.json", "mistral": "mistralai__Mistral-7B-v0.1.json"}

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


def real_config(arch: str) -> dict:
    """The released config of the model `arch` stands in for (bundled copy; no download)."""
    config = json.loads((BUNDLED_CONFIGS / REAL_CONFIGS[arch]).read_text())
    config.pop("torch_dtype", None)  # a property of the saved weights, not of the architecture
    return config


def build_model(arch: str, tokenizer, size: TinySize = TinySize(), seed: int = 0):
    """A random-weight model whose config is the real one (flan-t5-small, Mistral-7B-v0.1) with only the
    sizes changed: dropout, norms, positions, sliding window, rope and special-token conventions stay as
    released, so a tiny stand-in hides nothing the real model would show."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM, T5Config, T5ForConditionalGeneration

    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}: choose one of {', '.join(ARCHS)}")
    torch.manual_seed(seed)
    values = real_config(arch)
    vocab = len(tokenizer)
    if arch == "t5":
        values.update(vocab_size=vocab, d_model=size.hidden, d_kv=size.head_dim, d_ff=size.ffn,
                      num_layers=size.layers, num_decoder_layers=size.layers, num_heads=size.heads,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id)
        model = T5ForConditionalGeneration(T5Config(**values))
    else:
        values.update(vocab_size=vocab, hidden_size=size.hidden, intermediate_size=size.ffn,
                      num_hidden_layers=size.layers, num_attention_heads=size.heads,
                      num_key_value_heads=size.kv_heads, head_dim=size.head_dim,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.unk_token_id:
            values["pad_token_id"] = tokenizer.pad_token_id
        model = MistralForCausalLM(MistralConfig(**values))
    model.eval()
    return model


def build_tiny_model(arch: str, out: str | Path, seed: int = 0, size: TinySize = TinySize(),
                     tokenizer: str = "trained") -> Path:
    """Build and save a tiny model + tokenizer to `out`; returns the directory."""
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch {arch!r}: choose one of {', '.join(ARCHS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer == "mistral-v1":
        if arch != "mistral":
            raise ValueError("--tokenizer mistral-v1 is Mistral-7B's own tokenizer: use it with --arch mistral")
        tok = mistral_v1_tokenizer()
    else:
        tok = build_tokenizer(seed=seed, vocab_size=size.vocab, arch=arch)
    model = build_model(arch, tok, size=size, seed=seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "stepdpo_tiny.json").write_text(
        json.dumps({"arch": arch, "seed": seed, "size": size.__dict__, "tokenizer": tokenizer}, indent=2,
                   sort_keys=True) + "\n"
    )
    return out


def mistral_v1_tokenizer():
    """Mistral-7B-v0.1's own tokenizer (32,000 sentencepiece pieces), from the file the `mistral-common`
    wheel ships, converted offline by transformers (needs sentencepiece + protobuf)."""
    import importlib.resources
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    try:
        source = importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    except ModuleNotFoundError:
        raise ValueError("--tokenizer mistral-v1 needs the mistral-common package (pip install mistral-common "
                         "sentencepiece protobuf)") from None
    with tempfile.TemporaryDirectory() as d:
        shutil.copyfile(str(source), Path(d) / "tokenizer.model")
        # Mistral-7B-v0.1's tokenizer_config.json: a Llama sentencepiece tokenizer, BOS added, no EOS, no pad.
        (Path(d) / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": True, "model_max_length": 32768,
            "clean_up_tokenization_spaces": False,
        }))
        tok = AutoTokenizer.from_pretrained(d)
    return tok


@dataclass
class TinyModelOptions:
    arch: str = opt(REQUIRED, "t5: flan-t5-small's architecture (T5ForConditionalGeneration) shrunk; mistral: "
                    "Mistral-7B-v0.1's (MistralForCausalLM, grouped-query attention) shrunk. Every other config "
                    "value is the released model's.", choices=ARCHS)
    out: str = opt(REQUIRED, "Output directory (loadable with from_pretrained).")
    seed: int = opt(0, "Seed of the tokenizer corpus and the weights: same seed, same bytes.")
    hidden: int = opt(TinySize.hidden, "Hidden size.")
    layers: int = opt(TinySize.layers, "Layers (encoder and decoder each, for t5).")
    tokenizer: str = opt("trained", "trained: a byte-level BPE trained here on arithmetic text (fast, 512 pieces); "
                         "mistral-v1: Mistral-7B-v0.1's own 32,000-piece tokenizer from the mistral-common wheel.",
                         choices=("trained", "mistral-v1"))

    def __post_init__(self):
        check_choice(self.arch, "arch", ARCHS)
        check_choice(self.tokenizer, "tokenizer", ("trained", "mistral-v1"))
        check(self.tokenizer != "mistral-v1" or self.arch == "mistral", "tokenizer", "mistral-v1 goes with --arch mistral")
        check(self.hidden >= 32 and self.layers >= 1, "hidden", "needs hidden >= 32 and layers >= 1")


def tiny_model(options: TinyModelOptions) -> Path:
    """Build a tiny model of a real architecture with random weights and save it with save_pretrained."""
    size = TinySize(hidden=options.hidden, layers=options.layers)
    out = build_tiny_model(options.arch, options.out, seed=options.seed, size=size, tokenizer=options.tokenizer)
    print(f"tiny {options.arch} model written to {out}")
    return out
