"""`stepdpo generate`: step-formatted solutions from a policy, in-process (`hf`) or from vLLM servers.

Prompts are rendered by the one renderer (`render_prompt`, chat template included) and sent as token ids, so
both backends see exactly the training input; greedy outputs of the two are token-identical. Samples are
appended to OUT/generate_cache.jsonl as each batch arrives (keyed by the model's identity, the sampling
settings, the prompt and, for vLLM, its sampling scheme), so a crash or a killed server loses at most the
batches in flight and a re-run generates only what is missing. OUT/samples.jsonl holds one line per sample:
id, problem_id, problem, sample, text, steps (the shared step splitter), token_ids, finish_reason;
OUT/report.json has samples/s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from stepdpo.console import progress_bar
from stepdpo.data.pairs import DEFAULT_INSTRUCTION, PromptStyle, prompt_style, render_prompt, write_jsonl
from stepdpo.errors import StepdpoError
from stepdpo.generate.problems import Problem, read_problems
from stepdpo.options import REQUIRED, check, check_choice, opt
from stepdpo.reward.vllm import RECONNECT_HELP, RECONNECT_TIMEOUT, VLLMError

logger = logging.getLogger("stepdpo.generate")


class GenerateError(StepdpoError):
    pass


@dataclass
class PolicyOptions:
    """What `generate` and `mine` share: the problems, the policy and where it runs (in this process or on vLLM
    servers), how prompts are rendered (as in training), and the sampling settings with the same defaults. Each
    stage restates `problems`, `model` and `out` with its own help and adds what is its own."""

    problems: str = opt(REQUIRED, "Problem file (MATH, GSM8K, PRM800K or stepdpo layouts).")
    model: str = opt(REQUIRED, "Policy: a model directory or hub id (for vllm: the one the server serves).")
    out: str = opt(REQUIRED, "Output directory.")
    backend: str = opt("hf", "hf: transformers generate in this process; vllm: batched /v1/completions requests to "
                       "the servers at --url.", choices=("hf", "vllm"))
    top_p: float = opt(1.0, "Nucleus sampling.")
    top_k: int = opt(0, "Sample from the K most likely tokens only; 0: the whole vocabulary (vLLM's default). Both "
                     "backends get it: left unset, transformers would fill in its own default of 50 and the two "
                     "backends would sample from different distributions.")
    seed: int = opt(0, "Sampling seed.")
    limit: int | None = opt(None, "Only the first N problems.")
    url: list[str] = opt(factory=list, help="vLLM server URL(s) serving the policy.")
    served_model_name: str | None = opt(None, "Model name the vLLM server knows (default: --model).")
    api_key_env: str = opt("STEPDPO_API_KEY", "Environment variable holding the server API key.")
    api_key_file: str | None = opt(None, "File holding the server API key.")
    concurrency: int = opt(4, "Requests in flight per vLLM server.")
    timeout: float = opt(300.0, "vLLM read timeout in seconds.")
    health_timeout: float = opt(10.0, "Seconds to wait for /health at start.")
    reconnect_timeout: float = opt(RECONNECT_TIMEOUT, RECONNECT_HELP)
    chat_template: str = opt("auto", "As in training: auto, always or never.", choices=("auto", "always", "never"))
    system_prompt: str | None = opt(None, "As in training.")
    instruction: str = opt(DEFAULT_INSTRUCTION, "As in training.")
    dtype: str = opt("auto", "hf: weights dtype (auto: bfloat16 on a GPU that has it, else float32).",
                     choices=("auto", "float32", "bfloat16", "float16"))
    hf_token_file: str | None = opt(None, "File holding a Hugging Face token.")
    progress: bool = opt(True, "Show progress bars.")

    def sampling_settings(self, stop: list[str] | tuple[str, ...] = ()) -> dict:
        """What both backends sample with (temperature and max_new_tokens are each stage's own fields). It is also
        part of every cache key, and so of the sampling seeds: a setting added here keys the samples it changes,
        and the order of the keys must stay as it is, or every cached sample would be drawn again."""
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
                "max_new_tokens": self.max_new_tokens, "stop": list(stop)}

    def _check_policy(self):
        check_choice(self.backend, "backend", ("hf", "vllm"))
        check(self.backend != "vllm" or bool(self.url), "url", "--backend vllm needs at least one --url")
        check(self.top_k >= 0, "top_k", "must be >= 0 (0: the whole vocabulary)")
        check(self.reconnect_timeout >= 0, "reconnect_timeout", "must be >= 0 seconds (0: stop at once when the "
              "servers go away)")


@dataclass
class GenerateOptions(PolicyOptions):
    problems: str = opt(REQUIRED, "Problem file (MATH, GSM8K, PRM800K or stepdpo layouts).")
    model: str = opt(REQUIRED, "Policy: a model directory or hub id (for vllm: the one the server serves).")
    out: str = opt(REQUIRED, "Output directory: samples.jsonl, report.json, generate_cache.jsonl.")
    n: int = opt(1, "Samples per problem.")
    temperature: float = opt(0.0, "0 = greedy.")
    max_new_tokens: int = opt(256, "Most tokens per solution.")
    stop: list[str] = opt(factory=list, help="Stop strings (the text ends before them), besides EOS.")
    batch_size: int = opt(16, "Prompts per forward pass / per request.")

    def __post_init__(self):
        self._check_policy()
        check(self.n >= 1 and self.batch_size >= 1 and self.max_new_tokens >= 1, "n",
              "n, batch_size and max_new_tokens must be >= 1")
        check(self.temperature >= 0 and 0 < self.top_p <= 1, "temperature", "needs temperature >= 0, 0 < top_p <= 1")


def open_policy(options: PolicyOptions, settings: dict, model=None):
    """The policy's tokenizer, prompt style, identity (the cache key's model part: the model's files or hub commit,
    the sampling settings, the prompt style) and generator, for `generate` and `mine` alike."""
    from stepdpo.auth import model_token
    from stepdpo.identity import model_identity
    from stepdpo.train.modeling import load_tokenizer

    token = model_token(options.model, options.hf_token_file)
    tokenizer = load_tokenizer(options.model, None, token)
    style = prompt_style(tokenizer, options.chat_template, options.system_prompt, options.instruction)
    identity = policy_identity(model_identity(options.model, token), settings, style.key(), options.backend)
    generator = (HFGenerator(options.model, tokenizer, token, options.dtype, model=model) if options.backend == "hf"
                 else VLLMGenerator(options, tokenizer))
    return tokenizer, style, identity, generator


# How a backend turns the cache's units into samples, where a change makes old cached samples wrong. vLLM's
# samples are tagged: before "n-per-prompt", copies of a prompt went in one request, and vLLM seeds every
# prompt of a request alike, so a problem's K samples (and a prefix's M rollouts) were one sample K times.
# Those cached rows must not be reused. The in-process scheme never changed, so its keys stay as they were.
SAMPLING_SCHEMES = {"hf": None, "vllm": "n-per-prompt"}


def policy_identity(model: str, settings: dict, style: str, backend: str) -> str:
    """The model part of every cache key: the model's identity, the sampling settings, the prompt style and,
    where a backend's sampling scheme has changed, that scheme."""
    scheme = SAMPLING_SCHEMES[backend]
    return json.dumps([model, settings, style] + ([{"sampling": scheme}] if scheme else []))


def with_settings(identity: str, settings: dict) -> str:
    """`identity` (from policy_identity) with other sampling settings: the same model, prompts and backend."""
    parts = json.loads(identity)
    parts[1] = settings
    return json.dumps(parts)


@dataclass(frozen=True)
class Unit:
    """One sample to draw: a problem, the steps already written (empty for a whole solution), its index."""

    problem: Problem
    prompt_ids: tuple[int, ...]
    sample: int
    key: str
    prefix: tuple[str, ...] = ()


class HFGenerator:
    """transformers `generate`, left-padded batches, on the GPU when there is one."""

    def __init__(self, model_name: str, tokenizer, token: str | None, dtype: str, model=None):
        import torch
        from transformers import AutoModelForCausalLM

        from stepdpo.models import load_pretrained
        from stepdpo.reward.hf import default_device
        from stepdpo.train.modeling import DTYPES

        self.device = default_device()
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
        self.model = model if model is not None else load_pretrained(
            AutoModelForCausalLM, model_name, dtype=DTYPES[dtype], token=token).to(self.device)
        self.model.eval()
        self.tokenizer = tokenizer

    def run(self, batches: list[list[Unit]], settings: dict, on_result) -> None:
        for i, batch in enumerate(batches):
            on_result(i, self.generate(batch, settings))

    def generate(self, batch: list[Unit], s: dict) -> list[dict]:
        import torch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        width = max(len(u.prompt_ids) for u in batch)
        ids = torch.tensor([[pad] * (width - len(u.prompt_ids)) + list(u.prompt_ids) for u in batch])
        mask = torch.tensor([[0] * (width - len(u.prompt_ids)) + [1] * len(u.prompt_ids) for u in batch])
        kwargs = dict(max_new_tokens=s["max_new_tokens"], pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id)
        if s["temperature"] > 0:
            torch.manual_seed(batch_seed(batch, s["seed"]))
            # top_k always explicit: None would be replaced by GenerationConfig's default of 50 (0 turns it off)
            kwargs.update(do_sample=True, temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"])
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if s["stop"]:
            kwargs.update(stop_strings=list(s["stop"]), tokenizer=self.tokenizer)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        results = []
        for row in out[:, width:].tolist():
            tokens, finish = [], "length"
            for t in row:
                if t == self.tokenizer.eos_token_id:
                    finish = "stop"
                    break
                tokens.append(t)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            for stop in s["stop"]:  # as vLLM does: the text ends before the stop string
                if stop in text:
                    text, finish = text[: text.index(stop)], "stop"
            results.append({"text": text, "token_ids": tokens, "finish_reason": finish})
        return results


class VLLMGenerator:
    """The same vLLM client as scoring (retries, timeouts, per-URL caps, failover, API key)."""

    def __init__(self, options: PolicyOptions, tokenizer):
        from stepdpo.reward.score import _api_key
        from stepdpo.reward.vllm import VLLMClient, VLLMError

        self.tokenizer = tokenizer
        self.client = VLLMClient(options.url, options.served_model_name or options.model,
                                 _api_key(options.api_key_env, options.api_key_file), read_timeout=options.timeout,
                                 concurrency=options.concurrency, reconnect_timeout=options.reconnect_timeout)
        try:
            self.client.wait_healthy(options.health_timeout)
        except VLLMError as e:
            raise GenerateError(str(e)) from None

    def run(self, batches: list[list[Unit]], s: dict, on_result) -> None:
        eos = self.tokenizer.eos_token_id

        def call(url, batch):
            # vLLM gives every prompt of a request the request's seed, and sample j of n the seed + j
            # (vllm/v1/engine/parallel_sampling.py). Copies of one prompt in a request (the K samples of a
            # problem, the M rollouts of a prefix) would all draw the same sample, so each prompt goes once,
            # with n = its copies; prompts with as many copies share a request.
            copies: dict[tuple[int, ...], list[int]] = {}
            for i, u in enumerate(batch):
                copies.setdefault(u.prompt_ids, []).append(i)
            by_n: dict[int, list[tuple[int, ...]]] = {}
            for ids, members in copies.items():
                by_n.setdefault(len(members), []).append(ids)
            out: list[dict | None] = [None] * len(batch)
            seed = batch_seed(batch, s["seed"])
            for n, prompts in sorted(by_n.items()):
                rows = self.client.complete(url, [list(ids) for ids in prompts], n=n, max_tokens=s["max_new_tokens"],
                                            temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"],
                                            seed=seed, stop=s["stop"] or None)
                for ids, samples in zip(prompts, rows):
                    for i, r in zip(copies[ids], samples):
                        tokens = r["token_ids"]
                        if tokens and tokens[-1] == eos:
                            tokens = tokens[:-1]
                        out[i] = {"text": r["text"], "token_ids": tokens, "finish_reason": r["finish_reason"]}
            return out

        self.client.map_batches(batches, call, on_result)

    def report(self) -> dict:
        return self.client.report()


def batch_seed(batch: list[Unit], seed: int) -> int:
    """The sampling seed of a batch, derived from its content and --seed (both backends), so a resumed run
    samples the same batch the same way."""
    return int(hashlib.sha1(batch[0].key.encode()).hexdigest()[:6], 16) ^ seed


class SampleCache:
    """Append-only JSONL of finished samples keyed by (model identity, settings, prompt ids, sample index)."""

    def __init__(self, path: Path):
        import fcntl

        self.path = path
        self.rows: dict[str, dict] = {}
        if path.exists():
            # split on "\n" only: str.splitlines also breaks at U+2028, U+0085 and other separators a model's text
            # can hold (JSON keeps them raw with ensure_ascii=False), which lost those samples on every re-run
            for line in path.read_text(encoding="utf-8").split("\n"):
                try:
                    row = json.loads(line)
                    if isinstance(row.get("key"), str) and isinstance(row.get("text"), str):
                        self.rows[row["key"]] = row
                except (json.JSONDecodeError, AttributeError):
                    continue  # a torn last line: that sample is generated again
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("a", encoding="utf-8")
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._f.close()
            raise GenerateError(f"{path} is in use by another `stepdpo generate`; wait for it or use another --out")

    def put(self, rows: list[dict]) -> None:
        for row in rows:
            self.rows[row["key"]] = row
            self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def make_units(problems: list[Problem], tokenizer, style: PromptStyle, n: int, identity: str,
               prefix: tuple[str, ...] = ()) -> list[Unit]:
    """`n` samples per problem, continuing after `prefix` (the steps already written; the one renderer puts them
    after the problem exactly as training does)."""
    units = []
    for p in problems:
        text = render_prompt(p.text, list(prefix), style)
        ids = tuple(tokenizer(text, add_special_tokens=style.add_special_tokens)["input_ids"])
        for k in range(n):
            key = hashlib.sha1(json.dumps([identity, p.id, ids, k]).encode()).hexdigest()
            units.append(Unit(p, ids, k, key, tuple(prefix)))
    return units


def run_generation(units: list[Unit], generator, settings: dict, cache: SampleCache, *, batch_size: int,
                   progress: bool) -> dict:
    """Generate every unit not in the cache, caching each batch as it arrives; returns counts."""
    from stepdpo.data.formats import split_steps

    missing = [u for u in units if u.key not in cache.rows]
    # longest prompts first: batches of similar length waste less padding
    missing.sort(key=lambda u: -len(u.prompt_ids))
    batches = [missing[i : i + batch_size] for i in range(0, len(missing), batch_size)]
    bar = progress_bar(total=len(missing), desc="generate", unit="sample", disable=not progress)
    start = time.perf_counter()

    def on_result(i, results):
        rows = []
        for u, r in zip(batches[i], results):
            row = {"key": u.key, "id": f"{u.problem.id}#{u.sample}", "problem_id": u.problem.id,
                   "problem": u.problem.text, "sample": u.sample, "text": r["text"],
                   "steps": split_steps(r["text"]), "token_ids": r["token_ids"], "finish_reason": r["finish_reason"]}
            if u.prefix:
                row["prefix_steps"] = list(u.prefix)
            rows.append(row)
        cache.put(rows)
        bar.update(len(rows))
        bar.set_postfix(samples_per_s=f"{bar.n / max(time.perf_counter() - start, 1e-9):.2f}")

    generator.run(batches, settings, on_result)
    bar.close()
    return {"units": len(units), "generated": len(missing), "cache_hits": len(units) - len(missing),
            "generate_seconds": round(time.perf_counter() - start, 3)}


def generate(options: GenerateOptions, model=None) -> dict:
    """Sample step-formatted solutions for a problem file. `model` (Python callers): an already loaded policy."""
    problems, rejects = read_problems(options.problems)
    if options.limit:
        problems = problems[: options.limit]
    settings = options.sampling_settings(options.stop)
    tokenizer, style, identity, generator = open_policy(options, settings, model)
    units = make_units(problems, tokenizer, style, options.n, identity)
    out = Path(options.out)
    cache = SampleCache(out / "generate_cache.jsonl")
    try:
        counts = run_generation(units, generator, settings, cache, batch_size=options.batch_size,
                                progress=options.progress)
    except VLLMError as e:  # the samples so far are cached
        raise GenerateError(f"{e} (samples so far are cached in {cache.path}; re-run to resume)") from None
    finally:
        cache.close()
    rows = [dict(cache.rows[u.key]) for u in units]
    for row in rows:
        row.pop("key", None)
    write_jsonl(out / "samples.jsonl", rows)
    seconds = counts["generate_seconds"]
    report = {**counts, "problems": len(problems), "n": options.n, "backend": options.backend, "model": options.model,
              "settings": settings, "style": style.key(), "rejected_problems": rejects,
              "samples_per_second": round(counts["generated"] / seconds, 3) if seconds > 0 and counts["generated"] else 0.0,
              "finish_reasons": {r: sum(1 for x in rows if x["finish_reason"] == r)
                                 for r in sorted({x["finish_reason"] or "none" for x in rows})}}
    if hasattr(generator, "report"):
        report.update(generator.report())
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: report[k] for k in ("problems", "units", "generated", "cache_hits", "samples_per_second")}))
    return report

