"""Test driver run by every rank under launch/train.sh --entry: records every `use_reentrant` that activation
checkpointing was called with, then runs the real stage (`train`, or `sft` with STEPDPO_SPY_STAGE=sft). Writes
OUTPUT_DIR/checkpoint_calls_rank{R}.json: {"use_reentrant": [the values seen]}."""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

import torch.utils.checkpoint as checkpointing

SEEN: set[str] = set()
_checkpoint = checkpointing.checkpoint


def _spy(*args, **kwargs):
    SEEN.add(str(kwargs.get("use_reentrant")))
    return _checkpoint(*args, **kwargs)


# before transformers binds it (functools.partial(checkpoint, **kwargs) when checkpointing is turned on)
checkpointing.checkpoint = _spy


def _write(out: Path) -> None:
    if out.is_dir():
        record = {"use_reentrant": sorted(SEEN)}
        (out / f"checkpoint_calls_rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    from stepdpo.cli import main

    argv = sys.argv[1:]
    atexit.register(_write, Path(argv[argv.index("--output_dir") + 1]))
    code = main([os.environ.get("STEPDPO_SPY_STAGE", "train"), *argv])
    from stepdpo.train.trainer import end_process  # after main: this module must load before transformers

    end_process(code)
