"""`stepdpo demo`: the whole pipeline on CPU from nothing, with a tiny model and generated data.

Stages: tiny model -> PRM800K-format data -> pairs with a held-out split by problem -> substep
rewards (hf judge) -> stepwise DPO training -> held-out evaluation before and after.

The model starts from random weights, so "before" is chance. The held-out pairs come from problems
never seen in training; what transfers is arithmetic (the same facts recur in different problems),
which is exactly what separates a correct step from a wrong one in this data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from stepdpo.errors import StepdpoError
from stepdpo.options import check_choice, opt
from stepdpo.tiny import ARCHS

# Per-architecture defaults, measured on 2 CPU cores (see README "Demo").
DEFAULTS = {
    "t5": {"problems": 800, "steps": 600, "lr": 1e-3, "batch": 16},
    "mistral": {"problems": 800, "steps": 600, "lr": 1e-3, "batch": 16},
}
MAX_VALUE = 9  # single-digit intermediate values: about a hundred arithmetic facts to learn


@dataclass
class DemoOptions:
    out: str = opt("demo_out", "Output directory (summary.json, training_curves.png, every stage's files).")
    arch: str = opt("t5", "Tiny model architecture.", choices=ARCHS)
    seed: int = opt(0, "Seed of the model, the data and the split.")
    problems: int | None = opt(None, f"Generated problems (default {DEFAULTS['t5']['problems']}).")
    steps: int | None = opt(None, f"Training steps (default {DEFAULTS['t5']['steps']}).")
    progress: bool = opt(True, "Show a progress bar (with ETA) while training.")
    loop: bool = opt(False, "The whole loop instead (`stepdpo loop` with the tiny Mistral's settings): sft -> answer "
                     "accuracy A0 -> mine -> stepwise DPO -> A1, with controls trained like the DPO stage (SFT on the "
                     "reference solutions, RFT on the policy's own right samples). Writes OUT/summary.json.")
    backend: str = opt("hf", "--loop: generation in-process (hf) or on a vLLM CPU server (vllm).", choices=("hf", "vllm"))

    def __post_init__(self):
        check_choice(self.arch, "arch", ARCHS)
        check_choice(self.backend, "backend", ("hf", "vllm"))


def demo(options: DemoOptions) -> dict:
    """From nothing, on CPU: tiny model, generated PRM800K data, prepare with a held-out split by problem,
    score, train, evaluate before and after. Writes OUT/summary.json; fails when accuracy did not rise.
    With --loop: the answer-accuracy loop (sft, mine, stepwise DPO) instead."""
    if options.loop:
        from stepdpo.loop import LoopOptions, loop

        out = options.out if options.out != "demo_out" else "loop_out"
        return loop(LoopOptions(out=out, seed=options.seed, backend=options.backend, progress=options.progress))
    summary = run_demo(options.out, arch=options.arch, seed=options.seed, problems=options.problems,
                       steps=options.steps, progress=options.progress)
    if summary["after"]["pair_accuracy"] <= summary["before"]["pair_accuracy"]:
        raise StepdpoError("held-out pair accuracy did not rise; see the summary above")
    return summary


def run_demo(out: str | Path = "demo_out", arch: str = "t5", seed: int = 0, problems: int | None = None,
             steps: int | None = None, progress: bool = False) -> dict:
    from stepdpo.console import Console, quiet_libraries

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with Console(out / "demo.log", "demo", progress=progress) as console:
        quiet_libraries()
        return _run_demo(console, out, arch, seed, problems, steps, progress)


def _run_demo(console, out: Path, arch: str, seed: int, problems: int | None, steps: int | None,
              progress: bool) -> dict:
    from stepdpo.data.pairs import read_pairs
    from stepdpo.data.prepare import PrepareOptions, prepare
    from stepdpo.data.synthetic import SynthConfig, write_synthetic
    from stepdpo.evaluate import evaluate, plot_training_curves
    from stepdpo.reward.score import ScoreOptions, score
    from stepdpo.tiny import build_tiny_model

    d = DEFAULTS[arch]
    problems = problems or d["problems"]
    steps = steps or d["steps"]
    stages: dict[str, float] = {}

    with console.stage("tiny_model", stages):
        model_dir = build_tiny_model(arch, out / "model", seed=seed)
    with console.stage("synth", stages):
        data = out / "data" / "prm800k.jsonl"
        write_synthetic(data, SynthConfig(problems=problems, seed=seed, max_value=MAX_VALUE))
    with console.stage("prepare", stages):
        report = prepare([data], out / "pairs", PrepareOptions(test_fraction=0.2, seed=seed, progress=False,
                                                                overwrite=True))  # a re-run replaces its data
    with console.stage("score", stages):
        score_report = score(ScoreOptions(pairs=str(out / "pairs" / "train" / "pairs.jsonl"), model=str(model_dir),
                                          out=str(out / "scored"), batch_size=64, progress=False))
    test_pairs = read_pairs(out / "pairs" / "test" / "pairs.jsonl")
    with console.stage("eval_before", stages):
        before = evaluate(str(model_dir), test_pairs, str(model_dir), progress=False)
    with console.stage("train", stages):
        summary_train = _train(model_dir, out / "scored" / "pairs.jsonl", out / "run", seed, steps, d, progress)
    with console.stage("eval_after", stages):
        after = evaluate(str(out / "run" / "final"), test_pairs, str(model_dir), progress=False)
        plot_training_curves(out / "run", out / "training_curves.png")

    summary = {
        "arch": arch,
        "before": _pick(before),
        "after": _pick(after),
        "stages": stages,
        "total_seconds": round(sum(stages.values()), 2),
        "data": {"problems": problems, "train_pairs": report["split"]["train_pairs"],
                 "test_pairs": report["split"]["test_pairs"], "test_problems": report["split"]["test_problems"]},
        "reward_model": {"model": "the untrained tiny model as judge (exercises scoring; expect chance)",
                         "accuracy": score_report["reward_accuracy"]},
        "train": {"steps": summary_train["global_step"], "seconds": summary_train["seconds"]},
        "files": {"metrics_before_after": "summary.json", "curves": "training_curves.png", "model": "run/final"},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_table(summary, console)
    return summary


def _pick(m: dict) -> dict:
    keys = ("pair_accuracy", "pair_accuracy_ref", "mean_reward_margin", "mean_logp_margin", "pairs")
    return {k: m[k] for k in keys if k in m}


def _train(model_dir: Path, pairs: Path, run_dir: Path, seed: int, steps: int, d: dict, progress: bool) -> dict:
    from stepdpo.train.config import StepwiseDPOConfig
    from stepdpo.train.run import train

    config = StepwiseDPOConfig(
        output_dir=str(run_dir), model_name_or_path=str(model_dir), train_pairs=str(pairs), step_loss="dpo",
        beta=0.1, learning_rate=d["lr"], lr_scheduler_type="constant", max_steps=steps,
        per_device_train_batch_size=d["batch"], logging_steps=10, save_strategy="no", report_to="none",
        use_cpu=True, seed=seed, gradient_checkpointing=False, resume="never", disable_tqdm=not progress,
    )
    return train(config)


def _print_table(s: dict, console) -> None:
    rows = [("held-out pair accuracy", "pair_accuracy"), ("  with reference normalisation", "pair_accuracy_ref"),
            ("mean implicit reward margin", "mean_reward_margin")]
    console.result("")
    console.result(f"stepdpo demo ({s['arch']}, {s['data']['test_pairs']} held-out pairs from "
                   f"{s['data']['test_problems']} unseen problems)")
    console.result(f"{'metric':34s} {'before':>10s} {'after':>10s}")
    for label, key in rows:
        b, a = s["before"].get(key), s["after"].get(key)
        if b is not None and a is not None:
            console.result(f"{label:34s} {b:10.3f} {a:10.3f}")
    console.note("stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in s["stages"].items())
                 + f"; total {s['total_seconds']:.1f}")
