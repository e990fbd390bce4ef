# Shared by slurm/pipeline.sh and slurm/loop.sh (sourced, not run): argument checks, the --env forms, the
# sbatch arguments every job gets, and submission (or, with DRY=1, printing the exact sbatch command).
# The sourcing script defines die() and sets REPO.

check_positive() {  # check_positive VAR...: each is a positive integer, or die naming its flag
  local n
  for n in "$@"; do [[ ${!n} =~ ^[1-9][0-9]*$ ]] || die "--${n,,} must be a positive integer"; done
}

check_times() {  # check_times VAR...: each is a SLURM time limit
  local t
  for t in "$@"; do
    [[ ${!t} =~ ^([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}$ ]] || die "time limit '${!t}' is not SLURM's [D-]HH:MM:SS"
  done
}

env_setup() {  # an --env spec -> shell code (containers go through srun arguments instead)
  local spec=$1
  case "$spec" in
    "") echo "true";;
    venv:*) echo "source ${spec#venv:}/bin/activate";;
    conda:*) echo "eval \"\$(conda shell.bash hook)\" && conda activate ${spec#conda:}";;
    cmd:*) echo "${spec#cmd:}";;
    container:*) echo "true";;
    *) die "--env/--vllm-env '$spec': use venv:PATH, conda:NAME, cmd:CODE or container:IMAGE";;
  esac
}

common_args() {  # COMMON: what every job gets (parsable id, the checkout as working directory, partition, account, qos)
  COMMON=(--parsable --chdir "$REPO")
  [[ -n ${PARTITION:-} ]] && COMMON+=(--partition "$PARTITION")
  [[ -n ${ACCOUNT:-} ]] && COMMON+=(--account "$ACCOUNT")
  [[ -n ${QOS:-} ]] && COMMON+=(--qos "$QOS")
  true
}

submit() {  # submit NAME ENV... -- SBATCH_ARGS... ; echoes the job id (or a placeholder with DRY=1)
  local name=$1; shift
  local envs=()
  while [[ $1 != -- ]]; do envs+=("$1"); shift; done
  shift
  if [[ ${DRY:-0} == 1 ]]; then
    printf '%q ' env "${envs[@]}" sbatch "$@" >&2; echo >&2
    echo "<$name>"
  else
    env "${envs[@]}" sbatch "$@"
  fi
}

check_options() {  # check_options SETUP STAGE ARGS... [--and STAGE ARGS...]: `stepdpo check` in the jobs' environment
  # (SETUP: their --env shell code) before anything is submitted, so that a misspelt option or recipe key stops
  # the submission, not a job hours later. Where this node cannot run stepdpo, a warning says the check was skipped.
  local setup=$1; shift
  local out status=0
  out=$(eval "$setup" >/dev/null 2>&1 || exit 97
        cmd=${STEPDPO:-stepdpo}
        command -v "$cmd" >/dev/null 2>&1 || cmd=$REPO/.venv/bin/stepdpo
        command -v "$cmd" >/dev/null 2>&1 || exit 98
        "$cmd" check "$@" 2>&1 >/dev/null) || status=$?
  case $status in
    0) ;;
    97) echo "$(basename "$0"): warning: the --env set-up failed on this node; options not checked before" \
             "submitting" >&2;;
    98) echo "$(basename "$0"): warning: no stepdpo on this node (set STEPDPO to its path); options not checked" \
             "before submitting" >&2;;
    *) die "nothing submitted: fix these options (the recipes' keys or the --*-args overrides)"$'\n'"$out";;
  esac
}
