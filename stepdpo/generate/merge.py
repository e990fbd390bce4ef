"""`stepdpo merge`: a LoRA/QLoRA adapter folded into its base, saved as a plain model directory that any server
(vLLM without LoRA support, TGI, transformers) loads. The base is loaded unquantised in the adapter's training
dtype (16-bit on a GPU, float32 on CPU), as merging needs real weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stepdpo.errors import StepdpoError
from stepdpo.options import REQUIRED, opt


@dataclass
class MergeOptions:
    adapter: str = opt(REQUIRED, "A PEFT adapter directory (e.g. RUN/final of a LoRA or QLoRA run).")
    out: str = opt(REQUIRED, "Output directory for the merged model (with the tokenizer).")
    dtype: str = opt("auto", "Weights dtype of the merged model (auto: the run's, else float32).",
                     choices=("auto", "float32", "bfloat16", "float16"))
    hf_token_file: str | None = opt(None, "File holding a Hugging Face token (gated bases).")


def merge(options: MergeOptions) -> Path:
    """Fold a LoRA adapter into its base model and save the result with its tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from stepdpo.auth import model_token
    from stepdpo.models import load_pretrained, load_tokenizer
    from stepdpo.train.checkpoint import adapter_base, load_run_config
    from stepdpo.train.modeling import DTYPES

    adapter = Path(options.adapter)
    base = adapter_base(adapter)
    if base is None:
        raise StepdpoError(f"--adapter {adapter}: no adapter_config.json (a full model needs no merging)")
    dtype = options.dtype
    if dtype == "auto":
        dtype = (load_run_config(adapter) or {}).get("dtype", "float32")
    token = model_token(base, options.hf_token_file, f"the base model in {adapter / 'adapter_config.json'}")
    model = load_pretrained(AutoModelForCausalLM, base, dtype=DTYPES[dtype], token=token)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    out = Path(options.out)
    merged.save_pretrained(out)
    tok_dir = adapter if (adapter / "tokenizer_config.json").is_file() else base
    load_tokenizer(str(tok_dir), token=token).save_pretrained(out)
    print(f"merged {adapter} into {base}: {out}")
    return out
