#!/usr/bin/env bash
# Prepare, on this machine, what the GPU check (benchmarks/gpu/check.py) needs on the lent H200, which reaches no
# registry and has torch, transformers, accelerate and peft but no trl, datasets, deepspeed, bitsandbytes or
# math-verify:
#   .whl/        those packages as cp312 manylinux x86_64 wheels, at requirements/lock.txt's versions (DeepSpeed
#                ships only an sdist: built here into a pure-Python wheel; its ops compile there when used)
#   .gpu_assets/ Mistral-7B-v0.1's own tokenizer (from the mistral-common wheel) and config
# Both are ignored by git (.git/info/exclude) and travel with the device tool's `carry` (64 MiB a call in all;
# this script prints the total and fails above 60 MiB).
#   bash benchmarks/gpu/prepare.sh
# Then, with the device tool (one call; see benchmarks/gpu/README.md):
#   run(carry=[".whl", ".gpu_assets"], timeout_s=560, command="bash benchmarks/gpu/run.sh")
set -euo pipefail
cd "$(dirname "$0")/../.."
WHL=.whl
mkdir -p "$WHL" .gpu_assets
for p in /.whl/ /.gpu_assets/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
PY=${PYTHON:-.venv/bin/python}
version() { sed -n "s/^$1==\([^ ]*\) .*/\1/p" requirements/lock.txt; }
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for name in trl datasets dill multiprocess bitsandbytes hjson pydantic pydantic-core annotated-types \
            typing-inspection math-verify latex2sympy2-extended antlr4-python3-runtime; do
  v=$(version "$name"); [[ -n $v ]] || { echo "prepare.sh: $name is not in requirements/lock.txt" >&2; exit 1; }
  ls "$WHL"/"$(echo "$name" | tr - _)"-"$v"-*.whl >/dev/null 2>&1 && continue
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d "$WHL" "$name==$v"
done
v=$(version deepspeed)
if ! ls "$WHL"/deepspeed-"$v"-*.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHL" "deepspeed==$v" \
    || DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps -w "$WHL" "deepspeed==$v"
fi
"$PY" - <<'PY'
# Mistral-7B-v0.1's own tokenizer (the mistral-common wheel's tokenizer.model.v1, converted by transformers) and
# its published config, bundled with stepdpo: the check builds random weights from them on the GPU.
import json, shutil
from pathlib import Path
from stepdpo.tiny import build_tiny_model
out = Path(".gpu_assets/mistral-7b")
if not (out / "tokenizer.json").is_file():
    tmp = build_tiny_model("mistral", Path(".gpu_assets/tmp"), seed=0, tokenizer="mistral-v1")
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(tmp).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    shutil.rmtree(".gpu_assets/tmp")
cfg = json.loads(Path("stepdpo/model_configs/mistralai__Mistral-7B-v0.1.json").read_text())
(out / "config.json").write_text(json.dumps(cfg, indent=2))
PY
total=$(du -cb "$WHL" .gpu_assets | tail -1 | cut -f1)
tree=$(git ls-files -co --exclude-standard | xargs -d '\n' du -cb 2>/dev/null | tail -1 | cut -f1)
echo "[prepare] wheels and assets: $((total / 1048576)) MiB; working tree: $((tree / 1048576)) MiB"
ls -la "$WHL"
(( total + tree < 60 * 1048576 )) || { echo "prepare.sh: over 60 MiB with the working tree; the device tool takes 64" >&2; exit 1; }
