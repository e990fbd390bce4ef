"""Generated PRM800K-format data: short multi-step arithmetic with step-level labels.

Each record follows PRM800K's schema (phase 1 and phase 2 styles). A problem is a chain of
operations ("Start with 7. Add 5, then subtract 3. What is the result?"); each solution step
states one operation and its result ("7 + 5 = 12"); the last result is the answer.

Wrong (-1) steps differ from correct (+1) ones only in the arithmetic: the wrong result has as many
characters as the correct one and is drawn from the same distribution as correct results, so
length, token set and position carry no signal. Neutral (0) steps restate the plan without computing anything.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from stepdpo.options import check, opt


@dataclass(frozen=True)
class SynthConfig:
    problems: int = opt(100, "Number of records.")
    seed: int = opt(0, "Random seed.")
    min_ops: int = opt(2, "Fewest operations per problem.")
    max_ops: int = opt(4, "Most operations per problem.")
    max_value: int = opt(20, "Every intermediate value stays in [0, N].")
    phase2_fraction: float = opt(0.4, "Share of phase-2 style records (one solution, labelled until its first "
                                 "error); the rest are phase-1 style (alternatives at every step).")
    human_fraction: float = opt(0.1, "Phase-1 steps whose good step was written by the labeller.")
    flagged_fraction: float = opt(0.03, "Completions flagged by the labeller.")
    null_rating_fraction: float = opt(0.03, "Completions with a null rating.")
    give_up_fraction: float = opt(0.03, "Records that end in give_up.")
    bad_problem_fraction: float = opt(0.02, "Records marked bad_problem (skipped by prepare).")

    def __post_init__(self):
        check(self.problems >= 0, "problems", "must be >= 0")
        check(1 <= self.min_ops <= self.max_ops, "min_ops", "needs 1 <= --min-ops <= --max-ops")
        check(self.max_value >= 2, "max_value", "must be at least 2")
        for name in ("phase2_fraction", "human_fraction", "flagged_fraction", "null_rating_fraction",
                     "give_up_fraction", "bad_problem_fraction"):
            check(0.0 <= getattr(self, name) <= 1.0, name, "must be in [0, 1]")


SYNTH_KINDS = ("prm800k", "problems")


@dataclass(frozen=True)
class SynthOptions(SynthConfig):
    out: str = opt(None, "Output .jsonl file (required).")
    kind: str = opt("prm800k", "prm800k: step-labelled records (for prepare); problems: problems with their answer "
                    "and correct step-by-step solution (for generate, grade, sft and mine).", choices=SYNTH_KINDS)

    def __post_init__(self):
        check(bool(self.out), "out", "is required: the .jsonl file to write")
        check(self.kind in SYNTH_KINDS, "kind", f"choose one of {', '.join(SYNTH_KINDS)}")
        super().__post_init__()


def synth(options: SynthOptions) -> int:
    """Write generated arithmetic data: PRM800K-format records (phase-1 alternatives at every step, phase-2
    solutions labelled until their first error; wrong steps differ from correct ones only in the arithmetic), or
    problems with answers and correct step-by-step solutions."""
    if options.kind == "problems":
        n = write_problems(options.out, options)
        print(f"{n} problems with answers and step-by-step solutions written to {options.out}")
    else:
        n = write_synthetic(options.out, options)
        print(f"{n} PRM800K-format records written to {options.out}")
    return n


ANSWER_STEP = "The answer is {answer}."


def generate_problems(cfg: SynthConfig) -> Iterator[dict]:
    """Problems in MATH's layout (`problem`, `answer`, `solution`) plus `steps`: the correct computation steps
    and a final "The answer is N." step, the step-by-step format `sft` teaches and `grade` reads."""
    rng = random.Random(cfg.seed)
    seen = set()
    # Answers are spread evenly over 0..max_value: the chain of operations drifts towards small values, and a
    # model must not score by always answering 0.
    per_answer = -(-cfg.problems // (cfg.max_value + 1)) + 1
    counts: dict[int, int] = {}
    tries = 0
    while len(seen) < cfg.problems:
        tries += 1
        start, ops, value = _draw(rng, cfg)
        problem = _problem_text(start, ops)
        if problem in seen or (counts.get(value, 0) >= per_answer and tries < 1000 * cfg.problems):
            continue
        seen.add(problem)
        counts[value] = counts.get(value, 0) + 1
        steps, v = [], start
        for op, b in ops:
            result = _apply(op, v, b)
            steps.append(_step(v, op, b, result))
            v = result
        steps.append(ANSWER_STEP.format(answer=value))
        yield {"id": f"synth-{cfg.seed}-{len(seen) - 1}", "problem": problem, "answer": str(value),
               "solution": "\n".join(steps[:-1]) + f"\nThe answer is $\\boxed{{{value}}}$.", "steps": steps}


def write_problems(path: str | Path, cfg: SynthConfig) -> int:
    return _write_rows(path, generate_problems(cfg))


def _write_rows(path: str | Path, rows) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def _draw(rng: random.Random, cfg: SynthConfig) -> tuple[int, list[tuple[str, int]], int]:
    start = rng.randint(1, cfg.max_value)
    value, ops = start, []
    for _ in range(rng.randint(cfg.min_ops, cfg.max_ops)):
        op, b = _choose_op(rng, value, cfg.max_value)
        ops.append((op, b))
        value = _apply(op, value, b)
    return start, ops, value


_OPS = {"add": ("+", "add"), "subtract": ("-", "subtract"), "multiply": ("*", "multiply by")}


def _choose_op(rng: random.Random, value: int, max_value: int) -> tuple[str, int]:
    options = []
    if value < max_value:
        options.append("add")
    if value > 0:
        options.append("subtract")
    if value >= 1 and value * 2 <= max_value:
        options.append("multiply")
    op = rng.choice(options)
    if op == "add":
        return op, rng.randint(1, max_value - value)
    if op == "subtract":
        return op, rng.randint(1, value)
    return op, rng.randint(2, max_value // value)


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "add" else a - b if op == "subtract" else a * b


def wrong_value(rng: random.Random, correct: int, max_value: int) -> int:
    """A wrong result with as many characters as `correct`, drawn like a correct result.

    The wrong value is the result of another random operation from the same generator (not the
    correct value plus a small offset), so wrong and correct results share one distribution over
    values and digits: nothing but the arithmetic of *this* step tells them apart.
    """
    width = len(str(correct))
    for _ in range(200):
        value = rng.randint(0, max_value)
        op, b = _choose_op(rng, value, max_value)
        candidate = _apply(op, value, b)
        if candidate != correct and len(str(candidate)) == width:
            return candidate
    low = 0 if width == 1 else 10 ** (width - 1)
    return rng.choice([v for v in range(low, 10**width) if v != correct])


def _problem_text(start: int, ops: list[tuple[str, int]]) -> str:
    phrases = []
    for i, (op, b) in enumerate(ops):
        word = _OPS[op][1]
        phrases.append(f"{word.capitalize() if i == 0 else word} {b}")
    return f"Start with {start}. " + ", then ".join(phrases) + ". What is the result?"


def _step(a: int, op: str, b: int, result: int) -> str:
    return f"{a} {_OPS[op][0]} {b} = {result}"


def _neutral(op: str, b: int) -> str:
    return f"Next we {op} {b}." if op != "multiply" else f"Next we multiply by {b}."


def _completion(text: str, rating, flagged: bool = False) -> dict:
    return {"text": text, "rating": rating, "flagged": flagged}


def _two_wrong(rng: random.Random, correct: int, max_value: int) -> tuple[int, int]:
    first = wrong_value(rng, correct, max_value)
    for _ in range(50):
        second = wrong_value(rng, correct, max_value)
        if second != first:
            return first, second
    return first, first


def _solution(rng: random.Random, start: int, ops: list[tuple[str, int]], max_value: int) -> list[tuple[str, str, str, str]]:
    """(correct step, wrong step, another wrong step, neutral step) for every step of the solution.

    There is no separate "The answer is" step: the last computation states the answer, so every
    labelled step has the same shape.
    """
    steps, value = [], start
    for op, b in ops:
        result = _apply(op, value, b)
        w1, w2 = _two_wrong(rng, result, max_value)
        steps.append((_step(value, op, b, result), _step(value, op, b, w1), _step(value, op, b, w2), _neutral(op, b)))
        value = result
    return steps


def _phase1_steps(rng: random.Random, cfg: SynthConfig, solution) -> list[dict]:
    out = []
    for good, bad, bad2, neutral in solution:
        human = rng.random() < cfg.human_fraction
        completions = [] if human else [_completion(good, 1)]
        completions.append(_completion(bad, -1))
        if rng.random() < 0.5 and bad2 != bad:  # a second, different wrong alternative
            completions.append(_completion(bad2, -1))
        if rng.random() < 0.5:
            completions.append(_completion(neutral, 0))
        for c in completions:
            if rng.random() < cfg.flagged_fraction:
                c["flagged"] = True
            if rng.random() < cfg.null_rating_fraction:
                c["rating"] = None
        rng.shuffle(completions)
        step = {"completions": completions, "human_completion": None, "chosen_completion": None}
        if human:
            # PRM800K has both shapes: a bare string and an object with `text`.
            step["human_completion"] = good if rng.random() < 0.5 else {"text": good, "rating": None, "source": "human"}
        else:
            step["chosen_completion"] = next(i for i, c in enumerate(completions) if c["text"] == good)
        out.append(step)
    return out


def _phase2_steps(rng: random.Random, solution) -> tuple[list[dict], list[str], str]:
    """One generated solution rated step by step; labelling stops at the first error.

    Returns the labelled steps, the generated step texts, and the finish reason.
    """
    error_at = rng.randrange(len(solution) + 1)  # == len: no error
    steps, generated = [], []
    for i, (good, bad, _bad2, _neutral) in enumerate(solution):
        if i < error_at:
            steps.append({"completions": [_completion(good, 1)], "human_completion": None, "chosen_completion": 0})
            generated.append(good)
            continue
        completions = [_completion(bad, -1)]
        if rng.random() < 0.5:  # an alternative offered after the first error
            completions.append(_completion(good, 1))
            rng.shuffle(completions)
        steps.append({"completions": completions, "human_completion": None, "chosen_completion": None})
        generated.append(bad)
        return steps, generated, "found_error"
    return steps, generated, "solution"


def generate_records(cfg: SynthConfig) -> Iterator[dict]:
    rng = random.Random(cfg.seed)
    for _ in range(cfg.problems):
        start, ops, value = _draw(rng, cfg)
        solution = _solution(rng, start, ops, cfg.max_value)
        problem = _problem_text(start, ops)
        phase2 = rng.random() < cfg.phase2_fraction
        question = {"problem": problem, "ground_truth_answer": str(value)}
        if phase2:
            steps, generated, finish = _phase2_steps(rng, solution)
            question.update(
                pre_generated_steps=generated,
                pre_generated_answer=generated[-1].rsplit(" ", 1)[-1] if len(generated) == len(solution) else None,
                pre_generated_verifier_score=round(rng.random(), 4),
            )
        else:
            steps, finish = _phase1_steps(rng, cfg, solution), "solution"
        roll = rng.random()
        if roll < cfg.bad_problem_fraction:
            finish, steps = "bad_problem", steps[:1]
        elif roll < cfg.bad_problem_fraction + cfg.give_up_fraction and len(steps) > 1:
            finish, steps = "give_up", steps[:-1]
        yield {
            "labeler": str(uuid.UUID(int=rng.getrandbits(128))),
            "timestamp": f"2022-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T12:00:00.000000",
            "generation": rng.randint(1, 12) if phase2 else None,
            "is_quality_control_question": rng.random() < 0.02,
            "is_initial_screening_question": False,
            "question": question,
            "label": {"steps": steps, "total_time": rng.randint(10_000, 900_000), "finish_reason": finish},
        }


def write_synthetic(path: str | Path, cfg: SynthConfig) -> int:
    return _write_rows(path, generate_records(cfg))
