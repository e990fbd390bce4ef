"""`stepdpo score`: substep rewards for every pair, cached, resumable, on either backend.

Work units: for `judge`, one substep per prompt; for `prm`, one solution (prefix + one side's steps)
per prompt, which yields the rewards of every step in it. Units whose rewards are all cached are not
sent again; every finished batch is appended to the cache before the next one is awaited, so a
crash or a killed server loses at most the batches in flight.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from tqdm import tqdm

from stepdpo.data.pairs import read_pairs, write_jsonl
from stepdpo.evaluate import reward_accuracy
from stepdpo.reward.scorer import DEFAULT_STEP_TAG, MethodSpec, ScoreCache, ScoreError, Substep, substeps_of_pair
from stepdpo.reward.vllm import BadRequest

__all__ = ["ScoreError", "run_score", "score_pairs"]
logger = logging.getLogger("stepdpo.score")


def _prob_first(a: float, b: float) -> float:
    """The first of two outcomes' probability from their logits or log-probs: softmax([a, b])[0]."""
    return 1.0 / (1.0 + math.exp(b - a))


def _api_key(env_name: str | None, file: str | None) -> str | None:
    if file:
        path = Path(file).expanduser()
        if not path.is_file():
            raise ScoreError(f"--api-key-file {path}: no such file")
        return path.read_text(encoding="utf-8").strip() or None
    return os.environ.get(env_name or "", "").strip() or None


class _Backend:
    """Token ids + the scoring calls of one backend, behind one interface."""

    def __init__(self, spec: MethodSpec, backend: str, urls, served_name, api_key, timeout, concurrency, token=None):
        from stepdpo.reward.hf import HFScorer

        self.spec = spec
        self.backend = backend
        if backend == "hf":
            self.hf = HFScorer(spec, token=token)
            self.tokenizer = self.hf.tokenizer
            return
        from transformers import AutoConfig, AutoTokenizer

        from stepdpo.reward.scorer import judge_token_ids, prm_token_ids
        from stepdpo.reward.vllm import VLLMClient

        # Only the tokenizer is loaded locally: prompts are sent as token ids, so both backends see
        # exactly the same input.
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model, token=token)
        if getattr(AutoConfig.from_pretrained(spec.model, token=token), "is_encoder_decoder", False):
            raise ScoreError(f"{spec.model}: vLLM does not serve encoder-decoder judges; use --backend hf")
        if spec.method == "judge":
            self.yes_id, self.no_id = judge_token_ids(self.tokenizer, spec.model)
        else:
            self.tag_id, self.good_id, self.bad_id = prm_token_ids(self.tokenizer, spec)
        self.client = VLLMClient(urls, served_name or spec.model, api_key, read_timeout=timeout,
                                 concurrency=concurrency)
        self._no_pooling: set[str] = set()  # servers that answered /pooling with a client error

    # judge ---------------------------------------------------------------
    def judge_batch(self, url, subs: list[Substep]) -> list[float]:
        if self.backend == "hf":
            return self.hf.score_judge(subs)
        from stepdpo.reward.scorer import judge_prompt

        prompts = []
        for s in subs:
            ids = self.tokenizer(judge_prompt(s))["input_ids"]
            prompts += [ids + [self.yes_id], ids + [self.no_id]]
        lp = self.client.last_token_logprobs(url, prompts)
        # P(yes)/(P(yes)+P(no)) = sigmoid(log P(yes) - log P(no)), as the hf backend computes it
        return [_prob_first(lp[2 * i], lp[2 * i + 1]) for i in range(len(subs))]

    # prm -----------------------------------------------------------------
    def prm_batch(self, url, solutions: list[tuple[str, list[str]]]) -> list[list[float]]:
        if self.backend == "hf":
            return self.hf.score_prm(solutions)
        from stepdpo.reward.scorer import prm_text

        prompts = [self.tokenizer(prm_text(p, s, self.spec.step_tag))["input_ids"] for p, s in solutions]
        if url in self._no_pooling:
            return self._prm_by_logprobs(url, prompts, solutions)
        try:
            pooled = self.client.step_pooling(url, prompts)
        except BadRequest as e:
            if self.spec.head == "classifier":
                raise ScoreError(f"{url} is not serving the PRM with STEP pooling ({e}); start it with "
                                 "launch/serve_reward.sh --method prm --prm-head classifier") from None
            logger.warning("%s does not serve STEP pooling (%s); scoring every step tag through prompt "
                           "logprobs instead (same numbers; vLLM's prefix cache keeps it cheap). For one pass per "
                           "solution start the server with launch/serve_reward.sh --method prm", url, str(e)[:120])
            self._no_pooling.add(url)
            return self._prm_by_logprobs(url, prompts, solutions)
        out = []
        for rows, (_, steps) in zip(pooled, solutions):
            if len(rows) != len(steps):
                raise ScoreError(f"{url}: {len(rows)} step scores for {len(steps)} steps")
            # lm head: rows are (good, bad) token logits; classifier head: (bad, good) label logits
            good, bad = (1, 0) if self.spec.head == "classifier" else (0, 1)
            out.append([_prob_first(r[good], r[bad]) for r in rows])
        return out

    def _prm_by_logprobs(self, url, prompts, solutions) -> list[list[float]]:
        """Fallback for a plain generative server: for each step tag, the prefix up to the tag followed by
        the good token, and by the bad one; P(good) = sigmoid(log p(good) - log p(bad)), which is exactly
        the 2-way softmax the hf backend computes at the tag."""
        queries, shape = [], []
        for ids, (_, steps) in zip(prompts, solutions):
            tags = [i for i, t in enumerate(ids) if t == self.tag_id]
            if len(tags) != len(steps):
                raise ScoreError(f"{len(tags)} step tags for {len(steps)} steps: a step contains the tag text")
            for pos in tags:
                queries += [ids[: pos + 1] + [self.good_id], ids[: pos + 1] + [self.bad_id]]
            shape.append(len(tags))
        logps = []
        for i in range(0, len(queries), 256):  # bounded request size
            logps += self.client.last_token_logprobs(url, queries[i : i + 256])
        out, k = [], 0
        for n in shape:
            out.append([_prob_first(logps[k + 2 * j], logps[k + 2 * j + 1]) for j in range(n)])
            k += 2 * n
        return out

    def map(self, batches, fn, on_result):
        if self.backend == "hf":
            return [on_result(i, fn(None, b)) for i, b in enumerate(batches)]
        return self.client.map_batches(batches, fn, on_result)


def score_pairs(pairs: list[dict], spec: MethodSpec, cache: ScoreCache, backend: _Backend, *, batch_size: int = 32,
                progress: bool = True) -> dict:
    """Fill `chosen_step_rewards`/`rejected_step_rewards` in place; returns counts."""
    per_pair = [substeps_of_pair(p) for p in pairs]
    needed = {}
    for sides in per_pair:
        for subs in sides.values():
            for s in subs:
                needed.setdefault(spec.key(s), s)
    missing = {k: s for k, s in needed.items() if k not in cache}
    counts = {"substeps": len(needed), "cache_hits": len(needed) - len(missing), "scored": 0, "forward_units": 0}
    bar = tqdm(total=len(missing), desc=f"score {spec.method}", unit="substep", disable=not progress)
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
        backend.map(batches, backend.judge_batch, lambda i, res: record(list(zip(batches[i], res))))
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

        backend.map(batches, backend.prm_batch, on_prm)
    bar.close()

    for pair, sides in zip(pairs, per_pair):
        for side, subs in sides.items():
            values = [cache.get(spec.key(s)) for s in subs]
            if any(v is None for v in values):  # never continue with a missing reward
                raise ScoreError(f"pair {pair['id']}: a {side} step has no reward after scoring")
            pair[f"{side}_step_rewards"] = values
    return counts


def run_score(a) -> dict:
    from stepdpo.auth import resolve_token
    from stepdpo.reward.vllm import VLLMError

    if a.backend == "vllm" and not a.url:
        raise ScoreError("--backend vllm needs at least one --url (launch/serve_reward.sh prints it)")
    spec = MethodSpec(model=a.model, method=a.method, good_token=a.prm_good_token,
                      bad_token=a.prm_bad_token, step_tag=a.prm_step_tag or DEFAULT_STEP_TAG,
                      head=getattr(a, "prm_head", "lm"))
    pairs = read_pairs(a.pairs)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    token = resolve_token(getattr(a, "hf_token_file", None)).value
    backend = _Backend(spec, a.backend, a.url, a.served_model_name, _api_key(a.api_key_env, a.api_key_file),
                       a.timeout, a.concurrency, token=token)
    if a.backend == "vllm":
        try:
            backend.client.wait_healthy(a.health_timeout)
        except VLLMError as e:
            raise ScoreError(str(e)) from None
    cache = ScoreCache(a.cache or out / "score_cache.jsonl")
    start = time.perf_counter()
    try:
        counts = score_pairs(pairs, spec, cache, backend, batch_size=a.batch_size, progress=not a.no_progress)
    except VLLMError as e:
        raise ScoreError(f"{e} (scores so far are cached in {cache.path}; re-run to resume)") from None
    finally:
        cache.close()
    wall = time.perf_counter() - start
    write_jsonl(out / "pairs.jsonl", pairs)
    report = {
        **counts,
        "failures": 0,
        "wall_seconds": round(wall, 3),
        "substeps_per_second": round(counts["scored"] / wall, 2) if wall > 0 and counts["scored"] else 0.0,
        "model": a.model,
        "method": a.method,
        "backend": a.backend,
        "urls": a.url,
        "reward_accuracy": reward_accuracy(pairs),
        "pairs_file": str(out / "pairs.jsonl"),
    }
    if a.backend == "vllm":
        report["requests_sent"] = backend.client.requests_sent
        report["retries"] = backend.client.retries
    (out / "score_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
