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
