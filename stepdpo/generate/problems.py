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

from stepdpo.data.jsonio import parsed_records
from stepdpo.errors import StepdpoError


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
        if isinstance(answer, str) and "####" in answer:
            answer = answer.rsplit("####", 1)[1].strip()
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
