"""`stepdpo`: one entry point, one sub-command per stage.

Heavy imports (torch, transformers) happen inside each command, so `stepdpo --help` is instant.
`main(argv)` is callable from tests without a subprocess.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

STAGES = "tiny-model, synth, prepare, score, train, eval, plan, demo"


def _tiny_model(sub):
    p = sub.add_parser("tiny-model", help="build a tiny random-weight model + offline tokenizer (no download)",
                       description="Build a tiny model of a real architecture with random weights and a tokenizer "
                       "trained offline, saved with save_pretrained. Same seed, same bytes.")
    p.add_argument("--arch", choices=["t5", "mistral"], required=True,
                   help="t5: flan-t5-small's architecture (T5ForConditionalGeneration, gated-gelu) shrunk; "
                   "mistral: MistralForCausalLM shrunk (grouped-query attention, head_dim 32)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed for the tokenizer corpus and the weights (default 0)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    p.add_argument("--layers", type=int, default=2, help="layers (encoder and decoder each, for t5; default 2)")

    def run(a):
        from stepdpo.tiny import TinySize, build_tiny_model

        out = build_tiny_model(a.arch, a.out, seed=a.seed, size=TinySize(hidden=a.hidden, layers=a.layers))
        print(f"tiny {a.arch} model written to {out}")
        return 0

    p.set_defaults(run=run)


def _synth(sub):
    p = sub.add_parser("synth", help="generate PRM800K-format data (multi-step arithmetic with step labels)",
                       description="Write PRM800K-format jsonl: phase-1 records (alternatives at every step) and "
                       "phase-2 records (one solution, labelled until its first error). Wrong steps differ from "
                       "correct ones only in the arithmetic.")
    p.add_argument("--out", required=True, help="output .jsonl file")
    p.add_argument("--problems", type=int, required=True, help="number of records")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--max-value", type=int, default=20, help="intermediate values stay in [0, N] (default 20)")
    p.add_argument("--min-ops", type=int, default=2, help="fewest operations per problem (default 2)")
    p.add_argument("--max-ops", type=int, default=4, help="most operations per problem (default 4)")
    p.add_argument("--phase2-fraction", type=float, default=0.4, help="share of phase-2 style records (default 0.4)")

    def run(a):
        from stepdpo.data.synthetic import SynthConfig, write_synthetic

        cfg = SynthConfig(problems=a.problems, seed=a.seed, max_value=a.max_value, min_ops=a.min_ops,
                          max_ops=a.max_ops, phase2_fraction=a.phase2_fraction)
        n = write_synthetic(a.out, cfg)
        print(f"{n} PRM800K-format records written to {a.out}")
        return 0

    p.set_defaults(run=run)


def _prepare(sub):
    p = sub.add_parser("prepare", help="validate step-labelled data and build step preference pairs",
                       description="Turn PRM800K, Step-DPO, step-list or TRL preference data into step pairs: "
                       "DIR/pairs.jsonl, DIR/rejects.jsonl (every unused line with its reason), DIR/report.json.")
    p.add_argument("--format", choices=["prm800k", "step-dpo", "steps", "trl"], default="prm800k",
                   help="input format (default prm800k)")
    p.add_argument("--input", action="append", required=True, help="input file (.jsonl, or a JSON array); repeatable")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--neutral", choices=["skip", "positive", "negative"], default="skip",
                   help="PRM800K: how to treat rating-0 steps (default skip)")
    p.add_argument("--solution-pairs", type=int, default=0, metavar="N",
                   help="PRM800K: also write up to N kind=solution pairs per problem (default 0 = none)")
    p.add_argument("--test-fraction", type=float, default=0.0,
                   help="hold out this fraction of problems as DIR/test/pairs.jsonl (split by problem)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default 0)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad line (naming file, line, reason)")
    p.add_argument("--max-bad-fraction", type=float, default=None,
                   help="fail when more than this fraction of lines is rejected")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(a):
        from stepdpo.data.prepare import PrepareError, PrepareOptions, prepare

        opts = PrepareOptions(format=a.format, neutral=a.neutral, solution_pairs=a.solution_pairs,
                              test_fraction=a.test_fraction, seed=a.seed, strict=a.strict,
                              max_bad_fraction=a.max_bad_fraction, progress=not a.no_progress)
        try:
            report = prepare(a.input, a.out, opts)
        except PrepareError as e:
            print(f"stepdpo prepare: error: {e}", file=sys.stderr)
            return 2
        c = report["counts"]
        print(f"{c['lines_read']} lines read, {c['records_used']} records used, {c['pairs_written']} pairs written "
              f"({c['duplicates_removed']} duplicates removed), {c['rejected']} rejected, {c['skipped']} skipped")
        if report["split"]:
            s = report["split"]
            print(f"split by problem: train {s['train_pairs']} pairs / {s['train_problems']} problems, "
                  f"test {s['test_pairs']} pairs / {s['test_problems']} problems")
        print(f"report: {a.out}/report.json")
        return 0

    p.set_defaults(run=run)


def _score(sub):
    p = sub.add_parser("score", help="score every substep with a reward model (in-process, or a vLLM server)",
                       description="Add chosen_step_rewards / rejected_step_rewards to every pair. Scores are "
                       "cached as they arrive; re-running scores only what is missing.")
    p.add_argument("--pairs", required=True, help="pairs.jsonl (or a directory holding one)")
    p.add_argument("--model", required=True, help="reward model: local directory or hub id")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="hf: in-process transformers; "
                   "vllm: batched HTTP requests to vLLM server(s) (default hf)")
    p.add_argument("--method", choices=["judge", "prm"], default="judge",
                   help="judge: P(yes)/(P(yes)+P(no)) from a generative judge prompt per step; "
                   "prm: a process reward model read at a step tag after every step, one pass per solution")
    p.add_argument("--url", action="append", default=[], help="vLLM server URL; repeat to shard across replicas")
    p.add_argument("--served-model-name", default=None, help="model name the vLLM server knows (default: --model)")
    p.add_argument("--api-key-env", default="STEPDPO_API_KEY", help="env var holding the server API key")
    p.add_argument("--api-key-file", default=None, help="file holding the server API key")
    p.add_argument("--out", required=True, help="output directory: pairs.jsonl, score_report.json, cache")
    p.add_argument("--cache", default=None, help="score cache file (default OUT/score_cache.jsonl)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per forward pass / per request (default 32)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight per server (default 4)")
    p.add_argument("--prm-good-token", default="+", help="prm: the token meaning 'step is good' (default +)")
    p.add_argument("--prm-bad-token", default="-", help="prm: the token meaning 'step is bad' (default -)")
    p.add_argument("--prm-step-tag", default=None, help="prm: the step tag after each step (default ' ки')")
    p.add_argument("--prm-head", choices=["lm", "classifier"], default="lm",
                   help="prm: lm = rewards from the good/bad token logits (math-shepherd); classifier = a 2-label "
                   "token-classification head, P(good) = softmax[1] (Qwen2.5-Math-PRM style)")
    p.add_argument("--timeout", type=float, default=120.0, help="vLLM read timeout in seconds (default 120)")
    p.add_argument("--health-timeout", type=float, default=10.0,
                   help="seconds to wait for /health at start (default 10: an unreachable URL fails fast; raise it "
                   "to wait for a server that is still loading its model)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(a):
        from stepdpo.reward.score import ScoreError, run_score

        try:
            report = run_score(a)
        except ScoreError as e:
            print(f"stepdpo score: error: {e}", file=sys.stderr)
            return 2
        print(json.dumps({k: report[k] for k in ("substeps", "scored", "cache_hits", "substeps_per_second")}))
        return 0

    p.set_defaults(run=run)


def _train(sub):
    # Listed for `stepdpo --help`; main() hands `stepdpo train ...` to TrlParser (YAML + overrides),
    # whose own --help lists every StepwiseDPOConfig field.
    sub.add_parser("train", add_help=False, help="train with stepwise DPO (run under accelerate for multi-process)",
                   description="Arguments: --config recipe.yaml and any StepwiseDPOConfig field as --field value.")


def _eval(sub):
    p = sub.add_parser("eval", help="held-out step-pair accuracy, reward margins, training curves",
                       description="Does the policy prefer the chosen step? Writes OUT/metrics.json and, with "
                       "--run-dir, OUT/training_curves.png.")
    p.add_argument("--model", help="trained model directory (full model or PEFT adapter)")
    p.add_argument("--pairs", required=True, help="held-out pairs.jsonl")
    p.add_argument("--ref-model", default=None,
                   help="reference model (default: the adapter-disabled base for adapters, else none)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--run-dir", default=None, help="training output_dir whose curves to plot")
    p.add_argument("--beta", type=float, default=0.1, help="beta for the implicit reward margin (default 0.1)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=None, help="as in training (pairs that do not fit are skipped)")
    p.add_argument("--append-eos", action="store_true", help="as in training")
    p.add_argument("--no-progress", action="store_true")

    def run(a):
        from pathlib import Path

        from stepdpo.data.pairs import read_pairs
        from stepdpo.evaluate import evaluate, plot_training_curves, reward_accuracy

        pairs = read_pairs(a.pairs)
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        if a.model:
            metrics = evaluate(a.model, pairs, a.ref_model, beta=a.beta, batch_size=a.batch_size,
                               max_length=a.max_length, append_eos=a.append_eos, progress=not a.no_progress)
        else:
            metrics = {"pairs": len(pairs), "reward_model": reward_accuracy(pairs)}
            if metrics["reward_model"] is None:
                print("stepdpo eval: error: without --model, --pairs must be scored (run `stepdpo score`)",
                      file=sys.stderr)
                return 2
        if a.run_dir:
            png = plot_training_curves(a.run_dir, out / "training_curves.png")
            metrics["training_curves"] = str(png) if png else None
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}))
        return 0

    p.set_defaults(run=run)


def _plan(sub):
    p = sub.add_parser("plan", help="per-GPU / per-node memory plan from the model config (meta device, no weights)")
    p.add_argument("--model", required=True, help="model directory or hub id (only config.json is read)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--mode", choices=["full", "lora", "qlora"], default="qlora")
    p.add_argument("--zero", type=int, choices=[2, 3], default=3)
    p.add_argument("--offload", choices=["none", "optimizer", "all"], default="none",
                   help="ZeRO CPU offload: optimizer states, or optimizer states and parameters")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=2, help="pairs per GPU per step (DPO runs 2 sequences each)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    def run(a):
        from stepdpo.plan import format_plan, make_plan

        plan = make_plan(a.model, nodes=a.nodes, gpus_per_node=a.gpus_per_node, mode=a.mode, zero=a.zero,
                         offload=a.offload, seq_len=a.seq_len, micro_batch=a.micro_batch, lora_r=a.lora_r)
        print(json.dumps(plan, indent=2) if a.json else format_plan(plan))
        return 0

    p.set_defaults(run=run)


def _demo(sub):
    p = sub.add_parser("demo", help="the whole pipeline on CPU with a tiny model: data, pairs, scores, training, eval",
                       description="From nothing, on CPU: tiny model, generated PRM800K data, prepare with a held-out "
                       "split by problem, score, train, evaluate before and after. Writes OUT/summary.json.")
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out)")
    p.add_argument("--arch", choices=["t5", "mistral"], default="t5", help="tiny model architecture (default t5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--problems", type=int, default=None, help="generated problems (default per arch)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default per arch)")

    def run(a):
        from stepdpo.demo import run_demo

        summary = run_demo(a.out, arch=a.arch, seed=a.seed, problems=a.problems, steps=a.steps)
        return 0 if summary["after"]["pair_accuracy"] > summary["before"]["pair_accuracy"] else 1

    p.set_defaults(run=run)


def score_args(**values) -> argparse.Namespace:
    """`stepdpo score` arguments with the CLI's own defaults, for calling run_score from Python."""
    argv = ["score"]
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            for v in value:
                argv += [flag, str(v)]
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return make_parser().parse_args(argv)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepdpo",
        description=f"Step-level DPO for math reasoning. Stages: {STAGES}. `stepdpo CMD --help` for each.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_tiny_model, _synth, _prepare, _score, _train, _eval, _plan, _demo):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":  # TrlParser owns train's arguments (YAML + overrides)
        from stepdpo.train.run import main as train_main

        return train_main(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = make_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
