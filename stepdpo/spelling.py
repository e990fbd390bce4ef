"""The nearest names to a misspelt one: one rule for the stages' unknown options and config keys (stepdpo.cli) and
for the shell entry points' unknown options (launch/options.sh runs this file by path). It imports nothing from
stepdpo, so it runs with any python3 on a node where the package is not installed."""

from __future__ import annotations

import difflib
import sys


def close_names(word: str, names: list[str]) -> list[str]:
    """Up to three of `names` as near to `word` as the nearest: difflib ratio >= 0.6 and within 0.05 of the best."""
    scored = sorted(((difflib.SequenceMatcher(None, word, n).ratio(), n) for n in names), reverse=True)
    return [n for r, n in scored[:3] if r >= 0.6 and r >= scored[0][0] - 0.05] if scored else []


def or_join(names: list[str], word: str = "or") -> str:
    """'a', 'a or b', 'a, b or c'."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {word} {names[-1]}"


def main(argv: list[str]) -> None:
    """`python3 spelling.py --word --option...`: prints the options meant, or nothing. The shell scripts take no
    abbreviations, so every option the word begins comes first; else the nearest spellings, compared without the
    dashes every option has (with them, --reward-model looked near --max-model-len)."""
    word, names = argv[0], argv[1:]
    close = [n for n in names if n.startswith(word)] or \
        ["--" + n for n in close_names(word.removeprefix("--"), [n.removeprefix("--") for n in names])]
    if close:
        print(or_join(close))


if __name__ == "__main__":
    main(sys.argv[1:])
