#!/usr/bin/env bash
# One launcher for every setting: picks the accelerate config, runs the Hugging Face preflight once
# (before any worker starts), then `accelerate launch -m stepdpo.train.run`.
#
#   launch/train.sh --mode MODE --config RECIPE.yaml [options] [-- stepdpo train overrides]
#
# MODE: cpu | cpu-ddp | cpu-zero3 (2 CPU processes over gloo; the test paths)
#       ddp | zero2 | zero3 | zero3-offload (GPUs)
# Options (each also read from the environment, for SLURM):
#   --nodes N            machines (NUM_NODES, SLURM_NNODES; default 1)
#   --gpus-per-node G    processes per machine for GPU modes (GPUS_PER_NODE; default: all visible GPUs)
#   --procs P            processes for the cpu-* modes (default 2)
#   --machine-rank R     this machine's rank (MACHINE_RANK, SLURM_NODEID; default 0)
#   --main-address A     rank-0 machine address (MAIN_ADDRESS; default 127.0.0.1)
#   --main-port P        rendezvous port (MAIN_PORT; default 29500)
#   --hf-token-file F    file with a Hugging Face token (else HF_TOKEN, else the standard token file)
#   --no-preflight       skip the hub preflight (e.g. a local model directory known to exist)
#   --stage S            train (stepwise DPO, default) or sft (supervised fine-tuning, stepdpo.train.sft)
#   --entry MODULE       the Python module each process runs (default: the stage's)
#   --dry-run            print the accelerate command and exit
# Examples:
#   launch/train.sh --mode cpu-zero3 --config configs/recipes/tiny/mistral_qlora_zero3_cpu.yaml
#   launch/train.sh --mode zero3 --config configs/recipes/mistral-7b/qlora_zero3.yaml --gpus-per-node 8
#   launch/train.sh --mode zero3 --config R.yaml --nodes 2 --machine-rank 1 --main-address node001
set -euo pipefail
# shellcheck source=launch/options.sh
source "$(dirname "$0")/options.sh"  # usage, unknown_option

MODE=""; CONFIG=""; NODES=${NUM_NODES:-${SLURM_NNODES:-1}}; GPUS=${GPUS_PER_NODE:-}; PROCS=2
RANK=${MACHINE_RANK:-${SLURM_NODEID:-0}}; ADDR=${MAIN_ADDRESS:-127.0.0.1}; PORT=${MAIN_PORT:-29500}
TOKEN_FILE=""; PREFLIGHT=1; DRY=0; ENTRY=stepdpo.train.run; EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --mode) MODE=$2; shift 2;;
    --config) CONFIG=$2; shift 2;;
    --nodes) NODES=$2; shift 2;;
    --gpus-per-node) GPUS=$2; shift 2;;
    --procs) PROCS=$2; shift 2;;
    --machine-rank) RANK=$2; shift 2;;
    --main-address) ADDR=$2; shift 2;;
    --main-port) PORT=$2; shift 2;;
    --hf-token-file) TOKEN_FILE=$2; shift 2;;
    --no-preflight) PREFLIGHT=0; shift;;
    --stage) case "$2" in train) ENTRY=stepdpo.train.run;; sft) ENTRY=stepdpo.train.sft;;
               *) echo "train.sh: --stage must be train or sft" >&2; exit 2;; esac; shift 2;;
    --entry) ENTRY=$2; shift 2;;
    --dry-run) DRY=1; shift;;
    -h|--help) usage; exit 0;;
    --) shift; EXTRA=("$@"); break;;
    *) unknown_option train.sh "$1";;
  esac
done
[[ -n $MODE ]] || { echo "train.sh: --mode is required (see --help)" >&2; exit 2; }
[[ -n $CONFIG ]] || { echo "train.sh: --config RECIPE.yaml is required" >&2; exit 2; }
[[ -f $CONFIG ]] || { echo "train.sh: --config $CONFIG: no such file" >&2; exit 2; }
[[ $NODES =~ ^[1-9][0-9]*$ ]] || { echo "train.sh: --nodes must be a positive integer, got '$NODES'" >&2; exit 2; }
[[ $RANK =~ ^[0-9]+$ && $RANK -lt $NODES ]] || { echo "train.sh: --machine-rank $RANK must be in [0, $NODES)" >&2; exit 2; }
[[ $PROCS =~ ^[1-9][0-9]*$ ]] || { echo "train.sh: --procs must be a positive integer, got '$PROCS'" >&2; exit 2; }
[[ -z $GPUS || $GPUS =~ ^[1-9][0-9]*$ ]] || { echo "train.sh: --gpus-per-node must be a positive integer, got '$GPUS'" >&2; exit 2; }

HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${STEPDPO_PYTHON:-}
if [[ -z $PY ]]; then if [[ -x $HERE/.venv/bin/python ]]; then PY=$HERE/.venv/bin/python; else PY=python; fi; fi
ACC=$HERE/configs/accelerate
DS=$HERE/configs/deepspeed
DS_FILE=""
case "$MODE" in
  cpu)           CFG=$ACC/cpu.yaml; NPROC=1;;
  cpu-ddp)       CFG=$ACC/cpu_ddp.yaml; NPROC=$PROCS;;
  cpu-zero3)     CFG=$ACC/cpu_zero3.yaml; NPROC=$PROCS; DS_FILE=$DS/zero3.json;;
  ddp)           CFG=$ACC/ddp.yaml;;
  zero2)         CFG=$ACC/zero2.yaml; DS_FILE=$DS/zero2.json;;
  zero3)         CFG=$ACC/zero3.yaml; DS_FILE=$DS/zero3.json;;
  zero3-offload) CFG=$ACC/zero3_offload.yaml; DS_FILE=$DS/zero3_offload.json;;
  *) echo "train.sh: unknown --mode $MODE (see --help)" >&2; exit 2;;
esac
if [[ $MODE == cpu* ]]; then
  export DS_ACCELERATOR=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one thread per process: ranks share the cores
  export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}   # waiting threads sleep (stepdpo.console.share_cores)
  TOTAL=$((NPROC * NODES))
else
  if [[ -z $GPUS ]]; then GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())"); fi
  [[ $GPUS -ge 1 ]] || { echo "train.sh: --mode $MODE needs GPUs (none visible); use a cpu-* mode" >&2; exit 2; }
  TOTAL=$((GPUS * NODES))
fi

TRAIN_ARGS=(--config "$CONFIG")
[[ -n $TOKEN_FILE ]] && TRAIN_ARGS+=(--hf_token_file "$TOKEN_FILE")   # a path, never the token itself
TRAIN_ARGS+=("${EXTRA[@]}")

# The preflight runs once, on machine rank 0, before any worker process exists.
if [[ $PREFLIGHT == 1 && $RANK == 0 && $DRY == 0 ]]; then
  "$PY" -m stepdpo.auth "${TRAIN_ARGS[@]}"
fi
# Done here (or skipped on purpose): the training entry need not repeat it on its main process.
export STEPDPO_PREFLIGHT_DONE=1

CMD=("$PY" -m accelerate.commands.launch --config_file "$CFG" --num_processes "$TOTAL" --num_machines "$NODES"
     --machine_rank "$RANK" --main_process_ip "$ADDR" --main_process_port "$PORT")
[[ -n $DS_FILE ]] && CMD+=(--deepspeed_config_file "$DS_FILE")
CMD+=(-m "$ENTRY" "${TRAIN_ARGS[@]}")
if [[ $DRY == 1 ]]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
echo "[train.sh] mode=$MODE nodes=$NODES machine_rank=$RANK processes=$TOTAL main=$ADDR:$PORT" >&2
exec "${CMD[@]}"
