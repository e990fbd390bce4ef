"""What a reward is computed on, how it is cached, and the prompts both backends share.

A *substep* is one step in its context: (problem, previous steps, step). Every chosen and rejected
step of every pair is one substep; pairs share many (the same prefix recurs), so each distinct
substep is scored once.

Methods:
* judge: a generative LLM judge (the seed's LLMRewardModel). reward = P(yes) / (P(yes) + P(no)) for
  the next token after `judge_prompt(...)`; decoder-only or encoder-decoder (first decoder token).
* prm:   a process reward model: the whole solution with a step tag after every step, one forward
  pass, a reward read at every tag. head "lm" (math-shepherd): softmax(logit(good), logit(bad))[good]
  from the LM head; head "classifier" (Qwen2.5-Math-PRM style): softmax(2-label logits)[1] from a
  token-classification head. Scoring a side costs one pass over prefix+steps, linear in its steps.

The cache is an append-only JSONL of {"key", "reward"}; a key hashes (model, method settings, prompt
template version, problem, previous steps, step), so a re-run after a crash scores only what is missing.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from stepdpo.data.pairs import PLAIN, PROMPT_TEMPLATE_VERSION, PromptStyle, render_prompt
from stepdpo.errors import StepdpoError

JUDGE_QUESTION = "Step: {step}\nIs this step correct? Answer:"
YES_VARIANTS = (" yes", "yes", " Yes", "Yes")
NO_VARIANTS = (" no", "no", " No", "No")
DEFAULT_STEP_TAG = " ки"  # math-shepherd's


class ScoreError(StepdpoError, RuntimeError):
    """A scoring run that cannot start or continue; the message says why and what to do."""


def prob_first(a: float, b: float) -> float:
    """softmax([a, b])[0] from two logits or log-probs, stable for any gap (no overflow at |a - b| > 709).
    For a judge, P(yes) / (P(yes) + P(no)) = prob_first(log P(yes), log P(no))."""
    d = b - a
    if d > 0:
        e = math.exp(-d)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(d))


class RewardBackend(abc.ABC):
    """Where rewards are computed: in this process (reward.hf) or on vLLM servers (reward.vllm).
    `score` only sees this interface: the tokenizer (prompts are token ids on both backends, so both see
    exactly the same input) and `run`, which scores batches of work units and hands each batch's result
    to `on_result(i, result)` as soon as it is ready (so it can be cached before the next one)."""

    tokenizer = None

    @abc.abstractmethod
    def run(self, method: str, batches: list, on_result) -> None:
        """method "judge": a batch is a list of Substep, the result one reward each;
        method "prm": a batch is a list of (problem, steps), the result one reward per step each."""

    def report(self) -> dict:
        return {}


@dataclass(frozen=True)
class Substep:
    problem: str
    previous: tuple[str, ...]
    step: str


@dataclass(frozen=True)
class MethodSpec:
    """Everything that changes a reward besides the input; part of every cache key."""

    model: str
    method: str  # judge | prm
    good_token: str = "+"
    bad_token: str = "-"
    step_tag: str = DEFAULT_STEP_TAG
    head: str = "lm"  # prm: "lm" (good/bad token logits) or "classifier" (2-label token-classification head)
    style: PromptStyle = PLAIN  # how the problem is rendered (plain, or the reward model's chat template)
    model_id: str = ""  # the model's identity (hub revision or a hash of its files), not only its path

    def key(self, sub: Substep) -> str:
        fields = [self.model_id or self.model, self.method, PROMPT_TEMPLATE_VERSION, self.style.key(), sub.problem,
                  list(sub.previous), sub.step]
        if self.method == "prm":
            fields += [self.good_token, self.bad_token, self.step_tag, self.head]
        payload = json.dumps(fields, ensure_ascii=False)
        return hashlib.sha1(payload.encode("utf-8")).hexdigest()


def judge_prompt(sub: Substep, style: PromptStyle = PLAIN) -> str:
    return render_prompt(sub.problem, list(sub.previous), style) + JUDGE_QUESTION.format(step=sub.step)


def prm_text(problem: str, steps: list[str], tag: str, style: PromptStyle = PLAIN) -> str:
    """math-shepherd's layout: the question, then every step followed by the step tag."""
    return render_prompt(problem, [], style) + "".join(f"{s}{tag}\n" for s in steps)


def single_token(tokenizer, variants: tuple[str, ...]) -> int | None:
    for text in variants:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return ids[0]
    return None


def judge_token_ids(tokenizer, model_name: str) -> tuple[int, int]:
    yes, no = single_token(tokenizer, YES_VARIANTS), single_token(tokenizer, NO_VARIANTS)
    if yes is None or no is None:
        missing = " and ".join(w for w, t in (("yes", yes), ("no", no)) if t is None)
        raise ScoreError(
            f"{model_name}: the tokenizer has no single token for {missing} (tried {YES_VARIANTS + NO_VARIANTS}); "
            "the judge method reads P(yes)/P(no) from one next token. Use a judge model whose vocabulary has them, "
            "or --method prm."
        )
    return yes, no


def prm_token_ids(tokenizer, spec: MethodSpec) -> tuple[int, int | None, int | None]:
    """(step tag id, good id, bad id); errors before any work when one is not a single token.
    A classifier head reads labels, not tokens: good/bad are None then."""
    tag_ids = tokenizer(spec.step_tag, add_special_tokens=False)["input_ids"]
    if len(tag_ids) != 1:
        raise ScoreError(
            f"{spec.model}: the step tag {spec.step_tag!r} is {len(tag_ids)} tokens, not one; a PRM needs a "
            "single-token step tag (math-shepherd: ' ки'; Qwen2.5-Math-PRM: '<extra_0>'). Set --prm-step-tag."
        )
    if spec.head == "classifier":
        return tag_ids[0], None, None
    good = single_token(tokenizer, (spec.good_token, " " + spec.good_token))
    bad = single_token(tokenizer, (spec.bad_token, " " + spec.bad_token))
    if good is None or bad is None:
        raise ScoreError(f"{spec.model}: --prm-good-token/--prm-bad-token must each be one token")
    return tag_ids[0], good, bad


def prm_serving_tokens(model: str, good_token: str = "+", bad_token: str = "-", step_tag: str = DEFAULT_STEP_TAG,
                       head: str = "lm") -> dict:
    """What `launch/serve_reward.sh --method prm` tells vLLM, from the same token resolution the hf backend uses:
    the step-tag id, and for an LM head the good/bad *vocabulary pieces*. vLLM's `classifier_from_token` looks
    its entries up as pieces, so it must get the piece of the id stepdpo reads ('▁+' = 648 in Mistral's
    vocabulary, math-shepherd's), not the bare text ('+' = 28806, another row of the LM head)."""
    from stepdpo.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    spec = MethodSpec(model=model, method="prm", good_token=good_token, bad_token=bad_token, step_tag=step_tag,
                      head=head)
    tag, good, bad = prm_token_ids(tokenizer, spec)
    out = {"step_tag_id": tag}
    if head == "lm":
        out["classifier_from_token"] = tokenizer.convert_ids_to_tokens([good, bad])
    return out


def substeps_of_pair(pair: dict) -> dict[str, list[Substep]]:
    out = {}
    for side in ("chosen", "rejected"):
        previous = list(pair["prefix_steps"])
        subs = []
        for step in pair[f"{side}_steps"]:
            subs.append(Substep(pair["problem"], tuple(previous), step))
            previous.append(step)
        out[side] = subs
    return out


class ScoreCache:
    """Append-only JSONL cache; every batch is flushed and fsync'd as it arrives."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.values: dict[str, float] = {}
        if self.path.exists():
            with self.path.open(encoding="utf-8") as f:
                for line in f:
                    try:
                        row = json.loads(line)
                        key, value = row["key"], row["reward"]
                    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                        continue  # a torn last line from a crash: that score is simply recomputed
                    if (isinstance(key, str) and not isinstance(value, bool) and isinstance(value, (int, float))
                            and math.isfinite(value) and 0.0 <= value <= 1.0):
                        self.values[key] = float(value)
                    # anything else (NaN, a string, a boolean) is ignored and recomputed, never served
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a", encoding="utf-8")
        # One scorer per cache: two would each score everything missing, twice the work for the same numbers.
        import fcntl

        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._f.close()
            raise ScoreError(f"{self.path} is in use by another `stepdpo score`; wait for it to finish (it fills the "
                             "same cache) or pass another --cache") from None

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def get(self, key: str) -> float | None:
        return self.values.get(key)

    def put_many(self, items: list[tuple[str, float]]) -> None:
        for k, v in items:  # a non-finite reward is a bug upstream; never let it into the cache
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
                raise ScoreError(f"reward {v!r} for cache key {k} is not a probability in [0, 1]; nothing of "
                                 "this batch was cached")
        new = [(k, v) for k, v in items if k not in self.values]
        for k, v in new:
            self.values[k] = v
            self._f.write(json.dumps({"key": k, "reward": v}) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()
