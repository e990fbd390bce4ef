"""The equations a step writes, checked exactly: `a op b (op c ...) = r`, as arithmetic and GSM8K solutions state
their calculations ("47 + 38 = 85", "12 / 3 * 2 = 8", "$5 x 3 = $15").

One checker for the whole project: `stepdpo mine --locate equations` (an exact verifier of computation errors, the
located step being the first that states a false equation) and benchmarks/loop_analysis.py (pair quality, the share
of false equations in a model's solutions). It reads intermediate steps only: final answers are graded by
math-verify (`stepdpo grade`), never here.

What is checked, and why it is no wider: a chain of numbers joined by + - * / x × ÷ before an `=` and a number after
it, evaluated in rationals with the usual precedence. A result written with decimals may be rounded to the places it
shows (10 / 3 = 3.33); an integer result must be exact (10 / 3 = 3 is false). Anything else (parentheses, percents,
units between the numbers, words) is not checked: a step with nothing checkable is neither right nor wrong, so the
checker never calls a correct step false because it could not read it.
"""

from __future__ import annotations

import ast
import re
from fractions import Fraction

_NUM = r"\$?\d+(?:,\d{3})*(?:\.\d+)?"
_OP = r"[-+*/×x÷]"
# the chain is not the tail of a longer expression (a digit, a point or a closing parenthesis before it) and the
# result is a lookahead, so "2 * 3 = 6 + 4 = 10" yields both equations. Spaces and tabs only, never a line break:
# an equation is stated on one line, and with \s the result ending one line ("5 + 44 = 49") and the next line's
# "-44 - 44 = 0" read as one chain "49\n-44 - 44", which is not an expression at all
_SP = r"[ \t]*"
_EQUATION = re.compile(rf"(?<![\d.,)$])(-?{_NUM}(?:{_SP}{_OP}{_SP}{_NUM})+){_SP}={_SP}(?=(-?{_NUM})(?![\d(]|\.\d))")
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}


def _number(text: str) -> Fraction:
    return Fraction(text.replace("$", "").replace(",", ""))


def _evaluate(node) -> Fraction:
    if isinstance(node, ast.Constant):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise ValueError(ast.dump(node))


def _holds(left: str, right: str) -> bool:
    expression = re.sub(r"[x×]", "*", left.replace("÷", "/").replace("$", "").replace(",", ""))
    try:
        value = _evaluate(ast.parse(expression, mode="eval").body)
    except ZeroDivisionError:
        return False
    result = _number(right)
    places = len(right.split(".")[1]) if "." in right else 0
    return value == result if places == 0 else abs(value - result) <= Fraction(1, 2 * 10**places)


def equations(text: str) -> list[bool]:
    """Every checkable equation in the text, in order: True where it holds, False where it does not."""
    return [_holds(left, right) for left, right in _EQUATION.findall(text)]


def step_verdict(step: str) -> str:
    """'wrong' (a false equation), 'right' (equations, all true) or 'none' (no equation to check)."""
    v = equations(step)
    return "none" if not v else "right" if all(v) else "wrong"
