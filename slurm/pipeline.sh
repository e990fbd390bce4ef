#!/usr/bin/env bash
# Submit the whole pipeline to SLURM, chained with --dependency=afterok, and print the job ids:
#   prepare -> score (waits for the reward server's URL; stops the server when done) -> train -> eval
#   reward server: starts at once (loading a 7B model takes minutes), stops when scoring ends
#
#   slurm/pipeline.sh --run-dir runs/mistral7b --input prm800k/phase2_train.jsonl \
#       --model mistralai/Mistral-7B-v0.1 --reward-model peiyi9979/math-shepherd-mistral-7b-prm --method prm \
#       --recipe configs/recipes/mistral-7b/qlora_zero3.yaml --nodes 2 --gpus-per-node 8 \
#       --partition gpu --account myproj --env venv:/opt/venvs/stepdpo --vllm-env venv:/opt/venvs/vllm
#
# Required: --run-dir DIR, --input FILE (repeatable), --model POLICY, --reward-model RM, --recipe YAML
# Data:       --format prm800k|step-dpo|steps|trl (prm800k), --test-fraction F (0.1), --seed S (0)
# Scoring:    --method judge|prm (judge), --reward-replicas R (1), --reward-gpus G (= --gpus-per-node),
#             --serve-args "..." (extra launch/serve_reward.sh args, e.g. "--tp 8 --dtype bfloat16"),
#             --api-key-file F,
#             --reward-url URL (repeatable: score on servers already running, e.g. a team's standing
#             deployment; no reward-server job is submitted), --served-model-name NAME (= --reward-model)
# Training:   --mode zero3|zero2|zero3-offload|ddp|cpu-ddp (zero3), --nodes N (1), --gpus-per-node G (8),
#             --train-args "..." (stepdpo train overrides, shell-quoted: "--run_name 'a b'"), --hf-token-file F
# Answers:    --answers PROBLEMS (a problem file: an extra job serves the trained policy with vLLM and runs
#             generate + grade; answer accuracy in RUN_DIR/answers/graded/report.json), --answer-samples K (1)
# Eval:       --eval-gpus G (1), --eval-cpus C (8), --eval-mem M (64G); --train-cpus C, --train-mem M (per node;
#             default: the whole node, --exclusive)
# Cluster:    --partition P, --account A, --qos Q, --reward-partition P (= --partition),
#             --time-prepare, --time-reward, --time-score, --time-train, --time-eval (HH:MM:SS)
# Environment (every job): --env venv:PATH | conda:NAME | cmd:"shell code" | container:IMAGE (pyxis)
#             --vllm-env the same forms, for the reward server (default: the repo's .venv-vllm)
# Other:      --cpu (a CPU-only cluster: no GPUs requested, cpu-ddp training, vLLM CPU; what the tests use)
#             --dry-run (print the exact sbatch commands, submit nothing), -h|--help
# Nothing is submitted unless every argument is valid. The train job's options (the recipe's keys, --train-args)
# are checked with `stepdpo check` in the --env environment first (a warning if it cannot run on this node), and
# --serve-args with launch/serve_reward.sh --check.
set -euo pipefail
die() { echo "pipeline.sh: $*" >&2; exit 2; }

REPO=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=slurm/lib.sh
source "$REPO/slurm/lib.sh"
# shellcheck source=launch/options.sh
source "$REPO/launch/options.sh"  # usage, unknown_option
RUN_DIR=""; INPUTS=(); MODEL=""; RM=""; RECIPE=""; FORMAT=prm800k; TEST_FRACTION=0.1; SEED=0
METHOD=judge; REPLICAS=1; REWARD_GPUS=""; SERVE_ARGS=""; API_KEY_FILE=""; REWARD_URLS=(); SERVED_NAME=""
LAUNCH_OPTS=()  # options that configure a reward-server job, refused with --reward-url
MODE=zero3; NODES=1; GPUS=8; TRAIN_ARGS=""; TOKEN_FILE=""
PARTITION=""; ACCOUNT=""; QOS=""; REWARD_PARTITION=""
T_PREP=01:00:00; T_REWARD=08:00:00; T_SCORE=08:00:00; T_TRAIN=24:00:00; T_EVAL=02:00:00
ENV_SPEC=""; VLLM_ENV_SPEC=""; CPU=0; DRY=0
EVAL_GPUS=1; EVAL_CPUS=8; EVAL_MEM=64G; TRAIN_CPUS=""; TRAIN_MEM=""; ANSWERS=""; ANSWER_SAMPLES=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --run-dir) RUN_DIR=$2; shift 2;;
    --input) INPUTS+=("$2"); shift 2;;
    --model) MODEL=$2; shift 2;;
    --reward-model) RM=$2; shift 2;;
    --recipe) RECIPE=$2; shift 2;;
    --format) FORMAT=$2; shift 2;;
    --test-fraction) TEST_FRACTION=$2; shift 2;;
    --seed) SEED=$2; shift 2;;
    --method) METHOD=$2; shift 2;;
    --reward-replicas) REPLICAS=$2; LAUNCH_OPTS+=("$1"); shift 2;;
    --reward-gpus) REWARD_GPUS=$2; LAUNCH_OPTS+=("$1"); shift 2;;
    --serve-args) SERVE_ARGS=$2; LAUNCH_OPTS+=("$1"); shift 2;;
    --reward-url) REWARD_URLS+=("$2"); shift 2;;
    --served-model-name) SERVED_NAME=$2; shift 2;;
    --api-key-file) API_KEY_FILE=$2; shift 2;;
    --mode) MODE=$2; shift 2;;
    --nodes) NODES=$2; shift 2;;
    --gpus-per-node) GPUS=$2; shift 2;;
    --train-args) TRAIN_ARGS=$2; shift 2;;
    --hf-token-file) TOKEN_FILE=$2; shift 2;;
    --partition) PARTITION=$2; shift 2;;
    --account) ACCOUNT=$2; shift 2;;
    --qos) QOS=$2; shift 2;;
    --reward-partition) REWARD_PARTITION=$2; LAUNCH_OPTS+=("$1"); shift 2;;
    --time-prepare) T_PREP=$2; shift 2;;
    --time-reward) T_REWARD=$2; LAUNCH_OPTS+=("$1"); shift 2;;
    --time-score) T_SCORE=$2; shift 2;;
    --time-train) T_TRAIN=$2; shift 2;;
    --time-eval) T_EVAL=$2; shift 2;;
    --env) ENV_SPEC=$2; shift 2;;
    --vllm-env) VLLM_ENV_SPEC=$2; LAUNCH_OPTS+=("$1"); shift 2;;
    --answers) ANSWERS=$2; shift 2;;
    --answer-samples) ANSWER_SAMPLES=$2; shift 2;;
    --eval-gpus) EVAL_GPUS=$2; shift 2;;
    --eval-cpus) EVAL_CPUS=$2; shift 2;;
    --eval-mem) EVAL_MEM=$2; shift 2;;
    --train-cpus) TRAIN_CPUS=$2; shift 2;;
    --train-mem) TRAIN_MEM=$2; shift 2;;
    --cpu) CPU=1; shift;;
    --dry-run) DRY=1; shift;;
    -h|--help) usage; exit 0;;
    *) unknown_option pipeline.sh "$1";;
  esac
done

# ---- validation: every mistake is reported before anything is submitted
[[ -n $RUN_DIR ]] || die "--run-dir is required"
[[ ${#INPUTS[@]} -gt 0 ]] || die "--input is required (repeatable)"
for f in "${INPUTS[@]}"; do [[ -f $f ]] || die "--input $f: no such file"; done
[[ -n $MODEL ]] || die "--model (the policy) is required"
[[ -n $RM ]] || die "--reward-model is required"
[[ -n $RECIPE ]] || die "--recipe is required"
[[ -f $RECIPE ]] || die "--recipe $RECIPE: no such file"
[[ $FORMAT =~ ^(prm800k|step-dpo|steps|trl)$ ]] || die "--format must be prm800k, step-dpo, steps or trl"
[[ $METHOD =~ ^(judge|prm)$ ]] || die "--method must be judge or prm"
[[ $MODE =~ ^(zero3|zero2|zero3-offload|ddp|cpu|cpu-ddp|cpu-zero3)$ ]] || die "--mode $MODE is not a launch/train.sh mode"
check_positive NODES GPUS REPLICAS
check_times T_PREP T_REWARD T_SCORE T_TRAIN T_EVAL
[[ $TEST_FRACTION =~ ^0?\.[0-9]+$ ]] || die "--test-fraction must be in (0, 1)"
if [[ $CPU == 1 && $MODE != cpu* ]]; then MODE=cpu-ddp; fi
if [[ $CPU == 0 && $MODE == cpu* ]]; then die "--mode $MODE needs --cpu"; fi
[[ -z $API_KEY_FILE || -f $API_KEY_FILE ]] || die "--api-key-file $API_KEY_FILE: no such file"
for u in ${REWARD_URLS[@]+"${REWARD_URLS[@]}"}; do
  [[ $u =~ ^https?://[^/[:space:]]+ ]] || die "--reward-url $u: not an http(s):// URL (e.g. http://node12:8100)"
  # job scripts, argv and sacct would show it: the key goes in a file
  [[ ! $u =~ ^https?://[^/]*@ ]] || die "--reward-url: credentials in a URL would be logged; give the key with --api-key-file"
done
if [[ ${#REWARD_URLS[@]} -gt 0 && ${#LAUNCH_OPTS[@]} -gt 0 ]]; then
  die "${LAUNCH_OPTS[0]} configures the reward-server job, which --reward-url replaces (the server is already running)"
fi
[[ -z $SERVED_NAME || ${#REWARD_URLS[@]} -gt 0 ]] || die "--served-model-name goes with --reward-url (a server the pipeline starts serves --reward-model under its own name)"
[[ -z $ANSWERS || -f $ANSWERS ]] || die "--answers $ANSWERS: no such file"
[[ -z $TOKEN_FILE || -f $TOKEN_FILE ]] || die "--hf-token-file $TOKEN_FILE: no such file"
REWARD_GPUS=${REWARD_GPUS:-$GPUS}
REWARD_PARTITION=${REWARD_PARTITION:-$PARTITION}
# --train-args is shell-quoted text: split it into words as a shell would (quotes kept), never at every space.
eval "TRAIN_ARGV=($TRAIN_ARGS)" 2>/dev/null || die "--train-args: unbalanced quotes in '$TRAIN_ARGS'"

recipe_value() {  # recipe_value KEY DEFAULT: the last --KEY in --train-args, else the recipe's KEY:, else DEFAULT
  local key=$1 value=$2 i
  local line; line=$(sed -n "s/^$key:[[:space:]]*\([^#[:space:]]*\).*/\1/p" "$RECIPE" | tail -n 1)
  [[ -n $line ]] && value=$line
  for ((i = 0; i < ${#TRAIN_ARGV[@]}; i++)); do
    [[ ${TRAIN_ARGV[$i]} == "--$key" ]] && value=${TRAIN_ARGV[$((i + 1))]:-$value}
  done
  echo "${value//\"/}"
}
# The global batch the recipe states (a `# global_batch: N` comment) against what this allocation gives.
WANT_GLOBAL=$(sed -n 's/^#[[:space:]]*global_batch:[[:space:]]*\([0-9]*\).*/\1/p' "$RECIPE" | head -n 1)
if [[ -n $WANT_GLOBAL ]]; then
  PER_DEVICE=$(recipe_value per_device_train_batch_size 8); ACCUM=$(recipe_value gradient_accumulation_steps 1)
  if [[ $CPU == 1 ]]; then PROCS_PER_NODE=1; else PROCS_PER_NODE=$GPUS; fi
  GOT_GLOBAL=$((NODES * PROCS_PER_NODE * PER_DEVICE * ACCUM))
  if [[ $GOT_GLOBAL != "$WANT_GLOBAL" ]]; then
    echo "pipeline.sh: warning: $NODES node(s) x $PROCS_PER_NODE process(es) x batch $PER_DEVICE x accumulation $ACCUM =" \
         "global batch $GOT_GLOBAL, but $(basename "$RECIPE") states $WANT_GLOBAL; set --gradient_accumulation_steps in" \
         "--train-args to match" >&2
  fi
fi
# Step-reward losses need scored eval pairs; the score job scores the training split only, so those
# recipes evaluate in the eval job (after training), not during training.
STEP_LOSS=$(recipe_value step_loss dpo)
if [[ $STEP_LOSS == dpo ]]; then EVAL_DURING=(--eval_pairs "RUN_DIR_PLACEHOLDER/pairs/test/pairs.jsonl"); else EVAL_DURING=(--eval_strategy no); fi

srun_args() { [[ $1 == container:* ]] && echo "--container-image=${1#container:} --container-mounts=$REPO:$REPO,$(cd "$(dirname "$RUN_DIR")" && pwd)"; true; }
ENV_SETUP=$(env_setup "$ENV_SPEC")
VLLM_SETUP=$(env_setup "$VLLM_ENV_SPEC")
# the reward-server job's options, split into words as reward_server.sbatch splits them
if [[ ${#REWARD_URLS[@]} -eq 0 ]]; then
  # shellcheck disable=SC2086
  bash "$REPO/launch/serve_reward.sh" "$RM" --method "$METHOD" $SERVE_ARGS --check \
    || die "--serve-args '$SERVE_ARGS': see above; nothing submitted"
fi
# the train job's options as it will get them: the recipe, then the pipeline's, then --train-args
check_options "$ENV_SETUP" train --config "$RECIPE" --model_name_or_path "$MODEL" --train_pairs pairs.jsonl \
  "${EVAL_DURING[@]}" "${TRAIN_ARGV[@]}"

mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd)
EVAL_DURING=("${EVAL_DURING[@]/RUN_DIR_PLACEHOLDER/$RUN_DIR}")
mkdir -p "$RUN_DIR/logs"
rm -f "$RUN_DIR/score_job_id"
# A URL left by an earlier run's server would send this run's score job to a server that is gone, before its
# own has started. (reward_server.sbatch also clears them, but only once it runs, which may be after scoring starts.)
[[ $DRY == 1 ]] || rm -rf "$RUN_DIR/reward_urls"

common_args

GPU_ARGS=(); REWARD_GPU_ARGS=(); EVAL_RES=(--cpus-per-task 1); TRAIN_RES=()
if [[ $CPU == 0 ]]; then
  GPU_ARGS=(--gpus-per-node "$GPUS"); REWARD_GPU_ARGS=(--gpus-per-node "$REWARD_GPUS")
  # The policy (and, for an adapter, its base as trained) on a GPU, with CPUs and memory to load it.
  EVAL_RES=(--gpus-per-node "$EVAL_GPUS" --cpus-per-task "$EVAL_CPUS" --mem "$EVAL_MEM")
  # Training owns its nodes unless told how much to take.
  if [[ -z $TRAIN_CPUS && -z $TRAIN_MEM ]]; then TRAIN_RES=(--exclusive); fi
  # Use every GPU the reward server gets: tensor parallelism over them unless --serve-args says otherwise.
  [[ " $SERVE_ARGS " == *" --tp "* ]] || SERVE_ARGS="--tp $REWARD_GPUS $SERVE_ARGS"
fi
[[ -n $TRAIN_CPUS ]] && TRAIN_RES+=(--cpus-per-task "$TRAIN_CPUS")
[[ -n $TRAIN_MEM ]] && TRAIN_RES+=(--mem "$TRAIN_MEM")
if [[ $CPU == 1 ]]; then SERVE_ARGS="--cpu $SERVE_ARGS"; fi
INPUT_ARGS=""; for f in "${INPUTS[@]}"; do INPUT_ARGS+=" --input $(cd "$(dirname "$f")" && pwd)/$(basename "$f")"; done

PREP=$(submit prepare ENV_SETUP="$ENV_SETUP" SRUN_ARGS="$(srun_args "$ENV_SPEC")" \
  STAGE_ARGS="prepare --format $FORMAT$INPUT_ARGS --out $RUN_DIR/pairs --test-fraction $TEST_FRACTION --seed $SEED --overwrite --no-progress" -- \
  "${COMMON[@]}" --job-name stepdpo-prepare --time "$T_PREP" --output "$RUN_DIR/logs/prepare-%j.out" \
  "$REPO/slurm/stage.sbatch")

# With --reward-url the servers are not the pipeline's: the score job neither waits for a URL file nor stops them.
SERVER=""; SERVER_ENV=()
URL_ARGS=""; for u in ${REWARD_URLS[@]+"${REWARD_URLS[@]}"}; do URL_ARGS+=" --url $u"; done
if [[ ${#REWARD_URLS[@]} -eq 0 ]]; then
  REWARD_COMMON=("${COMMON[@]}")
  if [[ -n $REWARD_PARTITION && $REWARD_PARTITION != "$PARTITION" ]]; then
    REWARD_COMMON=(--parsable --chdir "$REPO" --partition "$REWARD_PARTITION")
    [[ -n $ACCOUNT ]] && REWARD_COMMON+=(--account "$ACCOUNT")
  fi
  SERVER=$(submit reward-server MODEL="$RM" RUN_DIR="$RUN_DIR" METHOD="$METHOD" SERVE_ARGS="$SERVE_ARGS" \
    API_KEY_FILE="$API_KEY_FILE" WATCH_JOB_FILE="$RUN_DIR/score_job_id" ENV_SETUP="$VLLM_SETUP" -- \
    "${REWARD_COMMON[@]}" --job-name stepdpo-reward --nodes "$REPLICAS" --ntasks-per-node 1 "${REWARD_GPU_ARGS[@]}" \
    --time "$T_REWARD" --output "$RUN_DIR/logs/reward-%j.out" "$REPO/slurm/reward_server.sbatch")
  SERVER_ENV=(WAIT_URLS_DIR="$RUN_DIR/reward_urls" SERVER_JOB_ID="$SERVER")
fi

SCORE=$(submit score ENV_SETUP="$ENV_SETUP" SRUN_ARGS="$(srun_args "$ENV_SPEC")" ${SERVER_ENV[@]+"${SERVER_ENV[@]}"} \
  STAGE_ARGS="score --pairs $RUN_DIR/pairs/train/pairs.jsonl --model $RM --backend vllm --method $METHOD --out $RUN_DIR/scored --no-progress${URL_ARGS}${SERVED_NAME:+ --served-model-name $SERVED_NAME}${API_KEY_FILE:+ --api-key-file $API_KEY_FILE}" -- \
  "${COMMON[@]}" --job-name stepdpo-score --dependency "afterok:$PREP" --time "$T_SCORE" \
  --output "$RUN_DIR/logs/score-%j.out" "$REPO/slurm/stage.sbatch")
[[ $DRY == 1 || -z $SERVER ]] || echo "$SCORE" > "$RUN_DIR/score_job_id"   # the server watches it

TRAIN=$(submit train RECIPE="$(cd "$(dirname "$RECIPE")" && pwd)/$(basename "$RECIPE")" RUN_DIR="$RUN_DIR/train" \
  MODE="$MODE" PROCS=1 ENV_SETUP="$ENV_SETUP" SRUN_ARGS="$(srun_args "$ENV_SPEC")" STEPDPO_REPO="$REPO" \
  HF_TOKEN_FILE="$TOKEN_FILE" -- \
  "${COMMON[@]}" --job-name stepdpo-train --dependency "afterok:$SCORE" --nodes "$NODES" --ntasks-per-node 1 \
  "${GPU_ARGS[@]}" "${TRAIN_RES[@]}" --time "$T_TRAIN" --output "$RUN_DIR/logs/train-%j.out" \
  "$REPO/slurm/train.sbatch" --model_name_or_path "$MODEL" --train_pairs "$RUN_DIR/scored/pairs.jsonl" \
  "${EVAL_DURING[@]}" "${TRAIN_ARGV[@]}")

EVAL=$(submit eval ENV_SETUP="$ENV_SETUP" SRUN_ARGS="$(srun_args "$ENV_SPEC")" \
  STAGE_ARGS="eval --model $RUN_DIR/train/final --pairs $RUN_DIR/pairs/test/pairs.jsonl --out $RUN_DIR/eval --run-dir $RUN_DIR/train --no-progress" -- \
  "${COMMON[@]}" --job-name stepdpo-eval --dependency "afterok:$TRAIN" --time "$T_EVAL" "${EVAL_RES[@]}" \
  --output "$RUN_DIR/logs/eval-%j.out" "$REPO/slurm/stage.sbatch")

ANSWERS_JOB=""
if [[ -n $ANSWERS ]]; then
  POLICY_SERVE_ARGS=""
  if [[ $CPU == 1 ]]; then POLICY_SERVE_ARGS="--cpu"; else POLICY_SERVE_ARGS="--tp $EVAL_GPUS --dtype bfloat16"; fi
  VLLM_PY=""; [[ $VLLM_ENV_SPEC == venv:* ]] && VLLM_PY="${VLLM_ENV_SPEC#venv:}/bin/python"
  ANSWERS_JOB=$(submit answers POLICY="$RUN_DIR/train/final" PROBLEMS="$(cd "$(dirname "$ANSWERS")" && pwd)/$(basename "$ANSWERS")" \
    OUT="$RUN_DIR/answers" SAMPLES="$ANSWER_SAMPLES" SERVE_ARGS="$POLICY_SERVE_ARGS" ENV_SETUP="$ENV_SETUP" \
    STEPDPO_REPO="$REPO" ${VLLM_PY:+VLLM_PYTHON="$VLLM_PY"} -- \
    "${COMMON[@]}" --job-name stepdpo-answers --dependency "afterok:$TRAIN" --time "$T_EVAL" "${EVAL_RES[@]}" \
    --output "$RUN_DIR/logs/answers-%j.out" "$REPO/slurm/answers.sbatch")
fi
printf 'prepare=%s%s score=%s train=%s eval=%s%s\n' "$PREP" "${SERVER:+ reward_server=$SERVER}" "$SCORE" "$TRAIN" \
  "$EVAL" "${ANSWERS_JOB:+ answers=$ANSWERS_JOB}"
[[ $DRY == 1 ]] || echo "logs: $RUN_DIR/logs  (squeue -u ${USER:-$(id -un)}; results in $RUN_DIR/eval/metrics.json)"
