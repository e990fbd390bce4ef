#!/usr/bin/env bash
# Submit the loop to SLURM, chained with --dependency=afterok, and print the job ids:
#   sft -> (mine -> train) x ROUNDS, and with --held-out an answer-accuracy job after sft and after every round
#   mine:  the current policy's own step pairs (slurm/mine.sbatch: merge an adapter, serve it with vLLM, mine)
#   train: stepwise DPO on those pairs, starting from the policy that produced them
#
#   slurm/loop.sh --run-dir runs/loop --model mistralai/Mistral-7B-v0.1 --sft-data prm800k/phase2_train.jsonl \
#       --problems math/train.jsonl --held-out math/test.jsonl --rounds 2 --nodes 2 --gpus-per-node 8 \
#       --partition gpu --account myproj --env venv:/opt/venvs/stepdpo --vllm-env venv:/opt/venvs/vllm
#
# Required: --run-dir DIR, --model BASE, --sft-data FILE (correct solutions), --problems FILE (training problems
#           with answers: MATH, GSM8K or PRM800K layouts; never the held-out ones)
# Loop:     --rounds R (2), --held-out FILE (problems for answer accuracy after sft and every round),
#           --answer-samples K (1), --skip-sft (--model is already a step-by-step solver)
# Recipes:  --sft-recipe YAML (configs/recipes/mistral-7b/sft_qlora_zero3.yaml),
#           --recipe YAML (configs/recipes/mistral-7b/loop_dpo_qlora_zero3.yaml),
#           --mine-config YAML (configs/stages/mistral-7b/mine.yaml), --mine-backend vllm|hf (vllm)
# Overrides (shell-quoted text): --sft-args "...", --train-args "...", --mine-args "..."
# Control:  --rft-control: every round also fine-tunes the mining policy on its own right samples
#           (mine/solved.jsonl) with the SFT recipe, as rejection-sampling fine-tuning does, the baseline that uses
#           what the pairs use and no reference solutions (with --held-out, it gets an answers job too);
#           --rft-args "..." (overrides for it, e.g. the DPO job's learning rate and --max_steps to match)
# Resources: --mode zero3|zero2|zero3-offload|ddp|cpu-ddp (zero3), --nodes N (1), --gpus-per-node G (8),
#           --mine-gpus G (= --gpus-per-node; the policy's vLLM server), --eval-gpus G (1), --hf-token-file F
# Cluster:  --partition P, --account A, --qos Q, --time-sft, --time-mine, --time-train, --time-eval (HH:MM:SS)
# Environment (every job): --env venv:PATH | conda:NAME | cmd:"shell code"; --vllm-env venv:PATH (the vLLM
#           environment for serving; default the repo's .venv-vllm)
# Other:    --cpu (a CPU-only cluster: no GPUs, cpu-ddp training, vLLM CPU; what the tests use),
#           --dry-run (print the exact sbatch commands, submit nothing), -h|--help
# Nothing is submitted unless every argument is valid. Every job's options (the recipes, --mine-config, the
# --*-args) are checked with `stepdpo check` in the --env environment first (a warning if it cannot run here).
set -euo pipefail
die() { echo "loop.sh: $*" >&2; exit 2; }

REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=slurm/lib.sh
source "$REPO/slurm/lib.sh"
# shellcheck source=launch/options.sh
source "$REPO/launch/options.sh"  # usage, unknown_option
RUN_DIR=""; MODEL=""; SFT_DATA=""; PROBLEMS=""; HELD_OUT=""; ROUNDS=2; ANSWER_SAMPLES=1; SKIP_SFT=0
SFT_RECIPE=$REPO/configs/recipes/mistral-7b/sft_qlora_zero3.yaml
RECIPE=$REPO/configs/recipes/mistral-7b/loop_dpo_qlora_zero3.yaml
MINE_CONFIG=$REPO/configs/stages/mistral-7b/mine.yaml; MINE_BACKEND=vllm
SFT_ARGS=""; TRAIN_ARGS=""; MINE_ARGS=""; RFT=0; RFT_ARGS=""
MODE=zero3; NODES=1; GPUS=8; MINE_GPUS=""; EVAL_GPUS=1; TOKEN_FILE=""
PARTITION=""; ACCOUNT=""; QOS=""; T_SFT=24:00:00; T_MINE=12:00:00; T_TRAIN=24:00:00; T_EVAL=04:00:00
ENV_SPEC=""; VLLM_ENV_SPEC=""; CPU=0; DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --run-dir) RUN_DIR=$2; shift 2;;
    --model) MODEL=$2; shift 2;;
    --sft-data) SFT_DATA=$2; shift 2;;
    --problems) PROBLEMS=$2; shift 2;;
    --held-out) HELD_OUT=$2; shift 2;;
    --rounds) ROUNDS=$2; shift 2;;
    --answer-samples) ANSWER_SAMPLES=$2; shift 2;;
    --skip-sft) SKIP_SFT=1; shift;;
    --sft-recipe) SFT_RECIPE=$2; shift 2;;
    --recipe) RECIPE=$2; shift 2;;
    --mine-config) MINE_CONFIG=$2; shift 2;;
    --mine-backend) MINE_BACKEND=$2; shift 2;;
    --sft-args) SFT_ARGS=$2; shift 2;;
    --train-args) TRAIN_ARGS=$2; shift 2;;
    --mine-args) MINE_ARGS=$2; shift 2;;
    --rft-control) RFT=1; shift;;
    --rft-args) RFT_ARGS=$2; shift 2;;
    --mode) MODE=$2; shift 2;;
    --nodes) NODES=$2; shift 2;;
    --gpus-per-node) GPUS=$2; shift 2;;
    --mine-gpus) MINE_GPUS=$2; shift 2;;
    --eval-gpus) EVAL_GPUS=$2; shift 2;;
    --hf-token-file) TOKEN_FILE=$2; shift 2;;
    --partition) PARTITION=$2; shift 2;;
    --account) ACCOUNT=$2; shift 2;;
    --qos) QOS=$2; shift 2;;
    --time-sft) T_SFT=$2; shift 2;;
    --time-mine) T_MINE=$2; shift 2;;
    --time-train) T_TRAIN=$2; shift 2;;
    --time-eval) T_EVAL=$2; shift 2;;
    --env) ENV_SPEC=$2; shift 2;;
    --vllm-env) VLLM_ENV_SPEC=$2; shift 2;;
    --cpu) CPU=1; shift;;
    --dry-run) DRY=1; shift;;
    -h|--help) usage; exit 0;;
    *) unknown_option loop.sh "$1";;
  esac
done

# ---- validation: every mistake is reported before anything is submitted
[[ -n $RUN_DIR ]] || die "--run-dir is required"
[[ -n $MODEL ]] || die "--model (the base policy) is required"
[[ -n $PROBLEMS ]] || die "--problems (training problems with answers) is required"
[[ -f $PROBLEMS ]] || die "--problems $PROBLEMS: no such file"
if [[ $SKIP_SFT == 0 ]]; then
  [[ -n $SFT_DATA ]] || die "--sft-data (correct step-by-step solutions) is required, or --skip-sft"
  [[ -f $SFT_DATA ]] || die "--sft-data $SFT_DATA: no such file"
fi
abspath() { echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; }
if [[ $SKIP_SFT == 0 || $RFT == 1 ]]; then  # only the sft and rft jobs read the SFT recipe
  [[ -f $SFT_RECIPE ]] || die "--sft-recipe $SFT_RECIPE: no such file"
  SFT_RECIPE=$(abspath "$SFT_RECIPE")
fi
[[ -z $RFT_ARGS || $RFT == 1 ]] || die "--rft-args configures the --rft-control job; add --rft-control"
[[ -z $HELD_OUT || -f $HELD_OUT ]] || die "--held-out $HELD_OUT: no such file"
[[ -f $RECIPE ]] || die "--recipe $RECIPE: no such file"
[[ -z $MINE_CONFIG || -f $MINE_CONFIG ]] || die "--mine-config $MINE_CONFIG: no such file"
[[ $MINE_BACKEND =~ ^(vllm|hf)$ ]] || die "--mine-backend must be vllm or hf"
[[ $MODE =~ ^(zero3|zero2|zero3-offload|ddp|cpu|cpu-ddp|cpu-zero3)$ ]] || die "--mode $MODE is not a launch/train.sh mode"
check_positive ROUNDS NODES GPUS EVAL_GPUS ANSWER_SAMPLES
check_times T_SFT T_MINE T_TRAIN T_EVAL
[[ -z $TOKEN_FILE || -f $TOKEN_FILE ]] || die "--hf-token-file $TOKEN_FILE: no such file"
if [[ $CPU == 1 && $MODE != cpu* ]]; then MODE=cpu-ddp; fi
if [[ $CPU == 0 && $MODE == cpu* ]]; then die "--mode $MODE needs --cpu"; fi
MINE_GPUS=${MINE_GPUS:-$GPUS}
eval "SFT_ARGV=($SFT_ARGS)" 2>/dev/null || die "--sft-args: unbalanced quotes in '$SFT_ARGS'"
eval "TRAIN_ARGV=($TRAIN_ARGS)" 2>/dev/null || die "--train-args: unbalanced quotes in '$TRAIN_ARGS'"
eval "MINE_ARGV=($MINE_ARGS)" 2>/dev/null || die "--mine-args: unbalanced quotes in '$MINE_ARGS'"
eval "RFT_ARGV=($RFT_ARGS)" 2>/dev/null || die "--rft-args: unbalanced quotes in '$RFT_ARGS'"

[[ $ENV_SPEC != container:* ]] || die "--env container:IMAGE: loop.sh runs no srun; use venv:PATH, conda:NAME or cmd:CODE"
ENV_SETUP=$(env_setup "$ENV_SPEC")
VLLM_PY=""; [[ $VLLM_ENV_SPEC == venv:* ]] && VLLM_PY="${VLLM_ENV_SPEC#venv:}/bin/python"
[[ -z $VLLM_ENV_SPEC || -n $VLLM_PY ]] || die "--vllm-env: use venv:PATH (the server runs that environment's python)"

# every job's options as it will get them (the recipe or stage config, the loop's, then the --*-args overrides)
CHECKS=(train --config "$RECIPE" --model_name_or_path policy --train_pairs pairs.jsonl "${TRAIN_ARGV[@]}"
        --and mine --problems "$PROBLEMS" --model policy --out mine --backend "$MINE_BACKEND"
        ${MINE_CONFIG:+--config "$MINE_CONFIG"} "${MINE_ARGV[@]}")
[[ $SKIP_SFT == 1 ]] || CHECKS+=(--and sft --config "$SFT_RECIPE" --model_name_or_path "$MODEL" --train_data "$SFT_DATA"
                                 "${SFT_ARGV[@]}")
[[ $RFT == 0 ]] || CHECKS+=(--and sft --config "$SFT_RECIPE" --model_name_or_path policy --train_data solved.jsonl
                            "${RFT_ARGV[@]}")
check_options "$ENV_SETUP" "${CHECKS[@]}"

mkdir -p "$RUN_DIR/logs"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
PROBLEMS=$(abspath "$PROBLEMS"); RECIPE=$(abspath "$RECIPE")
[[ -n $HELD_OUT ]] && HELD_OUT=$(abspath "$HELD_OUT")
[[ -n $MINE_CONFIG ]] && MINE_CONFIG=$(abspath "$MINE_CONFIG")
common_args

TRAIN_RES=(); MINE_RES=(--cpus-per-task 1); EVAL_RES=(--cpus-per-task 1); SERVE_ARGS="--cpu"
if [[ $CPU == 0 ]]; then
  TRAIN_RES=(--gpus-per-node "$GPUS" --exclusive)
  MINE_RES=(--gpus-per-node "$MINE_GPUS" --cpus-per-task 16 --mem 128G)
  EVAL_RES=(--gpus-per-node "$EVAL_GPUS" --cpus-per-task 8 --mem 64G)
  SERVE_ARGS="--tp $MINE_GPUS --dtype bfloat16"
fi
train_job() {  # train_job NAME STAGE RECIPE RUN DEPENDENCY -- overrides...
  local name=$1 stage=$2 recipe=$3 run=$4 dep=$5; shift 6
  submit "$name" RECIPE="$recipe" RUN_DIR="$run" STAGE="$stage" MODE="$MODE" PROCS=1 ENV_SETUP="$ENV_SETUP" \
    STEPDPO_REPO="$REPO" HF_TOKEN_FILE="$TOKEN_FILE" -- \
    "${COMMON[@]}" --job-name "stepdpo-$name" ${dep:+--dependency "afterok:$dep"} --nodes "$NODES" \
    --ntasks-per-node 1 "${TRAIN_RES[@]}" --time "$T_TRAIN" --output "$RUN_DIR/logs/$name-%j.out" \
    "$REPO/slurm/train.sbatch" "$@"
}
answers_job() {  # answers_job NAME POLICY OUT DEPENDENCY
  [[ -n $HELD_OUT ]] || return 0
  local serve="--cpu"; [[ $CPU == 1 ]] || serve="--tp $EVAL_GPUS --dtype bfloat16"
  submit "$1" POLICY="$2" PROBLEMS="$HELD_OUT" OUT="$3" SAMPLES="$ANSWER_SAMPLES" SERVE_ARGS="$serve" \
    ENV_SETUP="$ENV_SETUP" STEPDPO_REPO="$REPO" ${VLLM_PY:+VLLM_PYTHON="$VLLM_PY"} -- \
    "${COMMON[@]}" --job-name "stepdpo-$1" --dependency "afterok:$4" --time "$T_EVAL" "${EVAL_RES[@]}" \
    --output "$RUN_DIR/logs/$1-%j.out" "$REPO/slurm/answers.sbatch"
}

IDS=(); DEP=""; POLICY=$MODEL
if [[ $SKIP_SFT == 0 ]]; then
  DEP=$(train_job sft sft "$SFT_RECIPE" "$RUN_DIR/sft" "" -- \
    --model_name_or_path "$MODEL" --train_data "$(abspath "$SFT_DATA")" "${SFT_ARGV[@]}")
  IDS+=("sft=$DEP"); POLICY=$RUN_DIR/sft/final
  A=$(answers_job answers-sft "$POLICY" "$RUN_DIR/sft/answers" "$DEP"); [[ -z $A ]] || IDS+=("answers-sft=$A")
fi
for ((r = 1; r <= ROUNDS; r++)); do
  R=$RUN_DIR/round$r
  MINE=$(submit "mine$r" POLICY="$POLICY" PROBLEMS="$PROBLEMS" OUT="$R/mine" BACKEND="$MINE_BACKEND" \
    MINE_CONFIG="$MINE_CONFIG" MINE_ARGS="$MINE_ARGS" SERVE_ARGS="$SERVE_ARGS" ENV_SETUP="$ENV_SETUP" \
    STEPDPO_REPO="$REPO" ${VLLM_PY:+VLLM_PYTHON="$VLLM_PY"} -- \
    "${COMMON[@]}" --job-name "stepdpo-mine$r" ${DEP:+--dependency "afterok:$DEP"} --time "$T_MINE" \
    "${MINE_RES[@]}" --output "$RUN_DIR/logs/mine$r-%j.out" "$REPO/slurm/mine.sbatch")
  # The round trains from the policy that mined its pairs (mine.sbatch links it, merged if it was an adapter).
  TRAIN=$(train_job "train$r" train "$RECIPE" "$R/train" "$MINE" -- \
    --model_name_or_path "$R/mine/policy" --train_pairs "$R/mine/pairs.jsonl" "${TRAIN_ARGV[@]}")
  IDS+=("mine$r=$MINE" "train$r=$TRAIN")
  A=$(answers_job "answers$r" "$R/train/final" "$R/answers" "$TRAIN"); [[ -z $A ]] || IDS+=("answers$r=$A")
  if [[ $RFT == 1 ]]; then  # a side branch: the next round still mines with the DPO-trained policy
    C=$(train_job "rft$r" sft "$SFT_RECIPE" "$R/rft" "$MINE" -- \
      --model_name_or_path "$R/mine/policy" --train_data "$R/mine/solved.jsonl" "${RFT_ARGV[@]}")
    IDS+=("rft$r=$C")
    A=$(answers_job "answers-rft$r" "$R/rft/final" "$R/rft/answers" "$C"); [[ -z $A ]] || IDS+=("answers-rft$r=$A")
  fi
  POLICY=$R/train/final; DEP=$TRAIN
done
echo "${IDS[*]}"
RFT_NOTE=""; [[ $RFT == 0 ]] || RFT_NOTE=" (the RFT control's: $RUN_DIR/round*/rft/answers/graded/report.json)"
[[ $DRY == 1 ]] || echo "logs: $RUN_DIR/logs; pairs and reports: $RUN_DIR/round*/mine; answer accuracy:" \
  "$RUN_DIR/*/answers/graded/report.json$RFT_NOTE"
