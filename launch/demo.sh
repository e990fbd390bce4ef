#!/usr/bin/env bash
# The main job on the CPU default: set up .venv, then `stepdpo demo --loop`: a tiny Mistral made a step-by-step
# solver (sft), answer accuracy on held-out problems, its own step pairs mined, stepwise DPO, answer accuracy
# again, and the controls. Extra args go to the demo (e.g. --backend vllm, --seed 1, --out DIR). The pair
# pipeline's demo (prepare, score, train, eval) is `.venv/bin/stepdpo demo`.
# Standard output gets the results table only (the same bytes on every run); standard error one line per stage
# and a progress bar; OUT/loop.log everything else.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh >&2
# Same numbers on every run: a fixed thread count (the CLI pins the CPU code paths: stepdpo.console.reproducible_cpu).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
exec .venv/bin/stepdpo demo --loop "$@"
