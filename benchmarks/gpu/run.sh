#!/usr/bin/env bash
# On the lent GPU machine (the device tool runs this in the repository's root): install the carried wheels
# (.whl, made by benchmarks/gpu/prepare.sh) beside the image's torch, transformers, accelerate and peft, then run the
# check; the report lands in $OUT (gpu_report.json, gpu_report.md, gpu_check.log). Extra args go to check.py.
set -uo pipefail
OUT=${OUT:-/tmp/stepdpo-gpu}
mkdir -p "$OUT"
[[ -d .whl && -d .gpu_assets ]] || { echo "run.sh: .whl or .gpu_assets missing: bash benchmarks/gpu/prepare.sh here, then carry both" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "run.sh: the carried wheels did not install" >&2; exit 2; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
# 540 s: inside one call's 10 minutes, and the session's 15 leave room for a second try
timeout 540 python3 -m benchmarks.gpu.check --out "$OUT" --work /tmp/stepdpo-gpu-work "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
