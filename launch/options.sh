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
# Otherwise: every option the word begins (--gpus: --gpus-per-node), else up to three nearest spellings by the
# stages' rule (stepdpo.cli._did_you_mean: difflib ratio >= 0.6, within 0.05 of the best). Where this node has no
# python3, no spelling hint.
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
    near=$(python3 - "$norm" $options <<'PY' 2>/dev/null || true
import difflib, sys
word, names = sys.argv[1], sys.argv[2:]
close = [n for n in names if n.startswith(word)]  # every one: these scripts take no abbreviations
if not close:  # compared without the dashes every name shares, as the stages compare
    scored = sorted(((difflib.SequenceMatcher(None, word[2:], n[2:]).ratio(), n) for n in names), reverse=True)
    close = [n for r, n in scored[:3] if r >= 0.6 and r >= scored[0][0] - 0.05] if scored else []
if close:
    print(close[0] if len(close) == 1 else ", ".join(close[:-1]) + " or " + close[-1])
PY
)
    [[ -n $near ]] && hint=" (did you mean $near?)"
  fi
  echo "$name: unknown option $given$hint; see --help" >&2
  exit 2
}
