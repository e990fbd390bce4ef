"""`stepdpo`: one entry point, one sub-command per stage, every parser generated from its options dataclass.

A stage is `(options dataclass, function)` in a module; this file only lists them. Each stage's parser is
a `trl.TrlParser` over its dataclass (TRL's `make_parser` pattern), so every stage takes
`--config stage.yaml` plus overrides, and both `--kebab-case` and `--snake_case` flags. Heavy imports
(torch, transformers) happen inside the stage modules, so `stepdpo --help` is instant.

Errors: a `StepdpoError` (or an OSError such as a read-only or full output directory) is printed as one
line naming the input and the fix, with exit status 2 (3 for authentication); `--debug` shows the
traceback instead. `main(argv)` is callable from tests without a subprocess.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import re
import sys
from dataclasses import dataclass

from stepdpo.spelling import close_names, or_join


@dataclass(frozen=True)
class Stage:
    module: str
    options: str
    function: str
    help: str
    # `--config` may be a file written for another stage (plan reads a training recipe): its other keys are
    # ignored instead of refused.
    foreign_config: bool = False


STAGES: dict[str, Stage] = {
    "tiny-model": Stage("stepdpo.tiny", "TinyModelOptions", "tiny_model",
                        "build a tiny random-weight model of a real architecture (no download)"),
    "synth": Stage("stepdpo.data.synthetic", "SynthOptions", "synth",
                   "generate PRM800K-format data (multi-step arithmetic with step labels)"),
    "problems": Stage("stepdpo.generate.problems", "ProblemsOptions", "select_problems",
                      "select problems by reference step count and split them by problem (train, validation, test)"),
    "prepare": Stage("stepdpo.data.prepare", "PrepareOptions", "run_prepare",
                     "validate step-labelled data and build step preference pairs"),
    "score": Stage("stepdpo.reward.score", "ScoreOptions", "score",
                   "score every substep with a reward model (in-process, or vLLM servers)"),
    "train": Stage("stepdpo.train.config", "StepwiseDPOConfig", "stepdpo.train.run:train_main",
                   "train with stepwise DPO (under accelerate launch for several processes)"),
    "generate": Stage("stepdpo.generate.generate", "GenerateOptions", "generate",
                      "step-formatted solutions for a problem file, in-process or from vLLM servers"),
    "grade": Stage("stepdpo.generate.grade", "GradeOptions", "grade",
                   "grade sampled solutions' final answers with math-verify: accuracy, maj@k, invalid"),
    "sft": Stage("stepdpo.train.sft", "StepSFTConfig", "sft_main",
                 "supervised fine-tuning on correct step-by-step solutions: a base model becomes a step solver"),
    "mine": Stage("stepdpo.generate.mine", "MineOptions", "mine",
                  "the policy's own step pairs: sample, grade, locate the first wrong step, correct it"),
    "convert": Stage("stepdpo.convert", "ConvertOptions", "convert",
                     "write a GGUF file (or a registry model) out once as a plain model directory"),
    "merge": Stage("stepdpo.generate.merge", "MergeOptions", "merge",
                   "fold a LoRA/QLoRA adapter into its base (for servers without LoRA support)"),
    "eval": Stage("stepdpo.evaluate", "EvalOptions", "run_eval",
                  "held-out step-pair accuracy, reward margins, training curves"),
    "inspect": Stage("stepdpo.inspect_pairs", "InspectOptions", "inspect_pairs",
                     "show what the trainer sees for a few pairs: templated texts, token counts, boundaries",
                     foreign_config=True),
    "plan": Stage("stepdpo.plan", "PlanOptions", "run_plan",
                  "per-GPU / per-node memory plan from the model config or a training recipe (no weights)",
                  foreign_config=True),
    "loop": Stage("stepdpo.loop", "LoopOptions", "loop",
                  "one round of the loop (sft, mine, stepwise DPO) against controls, with intervals and paired tests"),
    "demo": Stage("stepdpo.demo", "DemoOptions", "demo",
                  "the whole pipeline on CPU with a tiny model: data, pairs, scores, training, eval"),
}


def _load(stage: Stage):
    module = importlib.import_module(stage.module)
    options = getattr(module, stage.options)
    mod_name, _, fn_name = stage.function.rpartition(":")
    fn = getattr(importlib.import_module(mod_name) if mod_name else module, fn_name)
    return options, fn


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """HfArgumentParser's formatter, except where an option's help already says what its default is ("default:
    the run's"): there the appended "(default: None)" contradicted it."""

    def _get_help_string(self, action):
        if "default:" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


def make_parser(name: str):
    """The stage's parser, generated from its options dataclass (with `--config YAML`)."""
    from trl import TrlParser

    stage = STAGES[name]
    options, fn = _load(stage)
    description = (fn.__doc__ or stage.help).strip().split("\n\n")[0]
    parser = TrlParser((options,), prog=f"stepdpo {name}", description=description, formatter_class=_HelpFormatter,
                       epilog="Every option can also come from --config FILE.yaml (keys = option names); "
                       "flags given on the command line override the file. --debug shows tracebacks.")
    return parser, fn


def _overview() -> str:
    width = max(map(len, STAGES))
    lines = ["usage: stepdpo COMMAND [--config FILE.yaml] [--option value ...] [--debug]", "",
             "Step-level DPO for math reasoning. Commands (`stepdpo COMMAND --help` for each):"]
    lines += [f"  {name:{width}s}  {stage.help}" for name, stage in STAGES.items()]
    lines += ["", f"  {'check':{width}s}  check a stage's options without running it "
              "(`stepdpo check STAGE [options] [--and STAGE ...]`)"]
    return "\n".join(lines)


def parse(name: str, argv: list[str]):
    """Options for stage `name` from argv (YAML via --config, then flags): (options, function)."""
    parser, fn = make_parser(name)
    argv = _merge_repeated_lists(parser, argv)
    _refuse_unknown(name, parser, argv)
    try:
        if STAGES[name].foreign_config:
            options = parser.parse_args_and_config(argv, fail_with_unknown_args=False)[0]
        else:
            (options,) = parser.parse_args_and_config(argv)
    except ValueError as e:
        # TrlParser: unknown keys in the YAML file; our __post_init__ checks raise OptionsError (a ValueError too)
        from stepdpo.errors import OptionsError

        if isinstance(e, OptionsError):
            raise
        raise OptionsError(str(e)) from None
    return options, fn


# Names other trainers give options that stepdpo takes under TRL's and transformers' names (OpenRLHF, the Step-DPO
# reference scripts, axolotl, LLaMA-Factory). A user's habit from another tool is the commonest wrong name, and
# spelling similarity alone points elsewhere: --epochs looked nearest to --step_loss, --lora_rank to --local_rank.
# A name is suggested only where the stage has it.
_OTHER_TOOLS = {
    "lr": ("learning_rate",), "epochs": ("num_train_epochs",), "num_epochs": ("num_train_epochs",),
    "max_epochs": ("num_train_epochs",), "batch_size": ("per_device_train_batch_size",),
    "train_batch_size": ("per_device_train_batch_size",), "micro_train_batch_size": ("per_device_train_batch_size",),
    "micro_batch_size": ("per_device_train_batch_size",), "eval_batch_size": ("per_device_eval_batch_size",),
    "micro_eval_batch_size": ("per_device_eval_batch_size",), "grad_accum": ("gradient_accumulation_steps",),
    "gradient_accumulation": ("gradient_accumulation_steps",), "accumulation_steps": ("gradient_accumulation_steps",),
    "lora_rank": ("lora_r",), "rank": ("lora_r",), "target_modules": ("lora_target_modules",),
    "pretrain": ("model_name_or_path", "model"), "model_path": ("model_name_or_path", "model"),
    "base_model": ("model_name_or_path", "model"), "model_name_or_path": ("model",), "model": ("model_name_or_path",),
    "save_path": ("output_dir", "out"), "out_dir": ("output_dir", "out"), "output_path": ("output_dir", "out"),
    "output_dir": ("out",), "output": ("output_dir", "out"), "max_len": ("max_length",), "cutoff_len": ("max_length",),
    "max_seq_length": ("max_length",), "warmup": ("warmup_steps",), "l2": ("weight_decay",),
    "flash_attn": ("attn_implementation",), "train_file": ("train_pairs", "train_data"),
    "dataset": ("train_pairs", "train_data", "pairs", "input"), "eval_file": ("eval_pairs", "eval_data"),
}




def _did_you_mean(word: str, names: list[str], prefix: str = "") -> str:
    """' (did you mean --x?)' for a wrong option name (given without its dashes): the name other tools use for it
    (_OTHER_TOOLS) if the stage has that option, else the nearest spellings (up to three, as close as the best)."""
    key = word.replace("-", "_")
    close = [n for n in _OTHER_TOOLS.get(key, ()) if n in names][:1]
    if not close:
        close = close_names(key, names)
    return f" (did you mean {or_join([prefix + n for n in close])}?)" if close else ""


def _refuse_unknown(name: str, parser, argv: list[str]) -> dict | None:
    """An option the stage does not have, on the command line or as a key of its --config file, stops before
    anything is parsed, with the nearest real name; so does a --config file that is missing, not YAML or not a
    mapping. The parsers' own messages were addressed to developers ("...not used by the HfArgumentParser",
    "...add them to the dataclass, or set `fail_with_unknown_args=False`") and came after the options' own checks,
    so a misspelt flag could surface as a missing required option. Returns the --config file's mapping (None
    without one)."""
    from stepdpo.errors import OptionsError
    from stepdpo.options import config_argument, read_config_file

    dest_of = {s: action.dest for action in parser._actions for s in action.option_strings if s.startswith("--")}
    keys = sorted({action.dest for action in parser._actions} - {"help"})

    for token in argv:
        if not token.startswith("--") or token == "--" or " " in token:  # argparse: a value, not an option
            continue
        flag = token.split("=", 1)[0]
        if flag == "--config" or flag in dest_of:
            continue
        # argparse also takes an unambiguous prefix (--problem for --problems). An ambiguous one is reported here,
        # with the options it could be and the likely intent: argparse's own message for --lr lists only the
        # --lr_scheduler_* options (each twice, kebab and snake), never --learning_rate.
        starts = sorted({dest_of[f] for f in dest_of if f.startswith(flag)})
        if len(starts) == 1:
            continue
        if starts:
            listed = or_join(["--" + d for d in starts], "and")
            raise OptionsError(f"ambiguous option {flag}: it is the start of {listed}"
                               f"{_did_you_mean(flag[2:], keys, '--')}; give the whole name")
        raise OptionsError(f"unknown option {flag}{_did_you_mean(flag[2:], keys, '--')}; "
                           f"`stepdpo {name} --help` lists every option")
    path = config_argument(argv)
    if path is None:
        return None
    config = read_config_file(path)
    if not STAGES[name].foreign_config:
        unknown = [k for k in config if k != "env" and k not in keys]  # `env:` sets variables (TrlParser)
        if unknown:
            k = str(unknown[0])
            raise OptionsError(f"--config {path}: unknown key {k!r}{_did_you_mean(k, keys)}"
                               + (f" (and {len(unknown) - 1} more: {', '.join(map(str, unknown[1:]))})"
                                  if len(unknown) > 1 else "")
                               + f"; `stepdpo {name} --help` lists every option (keys are option names)")
    return config


def check_options(name: str, argv: list[str]) -> None:
    """What can be checked of stage `name`'s options without running it, on any machine: the option names (command
    line and --config keys), the --config file's YAML, and every value argparse checks (type, choices, required
    options), the file's values as if they were given as flags. What needs the job's own machine or inputs (a GPU
    for bf16, a model or a file that an earlier job writes, the stage's own cross-field rules) is checked when the
    stage starts. OptionsError names the first problem. Used by slurm/pipeline.sh and slurm/loop.sh before they
    submit anything: a misspelt --train-args flag used to stop the chain only when the train job started, after
    the jobs before it had run."""
    import json

    from stepdpo.errors import OptionsError

    parser, _ = make_parser(name)
    argv = _merge_repeated_lists(parser, list(argv))
    config = _refuse_unknown(name, parser, argv)  # read once, there: it exists and is a YAML mapping
    flags: list[str] = []
    if config is not None:
        i = argv.index("--config")
        path = argv[i + 1]
        del argv[i:i + 2]
        dests = {a.dest for a in parser._actions}
        # a flag overrides the file's value (argparse's prefixes too): that value is never parsed
        given = {t.split("=", 1)[0] for t in argv if t.startswith("--")}
        overridden = {a.dest for a in parser._actions
                      if any(f.startswith(g) for f in a.option_strings for g in given)}
        for key, value in config.items():
            # `env:` sets variables; a foreign config's other keys are ignored; null and [] are no value
            if key == "env" or key not in dests or key in overridden or value is None or value == []:
                continue
            if isinstance(value, list):
                if not any(str(v).startswith("-") for v in value):  # such an item would be taken for an option
                    flags += [f"--{key}", *map(str, value)]
                continue
            if isinstance(value, bool):
                value = str(value).lower()
            elif isinstance(value, dict):  # dict options (model_init_kwargs, ...) take JSON on the command line
                value = json.dumps(value)
            flags.append(f"--{key}={value}")  # `=`: a value that starts with "-" is not taken for an option

    def fail(message: str):  # argparse would print its usage and exit
        raise OptionsError(message)

    parser.error = fail
    if flags:  # the file's values on their own first, so that a bad one is reported as the file's
        required = [a for a in parser._actions if a.required]
        for a in required:
            a.required = False
        try:
            parser.parse_known_args(flags)
        except OptionsError as e:
            message = re.sub(r"^argument --([\w-]+)[^:]*: ", r"key \1: ", str(e))
            raise OptionsError(f"--config {path}: {message}") from None
        finally:
            for a in required:
                a.required = True
    _, extra = parser.parse_known_args(flags + argv)
    if extra:
        raise OptionsError(f"unexpected values {' '.join(extra)}; `stepdpo {name} --help` lists every option")


def _check_main(argv: list[str]) -> int:
    """`stepdpo check STAGE [options] [--and STAGE [options]]...`: check_options for each, one process (the training
    stages' imports take seconds); every group reported, exit 2 if any failed."""
    from stepdpo.errors import OptionsError

    if not argv or argv[0] in ("-h", "--help"):
        print("usage: stepdpo check STAGE [--config FILE.yaml] [--option value ...] [--and STAGE ...]\n\n"
              "Checks a stage's options without running it: option names (flags and --config keys), the --config\n"
              "file's YAML, and values' types, choices and required options. What needs the job's own machine or\n"
              "inputs (a GPU, files earlier jobs write) is checked when the stage starts. slurm/pipeline.sh and\n"
              "slurm/loop.sh run it before they submit anything.")
        return 0 if argv else 2
    groups: list[list[str]] = [[]]
    for token in argv:
        if token == "--and":
            groups.append([])
        else:
            groups[-1].append(token)
    failed = False
    for group in groups:
        if not group or group[0] not in STAGES:
            what = repr(group[0]) if group else "nothing after --and"
            print(f"stepdpo check: {what} is not a stage; `stepdpo --help` lists them", file=sys.stderr)
            failed = True
            continue
        try:
            check_options(group[0], group[1:])
            print(f"stepdpo check: {group[0]}: options OK", flush=True)
        except OptionsError as e:
            print(f"stepdpo check: {group[0]}: {e}", file=sys.stderr)
            failed = True
    return 2 if failed else 0


def _merge_repeated_lists(parser, argv: list[str]) -> list[str]:
    """`--input a --input b` means both files (argparse's nargs="+" alone would keep only the last)."""
    list_flags = {}
    for action in parser._actions:
        if action.nargs == "+":
            for flag in action.option_strings:
                list_flags[flag] = action.dest
    seen: dict[str, list[str]] = {}
    out: list[str] = []
    i = 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if flag in list_flags:
            dest = list_flags[flag]
            values = [argv[i].split("=", 1)[1]] if "=" in argv[i] else []
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            if dest not in seen:
                seen[dest] = []
                out += [flag, seen[dest]]
            seen[dest].extend(values)
            continue
        out.append(argv[i])
        i += 1
    flat: list[str] = []
    for item in out:
        flat.extend(item if isinstance(item, list) else [item])
    return flat


def _setup_logging() -> None:
    rank0 = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"
    logging.basicConfig(level=logging.INFO if rank0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # huggingface_hub's HTTP client logs every request at INFO (a line per file downloaded, per preflight)
    for name in ("httpx2", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # bitsandbytes 0.50 warns at import, on CPUs with AVX512-BF16 only, that it could not fetch an optional faster
    # CPU kernel from the hub ('Failed to load CPU gemm_4bit_forward from kernels-community'); it falls back to its
    # own, and training keeps its generic layout anyway (train.modeling.generic_4bit_on_cpu). Printed on every
    # command that imports it, it made `stepdpo check`'s messages machine-dependent (README: library warnings).
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "check":
        _setup_logging()
        return _check_main(rest)
    if name not in STAGES:
        close = difflib.get_close_matches(name, [*STAGES, "check"], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"stepdpo: unknown command {name!r}{hint}\n\n{_overview()}", file=sys.stderr)
        return 2
    from stepdpo.errors import StepdpoError

    if "torch" not in sys.modules:
        from stepdpo.console import reproducible_cpu, share_cores

        share_cores()
        if name in ("demo", "loop"):  # numbers the README quotes: the same on every machine
            reproducible_cpu()
    _setup_logging()
    options = None
    try:
        options, fn = parse(name, rest)
        fn(options)  # a stage returns its result (for callers in Python) or raises; success is exit 0
    except StepdpoError as e:
        if debug:
            raise
        print(f"stepdpo {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # the reader of our output went away (`| head`): not an error of ours
        return 0
    except OSError as e:  # read-only or full output directory, a missing YAML file, ...
        if debug:
            raise
        print(f"stepdpo {name}: error: {_os_error(e, options)}; --debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stepdpo {name}: interrupted", file=sys.stderr)
        return 130
    finally:
        _quiet_broken_pipe()
    return 0


def _os_error(e: OSError, options) -> str:
    """The file an OSError names, else (a write to an open file: a full disk) the stage's output, and what to check."""
    if getattr(e, "filename", None):
        return f"{e.filename}: {e.strerror or e} (check the path, its permissions and free space"
    outs = [f"--{k.replace('_', '-')} {getattr(options, k)}" for k in ("out", "output_dir")
            if getattr(options, k, None)]
    where = f"output {', '.join(outs)}: check its" if outs else "check the paths, their"
    return f"{e.strerror or e} ({where} permissions and free space"


def _quiet_broken_pipe() -> None:
    """`stepdpo ... | head`: once the reader is gone, flushing stdout at exit would raise BrokenPipeError and print a
    traceback; point stdout at /dev/null instead (the Python docs' recipe, signal-free)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def entry() -> None:
    """The `stepdpo` command (and `python -m stepdpo.cli`): main, then the end of a training process when a stage
    ran under torch.distributed (`accelerate launch $(which stepdpo) train ...`; see end_process)."""
    code = main()
    trainer = sys.modules.get("stepdpo.train.trainer")  # loaded only when a training stage ran
    if trainer is not None:
        trainer.end_process(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
