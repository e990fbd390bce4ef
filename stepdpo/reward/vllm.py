"""HTTP client for vLLM's OpenAI-compatible server, built for batch reward scoring.

Knobs, and why each exists:
* connect_timeout (5 s): an unreachable or wrong URL fails within seconds instead of hanging.
* read_timeout (120 s): a batch of long prompts on a busy server may take a while; a hung route must
  not hang the run forever.
* max_retries (5) with exponential backoff and full jitter: only 429 (rate limited), 5xx (server
  overloaded or restarting) and timeouts are retried; those are transient. Other 4xx mean the request
  is wrong and retrying cannot help. Connection refused is not retried: the server is not there.
* concurrency (per URL): a semaphore per URL bounds the requests in flight to each server, so the
  server's queue, not ours, holds the work, and a slow replica never gets more than its share.
* Several URLs: batches are sharded round-robin across replicas; results are reassembled in order.
  A batch whose URL fails (unreachable, or its retry budget spent) is sent to another URL; a URL that
  fails `fail_after` times in a row is taken out of rotation, and `url_stats` says so for the report.
* readmit_poll (10 s): a URL out of rotation because its server went away (connection refused, or still no
  connection within connect_timeout when its retries are spent: a host powered off drops packets instead of
  refusing) is probed on `/health` that often while the other URLs carry the run, and takes batches again once
  it answers: a replica restarted under a long `mine` is back in use within seconds, not only in the next run.
  A URL out for failing answers (5xx past the retry budget) stays out, as it is not waited for either. A probe
  runs in the thread of a batch, so a silent host (a node powered off drops packets instead of refusing;
  a hung server accepts and never answers) would cost that batch a timeout every poll: a probe that times
  out doubles that URL's interval, up to 8 times readmit_poll, and waits at most connect_timeout for the
  answer (a live server's `/health` answers at once).
* health wait: `/health` is polled until 200 or a deadline at start, so a starting server is waited
  for and a dead one is reported by URL.
* reconnect_timeout: when every URL has gone away mid-run (connection refused or never made: a server killed,
  crashed or requeued, a node powered off), `/health` is polled for that long before giving up, and the run
  continues once one answers. A restarted server costs a pause, not a re-run. URLs that answer but fail (HTTP
  5xx until the retry budget is spent) are not waited for: waiting cannot tell when that ends. 0 gives up at
  once.
The API key comes from an env var or a file; it is sent as a header and never logged or put in argv.
"""

from __future__ import annotations

import logging
import math
import random
import re
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed

import requests

logger = logging.getLogger("stepdpo.vllm")


_CREDENTIALS = re.compile(r"(\w+://)[^/@\s]+@")


def redact_url(text: str) -> str:
    """`http://user:pass@host` -> `http://***@host`, in a URL or in any text that holds one."""
    return _CREDENTIALS.sub(r"\1***@", str(text))


class VLLMError(RuntimeError):
    """Base class; every message names the URL (credentials in it redacted)."""

    def __init__(self, message: str):
        super().__init__(redact_url(message))


class ServerUnreachable(VLLMError):
    pass


class RetryBudgetExhausted(VLLMError):
    pass


class BadRequest(VLLMError):
    pass


class MalformedResponse(VLLMError):
    pass


RETRY_STATUS = {429, 500, 502, 503, 504}

# The stages' default wait for a server that went away mid-run, as TRL waits for its vLLM server at start
# (`vllm_server_timeout`, 240 s): long enough for a CPU server's restart here (45-80 s) or a 7B one's on a GPU.
RECONNECT_TIMEOUT = 240.0
RECONNECT_HELP = ("vLLM: seconds to wait for a server that went away mid-run (killed, crashed, requeued) to answer "
                  "/health again; the run then continues. 0 stops at once (what arrived is cached either way: "
                  "re-running the same command resumes).")


class VLLMClient:
    def __init__(self, urls: list[str], model: str, api_key: str | None = None, *, connect_timeout: float = 5.0,
                 read_timeout: float = 120.0, max_retries: int = 5, backoff: float = 0.5, max_backoff: float = 8.0,
                 concurrency: int = 4, fail_after: int = 2, reconnect_timeout: float = 0.0,
                 reconnect_poll: float = 2.0, readmit_poll: float = 10.0):
        if not urls:
            raise ValueError("at least one --url is needed for --backend vllm")
        self.urls = [u.rstrip("/") for u in urls]
        self.model = model
        self.timeout = (connect_timeout, read_timeout)
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.concurrency = concurrency
        self.fail_after = fail_after
        self.reconnect_timeout = reconnect_timeout
        self.reconnect_poll = reconnect_poll
        self.readmit_poll = readmit_poll
        self._next_probe: dict[str, float] = {}  # when a URL out of rotation is next probed for readmission
        self._probe_every: dict[str, float] = {}  # a silent URL's grown probe interval (default readmit_poll)
        self._back_at: dict[str, float] = {}  # when a URL last came back into rotation
        self._lock = threading.Lock()
        self._reconnect_lock = threading.Lock()  # one thread polls /health in an outage; the others queue on it
        self._outage_since: float | None = None  # when the outage being waited out began
        self._outage_told = False
        self._recovered_at: float | None = None  # when the last outage ended
        self._cancelled = threading.Event()
        self.reconnects = 0
        self.waited_s = 0.0
        self._slots = {u: threading.BoundedSemaphore(concurrency) for u in self.urls}
        self._failures_in_a_row: dict[str, int] = defaultdict(int)
        self._last_error: dict[str, VLLMError] = {}
        self.dead: set[str] = set()
        self.url_stats = {u: {"batches": 0, "failures": 0, "failed_over": 0, "in_rotation": True, "readmitted": 0}
                          for u in self.urls}
        self.max_in_flight = {u: 0 for u in self.urls}
        self._in_flight = {u: 0 for u in self.urls}
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session = requests.Session()
        self.requests_sent = 0
        self.retries = 0

    def __repr__(self) -> str:  # no API key or URL credentials in reprs or tracebacks
        return f"VLLMClient(urls={[redact_url(u) for u in self.urls]}, model={self.model!r})"

    # ------------------------------------------------------------------ health
    def wait_healthy(self, deadline_s: float = 300.0, poll_s: float = 1.0) -> None:
        for url in self.urls:
            end = time.monotonic() + deadline_s
            while True:
                last = self._health_problem(url)
                if last is None:
                    break
                if time.monotonic() >= end:
                    raise ServerUnreachable(
                        f"{url}: not healthy after {deadline_s:.0f} s (last: {last}); is the vLLM server running "
                        "there? (launch/serve_reward.sh prints its URL when ready; --health-timeout waits longer "
                        "for a server still loading its model)"
                    )
                time.sleep(poll_s)

    def _health_problem(self, url: str, read_timeout: float = 10.0) -> str | None:
        """One `/health` probe: None when the server answers 200, else what went wrong (for messages)."""
        try:
            r = self._session.get(f"{url}/health", timeout=(self.timeout[0], read_timeout))
        except requests.RequestException as e:
            return type(e).__name__
        return None if r.status_code == 200 else f"HTTP {r.status_code}"

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
            except requests.RequestException as e:  # e.g. ChunkedEncodingError: the server died mid-answer
                raise ServerUnreachable(f"{url}: connection broke ({type(e).__name__}); is the server up?") from None
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
                if problem == "connect timeout":
                    # No connection at all, to the end: the host is gone (powered off, dropping packets), not
                    # failing. As a lost server it is probed for readmission and waited for in an outage, like
                    # one that refuses; as a spent budget it would be neither, even once it is back.
                    raise ServerUnreachable(f"{url}: no connection within {self.timeout[0]:g} s, {attempt + 1} "
                                            "times (connect timeout); is the host up?")
                raise RetryBudgetExhausted(f"{url}{path}: gave up after {attempt + 1} attempts (last: {problem})")
            # Full jitter: many clients retrying together do not hit the server in lockstep.
            time.sleep(random.uniform(0, min(self.max_backoff, self.backoff * 2**attempt)))
            attempt += 1
            self.retries += 1

    # ------------------------------------------------------------------ batched calls
    def map_batches(self, batches: list, fn, on_result=None) -> list:
        """Run fn(url, batch) for every batch, sharded over URLs, at most `concurrency` in flight per URL;
        ordered results. `on_result(i, result)` is called as each batch finishes (to persist scores as
        they arrive). A batch whose URL fails goes to another URL (see the module docstring)."""
        results = [None] * len(batches)
        self._outage_since = self._recovered_at = None  # each call gets the whole reconnect timeout for an outage
        self._cancelled.clear()
        workers = max(1, self.concurrency * len(self.urls))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(self._run_one, i, fn, b): i for i, b in enumerate(batches)}
            try:
                for fut in as_completed(futures):
                    i = futures[fut]
                    results[i] = fut.result()
                    if on_result:
                        on_result(i, results[i])
            except BaseException:  # one batch failed for good, or Ctrl-C: stop, and stop waiting for servers
                self._cancelled.set()
                for f in futures:
                    f.cancel()
                raise
        return results

    def _untried(self, u: str, tried: dict[str, float]) -> bool:
        # A URL this batch failed on counts as untried again once it came back into rotation after that failure.
        return u not in tried or self._back_at.get(u, -math.inf) > tried[u]

    def _pick(self, i: int, tried: dict[str, float]) -> str | None:
        with self._lock:
            live = [u for u in self.urls if u not in self.dead and self._untried(u, tried)]
            if not live:
                return None
            preferred = self.urls[i % len(self.urls)]
            return preferred if preferred in live else min(live, key=lambda u: self._in_flight[u])

    def _run_one(self, i: int, fn, batch):
        tried: dict[str, float] = {}  # URL -> when this batch failed on it
        failed_at = time.monotonic()  # of this batch's last failure (only read once it has failed)
        while True:
            self._readmit_returned()
            url = self._pick(i, tried)
            if url is None:
                if not self._await_return(failed_at):  # what came back counts as untried (`_back_at`)
                    raise self._none_left()
                continue
            with self._slots[url]:
                with self._lock:
                    self._in_flight[url] += 1
                    self.max_in_flight[url] = max(self.max_in_flight[url], self._in_flight[url])
                try:
                    result = fn(url, batch)
                except (ServerUnreachable, RetryBudgetExhausted) as e:
                    failed_at = tried[url] = time.monotonic()
                    self._failed(url, e, tried)
                    continue
                finally:
                    with self._lock:
                        self._in_flight[url] -= 1
            with self._lock:
                self._failures_in_a_row[url] = 0
                self.url_stats[url]["batches"] += 1
            return result

    def _readmit_returned(self) -> None:
        """Put back in rotation the URLs that went away (connection refused or never made) and answer `/health`
        again; each is probed at most once per `readmit_poll` seconds (more rarely once its probes time out), by
        whichever batch comes first, outside the lock."""
        now = time.monotonic()
        with self._lock:
            due = [u for u in self.urls if u in self.dead and isinstance(self._last_error.get(u), ServerUnreachable)
                   and self._next_probe.get(u, 0.0) <= now]
            for u in due:
                self._next_probe[u] = math.inf  # one probe at a time: the others would queue behind a slow one
        for u in due:
            problem = self._health_problem(u, read_timeout=self.timeout[0])
            with self._lock:
                if problem is None:
                    if u in self.dead:
                        self._back_in_rotation(u, time.monotonic())
                        self.url_stats[u]["readmitted"] += 1
                        logger.warning("%s answers /health again; back in rotation", redact_url(u))
                elif problem in ("ConnectTimeout", "ReadTimeout"):  # silent, not refused: back off
                    self._probe_every[u] = min(2 * self._probe_every.get(u, self.readmit_poll), 8 * self.readmit_poll)
                self._next_probe[u] = time.monotonic() + self._probe_every.get(u, self.readmit_poll)

    def _back_in_rotation(self, u: str, now: float) -> None:
        """(Under the lock.) `u` answers again: it takes batches, also from batches that failed on it before."""
        self._back_at[u] = now
        self.dead.discard(u)
        self._failures_in_a_row[u] = 0
        self.url_stats[u]["in_rotation"] = True

    def _await_return(self, failed_at: float) -> set[str]:
        """Called when no URL is left for a batch (its last failure at `failed_at`): poll `/health` of the URLs
        that went away (connection refused) until one answers or `reconnect_timeout` has passed since the outage
        began; returns the URLs back in rotation (empty: give up). The deadline is the outage's, not each
        batch's: batches that queue behind the polling thread do not each wait a full timeout again, and a batch
        that failed in an outage that is already over finds its server back without counting a second one."""
        if self.reconnect_timeout <= 0:
            return set()
        with self._lock:
            gone = [u for u in self.urls if isinstance(self._last_error.get(u), ServerUnreachable)]
        if not gone:
            return set()
        with self._reconnect_lock:
            with self._lock:
                if self._outage_since is None and (self._recovered_at is None or failed_at > self._recovered_at):
                    self._outage_since, self._outage_told = failed_at, False
            while True:
                back = {u for u in gone if self._health_problem(u) is None}
                now = time.monotonic()
                with self._lock:
                    if back:
                        for u in back:
                            self._back_in_rotation(u, now)
                        if self._outage_since is not None:  # the batch that sees the outage end says so, once
                            waited = now - self._outage_since
                            self._outage_since, self._recovered_at = None, now
                            self.reconnects += 1
                            self.waited_s += waited
                            names = ", ".join(map(redact_url, sorted(back)))
                            if self._outage_told:
                                logger.warning("%s answers again after %.0f s; continuing", names, waited)
                            else:
                                logger.warning("lost the connection to %s (%s); it answers /health again; "
                                               "continuing", names, "; ".join(str(self._last_error[u]) for u in back))
                        return back
                    if self._outage_since is None:  # down again after a recovery this batch did not see
                        self._outage_since, self._outage_told = now, False
                    if not self._outage_told:
                        self._outage_told = True
                        errors = "; ".join(str(self._last_error[u]) for u in gone)
                        logger.warning("lost the vLLM server (%s). Waiting up to %.0f s for it to answer /health "
                                       "again (--reconnect-timeout; 0 gives up at once). What has arrived is "
                                       "cached: stopping now and re-running the same command also resumes.",
                                       errors, self.reconnect_timeout)
                    if now >= self._outage_since + self.reconnect_timeout:
                        return set()
                if self._cancelled.wait(self.reconnect_poll):
                    return set()

    def _none_left(self) -> VLLMError:
        """The error when no URL is left for a batch. It may be that this batch tried none of them: with
        several batches in flight, other batches can take every URL out of rotation first. So the message is
        built from every URL's last error, not from this batch's own. Every URL has one: a URL is left out
        only once this batch saw it fail or `_failed` took it out of rotation, and `_failed` records first.
        (How to resume is the caller's to say: it knows what it cached.)"""
        with self._lock:
            errors = [self._last_error[u] for u in self.urls]
        kind = RetryBudgetExhausted if any(isinstance(e, RetryBudgetExhausted) for e in errors) else ServerUnreachable
        waited = (f", and none answered /health again within {self.reconnect_timeout:.0f} s (--reconnect-timeout)"
                  if self.reconnect_timeout > 0 and kind is ServerUnreachable else "")
        return kind(f"every vLLM URL failed ({'; '.join(map(str, errors))}){waited}. Check that the servers are "
                    "up (launch/serve_reward.sh prints each URL when ready)")

    def _failed(self, url: str, error: VLLMError, tried: dict[str, float]) -> None:
        with self._lock:
            self._last_error[url] = error
            others = any(self._untried(u, tried) and u not in self.dead for u in self.urls)
            stats = self.url_stats[url]
            stats["failures"] += 1
            self._failures_in_a_row[url] += 1
            if others:
                stats["failed_over"] += 1
            if self._failures_in_a_row[url] >= self.fail_after and url not in self.dead and len(self.urls) > 1:
                self.dead.add(url)
                # every departure starts at readmit_poll, however the URL came back last time (a probe, or the
                # outage wait, which does not probe at this interval)
                self._probe_every.pop(url, None)
                self._next_probe[url] = time.monotonic() + self.readmit_poll
                stats["in_rotation"] = False
                logger.warning("%s failed %d times in a row (%s); its batches go to the other URLs", redact_url(url),
                               self._failures_in_a_row[url], str(error)[:160])

    def report(self) -> dict:
        """What the run's report says about the servers (scoring, generation and mining alike)."""
        return {"requests_sent": self.requests_sent, "retries": self.retries,
                "per_url": {redact_url(u): v for u, v in self.url_stats.items()},
                "max_in_flight_per_url": {redact_url(u): v for u, v in self.max_in_flight.items()},
                "failed_over_batches": sum(s["failed_over"] for s in self.url_stats.values()),
                "urls_out_of_rotation": sorted(redact_url(u) for u in self.dead),
                "reconnects": self.reconnects, "waited_for_servers_s": round(self.waited_s, 1)}

    def last_token_logprobs(self, url: str, prompts: list[list[int]]) -> list[float]:
        """log P(last token | the tokens before it) for each token-id prompt (echo, no generation)."""
        payload = {"model": self.model, "prompt": prompts, "max_tokens": 0, "echo": True, "prompt_logprobs": 0,
                   "temperature": 0.0}
        data = self.post(url, "/v1/completions", payload)
        try:
            choices = sorted(data["choices"], key=lambda c: c["index"])
            if len(choices) != len(prompts):
                raise MalformedResponse(f"{url}: {len(choices)} choices for {len(prompts)} prompts")
            return [_logprob(url, c["prompt_logprobs"][-1][str(prompt[-1])]["logprob"])
                    for c, prompt in zip(choices, prompts)]
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise MalformedResponse(f"{url}/v1/completions: unexpected answer shape ({type(e).__name__}: {e})") from None

    def complete(self, url: str, prompts: list[list[int]], *, n: int = 1, max_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: list[str] | None = None) -> list[list[dict]]:
        """Generation: for each token-id prompt, `n` samples {text, token_ids, finish_reason}. vLLM numbers the
        choices prompt by prompt (index = prompt * n + sample)."""
        payload = {"model": self.model, "prompt": prompts, "n": n, "max_tokens": max_tokens,
                   "temperature": temperature, "top_p": top_p, "return_token_ids": True,
                   # always sent: a server started with --generation-config auto (vLLM's default) otherwise takes
                   # the model's generation_config.json values; 0 is the whole vocabulary
                   "top_k": top_k}
        if seed is not None:
            payload["seed"] = seed
        if stop:
            payload["stop"] = list(stop)
        data = self.post(url, "/v1/completions", payload)
        try:
            choices = sorted(data["choices"], key=lambda c: c["index"])
            if len(choices) != len(prompts) * n:
                raise MalformedResponse(f"{url}: {len(choices)} choices for {len(prompts)} prompts x n={n}")
            out = []
            for i in range(len(prompts)):
                row = []
                for c in choices[i * n:(i + 1) * n]:
                    if not isinstance(c["text"], str) or not isinstance(c.get("token_ids"), list):
                        raise TypeError("text/token_ids")
                    row.append({"text": c["text"], "token_ids": [int(t) for t in c["token_ids"]],
                                "finish_reason": c.get("finish_reason")})
                out.append(row)
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
            return [[[_finite(url, "/pooling", v) for v in r] for r in d["data"]] for d in rows]
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise MalformedResponse(f"{url}/pooling: unexpected answer shape ({type(e).__name__}: {e})") from None



def _finite(url: str, route: str, value) -> float:
    """A number from the server: a real, finite one, or a typed error naming the URL (never a NaN that
    would end up in a cache or a reward)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MalformedResponse(f"{url}{route}: the server returned {value!r} where a finite number belongs; "
                                "check the served model (dtype overflow?) and re-run: nothing of it was cached")
    return float(value)


def _logprob(url: str, value) -> float:
    value = _finite(url, "/v1/completions", value)
    if value > 1e-4:  # a log-probability is <= 0 (allow float rounding)
        raise MalformedResponse(f"{url}/v1/completions: log-probability {value} > 0; this is not a log-probability")
    return value


class VLLMBackend:
    """Rewards from vLLM servers (a RewardBackend; see stepdpo.reward.scorer).

    Only the tokenizer is loaded here: prompts are sent as token ids, so both backends see exactly the
    same input. judge: prompt logprobs (`echo`, `max_tokens: 0`) of the prompt followed by the yes and
    the no token. prm: the server's STEP token pooling, one pass per solution; a plain generative server
    falls back to per-tag prompt logprobs (same numbers, several requests per solution).
    """

    def __init__(self, spec, tokenizer, urls: list[str], served_name: str | None, api_key: str | None, *,
                 read_timeout: float = 120.0, concurrency: int = 4, reconnect_timeout: float = 0.0):
        from stepdpo.reward.scorer import ScoreError, judge_token_ids, prm_token_ids

        self.spec = spec
        self.tokenizer = tokenizer
        if spec.method == "judge":
            self.yes_id, self.no_id = judge_token_ids(tokenizer, spec.model)
        else:
            self.tag_id, self.good_id, self.bad_id = prm_token_ids(tokenizer, spec)
        self.client = VLLMClient(urls, served_name or spec.model, api_key, read_timeout=read_timeout,
                                 concurrency=concurrency, reconnect_timeout=reconnect_timeout)
        self._no_pooling: set[str] = set()  # servers that answered /pooling with a client error
        self._error = ScoreError

    def wait_healthy(self, deadline_s: float) -> None:
        self.client.wait_healthy(deadline_s)

    def run(self, method: str, batches: list, on_result) -> None:
        self.client.map_batches(batches, self.judge if method == "judge" else self.prm, on_result)

    def report(self) -> dict:
        return self.client.report()

    # judge ---------------------------------------------------------------
    def judge(self, url: str, subs) -> list[float]:
        from stepdpo.reward.scorer import judge_prompt, prob_first

        prompts = []
        style = self.spec.style
        for s in subs:
            ids = self.tokenizer(judge_prompt(s, style), add_special_tokens=style.add_special_tokens)["input_ids"]
            prompts += [ids + [self.yes_id], ids + [self.no_id]]
        lp = self.client.last_token_logprobs(url, prompts)
        return [prob_first(lp[2 * i], lp[2 * i + 1]) for i in range(len(subs))]

    # prm -----------------------------------------------------------------
    def prm(self, url: str, solutions: list[tuple[str, list[str]]]) -> list[list[float]]:
        from stepdpo.reward.scorer import prm_text, prob_first

        style = self.spec.style
        prompts = [self.tokenizer(prm_text(p, s, self.spec.step_tag, style), add_special_tokens=style.add_special_tokens)
                   ["input_ids"] for p, s in solutions]
        if url in self._no_pooling:
            return self._prm_by_logprobs(url, prompts, solutions)
        try:
            pooled = self.client.step_pooling(url, prompts)
        except BadRequest as e:
            if self.spec.head == "classifier":
                raise self._error(f"{url} is not serving the PRM with STEP pooling ({e}); start it with "
                                  "launch/serve_reward.sh --method prm --prm-head classifier") from None
            logger.warning("%s does not serve STEP pooling (%s); scoring every step tag through prompt "
                           "logprobs instead (same numbers; vLLM's prefix cache keeps it cheap). For one pass per "
                           "solution start the server with launch/serve_reward.sh --method prm", redact_url(url),
                           str(e)[:120])
            self._no_pooling.add(url)
            return self._prm_by_logprobs(url, prompts, solutions)
        out = []
        # lm head: rows are (good, bad) token logits; classifier head: (bad, good) label logits
        good, bad = (1, 0) if self.spec.head == "classifier" else (0, 1)
        for rows, (_, steps) in zip(pooled, solutions):
            if len(rows) != len(steps):
                raise MalformedResponse(f"{url}/pooling: {len(rows)} step scores for {len(steps)} steps")
            if any(len(r) <= max(good, bad) for r in rows):
                raise MalformedResponse(f"{url}/pooling: expected 2 values per step tag")
            out.append([prob_first(r[good], r[bad]) for r in rows])
        return out

    def _prm_by_logprobs(self, url, prompts, solutions) -> list[list[float]]:
        """Fallback for a plain generative server: for each step tag, the prefix up to the tag followed by
        the good token, and by the bad one; P(good) = sigmoid(log p(good) - log p(bad)), which is exactly
        the 2-way softmax the hf backend computes at the tag."""
        from stepdpo.reward.scorer import prob_first

        queries, shape = [], []
        for ids, (_, steps) in zip(prompts, solutions):
            tags = [i for i, t in enumerate(ids) if t == self.tag_id]
            if len(tags) != len(steps):
                raise self._error(f"{len(tags)} step tags for {len(steps)} steps: a step contains the tag text")
            for pos in tags:
                queries += [ids[: pos + 1] + [self.good_id], ids[: pos + 1] + [self.bad_id]]
            shape.append(len(tags))
        logps = []
        for i in range(0, len(queries), 256):  # bounded request size
            logps += self.client.last_token_logprobs(url, queries[i : i + 256])
        out, k = [], 0
        for n in shape:
            out.append([prob_first(logps[k + 2 * j], logps[k + 2 * j + 1]) for j in range(n)])
            k += 2 * n
        return out
