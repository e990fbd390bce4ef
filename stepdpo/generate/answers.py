"""Final answers: find where a solution states its answer, and let math-verify decide equivalence.

Extraction only locates the answer text (stepdpo does not judge mathematics): the last `\\boxed{...}`, else
PRM800K's `# Answer` line, else GSM8K's `#### N`, else "The answer is ...". The located text and the reference
are both parsed and compared by math-verify (fractions, decimals, radicals, tuples, intervals, units).
"""

from __future__ import annotations

import re

from stepdpo.generate.problems import last_boxed

_PRM800K = re.compile(r"#\s*Answer\s*\n+\s*([^\n]+)")
_GSM8K = re.compile(r"####\s*([^\n]+)")
_SAYS = re.compile(r"[Tt]he (?:final )?answer is\s*:?\s*([^\n]+)")


def locate_answer(text: str) -> tuple[str | None, str]:
    """(answer text, how it was found) or (None, why not)."""
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip(), "boxed"
    for pattern, how in ((_PRM800K, "# Answer"), (_GSM8K, "####"), (_SAYS, "the answer is")):
        found = pattern.findall(text)
        if found:
            answer = found[-1].strip()
            if how == "the answer is":
                answer = answer.rstrip(".").strip().strip("$").strip()
            if answer:
                return answer, how
    return None, "no final answer (no \\boxed{}, '# Answer', '####' or 'The answer is')"


def parse_answer(answer: str):
    """math-verify's parse of an answer text (as if boxed, so LaTeX and plain numbers both parse)."""
    from math_verify import parse

    return parse(f"\\boxed{{{answer}}}")


def equivalent(gold, predicted) -> bool:
    from math_verify import verify

    return bool(gold) and bool(predicted) and bool(verify(gold, predicted))
