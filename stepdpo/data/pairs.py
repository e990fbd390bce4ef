"""The step-pair schema: one source of truth for what a pair is, how it is read, and how it is rendered.

A pair, whatever its origin, is one JSON object:

    id                      stable hash of (problem, prefix_steps, chosen_steps, rejected_steps)
    kind                    "step": one next step vs another after the same prefix
                            "solution": two step lists after their common prefix
    problem                 the problem text
    prefix_steps            the steps both sides share, in order (may be empty)
    chosen_steps            list of step texts (one element for kind="step")
    rejected_steps          list of step texts (one element for kind="step")
    source                  [{"file": ..., "line": ...}, ...]  (several when deduplicated)
    chosen_step_rewards     added by `stepdpo score`: one float per chosen step
    rejected_step_rewards   added by `stepdpo score`: one float per rejected step

Rendering a pair into model text is `render_prompt` + `render_completion`, used by training,
scoring and evaluation alike.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from stepdpo.data.jsonio import canonical_json, dumps_line
from stepdpo.errors import StepdpoError

KINDS = ("step", "solution")
# Bump when render_prompt / render_completion change: reward caches are keyed on it.
PROMPT_TEMPLATE_VERSION = 1
STEP_SEPARATOR = "\n"


class PairFileError(StepdpoError, ValueError):
    """A pair file line that does not follow the schema; the message names file, line and field."""


def pair_id(problem: str, prefix_steps: list[str], chosen_steps: list[str], rejected_steps: list[str]) -> str:
    """sha1 of the compact JSON of [problem, prefix, chosen, rejected] (the same bytes with or without orjson)."""
    payload = canonical_json((problem, prefix_steps, chosen_steps, rejected_steps))  # lists or tuples: same bytes
    return hashlib.sha1(payload).hexdigest()[:20]


def make_pair(
    kind: str,
    problem: str,
    prefix_steps: list[str],
    chosen_steps: list[str],
    rejected_steps: list[str],
    source: list[dict],
    id: str | None = None,
) -> dict:
    return {
        "id": id or pair_id(problem, prefix_steps, chosen_steps, rejected_steps),
        "kind": kind,
        "problem": problem,
        "prefix_steps": list(prefix_steps),
        "chosen_steps": list(chosen_steps),
        "rejected_steps": list(rejected_steps),
        "source": list(source),
    }


def _is_str_list(value, allow_empty: bool) -> bool:
    return isinstance(value, list) and (allow_empty or value) and all(isinstance(s, str) and s for s in value)


def validate_pair(pair) -> str | None:
    """None when `pair` follows the schema, else the first problem found (naming the field)."""
    if not isinstance(pair, dict):
        return "not a JSON object"
    for key in ("id", "problem"):
        if not isinstance(pair.get(key), str) or not pair[key]:
            return f"field {key!r} must be a non-empty string"
    if pair.get("kind") not in KINDS:
        return f"field 'kind' must be one of {KINDS}, got {pair.get('kind')!r}"
    if not _is_str_list(pair.get("prefix_steps"), allow_empty=True):
        return "field 'prefix_steps' must be a list of non-empty strings"
    for key in ("chosen_steps", "rejected_steps"):
        if not _is_str_list(pair.get(key), allow_empty=False):
            return f"field {key!r} must be a non-empty list of non-empty strings"
        if pair["kind"] == "step" and len(pair[key]) != 1:
            return f"field {key!r} must have exactly one step when kind is 'step'"
    for side in ("chosen", "rejected"):
        rewards = pair.get(f"{side}_step_rewards")
        if rewards is None:
            continue
        if not isinstance(rewards, list) or len(rewards) != len(pair[f"{side}_steps"]):
            return f"field '{side}_step_rewards' must have one number per step in '{side}_steps'"
        if not all(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) for r in rewards):
            return f"field '{side}_step_rewards' must contain finite numbers"
    return None


def read_pairs(path: str | Path, require_rewards: bool = False) -> list[dict]:
    """Read and validate a pairs.jsonl; any bad line raises PairFileError naming file, line and field."""
    path = Path(path)
    if path.is_dir():
        path = path / "pairs.jsonl"
    if not path.exists():
        raise PairFileError(f"{path}: no such pair file (write one with `stepdpo prepare`)")
    pairs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                pair = json.loads(line)
            except json.JSONDecodeError as e:
                raise PairFileError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            problem = validate_pair(pair)
            if problem is None and require_rewards and "chosen_step_rewards" not in pair:
                problem = "no 'chosen_step_rewards'/'rejected_step_rewards': score the pairs first with `stepdpo score`"
            if problem:
                raise PairFileError(f"{path}:{lineno}: {problem}")
            pairs.append(pair)
    return pairs


def to_json_line(row: dict) -> bytes:
    return dumps_line(row)


def write_lines(path: str | Path, lines: Iterable[bytes]) -> int:
    """Write pre-encoded UTF-8 lines atomically (temp file + rename) so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    try:
        with tmp.open("wb") as f:
            for line in lines:
                f.write(line)
                n += 1
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not stay full of our half-written file
        raise
    return n


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    return write_lines(path, (to_json_line(row) for row in rows))


# --------------------------------------------------------------------------------------------
# Rendering: the only place that decides how a pair becomes model text.
#
#   text = problem_text(problem) + "".join(step + "\n" for step in prefix_steps) + completion
#
# problem_text is "Problem: ...\nSolution:\n" for base models (plain), or the tokenizer's chat template applied
# to the problem and an instruction, up to the assistant's turn (instruct models, as Step-DPO trains them). The
# steps follow as they are: a step is never closed by EOS or the template's end-of-turn token.

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHAT_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class PromptStyle:
    """How a problem is rendered. `chat=False`: plain text (base models). `chat=True`: through `tokenizer`'s chat
    template, with `system_prompt` (None: the template's own default) and `instruction` after the problem."""

    chat: bool = False
    system_prompt: str | None = None
    instruction: str = DEFAULT_INSTRUCTION
    tokenizer: Any = field(default=None, compare=False, repr=False)

    def problem_text(self, problem: str) -> str:
        if not self.chat:
            return f"Problem: {problem}{STEP_SEPARATOR}Solution:{STEP_SEPARATOR}"
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        content = f"{problem}\n{self.instruction}" if self.instruction else problem
        messages.append({"role": "user", "content": content})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @property
    def add_special_tokens(self) -> bool:
        """A chat-rendered prompt already carries the template's special tokens (BOS included) as text."""
        return not self.chat

    def key(self) -> str:
        """What changes the rendered text (part of reward-cache keys)."""
        if not self.chat:
            return "plain"
        template = getattr(self.tokenizer, "chat_template", None) or ""
        digest = hashlib.sha1(template.encode("utf-8")).hexdigest()[:12]
        return json.dumps(["chat", digest, self.system_prompt, self.instruction], ensure_ascii=False)


PLAIN = PromptStyle()


def prompt_style(tokenizer=None, mode: str = "auto", system_prompt: str | None = None,
                 instruction: str = DEFAULT_INSTRUCTION) -> PromptStyle:
    """auto: the chat template when the tokenizer has one, else plain text; always: the chat template (an error
    when there is none); never: plain text."""
    if mode not in CHAT_MODES:
        raise ValueError(f"chat_template={mode!r}: choose one of {', '.join(CHAT_MODES)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "always" and not has_template:
        raise PairFileError("chat_template=always, but the tokenizer has no chat template; use auto or never")
    if mode == "never" or not has_template:
        return PLAIN
    return PromptStyle(chat=True, system_prompt=system_prompt, instruction=instruction, tokenizer=tokenizer)


def render_prompt(problem: str, prefix_steps: list[str], style: PromptStyle = PLAIN) -> str:
    """Problem and the shared prefix steps; the next step follows directly after it."""
    return style.problem_text(problem) + "".join(step + STEP_SEPARATOR for step in prefix_steps)


def render_completion(steps: list[str]) -> str:
    """One step, or several joined by the separator. No EOS: a step is not the end of an answer."""
    return STEP_SEPARATOR.join(steps)


def render_pair(pair: dict, drop_prefix_steps: int = 0, style: PromptStyle = PLAIN) -> tuple[str, str, str]:
    """(prompt, chosen, rejected); `drop_prefix_steps` leaves out the oldest prefix steps (truncation)."""
    prefix = pair["prefix_steps"][drop_prefix_steps:]
    if drop_prefix_steps:
        prefix = ["..."] + prefix  # mark that earlier steps were left out
    return (
        render_prompt(pair["problem"], prefix, style),
        render_completion(pair["chosen_steps"]),
        render_completion(pair["rejected_steps"]),
    )
