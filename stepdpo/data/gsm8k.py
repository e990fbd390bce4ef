"""GSM8K's layout: `question`, and `answer` = the reference solution, one step per line, with calculator
annotations (`48/2 = <<48/2=24>>24`), then a last line `#### 72` with the final answer.

stepdpo reads it as a problem (the question, the answer after `####`), as reference steps (the lines before
`####`, blank lines dropped, annotations stripped unless kept), and as an SFT solution: those steps and a closing
step `The answer is 72.`, the sentence the generated arithmetic ends with too and that `grade` finds.
"""

from __future__ import annotations

import re

ANNOTATION = re.compile(r"<<[^<>]*>>")
MARKER = "####"


def is_gsm8k(row) -> bool:
    return (isinstance(row, dict) and isinstance(row.get("question"), str) and isinstance(row.get("answer"), str)
            and MARKER in row["answer"])


def final_answer(answer: str) -> str:
    """The text after the last `####` (GSM8K writes thousands with commas, `1,080`: math-verify reads them)."""
    return answer.rsplit(MARKER, 1)[1].strip()


def reference_steps(answer: str, keep_annotations: bool = False) -> list[str]:
    """The reference solution's steps: the non-blank lines before `####` (four problems of the training split have
    a blank line between two steps), each stripped, calculator annotations removed unless `keep_annotations`."""
    body = answer.rsplit(MARKER, 1)[0]
    steps = []
    for line in body.split("\n"):
        if not keep_annotations:
            line = ANNOTATION.sub("", line)
        line = " ".join(line.split())  # an annotation removed leaves a double space: "= <<4*3=12>>12" -> "= 12"
        if line:
            steps.append(line)
    return steps


def answer_step(answer: str) -> str:
    """The closing step of a solution: what `grade` locates as the final answer ("The answer is ...")."""
    return f"The answer is {answer}."


def solution_steps(answer: str, keep_annotations: bool = False) -> list[str]:
    """A whole reference solution as steps: the reasoning steps, then the answer step."""
    return reference_steps(answer, keep_annotations) + [answer_step(final_answer(answer))]
