"""What a loop run did, beyond its accuracies: the evidence for reading a result (README "The loop on a real model").

    .venv/bin/python -m benchmarks.loop_analysis runs/loop-arith-validation [--json OUT.json]

For a run directory of `stepdpo loop` it reports
- the locator (mine/report.json, mine/pairs.jsonl): samples, their accuracy, wrong samples located, pairs, and at
  which step the errors were found;
- pair quality on the real errors, by the project's equation check (stepdpo.generate.equations, the one `stepdpo
  mine --locate equations` uses): a pair is clean when its prefix holds no false equation, its chosen step no false
  equation, and its rejected step at least one. This reads the intermediate steps only; answers are graded by
  math-verify (`stepdpo grade`), never here;
- each model's greedy solutions (answers_*/samples.jsonl, the split measured last, or with --split S
  answers_*/samples_S.jsonl): the share of false equations among the equations they write, steps per solution, and
  how many end without a stated answer;
- the learning curves of the DPO stage and the controls (train_summary.json / sft_summary.json: every logged step);
- with --policy-preference, where the policy that mined (A0) stood on each pair before training: its most likely
  token at the first token where the chosen and rejected steps differ. A pair whose chosen token is already A0's
  argmax corrects an error greedy decoding (what the evaluation measures) does not make; DPO's loss, relative to
  the reference, pushes on it all the same. This loads the model (a minute for SmolLM2-135M on 2 cores).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stepdpo.generate.equations import equations, step_verdict

MODELS = {"A0": "answers_before", "A1": "answers_after", "sft": "answers_control_sft", "rft": "answers_control_rft",
          "sft_at_sft_lr": "answers_control_sft_at_sft_lr"}
STAGES = {"dpo": "dpo/train_summary.json", "sft": "control_sft/sft_summary.json",
          "rft": "control_rft/sft_summary.json"}


def pair_quality(pairs: list[dict]) -> dict:
    counts = {"pairs": len(pairs), "clean": 0, "prefix_wrong": 0, "chosen_wrong": 0, "rejected_not_wrong": 0,
              "rejected_unchecked": 0}
    for p in pairs:
        prefix_bad = any(step_verdict(s) == "wrong" for s in p["prefix_steps"])
        chosen = step_verdict(" ".join(p["chosen_steps"]))
        rejected = step_verdict(" ".join(p["rejected_steps"]))
        counts["prefix_wrong"] += prefix_bad
        counts["chosen_wrong"] += chosen == "wrong"
        counts["rejected_not_wrong"] += rejected == "right"
        counts["rejected_unchecked"] += rejected == "none"
        counts["clean"] += not prefix_bad and chosen != "wrong" and rejected == "wrong"
    return counts


def solutions(path: Path) -> dict:
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    verdicts = [v for r in rows for v in equations(r["text"])]
    return {"solutions": len(rows), "equations": len(verdicts), "false_equations": verdicts.count(False),
            "false_share": round(verdicts.count(False) / len(verdicts), 4) if verdicts else None,
            "steps_per_solution": round(sum(len(r["steps"]) for r in rows) / len(rows), 2) if rows else None,
            "no_answer_line": sum(1 for r in rows if "answer is" not in r["text"].lower())}


CURVE_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "learning_rate")


def curve(path: Path) -> list[dict]:
    history = json.loads(path.read_text())["log_history"]
    return [{k: round(h[k], 4) if isinstance(h[k], float) else h[k] for k in ("step", *CURVE_KEYS) if k in h}
            for h in history if "loss" in h]


def analyse(run: str | Path, split: str | None = None, preference: str | None = None) -> dict:
    """split: whose solutions to read (validation or test); None: the split the run measured last. preference: the
    policy whose standing on the pairs to measure ("A0": the one that mined)."""
    run = Path(run)
    out: dict = {"run": str(run), "split": split or _last_split(run)}
    report = run / "mine" / "report.json"
    if report.is_file():
        r = json.loads(report.read_text())
        out["locator"] = {k: r.get(k) for k in ("problems", "samples", "sample_accuracy", "solved_solutions",
                                                 "wrong_examined", "errors_located", "pairs", "problems_with_pairs",
                                                 "generations", "located_before_first_zero")}
    pairs_file = run / "mine" / "pairs.jsonl"
    if pairs_file.is_file():
        pairs = [json.loads(x) for x in pairs_file.read_text(encoding="utf-8").splitlines() if x.strip()]
        out["pair_quality"] = pair_quality(pairs)
        steps: dict[int, int] = {}
        for p in pairs:
            k = p["source"][0].get("error_step")
            steps[k] = steps.get(k, 0) + 1
        out["error_step"] = {str(k): v for k, v in sorted(steps.items())}
        if preference:
            settings = json.loads((run / "summary.json").read_text())["settings"]
            model = mining_policy(run, settings) if preference == "A0" else preference
            out["policy_preference"] = policy_preference(pairs, model, settings)
    samples = f"samples_{split}.jsonl" if split else "samples.jsonl"
    out["solutions"] = {name: solutions(run / d / samples) for name, d in MODELS.items() if (run / d / samples).is_file()}
    out["curves"] = {name: curve(run / f) for name, f in STAGES.items() if (run / f).is_file()}
    return out


def mining_policy(run: Path, settings: dict) -> str:
    """The policy that mined (A0): the loop's SFT model, else the model it converted, else the --model it began from
    (`settings`: summary.json's)."""
    if settings.get("sft_steps") and (run / "sft" / "final").is_dir():
        return str(run / "sft" / "final")
    if (run / "model" / "config.json").is_file():
        return str(run / "model")
    return settings["model"]


def policy_preference(pairs: list[dict], model: str, settings: dict) -> dict:
    """For each pair, the policy's most likely token at the first token where prompt + chosen and prompt + rejected
    differ (rendered as training renders them): the chosen one, the rejected one or another; `prefix` counts pairs
    where one step is the start of the other (no token to compare). And the median probability of each."""
    from statistics import median

    import torch
    from transformers import AutoModelForCausalLM

    from stepdpo.data.pairs import prompt_style, render_pair
    from stepdpo.models import load_pretrained, load_tokenizer

    tokenizer = load_tokenizer(model)
    lm = load_pretrained(AutoModelForCausalLM, model).eval()
    style = prompt_style(tokenizer, settings.get("chat_template", "auto"), settings.get("system_prompt"),
                         settings["instruction"])
    argmax = {"chosen": 0, "rejected": 0, "other": 0, "prefix": 0}
    p_chosen, p_rejected = [], []
    for pair in pairs:
        prompt, chosen, rejected = render_pair(pair, 0, style)
        a, b = (tokenizer(prompt + x, add_special_tokens=style.add_special_tokens)["input_ids"] for x in (chosen, rejected))
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if k is None:
            argmax["prefix"] += 1
            continue
        with torch.no_grad():
            probs = lm(torch.tensor([a[:k]])).logits[0, -1].float().softmax(-1)
        top = int(probs.argmax())
        argmax["chosen" if top == a[k] else "rejected" if top == b[k] else "other"] += 1
        p_chosen.append(float(probs[a[k]]))
        p_rejected.append(float(probs[b[k]]))
    return {"model": model, "pairs": len(pairs), "argmax": argmax,
            "median_p_chosen": round(median(p_chosen), 4) if p_chosen else None,
            "median_p_rejected": round(median(p_rejected), 4) if p_rejected else None}


def _last_split(run: Path) -> str | None:
    summary = run / "summary.json"
    return json.loads(summary.read_text())["task"]["evaluate"] if summary.is_file() else None


def render(a: dict) -> str:
    lines = [f"# {a['run']}" + (f" (solutions to the {a['split']} problems)" if a.get("split") else "")]
    if "locator" in a:
        lines.append("locator: " + ", ".join(f"{k} {v}" for k, v in a["locator"].items()))
    if "pair_quality" in a:
        q = a["pair_quality"]
        lines.append(f"pairs: {q['pairs']}, clean by the arithmetic check {q['clean']}; prefix with a false equation "
                     f"{q['prefix_wrong']}, chosen false {q['chosen_wrong']}, rejected true {q['rejected_not_wrong']}, "
                     f"rejected with no equation {q['rejected_unchecked']}; error at step {a['error_step']}")
    if "policy_preference" in a:
        q = a["policy_preference"]
        n = q["pairs"] - q["argmax"]["prefix"]
        lines.append(f"before training, {q['model']}'s most likely token where chosen and rejected first differ: the "
                     f"chosen one in {q['argmax']['chosen']} of {n} pairs, the rejected one in {q['argmax']['rejected']}"
                     f", another in {q['argmax']['other']} (median p chosen {q['median_p_chosen']}, rejected "
                     f"{q['median_p_rejected']})")
    for name, s in a["solutions"].items():
        lines.append(f"{name}: {s['false_equations']} of {s['equations']} equations false ({s['false_share']}), "
                     f"{s['steps_per_solution']} steps per solution, {s['no_answer_line']} without an answer line")
    for name, points in a["curves"].items():
        lines.append(f"{name} curve: " + "; ".join(
            " ".join(f"{k.split('/')[-1]} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in p.items()
                     if k != "learning_rate") for p in points))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loop_analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a `stepdpo loop` output directory")
    parser.add_argument("--json", help="also write the analysis here")
    parser.add_argument("--split", choices=("validation", "test"),
                        help="read the solutions to these problems (default: the split the run measured last)")
    parser.add_argument("--policy-preference", nargs="?", const="A0", metavar="MODEL",
                        help="measure where a policy stood on each mined pair (default: A0, the one that mined)")
    a = parser.parse_args(argv)
    if not (Path(a.run) / "summary.json").is_file() and not (Path(a.run) / "mine").is_dir():
        raise SystemExit(f"benchmarks.loop_analysis: {a.run} is not a `stepdpo loop` output directory (no summary.json "
                         "or mine/); pass the --out of a loop run")
    missing = a.split and not any((Path(a.run) / d / f"samples_{a.split}.jsonl").is_file() for d in MODELS.values())
    if missing:
        raise SystemExit(f"benchmarks.loop_analysis: {a.run} holds no solutions to the {a.split} problems "
                         f"(answers_*/samples_{a.split}.jsonl): measure them with `stepdpo loop ... --evaluate "
                         f"{a.split} --reuse`, which generates only what its caches lack")
    if a.policy_preference and not (Path(a.run) / "mine" / "pairs.jsonl").is_file():
        raise SystemExit(f"benchmarks.loop_analysis: --policy-preference reads the mined pairs, and {a.run} has no "
                         "mine/pairs.jsonl: pass a loop run that mined")
    result = analyse(a.run, a.split, a.policy_preference)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    print(render(result), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
