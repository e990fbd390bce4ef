#!/usr/bin/env bash
# The test command: set up both virtualenvs (and SLURM where root can install it), then run pytest.
# Extra args go to pytest, e.g. `bash launch/test.sh tests/unit -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh --vllm $([[ $(id -u) == 0 ]] && echo --slurm)
export TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cpu
exec .venv/bin/python -m pytest "$@"
