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


def load_run_config(path: str | Path) -> dict | None:
    """The saved training config of a run directory, its final model, or a checkpoint."""
    path = Path(path)
    for candidate in (path / RUN_CONFIG, path / "final" / RUN_CONFIG):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return None
