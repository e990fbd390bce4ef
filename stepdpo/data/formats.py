"""The other input formats -> pairs: Step-DPO rows, hand-written step lists, TRL preference rows.

Each converter takes one parsed row and returns the pair fields
(kind, problem, prefix_steps, chosen_steps, rejected_steps) or raises RecordError.
"""

from __future__ import annotations

import re

from stepdpo.data.prm800k import RecordError

_STEP_HEADER = re.compile(r"\n(?=Step \d+\s*:)")


def _text(row: dict, key: str, reason: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RecordError(reason, f"field {key!r} must be a non-empty string")
    return value.strip()


def split_steps(text: str) -> list[str]:
    """Steps of a reasoning text: "Step N:" blocks when present (Step-DPO's style), else non-empty lines."""
    text = text.strip()
    if not text:
        return []
    if re.search(r"(^|\n)Step \d+\s*:", text):
        parts = _STEP_HEADER.split(text)
    else:
        parts = text.split("\n")
    return [p.strip() for p in parts if p.strip()]


def _diverge(problem: str, prefix: list[str], chosen: list[str], rejected: list[str]) -> tuple:
    """Move the shared leading steps of chosen/rejected into the prefix; pick the kind."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    chosen, rejected, prefix = chosen[n:], rejected[n:], prefix + chosen[:n]
    if not chosen or not rejected:
        raise RecordError("no_divergence", "chosen and rejected are identical, or one is a prefix of the other")
    kind = "step" if len(chosen) == 1 and len(rejected) == 1 else "solution"
    return kind, problem, prefix, chosen, rejected


_BOUNDARY = re.compile(r"\n(?=Step \d+\s*:)")
_ANY_LINE = re.compile(r"\n(?=\S)")


def step_dpo_split(initial_reason_steps: str, chosen: str, rejected: str) -> tuple[list[str], str, str]:
    """Step-DPO's layout -> (prefix_steps, chosen_step, rejected_step), byte for byte.

    In Step-DPO's data `initial_reason_steps` ends with the header of the step being compared
    ("...\nStep 3:") and `chosen`/`rejected` are that step's body (" The ..."); its trainer concatenates
    prompt + initial_reason_steps + chosen with nothing in between. So the header belongs to the compared step:
    the last line of `initial_reason_steps` starts both sides, and the lines before it are the prefix steps
    (split at "Step N:" headers, else at line starts). Rendered, "".join(s + "\n" for s in prefix) + step equals
    initial_reason_steps + body exactly; nothing is stripped."""
    cut = initial_reason_steps.rfind("\n")
    head, tail = initial_reason_steps[:max(cut, 0)], initial_reason_steps[cut + 1:]
    if cut < 0 or not head.strip():
        return [], initial_reason_steps + chosen, initial_reason_steps + rejected
    parts = (_BOUNDARY if _BOUNDARY.search(head) else _ANY_LINE).split(head)
    if any(not p.strip() for p in parts):  # a blank part would break the schema: keep the prefix as one step
        parts = [head]
    return parts, tail + chosen, tail + rejected


def from_step_dpo(row) -> tuple:
    """Step-DPO rows: prompt, initial_reason_steps (or prefix), chosen, rejected: the body of one step each.
    Texts are kept byte for byte (see step_dpo_split)."""
    if not isinstance(row, dict):
        raise RecordError("not_object", f"expected a JSON object, got {type(row).__name__}")
    _text(row, "prompt", "missing_prompt")
    prefix_text = row.get("initial_reason_steps", row.get("prefix", ""))
    if prefix_text is None:
        prefix_text = ""
    if not isinstance(prefix_text, str):
        raise RecordError("bad_prefix", "field 'initial_reason_steps'/'prefix' must be a string")
    _text(row, "chosen", "empty_chosen")
    _text(row, "rejected", "empty_rejected")
    if row["chosen"] == row["rejected"]:
        raise RecordError("no_divergence", "chosen and rejected are identical")
    prefix, chosen, rejected = step_dpo_split(prefix_text, row["chosen"], row["rejected"])
    return "step", row["prompt"], prefix, [chosen], [rejected]


def _step_list(row: dict, key: str) -> list[str]:
    value = row.get(key)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(s, str) and s.strip() for s in value):
        raise RecordError(f"bad_{key}", f"field {key!r} must be a non-empty list of non-empty step strings")
    return [s.strip() for s in value]


def from_steps(row) -> tuple:
    """Hand-written: {"prompt", "chosen": [step, ...], "rejected": [step, ...], optional "prefix": [...]}."""
    if not isinstance(row, dict):
        raise RecordError("not_object", f"expected a JSON object, got {type(row).__name__}")
    problem = _text(row, "prompt", "missing_prompt")
    prefix = row.get("prefix") or []
    if isinstance(prefix, str):
        prefix = split_steps(prefix)
    if not isinstance(prefix, list) or not all(isinstance(s, str) and s.strip() for s in prefix):
        raise RecordError("bad_prefix", "field 'prefix' must be a list of non-empty step strings")
    return _diverge(problem, [s.strip() for s in prefix], _step_list(row, "chosen"), _step_list(row, "rejected"))


def from_trl(row) -> tuple:
    """TRL's explicit-prompt preference rows (strings); completions are split into steps by line."""
    if not isinstance(row, dict):
        raise RecordError("not_object", f"expected a JSON object, got {type(row).__name__}")
    for key in ("prompt", "chosen", "rejected"):
        if isinstance(row.get(key), list):
            raise RecordError(
                "conversational", f"field {key!r} is a message list; convert conversational data to plain strings first"
            )
    problem = _text(row, "prompt", "missing_prompt")
    chosen = split_steps(_text(row, "chosen", "empty_chosen"))
    rejected = split_steps(_text(row, "rejected", "empty_rejected"))
    return _diverge(problem, [], chosen, rejected)


CONVERTERS = {"step-dpo": from_step_dpo, "steps": from_steps, "trl": from_trl}
