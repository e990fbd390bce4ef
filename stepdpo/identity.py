"""What a model or a data file *is*, not where it lies: caches and checkpoints are keyed on it, so a different
model copied under the same path (or a moved hub branch) is never mistaken for the old one."""

from __future__ import annotations

import hashlib
from pathlib import Path

_SAMPLE = 1 << 20  # bytes hashed at each end of a large file
_MODEL_FILES = (".json", ".safetensors", ".bin", ".model", ".txt", ".py", ".tiktoken", ".gguf", ".jinja")
# Records of the run that wrote a model, not the model: they hold its output paths, so with them the same weights
# trained into another directory got another identity, and with it other sampling seeds and cache keys.
# (stepdpo's run config and fingerprint: stepdpo.train.checkpoint.RUN_CONFIG and FINGERPRINT, spelled out because
# checkpoint imports this module; transformers' TRAINING_ARGS_NAME and TRAINER_STATE_NAME. tests/unit/test_identity.py
# keeps them in step.)
RUN_RECORDS = frozenset({"stepdpo_config.json", "stepdpo_fingerprint.json", "training_args.bin", "trainer_state.json"})


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's size and content; for files over 4 MiB the first and last MiB stand for the content
    (a safetensors file starts with its header of names, shapes and offsets; weights differ in both ends), so
    fingerprinting a 14 GB checkpoint takes milliseconds."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        if size <= 4 * _SAMPLE:
            h.update(f.read())
        else:
            h.update(f.read(_SAMPLE))
            f.seek(size - _SAMPLE)
            h.update(f.read(_SAMPLE))
    return h.hexdigest()


def model_identity(name: str, token: str | None = None, revision: str | None = None) -> str:
    """A local directory: a hash over its config, tokenizer and weight files (not the records of the run that
    wrote it). A local GGUF file: a hash of that file. A hub id: `id@commit` when the snapshot is cached (the
    commit a branch resolved to), else `id@revision`."""
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return f"gguf:{file_fingerprint(path)[:24]}"
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.iterdir()):
            if f.is_file() and f.suffix in _MODEL_FILES and f.name not in RUN_RECORDS:
                h.update(f.name.encode() + b"\0" + file_fingerprint(f).encode())
        return f"dir:{h.hexdigest()[:24]}"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", revision=revision)
        if isinstance(cached, str):
            return f"{name}@{Path(cached).parent.name}"
    except Exception:  # an invalid repo id, no cache: fall back to the name
        pass
    return f"{name}@{revision or 'main'}"
