"""Problems in every layout, answers located and compared by math-verify, maj@k and pass@k worked out by hand."""

from __future__ import annotations

import json

import pytest

from stepdpo.generate.answers import equivalent, locate_answer, parse_answer
from stepdpo.generate.grade import GradeOptions, grade, grade_samples
from stepdpo.generate.problems import Problem, ProblemFileError, read_problems


@pytest.mark.parametrize("gold, text, correct", [
    ("\\frac{1}{2}", "So the result is $0.5$.\nThe answer is 0.5.", True),  # fraction vs decimal
    ("0.25", "\\boxed{\\frac{1}{4}}", True),
    ("2\\sqrt{2}", "# Answer\n\n\\sqrt{8}", True),  # PRM800K's answer line, radicals
    ("(1,2)", "The point is \\boxed{(1, 2)}", True),  # tuples
    ("5", "It is 5 cm long. The answer is 5 \\text{ cm}.", True),  # units
    ("72", "Natalia sold 48+24 = 72 clips.\n#### 72", True),  # GSM8K
    ("10", "The answer is 11.", False),
    ("\\frac{3}{4}", "\\boxed{\\frac{6}{8}}", True),
    ("x^2+1", "\\boxed{1 + x^2}", True),
])
def test_equivalence_is_math_verifys(gold, text, correct):
    answer, _ = locate_answer(text)
    assert answer is not None
    assert equivalent(parse_answer(gold), parse_answer(answer)) is correct


def test_the_last_boxed_wins_and_nothing_found_is_invalid():
    assert locate_answer("first \\boxed{1}, then \\boxed{\\frac{2}{3}}") == ("\\frac{2}{3}", "boxed")
    assert locate_answer("I give up.")[0] is None


def test_problem_layouts_and_rejects(tmp_path):
    rows = [
        {"problem": "MATH with answer", "answer": "\\frac{1}{2}", "unique_id": "m1"},
        {"problem": "MATH with solution", "solution": "so \\boxed{\\sqrt{2}}."},
        {"question": "GSM8K", "answer": "48 + 24 = 72\n#### 72"},
        {"question": {"problem": "PRM800K", "ground_truth_answer": "7"}, "label": {"steps": []}},
        {"problem": "no answer"},
        "not an object",
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    problems, rejects = read_problems(path)
    assert [(p.text, p.answer) for p in problems] == [("MATH with answer", "\\frac{1}{2}"),
                                                      ("MATH with solution", "\\sqrt{2}"), ("GSM8K", "72"),
                                                      ("PRM800K", "7")]
    assert problems[0].id == "m1" and [r["line"] for r in rejects] == [5, 6, 7]
    (tmp_path / "none.jsonl").write_text('{"problem": "x"}\n')
    with pytest.raises(ProblemFileError, match="no problem with a reference answer"):
        read_problems(tmp_path / "none.jsonl")


def test_accuracy_maj_and_pass_at_k():
    problems = [Problem("a", "A?", "4"), Problem("b", "B?", "\\frac{1}{2}")]
    samples = [
        {"problem_id": "a", "text": "The answer is 4."}, {"problem_id": "a", "text": "The answer is 5."},
        {"problem_id": "a", "text": "\\boxed{4}"},  # a: 2 of 3 right; majority 4 (right)
        {"problem": "B?", "text": "The answer is 0.5"}, {"problem": "B?", "text": "\\boxed{3}"},
        {"problem": "B?", "text": "\\boxed{3.0}"},  # b: 1 of 3 right; majority 3 (wrong: 3 and 3.0 are one vote)
    ]
    grades, report = grade_samples(problems, samples)
    assert [g["correct"] for g in grades] == [True, False, True, True, False, False]
    assert report["accuracy"] == pytest.approx(3 / 6) and report["k"] == 3
    assert report["maj@3"] == 0.5 and report["pass@3"] == 1.0 and report["invalid"] == 0


def test_grade_writes_grades_and_report_and_rejects_bad_lines(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    (tmp_path / "s.jsonl").write_text(json.dumps({"problem": "1+1?", "text": "\\boxed{2}"}) + "\n" +
                                      json.dumps({"problem": "1+1?", "text": "no idea"}) + "\n" +
                                      json.dumps({"problem": "unknown?", "text": "\\boxed{2}"}) + "\n{oops\n")
    report = grade(GradeOptions(problems=str(tmp_path / "p.jsonl"), samples=str(tmp_path / "s.jsonl"),
                                out=str(tmp_path / "g")))
    grades = [json.loads(x) for x in (tmp_path / "g" / "grades.jsonl").read_text().splitlines()]
    assert [g["correct"] for g in grades] == [True, False, False]
    assert grades[1]["invalid"].startswith("no final answer") and grades[2]["invalid"].startswith("unknown problem")
    assert report["accuracy"] == pytest.approx(1 / 3) and report["invalid"] == 2
    assert report["rejected"]["samples"][0]["line"] == 4
