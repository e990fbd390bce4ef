#!/usr/bin/env bash
# The main job on the CPU default: set up .venv, then `stepdpo demo --loop`: a tiny Mistral made a step-by-step
# solver (sft), answer accuracy on held-out problems, its own step pairs mined, stepwise DPO, answer accuracy
# again, and the controls. Extra args go to the demo (e.g. --backend vllm, --seed 1, --out DIR). The pair
# pipeline's demo (prepare, score, train, eval) is `.venv/bin/stepdpo demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
exec .venv/bin/stepdpo demo --loop "$@"
