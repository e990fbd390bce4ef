"""`stepdpo demo`: the whole pipeline on CPU from nothing, with a tiny model and generated data.

Stages: tiny model -> PRM800K-format data -> pairs with a held-out split by problem -> substep
rewards (hf judge) -> stepwise DPO training -> held-out evaluation before and after.

The model starts from random weights, so "before" is chance. The held-out pairs come from problems
never seen in training; what transfers is arithmetic (the same facts recur in different problems),
which is exactly what separates a correct step from a wrong one in this data.
"""

from __future__ import annotations

import json
import time
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


def _stage(stages: dict, name: str):
    class _Timer:
        def __enter__(self):
            print(f"[demo] {name} ...", flush=True)
            self.t = time.perf_counter()

        def __exit__(self, *exc):
            stages[name] = round(time.perf_counter() - self.t, 2)
            if exc[0] is None:
                print(f"[demo] {name} done in {stages[name]:.1f} s", flush=True)

    return _Timer()


@dataclass
class DemoOptions:
    out: str = opt("demo_out", "Output directory (summary.json, training_curves.png, every stage's files).")
    arch: str = opt("t5", "Tiny model architecture.", choices=ARCHS)
    seed: int = opt(0, "Seed of the model, the data and the split.")
    problems: int | None = opt(None, f"Generated problems (default {DEFAULTS['t5']['problems']}).")
    steps: int | None = opt(None, f"Training steps (default {DEFAULTS['t5']['steps']}).")
    progress: bool = opt(True, "Show a progress bar (with ETA) while training.")

    def __post_init__(self):
        check_choice(self.arch, "arch", ARCHS)


def demo(options: DemoOptions) -> dict:
    """From nothing, on CPU: tiny model, generated PRM800K data, prepare with a held-out split by problem,
    score, train, evaluate before and after. Writes OUT/summary.json; fails when accuracy did not rise."""
    summary = run_demo(options.out, arch=options.arch, seed=options.seed, problems=options.problems,
                       steps=options.steps, progress=options.progress)
    if summary["after"]["pair_accuracy"] <= summary["before"]["pair_accuracy"]:
        raise StepdpoError("held-out pair accuracy did not rise; see the summary above")
    return summary


def run_demo(out: str | Path = "demo_out", arch: str = "t5", seed: int = 0, problems: int | None = None,
             steps: int | None = None, progress: bool = False) -> dict:
    from stepdpo.data.pairs import read_pairs
    from stepdpo.data.prepare import PrepareOptions, prepare
    from stepdpo.data.synthetic import SynthConfig, write_synthetic
    from stepdpo.evaluate import evaluate, plot_training_curves
    from stepdpo.reward.score import ScoreOptions, score
    from stepdpo.tiny import build_tiny_model

    d = DEFAULTS[arch]
    problems = problems or d["problems"]
    steps = steps or d["steps"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}

    with _stage(stages, "tiny_model"):
        model_dir = build_tiny_model(arch, out / "model", seed=seed)
    with _stage(stages, "synth"):
        data = out / "data" / "prm800k.jsonl"
        write_synthetic(data, SynthConfig(problems=problems, seed=seed, max_value=MAX_VALUE))
    with _stage(stages, "prepare"):
        report = prepare([data], out / "pairs", PrepareOptions(test_fraction=0.2, seed=seed, progress=False))
    with _stage(stages, "score"):
        score_report = score(ScoreOptions(pairs=str(out / "pairs" / "train" / "pairs.jsonl"), model=str(model_dir),
                                          out=str(out / "scored"), batch_size=64, progress=False))
    test_pairs = read_pairs(out / "pairs" / "test" / "pairs.jsonl")
    with _stage(stages, "eval_before"):
        before = evaluate(str(model_dir), test_pairs, str(model_dir), progress=False)
    with _stage(stages, "train"):
        summary_train = _train(model_dir, out / "scored" / "pairs.jsonl", out / "run", seed, steps, d, progress)
    with _stage(stages, "eval_after"):
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
    _print_table(summary)
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


def _print_table(s: dict) -> None:
    rows = [("held-out pair accuracy", "pair_accuracy"), ("  with reference normalisation", "pair_accuracy_ref"),
            ("mean implicit reward margin", "mean_reward_margin")]
    print()
    print(f"stepdpo demo ({s['arch']}, {s['data']['test_pairs']} held-out pairs from "
          f"{s['data']['test_problems']} unseen problems)")
    print(f"{'metric':34s} {'before':>10s} {'after':>10s}")
    for label, key in rows:
        b, a = s["before"].get(key), s["after"].get(key)
        if b is not None and a is not None:
            print(f"{label:34s} {b:10.3f} {a:10.3f}")
    print("stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in s["stages"].items()) + f"; total {s['total_seconds']:.1f}")
    print()
