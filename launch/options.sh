# Shared by the shell entry points (sourced, not run): launch/train.sh, launch/serve_reward.sh, slurm/pipeline.sh,
# slurm/loop.sh and slurm/local_cluster.sh. `--help` prints the script's header comment; an unknown option is
# refused with the nearest real one, as the stepdpo stages do.

usage() { awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; }  # the header comment

# unknown_option NAME OPTION: "NAME: unknown option OPTION (did you mean --x?); see --help" on stderr, exit 2.
# The options are the calling script's own `case` labels ("    --mode)", "    -h|--help)"), so the hint cannot
# drift from what the script takes. The two common slips get an exact hint:
# - underscores: the stepdpo stages (Python) take --reward_model and --reward-model alike, these scripts only
#   the dashed form;
# - --mode=cpu: these scripts take an option's value as the next argument.
# Otherwise: every option the word begins (--gpus: --gpus-per-node), else the nearest spellings by the stages' own
# rule (stepdpo/spelling.py, run by path: it needs python3, not the package). Without python3, no spelling hint.
unknown_option() {
  local name=$1 given=$2 flag norm options hint=""
  flag=${given%%=*}
  norm=${flag//_/-}
  norm=${norm,,}
  options=$(grep -oE '^ +(-[a-zA-Z][|])?--[a-z0-9-]+[)]' "$0" | grep -oE -- '--[a-z0-9-]+' | sort -u)
  if [[ $given == --* ]] && grep -qxF -- "$norm" <<<"$options"; then
    if [[ $flag != "$given" ]]; then
      hint=" (write $norm VALUE: the value is the next argument, not after '=')"
    else
      hint=" (did you mean $norm?)"
    fi
  elif [[ $given == --?* ]]; then
    local near
    near=$(python3 "$(dirname "${BASH_SOURCE[0]}")/../stepdpo/spelling.py" "$norm" $options 2>/dev/null || true)
    [[ -n $near ]] && hint=" (did you mean $near?)"
  fi
  echo "$name: unknown option $given$hint; see --help" >&2
  exit 2
}
