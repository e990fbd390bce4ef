"""`stepdpo grade`: is each sampled solution's final answer right? math-verify decides equivalence.

A sample row needs `text` (the raw solution) and either `problem_id` or `problem` (an id, or the problem's
text), so hand-written samples work too. Writes OUT/grades.jsonl (every sample with a boolean `correct`, the
extracted answer, and why it was invalid when it was) and OUT/report.json (accuracy over samples, maj@k and
pass@k when there are k samples per problem, invalid counts).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from stepdpo.data.jsonio import parsed_records
from stepdpo.errors import StepdpoError
from stepdpo.generate.answers import equivalent, locate_answer, parse_answer
from stepdpo.generate.problems import Problem, read_problems
from stepdpo.options import REQUIRED, opt


class GradeError(StepdpoError):
    pass


@dataclass
class GradeOptions:
    problems: str = opt(REQUIRED, "Problem file with reference answers (MATH, GSM8K, PRM800K or stepdpo layouts).")
    samples: str = opt(REQUIRED, "Samples: JSON lines with `text` and `problem_id` or `problem` (e.g. from "
                       "`stepdpo generate`).")
    out: str = opt(REQUIRED, "Output directory: grades.jsonl and report.json.")


def read_samples(path: str | Path) -> tuple[list[dict], list[dict]]:
    path = Path(path)
    if path.is_dir():
        path = path / "samples.jsonl"
    if not path.is_file():
        raise GradeError(f"--samples {path}: no such file (write one with `stepdpo generate`)")
    samples, rejects = [], []
    for line, row, invalid in parsed_records(path):
        try:
            if invalid:
                raise ValueError(invalid)
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError("a sample needs a string `text`")
            if not isinstance(row.get("problem_id", row.get("problem")), (str, int)):
                raise ValueError("a sample needs `problem_id` or `problem` (the id or the problem's text)")
        except ValueError as e:
            rejects.append({"file": str(path), "line": line, "reason": str(e).splitlines()[0]})
            continue
        row["_line"] = line
        samples.append(row)
    return samples, rejects


def grade_samples(problems: list[Problem], samples: list[dict]) -> tuple[list[dict], dict]:
    """(one grade per sample, the report)."""
    by_id = {p.id: p for p in problems}
    by_text = {p.text: p for p in problems}
    gold = {}
    grades = []
    for s in samples:
        key = s.get("problem_id", s.get("problem"))
        problem = by_id.get(str(key)) or by_text.get(str(key))
        row = {"sample_id": s.get("id", f"line-{s.get('_line')}"), "problem_id": problem.id if problem else str(key)}
        if problem is None:
            row.update(correct=False, answer=None, invalid="unknown problem: no problem with this id or text")
            grades.append(row)
            continue
        if problem.id not in gold:
            gold[problem.id] = parse_answer(problem.answer)
        answer, how = locate_answer(s["text"])
        if answer is None:
            row.update(correct=False, answer=None, invalid=how)
        else:
            parsed = parse_answer(answer)
            if not parsed:
                row.update(correct=False, answer=answer, invalid="math-verify could not parse the answer")
            else:
                row.update(correct=equivalent(gold[problem.id], parsed), answer=answer, found_by=how)
                row["_parsed"] = parsed
        grades.append(row)
    report = _report(grades, gold)
    for g in grades:
        g.pop("_parsed", None)
    return grades, report


def _report(grades: list[dict], gold: dict) -> dict:
    per_problem = defaultdict(list)
    for g in grades:
        per_problem[g["problem_id"]].append(g)
    n = len(grades)
    report = {
        "samples": n,
        "problems": len(per_problem),
        "accuracy": sum(g["correct"] for g in grades) / n if n else 0.0,
        "invalid": sum(1 for g in grades if g.get("invalid")),
        "invalid_by_reason": dict(_count(g["invalid"] for g in grades if g.get("invalid"))),
    }
    k = max((len(v) for v in per_problem.values()), default=0)
    if k > 1:
        report["k"] = k
        report[f"pass@{k}"] = sum(any(g["correct"] for g in v) for v in per_problem.values()) / len(per_problem)
        report[f"maj@{k}"] = sum(_majority_correct(v, gold.get(pid)) for pid, v in per_problem.items()) / len(per_problem)
    return report


def _majority_correct(grades: list[dict], gold) -> bool:
    """Cluster the valid answers by math-verify equivalence; the largest cluster (earliest on a tie) votes."""
    clusters: list[list] = []  # [representative parsed answer, count]
    for g in grades:
        parsed = g.get("_parsed")
        if not parsed:
            continue
        for c in clusters:
            if equivalent(c[0], parsed):
                c[1] += 1
                break
        else:
            clusters.append([parsed, 1])
    if not clusters or gold is None:
        return False
    best = max(clusters, key=lambda c: c[1])  # max keeps the first on ties
    return equivalent(gold, best[0])


def _count(values):
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def grade(options: GradeOptions) -> dict:
    """Grade sampled solutions against reference answers with math-verify: OUT/grades.jsonl, OUT/report.json."""
    problems, problem_rejects = read_problems(options.problems)
    samples, sample_rejects = read_samples(options.samples)
    if not samples:
        raise GradeError(f"--samples {options.samples}: no sample to grade ({len(sample_rejects)} rejected)")
    grades, report = grade_samples(problems, samples)
    report["rejected"] = {"problems": problem_rejects, "samples": sample_rejects}
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "grades.jsonl").open("w", encoding="utf-8") as f:
        for g in grades:
            f.write(json.dumps(g, ensure_ascii=False) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    summary = {k: v for k, v in report.items() if not isinstance(v, (dict, list))}
    print(json.dumps(summary))
    return report
