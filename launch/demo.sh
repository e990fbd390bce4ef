#!/usr/bin/env bash
# The main job on the CPU default: set up .venv, then `stepdpo demo` (tiny flan-t5-architecture model,
# generated PRM800K data, pairs, scores, stepwise DPO, held-out evaluation). Extra args go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
exec .venv/bin/stepdpo demo "$@"
