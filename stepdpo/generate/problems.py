"""Problem files with reference answers: MATH-style, GSM8K, PRM800K, and stepdpo's own.

* MATH: `problem` + `answer`, or `problem` + `solution` whose last `\\boxed{...}` is the answer;
* GSM8K: `question` + `answer` whose text after `####` is the answer;
* PRM800K: `question.problem` + `question.ground_truth_answer`.
An `id` (or `unique_id`, `problem_id`) names a problem; without one, a hash of its text does. Every layout the
record reader knows works (JSON Lines, arrays, concatenated objects); a bad record is a reject with its file and
line, never a crash.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from stepdpo.data import gsm8k
from stepdpo.data.jsonio import parsed_records
from stepdpo.errors import StepdpoError
from stepdpo.options import REQUIRED, check, opt


class ProblemFileError(StepdpoError):
    pass


@dataclass(frozen=True)
class Problem:
    id: str
    text: str
    answer: str  # the reference answer as written (LaTeX or plain)


def problem_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None when there is none."""
    for marker in ("\\boxed{", "\\fbox{"):
        start = text.rfind(marker)
        if start >= 0:
            i, depth = start + len(marker), 1
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i:j]
            return None
    return None


def _from_row(row) -> Problem:
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    question = row.get("question")
    if isinstance(question, dict):  # PRM800K
        text, answer = question.get("problem"), question.get("ground_truth_answer")
    elif isinstance(question, str):  # GSM8K
        text, answer = question, row.get("answer")
        if gsm8k.is_gsm8k(row):
            answer = gsm8k.final_answer(answer)
    else:  # MATH and stepdpo's
        text, answer = row.get("problem"), row.get("answer")
        if answer is None and isinstance(row.get("solution"), str):
            answer = last_boxed(row["solution"])
            if answer is None:
                raise ValueError("field 'solution' has no \\boxed{...} answer and there is no 'answer'")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("no problem text (MATH: 'problem'; GSM8K: 'question'; PRM800K: 'question.problem')")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError("no reference answer (MATH: 'answer' or a \\boxed{} in 'solution'; GSM8K: '#### N' in "
                         "'answer'; PRM800K: 'question.ground_truth_answer')")
    ident = next((row[k] for k in ("id", "unique_id", "problem_id") if isinstance(row.get(k), (str, int))), None)
    return Problem(str(ident) if ident is not None else problem_id(text), text, answer.strip())


def read_problems(path: str | Path) -> tuple[list[Problem], list[dict]]:
    """(problems, rejects): every record is one or the other. Raises when nothing is a problem."""
    path = Path(path)
    if not path.is_file():
        raise ProblemFileError(f"--problems {path}: no such file")
    problems, rejects, seen = [], [], set()
    for line, row, invalid in parsed_records(path):
        try:
            if invalid:
                raise ValueError(invalid)
            problem = _from_row(row)
        except ValueError as e:
            rejects.append({"file": str(path.resolve()), "line": line, "reason": str(e).splitlines()[0]})
            continue
        if problem.id in seen:
            rejects.append({"file": str(path.resolve()), "line": line, "reason": f"duplicate problem id {problem.id}"})
            continue
        seen.add(problem.id)
        problems.append(problem)
    if not problems:
        first = f"; first: line {rejects[0]['line']}: {rejects[0]['reason']}" if rejects else ""
        raise ProblemFileError(f"--problems {path}: no problem with a reference answer ({len(rejects)} rejected"
                               f"{first})")
    return problems, rejects


# ------------------------------------------------------------------------------------- `stepdpo problems`
def reference_step_count(row) -> int | None:
    """How many reasoning steps a row's reference solution has: GSM8K's lines before `####` (blank lines are not
    steps), or a step list's steps but its closing "The answer is ..." step; None when the row has no steps."""
    if gsm8k.is_gsm8k(row):
        return len(gsm8k.reference_steps(row["answer"]))
    steps = row.get("steps") if isinstance(row, dict) else None
    if isinstance(steps, list) and steps:
        closing = isinstance(steps[-1], str) and steps[-1].lower().startswith("the answer is")
        return len(steps) - int(closing)
    return None


@dataclass
class ProblemsOptions:
    input: str = opt(REQUIRED, "Problem file (GSM8K, MATH, PRM800K or stepdpo layouts), read in place.")
    out: str = opt(REQUIRED, "Output directory: train.jsonl, validation.jsonl, test.jsonl (each record as it was "
                   "in --input), report.json.")
    min_steps: int | None = opt(None, "Only problems whose reference solution has at least N steps (GSM8K: lines "
                                "before ####).")
    max_steps: int | None = opt(None, "Only problems whose reference solution has at most N steps (--max-steps 2 on "
                                "GSM8K's training split: its two-step problems).")
    held_out: float = opt(0.2, "Held-out problems (test.jsonl): a fraction of the selected problems below 1, or a "
                          "count from 1 up.")
    validation: float = opt(0.1, "Validation problems (validation.jsonl), to choose settings on: a fraction below "
                            "1, or a count.")
    train: int | None = opt(None, "At most N training problems (train.jsonl; default: all the others).")
    seed: int = opt(0, "Seed of the split (by problem: a problem is in one file only).")
    overwrite: bool = opt(False, "Replace the files of an earlier run in --out.")

    def __post_init__(self):
        check(self.held_out >= 0 and self.validation >= 0, "held_out", "--held-out and --validation must be >= 0")
        for name in ("held_out", "validation"):
            value = getattr(self, name)
            check(value < 1 or float(value).is_integer(), name, f"{value}: a fraction below 1 or a whole count")
        check(self.min_steps is None or self.min_steps >= 1, "min_steps", "must be >= 1")
        check(self.max_steps is None or self.max_steps >= (self.min_steps or 1), "max_steps",
              "must be >= --min-steps (and >= 1)")
        check(self.train is None or self.train >= 1, "train", "must be >= 1")


def _count(value: float, total: int) -> int:
    return int(value) if value >= 1 else round(value * total)


def select_problems(options: ProblemsOptions) -> dict:
    """Select problems by reference step count and split them, seeded and by problem, into training, validation
    and held-out files. Each record is written as it was read, so every stage reads the files in the input's own
    layout; report.json has the counts, the step histogram, the seed and the input's sha256."""
    import json
    import random

    from stepdpo.data.pairs import write_lines
    from stepdpo.options import as_dict

    src = Path(options.input)
    if not src.is_file():
        raise ProblemFileError(f"--input {src}: no such file")
    out = Path(options.out)
    names = ("train.jsonl", "validation.jsonl", "test.jsonl")
    if any((out / n).exists() for n in names) and not options.overwrite:
        raise ProblemFileError(f"--out {out}: holds an earlier split; pass --overwrite to replace it")
    filtering = options.min_steps is not None or options.max_steps is not None
    chosen, rejects, seen, histogram = [], [], set(), {}
    for line, row, invalid in parsed_records(src):
        try:
            if invalid:
                raise ValueError(invalid)
            problem = _from_row(row)
        except ValueError as e:
            rejects.append({"line": line, "reason": str(e).splitlines()[0]})
            continue
        if problem.id in seen:
            rejects.append({"line": line, "reason": f"duplicate problem id {problem.id}"})
            continue
        seen.add(problem.id)
        steps = reference_step_count(row)
        if steps is not None:
            histogram[steps] = histogram.get(steps, 0) + 1
        if filtering:
            if steps is None:
                raise ProblemFileError(f"--input {src}:{line}: no reference steps to count (GSM8K's `answer` or a "
                                       "`steps` list); --min-steps/--max-steps need them")
            if (options.min_steps and steps < options.min_steps) or (options.max_steps and steps > options.max_steps):
                continue
        chosen.append((problem.id, row))
    if not chosen:
        raise ProblemFileError(f"--input {src}: no problem is left after the selection ({len(seen)} read, "
                               f"{len(rejects)} rejected; steps per problem: {dict(sorted(histogram.items()))})")
    order = list(range(len(chosen)))
    random.Random(options.seed).shuffle(order)
    n_test = _count(options.held_out, len(chosen))
    n_val = _count(options.validation, len(chosen))
    if n_test + n_val >= len(chosen):
        raise ProblemFileError(f"--held-out {options.held_out} and --validation {options.validation} take "
                               f"{n_test + n_val} of the {len(chosen)} selected problems: none is left to train on")
    parts = {"test.jsonl": order[:n_test], "validation.jsonl": order[n_test:n_test + n_val],
             "train.jsonl": order[n_test + n_val:][: options.train or None]}
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, idx in parts.items():
        # the file's order is the input's: a split is a set of problems, and stages read it front to back
        counts[name] = write_lines(out / name, (json.dumps(chosen[i][1], ensure_ascii=False).encode() + b"\n"
                                                for i in sorted(idx)))
    from stepdpo.models import sha256_file

    report = {"input": str(src.resolve()), "input_sha256": sha256_file(src), "options": as_dict(options),
              "read": len(seen) + len(rejects), "problems": len(seen), "selected": len(chosen),
              "rejected": rejects, "steps_per_problem": {str(k): v for k, v in sorted(histogram.items())},
              "files": {name.split(".")[0]: counts[name] for name in names}}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"selected": len(chosen), **report["files"]}))
    return report
