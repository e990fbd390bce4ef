"""A model's identity is what it is (its config, tokenizer and weights), not where its run wrote it."""

from __future__ import annotations

import json

from stepdpo.identity import RUN_RECORDS, model_identity
from stepdpo.train.checkpoint import FINGERPRINT, RUN_CONFIG


def _model(root, run_dir: str, weights: bytes = b"\x00weights", config: dict | None = None):
    d = root / run_dir / "final"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(config or {"model_type": "mistral", "hidden_size": 64}))
    (d / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (d / "model.safetensors").write_bytes(weights)
    # the records of the run that wrote it: they name its own output directory
    (d / RUN_CONFIG).write_text(json.dumps({"output_dir": str(root / run_dir)}))
    (d / FINGERPRINT).write_text(json.dumps({"model_name_or_path": str(root / run_dir / "base")}))
    (d / "training_args.bin").write_bytes(str(root / run_dir).encode())
    (d / "COMPLETED").write_text("")
    return d


def test_the_same_model_written_by_runs_in_two_directories_has_one_identity(tmp_path):
    assert model_identity(str(_model(tmp_path, "run_a"))) == model_identity(str(_model(tmp_path, "run_b")))


def test_other_weights_or_another_config_is_another_model(tmp_path):
    base = model_identity(str(_model(tmp_path, "a")))
    assert model_identity(str(_model(tmp_path, "b", weights=b"\x01weights"))) != base
    assert model_identity(str(_model(tmp_path, "c", config={"model_type": "mistral", "hidden_size": 128}))) != base


def test_the_run_records_are_the_names_the_trainer_writes():
    from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME

    assert {RUN_CONFIG, FINGERPRINT, TRAINING_ARGS_NAME, TRAINER_STATE_NAME} <= RUN_RECORDS


def test_how_a_tokenizer_was_last_loaded_is_not_part_of_the_model(tmp_path):
    a, b = _model(tmp_path, "online"), _model(tmp_path, "offline")
    (a / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "is_local": True,
                                                         "local_files_only": False}))
    (b / "tokenizer_config.json").write_text(json.dumps({"local_files_only": True, "eos_token": "</s>"}, indent=2))
    assert model_identity(str(a)) == model_identity(str(b))
    (b / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "local_files_only": True}))
    assert model_identity(str(a)) != model_identity(str(b))


def test_a_tokenizer_saved_offline_and_online_gives_one_identity(tiny_mistral, tmp_path, monkeypatch):
    """Through transformers itself: the same tokenizer, loaded with and without local_files_only (what HF_HUB_OFFLINE
    sets) and saved beside the same weights, is one model. Before, tokenizer_config.json differed in
    `local_files_only` and so did the identity, and with it every sampling seed of the loop."""
    import shutil

    import transformers.tokenization_utils_base as tub
    from transformers import AutoTokenizer

    # the suite runs with HF_HUB_OFFLINE=1, which forces local_files_only=True: the online load must not see it
    # (the socket guard in conftest still refuses any network access)
    monkeypatch.setattr(tub, "is_offline_mode", lambda: False)
    dirs = []
    for offline in (False, True):
        d = tmp_path / f"offline_{offline}"
        shutil.copytree(tiny_mistral, d)
        (d / "tokenizer_config.json").unlink()
        AutoTokenizer.from_pretrained(tiny_mistral, local_files_only=offline).save_pretrained(d)
        dirs.append(d)
    saved = [(d / "tokenizer_config.json").read_text() for d in dirs]
    assert saved[0] != saved[1]  # transformers records the load in the file (what made the identities differ)
    assert model_identity(str(dirs[0])) == model_identity(str(dirs[1]))
