"""Checkpoint completeness and resume.

transformers writes `checkpoint-N/` file by file; a crash (or a SLURM kill) can leave one half
written. A checkpoint counts only once its `COMPLETED` marker exists, written after every file is
in place; resume picks the newest complete checkpoint and ignores the rest.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

MARKER = "COMPLETED"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def mark_complete(path: str | Path) -> None:
    path = Path(path)
    if not path.is_dir():
        return
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"time": time.time()}) + "\n")
    os.replace(tmp, path / MARKER)  # atomic: the marker is either absent or whole


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        m = _CKPT.match(child.name)
        if m and child.is_dir() and is_complete(child):
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = complete_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


RUN_CONFIG = "stepdpo_config.json"


def save_run_config(args, directory: str | Path) -> Path | None:
    """The training config, secrets removed, beside the weights: `stepdpo eval --run-dir` reads beta,
    max_length and append_eos from it, and a person can see how a checkpoint was made."""
    from stepdpo.train.config import SECRET_FIELDS

    directory = Path(directory)
    if not directory.is_dir():
        return None
    values = args.to_dict()
    for key in SECRET_FIELDS:
        values.pop(key, None)
    path = directory / RUN_CONFIG
    tmp = path.with_name(RUN_CONFIG + ".tmp")
    tmp.write_text(json.dumps(values, indent=2, default=str, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def adapter_base(path: str | Path) -> str | None:
    """The base model a PEFT adapter directory was trained on, or None when `path` is not an adapter."""
    config = Path(path) / "adapter_config.json"
    return json.loads(config.read_text())["base_model_name_or_path"] if config.is_file() else None


def load_run_config(path: str | Path) -> dict | None:
    """The saved training config of a run directory, its final model, or a checkpoint."""
    path = Path(path)
    for candidate in (path / RUN_CONFIG, path / "final" / RUN_CONFIG):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None


def rotate_complete_checkpoints(output_dir: str | Path, limit: int | None, best: str | None = None) -> list[Path]:
    """Keep the newest `limit` complete checkpoints (and the best one); delete older complete ones and any
    incomplete checkpoint older than the newest complete one (a crash's leftovers). Returns what was deleted."""
    import shutil

    if not limit or limit <= 0:
        return []
    complete = complete_checkpoints(output_dir)
    if not complete:
        return []
    protected = {complete[-1]} | ({Path(best)} if best else set())
    excess = len(complete) - max(limit, len(protected))
    doomed = [c for c in complete if c not in protected][:max(excess, 0)]
    newest = int(complete[-1].name.split("-")[1])
    for child in Path(output_dir).iterdir():
        m = _CKPT.match(child.name)
        if m and child.is_dir() and not is_complete(child) and int(m.group(1)) < newest:
            doomed.append(child)
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


FINGERPRINT = "stepdpo_fingerprint.json"


PAIR_FILES = ("train_pairs", "eval_pairs")  # fingerprinted by their records, without provenance


def _data_file(value) -> Path:
    path = Path(value)
    return path / "pairs.jsonl" if path.is_dir() else path


def run_fingerprint(args) -> dict:
    """What a checkpoint was trained from: the model's identity (hub commit, or a hash of its files) and the
    data files' fingerprints (pair files by their records without provenance, identity.records_fingerprint). A
    resumed run must match it, and a run reused by `stepdpo loop --reuse` too."""
    from stepdpo.identity import file_fingerprint, model_identity, records_fingerprint

    data = {}
    for key in (*PAIR_FILES, "train_data", "eval_data"):
        value = getattr(args, key, None)
        if value:
            path = _data_file(value)
            data[key] = (records_fingerprint if key in PAIR_FILES else file_fingerprint)(path) if path.is_file() \
                else None
    return {"model": model_identity(args.model_name_or_path, revision=getattr(args, "model_revision", None)),
            "model_name_or_path": args.model_name_or_path, "data": data}


def save_fingerprint(args, directory: str | Path) -> None:
    path = Path(directory) / FINGERPRINT
    tmp = path.with_name(FINGERPRINT + ".tmp")
    tmp.write_text(json.dumps(run_fingerprint(args), indent=2) + "\n")
    os.replace(tmp, path)


def fingerprint_mismatches(saved: dict, args, *, every_file: bool) -> list[str]:
    """How the run `args` describes differs from the one that wrote the fingerprint `saved`: its model, or a data
    file. every_file: a file named by one run and not by the other differs too (`loop --reuse` keeps a model only
    when it was trained from the same data); without it (resuming) only the files both name are compared, since
    older checkpoints named fewer. A pair file saved before records_fingerprint existed is compared by its bytes."""
    from stepdpo.identity import RECORDS, file_fingerprint

    now = run_fingerprint(args)
    problems = []
    if saved.get("model") != now["model"]:
        problems.append(f"model {saved.get('model_name_or_path')} ({saved.get('model')}) there, "
                        f"{now['model_name_or_path']} ({now['model']}) now")
    was = saved.get("data", {})
    for key in sorted(set(now["data"]) | set(was) if every_file else set(now["data"]) & set(was)):
        if key not in now["data"] or key not in was:
            problems.append(f"{key} {'named' if key in was else 'not named'} by the run that trained it")
            continue
        value = now["data"][key]
        if was[key] and value and not was[key].startswith(RECORDS) and value.startswith(RECORDS):
            value = file_fingerprint(_data_file(getattr(args, key)))
        if was[key] != value:
            problems.append(f"{key} differs from the file it was trained on")
    return problems


def check_fingerprint(args, checkpoint: str | Path) -> None:
    """Raise (naming both and the way out) when `checkpoint` was trained from another model or other data."""
    from stepdpo.errors import OptionsError

    path = Path(checkpoint) / FINGERPRINT
    if not path.is_file():
        return  # written before fingerprints existed: nothing to compare
    problems = fingerprint_mismatches(json.loads(path.read_text()), args, every_file=False)
    if problems:
        raise OptionsError(
            f"{checkpoint} belongs to another run: {'; '.join(problems)}. Resuming would continue that run. Pass "
            "--resume never to start over in this output_dir (its checkpoints will be overwritten), or choose a new "
            "--output_dir."
        )


class CompleteCheckpointsMixin:
    """For a transformers Trainer subclass. transformers deletes old checkpoints (save_total_limit) at the end of
    its save, before any callback could mark the new one complete: a kill in between left no complete
    checkpoint at all. Here the new checkpoint gets its config, fingerprint and COMPLETED marker first, once
    every rank has written its part, and only then are old checkpoints rotated, among complete ones."""

    def _save_checkpoint(self, model, trial):
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            ckpt = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            save_run_config(self.args, ckpt)
            save_fingerprint(self.args, ckpt)
            mark_complete(ckpt)
            rotate_complete_checkpoints(self.args.output_dir, limit, self.state.best_model_checkpoint)
