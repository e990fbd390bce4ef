"""`stepdpo score`: substep rewards for every pair, cached, resumable, on either backend.

Work units: for `judge`, one substep per prompt; for `prm`, one solution (prefix + one side's steps)
per prompt, which yields the rewards of every step in it. Units whose rewards are all cached are not
sent again; every finished batch is appended to the cache before the next one is awaited, so a
crash or a killed server loses at most the batches in flight. The backend (in-process transformers
or vLLM servers) sits behind one interface, `RewardBackend`; this module never asks which one it has.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path


from stepdpo.console import progress_bar
from stepdpo.data.pairs import DEFAULT_INSTRUCTION, prompt_style, read_pairs, write_jsonl
from stepdpo.identity import model_identity
from stepdpo.options import REQUIRED, check, check_choice, opt
from stepdpo.reward.accuracy import reward_accuracy
from stepdpo.reward.vllm import RECONNECT_HELP, RECONNECT_TIMEOUT, redact_url
from stepdpo.reward.scorer import (DEFAULT_STEP_TAG, MethodSpec, RewardBackend, ScoreCache, ScoreError, Substep,
                                   substeps_of_pair)

__all__ = ["ScoreError", "ScoreOptions", "score", "score_pairs"]
logger = logging.getLogger("stepdpo.score")


@dataclass
class ScoreOptions:
    pairs: str = opt(REQUIRED, "pairs.jsonl (or a directory holding one).")
    model: str = opt(REQUIRED, "Reward model: local directory or hub id.")
    out: str = opt(REQUIRED, "Output directory: pairs.jsonl (with rewards), score_report.json, the cache.")
    backend: str = opt("hf", "hf: transformers in this process (GPU when there is one); vllm: batched HTTP "
                       "requests to vLLM server(s).", choices=("hf", "vllm"))
    method: str = opt("judge", "judge: P(yes)/(P(yes)+P(no)) from a generative judge prompt per step; prm: a process "
                      "reward model read at a step tag after every step, one pass per solution.",
                      choices=("judge", "prm"))
    url: list[str] = opt(factory=list, help="vLLM server URL(s); several shard the batches (repeat the flag or "
                         "list them).")
    served_model_name: str | None = opt(None, "Model name the vLLM server knows (default: --model).")
    api_key_env: str = opt("STEPDPO_API_KEY", "Environment variable holding the server API key.")
    api_key_file: str | None = opt(None, "File holding the server API key (never put a key on a command line).")
    hf_token_file: str | None = opt(None, "File holding a Hugging Face token for a gated reward model "
                                    "(else HF_TOKEN, else the standard token file).")
    cache: str | None = opt(None, "Score cache file (default OUT/score_cache.jsonl).")
    batch_size: int = opt(32, "Prompts per forward pass / per request.")
    concurrency: int = opt(4, "Requests in flight per vLLM server (a cap per URL).")
    dtype: str = opt("auto", "hf backend: weights dtype; auto = bfloat16 on a GPU that supports it, else float32.",
                     choices=("auto", "float32", "bfloat16", "float16"))
    trust_remote_code: bool = opt(False, "Allow a reward model that ships its own Python code (e.g. "
                                  "Qwen2.5-Math-PRM) to run it. Off: such a model is refused.")
    chat_template: str = opt("auto", "Render the problem through the reward model's chat template when it has one "
                             "(auto), always, or never (plain text), as training does for the policy.",
                             choices=("auto", "always", "never"))
    system_prompt: str | None = opt(None, "Chat template: the system message (default: the template's own).")
    instruction: str = opt(DEFAULT_INSTRUCTION, "Chat template: the instruction after the problem.")
    prm_good_token: str = opt("+", "prm: the token meaning 'step is good'.")
    prm_bad_token: str = opt("-", "prm: the token meaning 'step is bad'.")
    prm_step_tag: str = opt(DEFAULT_STEP_TAG, "prm: the step tag after each step (math-shepherd: ' ки').")
    prm_head: str = opt("lm", "prm: lm = rewards from the good/bad token logits (math-shepherd); classifier = a "
                        "2-label token-classification head, P(good) = softmax[1] (Qwen2.5-Math-PRM style).",
                        choices=("lm", "classifier"))
    timeout: float = opt(120.0, "vLLM read timeout in seconds.")
    health_timeout: float = opt(10.0, "Seconds to wait for /health at start (10: an unreachable URL fails fast; "
                                "raise it to wait for a server that is still loading its model).")
    reconnect_timeout: float = opt(RECONNECT_TIMEOUT, RECONNECT_HELP)
    progress: bool = opt(True, "Show a progress bar.")

    def __post_init__(self):
        check_choice(self.backend, "backend", ("hf", "vllm"))
        check_choice(self.method, "method", ("judge", "prm"))
        check_choice(self.prm_head, "prm_head", ("lm", "classifier"))
        check(self.backend != "vllm" or bool(self.url), "url",
              "--backend vllm needs at least one --url (launch/serve_reward.sh prints it)")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.concurrency >= 1, "concurrency", "must be >= 1")
        check(self.reconnect_timeout >= 0, "reconnect_timeout", "must be >= 0 seconds (0: stop at once when the "
              "servers go away)")


def _api_key(env_name: str | None, file: str | None) -> str | None:
    if file:
        path = Path(file).expanduser()
        if not path.is_file():
            raise ScoreError(f"--api-key-file {path}: no such file")
        return path.read_text(encoding="utf-8").strip() or None
    return os.environ.get(env_name or "", "").strip() or None


def make_backend(options: ScoreOptions, spec: MethodSpec, token: str | None) -> RewardBackend:
    """The one place that picks a backend. The backend's `spec` has the prompt style and the model identity. The
    caller has run `stepdpo.auth.check_model` on the model (`model_token`)."""
    from stepdpo.models import load_config, load_tokenizer

    try:
        tokenizer = load_tokenizer(spec.model, token=token)
        config = load_config(spec.model, token=token)
    except OSError as e:
        raise ScoreError(f"--model {spec.model}: cannot load its tokenizer/config ({str(e).splitlines()[0]}). Pass a "
                         "local model directory, or a hub id with network access (HF_HUB_OFFLINE needs a cached "
                         "copy).") from None
    spec = dataclasses.replace(spec, style=prompt_style(tokenizer, options.chat_template, options.system_prompt,
                                                        options.instruction),
                               model_id=model_identity(spec.model, token))
    if options.backend == "hf":
        from stepdpo.reward.hf import load_hf_backend

        return load_hf_backend(spec, token, options.dtype, options.trust_remote_code, tokenizer=tokenizer, config=config)
    from stepdpo.reward.vllm import VLLMBackend, VLLMError

    if getattr(config, "is_encoder_decoder", False):
        raise ScoreError(f"{spec.model}: vLLM does not serve encoder-decoder judges; use --backend hf")
    backend = VLLMBackend(spec, tokenizer, options.url, options.served_model_name,
                          _api_key(options.api_key_env, options.api_key_file), read_timeout=options.timeout,
                          concurrency=options.concurrency, reconnect_timeout=options.reconnect_timeout)
    try:
        backend.wait_healthy(options.health_timeout)
    except VLLMError as e:
        raise ScoreError(str(e)) from None
    return backend


def score_pairs(pairs: list[dict], spec: MethodSpec, cache: ScoreCache, backend: RewardBackend, *,
                batch_size: int = 32, progress: bool = True) -> dict:
    """Fill `chosen_step_rewards`/`rejected_step_rewards` in place; returns counts."""
    per_pair = [substeps_of_pair(p) for p in pairs]
    needed = {}
    for sides in per_pair:
        for subs in sides.values():
            for s in subs:
                needed.setdefault(spec.key(s), s)
    missing = {k: s for k, s in needed.items() if k not in cache}
    counts = {"substeps": len(needed), "cache_hits": len(needed) - len(missing), "scored": 0, "forward_units": 0}
    bar = progress_bar(total=len(missing), desc=f"score {spec.method}", unit="substep", disable=not progress)
    start = time.perf_counter()

    remaining = set(missing)

    def record(items: list[tuple[Substep, float]]):
        keyed = list({spec.key(s): float(v) for s, v in items}.items())  # a pass may repeat a prefix step
        cache.put_many(keyed)
        new = sum(1 for k, _ in keyed if k in remaining)
        remaining.difference_update(k for k, _ in keyed)
        counts["scored"] += new
        bar.update(new)
        bar.set_postfix(substeps_per_s=f"{counts['scored'] / max(time.perf_counter() - start, 1e-9):.1f}")

    if spec.method == "judge":
        units = list(missing.values())
        batches = [units[i : i + batch_size] for i in range(0, len(units), batch_size)]
        counts["forward_units"] = len(units)
        backend.run("judge", batches, lambda i, res: record(list(zip(batches[i], res))))
    else:
        # One solution per pair side whose steps are not all cached; its pass also scores the prefix steps.
        solutions, seen = [], set()
        for pair, sides in zip(pairs, per_pair):
            for side, subs in sides.items():
                if all(spec.key(s) in cache for s in subs):
                    continue
                steps = list(pair["prefix_steps"]) + list(pair[f"{side}_steps"])
                key = (pair["problem"], tuple(steps))
                if key not in seen:
                    seen.add(key)
                    solutions.append((pair["problem"], steps))
        batches = [solutions[i : i + batch_size] for i in range(0, len(solutions), batch_size)]
        counts["forward_units"] = len(solutions)

        def on_prm(i, res):
            items = []
            for (problem, steps), rewards in zip(batches[i], res):
                for k, (step, reward) in enumerate(zip(steps, rewards)):
                    items.append((Substep(problem, tuple(steps[:k]), step), reward))
            record(items)

        backend.run("prm", batches, on_prm)
    bar.close()

    for pair, sides in zip(pairs, per_pair):
        for side, subs in sides.items():
            values = [cache.get(spec.key(s)) for s in subs]
            if any(v is None for v in values):  # never continue with a missing reward
                raise ScoreError(f"pair {pair['id']}: a {side} step has no reward after scoring")
            pair[f"{side}_step_rewards"] = values
    return counts


def score(options: ScoreOptions) -> dict:
    """Add chosen_step_rewards / rejected_step_rewards to every pair. Scores are cached as they arrive;
    re-running scores only what is missing."""
    from stepdpo.auth import model_token
    from stepdpo.reward.vllm import VLLMError

    spec = MethodSpec(model=options.model, method=options.method, good_token=options.prm_good_token,
                      bad_token=options.prm_bad_token, step_tag=options.prm_step_tag, head=options.prm_head)
    pairs = read_pairs(options.pairs)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = make_backend(options, spec, model_token(options.model, options.hf_token_file))
    spec = backend.spec
    cache = ScoreCache(options.cache or out / "score_cache.jsonl")
    start = time.perf_counter()
    try:
        counts = score_pairs(pairs, spec, cache, backend, batch_size=options.batch_size, progress=options.progress)
    except VLLMError as e:
        raise ScoreError(f"{e} (scores so far are cached in {cache.path}; re-run to resume)") from None
    except ScoreError as e:
        raise ScoreError(redact_url(str(e))) from None
    finally:
        cache.close()
    wall = time.perf_counter() - start
    write_jsonl(out / "pairs.jsonl", pairs)
    report = {
        **counts,
        "wall_seconds": round(wall, 3),
        "substeps_per_second": round(counts["scored"] / wall, 2) if wall > 0 and counts["scored"] else 0.0,
        "model": options.model,
        "method": options.method,
        "backend": options.backend,
        "urls": [redact_url(u) for u in options.url],
        **backend.report(),
        "reward_accuracy": reward_accuracy(pairs),
        "pairs_file": str(out / "pairs.jsonl"),
    }
    (out / "score_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("substeps", "scored", "cache_hits", "substeps_per_second")}))
    return report
