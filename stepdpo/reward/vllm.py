"""HTTP client for vLLM's OpenAI-compatible server, built for batch reward scoring.

Knobs, and why each exists:
* connect_timeout (5 s): an unreachable or wrong URL fails within seconds instead of hanging.
* read_timeout (120 s): a batch of long prompts on a busy server may take a while; a hung route must
  not hang the run forever.
* max_retries (5) with exponential backoff and full jitter: only 429 (rate limited), 5xx (server
  overloaded or restarting) and timeouts are retried; those are transient. Other 4xx mean the request
  is wrong and retrying cannot help. Connection refused is not retried: the server is not there.
* concurrency (per URL): bounds requests in flight so the server's queue, not ours, holds the work.
* Several URLs: batches are sharded round-robin across replicas; results are reassembled in order.
* health wait: `/health` is polled until 200 or a deadline at start, so a starting server is waited
  for and a dead one is reported by URL.
The API key comes from an env var or a file; it is sent as a header and never logged or put in argv.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import requests


class VLLMError(RuntimeError):
    """Base class; every message names the URL."""


class ServerUnreachable(VLLMError):
    pass


class RetryBudgetExhausted(VLLMError):
    pass


class BadRequest(VLLMError):
    pass


class MalformedResponse(VLLMError):
    pass


RETRY_STATUS = {429, 500, 502, 503, 504}


class VLLMClient:
    def __init__(self, urls: list[str], model: str, api_key: str | None = None, *, connect_timeout: float = 5.0,
                 read_timeout: float = 120.0, max_retries: int = 5, backoff: float = 0.5, max_backoff: float = 8.0,
                 concurrency: int = 4):
        if not urls:
            raise ValueError("at least one --url is needed for --backend vllm")
        self.urls = [u.rstrip("/") for u in urls]
        self.model = model
        self.timeout = (connect_timeout, read_timeout)
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.concurrency = concurrency
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session = requests.Session()
        self.requests_sent = 0
        self.retries = 0

    def __repr__(self) -> str:  # no API key in reprs or tracebacks
        return f"VLLMClient(urls={self.urls}, model={self.model!r})"

    # ------------------------------------------------------------------ health
    def wait_healthy(self, deadline_s: float = 300.0, poll_s: float = 1.0) -> None:
        for url in self.urls:
            end = time.monotonic() + deadline_s
            last = "no answer"
            while True:
                try:
                    r = self._session.get(f"{url}/health", timeout=(self.timeout[0], 10))
                    if r.status_code == 200:
                        break
                    last = f"HTTP {r.status_code}"
                except requests.RequestException as e:
                    last = type(e).__name__
                if time.monotonic() >= end:
                    raise ServerUnreachable(
                        f"{url}: not healthy after {deadline_s:.0f} s (last: {last}); is the vLLM server running "
                        "there? (launch/serve_reward.sh prints its URL when ready; --health-timeout waits longer "
                        "for a server still loading its model)"
                    )
                time.sleep(poll_s)

    # ------------------------------------------------------------------ one request, with retries
    def post(self, url: str, path: str, payload: dict) -> dict:
        attempt = 0
        while True:
            try:
                self.requests_sent += 1
                r = self._session.post(f"{url}{path}", json=payload, headers=self._headers, timeout=self.timeout)
            except requests.ConnectionError as e:
                if isinstance(e, requests.ConnectTimeout):
                    problem = "connect timeout"
                else:
                    raise ServerUnreachable(f"{url}: connection failed ({type(e).__name__}); is the server up?") from None
            except requests.Timeout:
                problem = f"no answer within {self.timeout[1]:.0f} s"
            else:
                if r.status_code == 200:
                    try:
                        return r.json()
                    except ValueError:
                        raise MalformedResponse(f"{url}{path}: the answer is not JSON: {r.text[:200]!r}") from None
                if r.status_code not in RETRY_STATUS:
                    raise BadRequest(f"{url}{path}: HTTP {r.status_code}: {r.text[:300]}")
                problem = f"HTTP {r.status_code}"
            if attempt >= self.max_retries:
                raise RetryBudgetExhausted(f"{url}{path}: gave up after {attempt + 1} attempts (last: {problem})")
            # Full jitter: many clients retrying together do not hit the server in lockstep.
            time.sleep(random.uniform(0, min(self.max_backoff, self.backoff * 2**attempt)))
            attempt += 1
            self.retries += 1

    # ------------------------------------------------------------------ batched calls
    def map_batches(self, batches: list, fn, on_result=None) -> list:
        """Run fn(url, batch) for every batch, sharded over URLs with bounded concurrency; ordered results.

        `on_result(i, result)` is called as each batch finishes (to persist scores as they arrive).
        """
        results = [None] * len(batches)
        workers = max(1, self.concurrency * len(self.urls))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(fn, self.urls[i % len(self.urls)], b): i for i, b in enumerate(batches)}
            try:
                for fut in _as_completed(futures):
                    i = futures[fut]
                    results[i] = fut.result()
                    if on_result:
                        on_result(i, results[i])
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return results

    def last_token_logprobs(self, url: str, prompts: list[list[int]]) -> list[float]:
        """log P(last token | the tokens before it) for each token-id prompt (echo, no generation)."""
        payload = {"model": self.model, "prompt": prompts, "max_tokens": 0, "echo": True, "prompt_logprobs": 0,
                   "temperature": 0.0}
        data = self.post(url, "/v1/completions", payload)
        try:
            choices = sorted(data["choices"], key=lambda c: c["index"])
            if len(choices) != len(prompts):
                raise MalformedResponse(f"{url}: {len(choices)} choices for {len(prompts)} prompts")
            out = []
            for c, prompt in zip(choices, prompts):
                entry = c["prompt_logprobs"][-1]
                out.append(float(entry[str(prompt[-1])]["logprob"]))
            return out
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise MalformedResponse(f"{url}/v1/completions: unexpected answer shape ({type(e).__name__}: {e})") from None

    def step_pooling(self, url: str, prompts: list[list[int]]) -> list[list[list[float]]]:
        """Per prompt, the raw 2-way logits at each step tag.

        The server runs the PRM with STEP token pooling (launch/serve_reward.sh --method prm sets it up):
        either a 2-way head built from the LM-head rows of the good/bad tokens (math-shepherd), or the
        model's own 2-label token-classification head (Qwen2.5-Math-PRM style). No activation, so the
        numbers are the logits transformers computes.
        """
        payload = {"model": self.model, "input": prompts, "task": "token_classify", "use_activation": False}
        data = self.post(url, "/pooling", payload)
        try:
            rows = sorted(data["data"], key=lambda d: d["index"])
            if len(rows) != len(prompts):
                raise MalformedResponse(f"{url}: {len(rows)} results for {len(prompts)} inputs")
            return [[list(map(float, r)) for r in d["data"]] for d in rows]
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise MalformedResponse(f"{url}/pooling: unexpected answer shape ({type(e).__name__}: {e})") from None


def _as_completed(futures):
    from concurrent.futures import as_completed

    return as_completed(futures)
