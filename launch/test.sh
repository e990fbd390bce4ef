#!/usr/bin/env bash
# The test command: set up both virtualenvs, the real model the tests load, and SLURM where root can install it;
# then pytest on two workers (STEPDPO_TEST_WORKERS, default 2; 0 runs in one process). Tests that share a costly
# fixture (the SLURM cluster and the demo's run, the vLLM judge, SmolLM2) each stay on one worker (tests/conftest.py).
# Extra args go to pytest, e.g. `bash launch/test.sh tests/unit -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh --vllm --models --ops $([[ $(id -u) == 0 ]] && echo --slurm)
# (OMP_WAIT_POLICY=PASSIVE: tests/conftest.py sets it before torch loads, see stepdpo.console.share_cores)
export TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cpu
WORKERS=${STEPDPO_TEST_WORKERS:-2}
PARALLEL=()
[[ $WORKERS == 0 ]] || PARALLEL=(-n "$WORKERS" --dist loadgroup)
exec .venv/bin/python -m pytest "${PARALLEL[@]}" "$@"
