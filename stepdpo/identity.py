"""What a model or a data file *is*, not where it lies: caches and checkpoints are keyed on it, so a different
model copied under the same path (or a moved hub branch) is never mistaken for the old one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

_SAMPLE = 1 << 20  # bytes hashed at each end of a large file
_MODEL_FILES = (".json", ".safetensors", ".bin", ".model", ".txt", ".py", ".tiktoken", ".gguf", ".jinja")
# Records of the run that wrote a model, not the model: they hold its output paths, so with them the same weights
# trained into another directory got another identity, and with it other sampling seeds and cache keys.
# (stepdpo's run config and fingerprint: stepdpo.train.checkpoint.RUN_CONFIG and FINGERPRINT, spelled out because
# checkpoint imports this module; transformers' TRAINING_ARGS_NAME and TRAINER_STATE_NAME. tests/unit/test_identity.py
# keeps them in step.)
RUN_RECORDS = frozenset({"stepdpo_config.json", "stepdpo_fingerprint.json", "training_args.bin", "trainer_state.json"})
# Keys that a file of the model holds about how it was last loaded, not about the model. transformers 5's tokenizer
# `from_pretrained` puts `is_local` and `local_files_only` into the tokenizer's init kwargs and `save_pretrained` writes
# them back to tokenizer_config.json (tokenization_utils_base.py; `name_or_path` was dropped from the saved file
# upstream for the same reason, huggingface/transformers#21483). `local_files_only` is True whenever HF_HUB_OFFLINE or
# TRANSFORMERS_OFFLINE is set, so the same SFT model trained with and without those switches had two identities, two
# sets of sampling seeds, and the loop demo mined 507 pairs instead of 546 (README, "Same install, same numbers").
LOAD_STATE = {"tokenizer_config.json": frozenset({"is_local", "local_files_only", "name_or_path"})}


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


# Keys of a pair record that say where it came from, not what it trains: mined pairs name their problem file's
# absolute path and sample, so the same pairs in a moved or copied run directory had another file fingerprint and
# its DPO model trained again (each pair's id hashes its content, not its provenance).
PROVENANCE = frozenset({"source"})
RECORDS = "records:"  # a records_fingerprint's prefix: older fingerprints of pair files are file_fingerprints


def records_fingerprint(path: str | Path) -> str:
    """sha256 of a JSON-lines file's records without their PROVENANCE keys (each record in a canonical form, in file
    order): the pairs a run trains on, wherever their source files lie. Reads the whole file; a line that is not a
    JSON object is hashed as it is."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                line = json.dumps({k: v for k, v in record.items() if k not in PROVENANCE}, sort_keys=True,
                                  ensure_ascii=False).encode()
            h.update(line.rstrip(b"\r\n") + b"\n")
    return RECORDS + h.hexdigest()


def _model_file_fingerprint(path: Path) -> str:
    """file_fingerprint, but a file named in LOAD_STATE is hashed as its JSON content without those keys (whether or
    not a loader wrote them), so the same model saved offline, online, or by another tool has one identity."""
    drop = LOAD_STATE.get(path.name)
    if drop:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):  # not JSON: hash it as it is
            data = None
        if isinstance(data, dict):
            kept = {k: v for k, v in data.items() if k not in drop}
            return hashlib.sha256(b"json\0" + json.dumps(kept, sort_keys=True).encode()).hexdigest()
    return file_fingerprint(path)


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
                h.update(f.name.encode() + b"\0" + _model_file_fingerprint(f).encode())
        return f"dir:{h.hexdigest()[:24]}"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", revision=revision)
        if isinstance(cached, str):
            return f"{name}@{Path(cached).parent.name}"
    except Exception:  # an invalid repo id, no cache: fall back to the name
        pass
    return f"{name}@{revision or 'main'}"
