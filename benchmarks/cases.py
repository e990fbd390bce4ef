"""Benchmark cases. Each returns a dict of measurements; the harness runs each in its own process (so
its peak RSS is its own) and compares ratios taken within the same run with the targets."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _stats(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def _ratio(num: list[float], den: list[float]) -> dict:
    """Median of per-repeat ratios (pairs measured back to back), with the spread."""
    return _stats([a / b for a, b in zip(num, den)])


# --------------------------------------------------------------------------------------------- data
def prepare_vs_json(quick: bool) -> dict:
    """`stepdpo prepare` (validate, pair, deduplicate, split, write) vs json.loads over the same lines."""
    from stepdpo.data.prepare import PrepareOptions, prepare
    from stepdpo.data.synthetic import SynthConfig, write_synthetic

    tmp = Path(tempfile.mkdtemp())
    n = 5000 if quick else 40000
    write_synthetic(tmp / "prm.jsonl", SynthConfig(problems=n, seed=1))
    lines = (tmp / "prm.jsonl").read_text(encoding="utf-8").splitlines()
    t_json, t_prep = [], []
    for i in range(3 if quick else 7):
        t = time.perf_counter()
        for line in lines:
            json.loads(line)
        t_json.append(time.perf_counter() - t)
        t = time.perf_counter()
        prepare([tmp / "prm.jsonl"], tmp / f"out{i}", PrepareOptions(progress=False, test_fraction=0.1))
        t_prep.append(time.perf_counter() - t)
    return {"lines": n, "json_loads_s": _stats(t_json), "prepare_s": _stats(t_prep), "ratio": _ratio(t_prep, t_json)}


# --------------------------------------------------------------------------------------------- scoring
VLLM_CASES = ("vllm_client_vs_raw", "generate_vllm_vs_raw")
SHARED_SERVER_ENV = "STEPDPO_BENCH_VLLM"  # JSON [model dir, url]: the harness's server, set for its children


def _on_judge_server(case, quick: bool) -> dict:
    from stepdpo.testing import vllm_available

    if not vllm_available():
        return {"skipped": "no .venv-vllm (launch/setup.sh --vllm)"}
    tmp = Path(tempfile.mkdtemp())
    with judge_server(tmp) as (model, url):
        return case(quick, model, url, tmp)


@contextmanager
def judge_server(log_dir: Path):
    """(model, url): a vLLM judge server of the tiny Mistral. The harness starts one for all the vLLM cases and
    names it in STEPDPO_BENCH_VLLM (each start costs about a minute); a case run alone starts its own. Every
    case measures stepdpo and raw requests on the same server, back to back, so sharing it changes no ratio."""
    from stepdpo.testing import VLLMServer

    if os.environ.get(SHARED_SERVER_ENV):
        model, url = json.loads(os.environ[SHARED_SERVER_ENV])
        yield Path(model), url
        return
    model = _tiny("mistral")
    server = VLLMServer(model, "judge", log_dir / "vllm.log").start().wait()
    try:
        yield model, server.url
    finally:
        server.stop()


# --quick proves that every case runs and reports; it claims no number. So it measures a smaller model of the same
# proportions (MLP 3.5x hidden), for fewer steps and repeats: in CI this run took 440 s of the suite at the sizes of
# the full run's, and the full run (which the committed tables come from) is unchanged.
def _trainer_model(quick: bool) -> Path:
    return _tiny("mistral", hidden=128, layers=2, ffn=448) if quick else _tiny("mistral", hidden=384, layers=4, ffn=1344)


def _tiny(arch: str, hidden: int = 64, layers: int = 2, ffn: int | None = None) -> Path:
    from stepdpo.tiny import TinySize, build_tiny_model

    size = TinySize(hidden=hidden, layers=layers, ffn=ffn or TinySize().ffn)
    return build_tiny_model(arch, Path(tempfile.mkdtemp()) / arch, seed=0, size=size)


def _solution(n_steps: int, seed: int) -> tuple[str, list[str]]:
    import random

    rng = random.Random(seed)
    value = rng.randint(1, 9)
    steps = []
    for _ in range(n_steps):
        b = rng.randint(1, 9)
        steps.append(f"{value} + {b} = {value + b}")
        value += b
    return f"Start with {steps[0].split()[0]}. Keep adding. What is the result?", steps


def prm_single_pass(quick: bool) -> dict:
    """PRM rewards for every step: one pass per solution vs one pass per prefix (the quadratic way)."""
    from stepdpo.reward.hf import load_hf_backend
    from stepdpo.reward.scorer import MethodSpec

    # A PRM shaped like a real one (MLP 3.5x hidden, as Mistral-7B's 14336/4096), only smaller: with a
    # toy MLP, attention's quadratic term dominates in a way it does not at 7B scale.
    model = _tiny("mistral", hidden=128, layers=2, ffn=448) if quick else _tiny("mistral", hidden=256, layers=4, ffn=896)
    scorer = load_hf_backend(MethodSpec(str(model), "prm"))
    solutions = 4 if quick else 16
    scorer.score_prm([_solution(8, 99)])  # warm-up: first-call allocations are not the method's cost
    out = {}
    for n in (8, 16, 32):
        sols = [_solution(n, s) for s in range(solutions)]
        single, per_prefix = [], []
        for _ in range(2 if quick else 5):
            t = time.perf_counter()
            scorer.score_prm(sols)  # one batched pass over all solutions
            single.append(time.perf_counter() - t)
            if n in (8, 32):
                t = time.perf_counter()
                for problem, steps in sols:  # every prefix scored on its own
                    for k in range(1, n + 1):
                        scorer.score_prm([(problem, steps[:k])])
                per_prefix.append(time.perf_counter() - t)
        out[f"steps{n}"] = {"single_pass_s": _stats(single)}
        if per_prefix:
            out[f"steps{n}"]["per_prefix_s"] = _stats(per_prefix)
            out[f"steps{n}"]["speedup"] = _ratio(per_prefix, single)
    out["doubling_16_over_8"] = out["steps16"]["single_pass_s"]["median"] / out["steps8"]["single_pass_s"]["median"]
    out["doubling_32_over_16"] = out["steps32"]["single_pass_s"]["median"] / out["steps16"]["single_pass_s"]["median"]
    return out


def vllm_client_vs_raw(quick: bool) -> dict:
    """`stepdpo score --backend vllm` vs sending the same prompts to the same server as raw batched requests."""
    return _on_judge_server(_vllm_client_vs_raw, quick)


def _vllm_client_vs_raw(quick: bool, model: Path, url: str, tmp: Path) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import requests
    from transformers import AutoTokenizer

    from stepdpo.data.pairs import read_pairs
    from stepdpo.data.prepare import PrepareOptions, prepare
    from stepdpo.data.synthetic import SynthConfig, write_synthetic
    from stepdpo.reward.score import ScoreOptions, score
    from stepdpo.reward.scorer import judge_prompt, judge_token_ids, substeps_of_pair

    write_synthetic(tmp / "prm.jsonl", SynthConfig(problems=80 if quick else 600, seed=2))
    prepare([tmp / "prm.jsonl"], tmp / "pairs", PrepareOptions(progress=False))
    pairs = read_pairs(tmp / "pairs" / "pairs.jsonl")
    tok = AutoTokenizer.from_pretrained(model)
    yes, no = judge_token_ids(tok, str(model))
    subs = {s for p in pairs for side in substeps_of_pair(p).values() for s in side}
    prompts = []
    for s in sorted(subs, key=lambda x: (x.problem, x.previous, x.step)):
        ids = tok(judge_prompt(s))["input_ids"]
        prompts += [ids + [yes], ids + [no]]
    batch, concurrency = 32, 4

    def raw_once():
        session = requests.Session()
        chunks = [prompts[i : i + 2 * batch] for i in range(0, len(prompts), 2 * batch)]

        def post(chunk):
            r = session.post(f"{url}/v1/completions", json={"model": str(model), "prompt": chunk, "max_tokens": 0,
                                                             "echo": True, "prompt_logprobs": 0})
            r.raise_for_status()
            return r.json()

        t = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(post, chunks))
        return time.perf_counter() - t

    raw_once()  # warm the server
    t_raw, t_ours = [], []
    for i in range(1 if quick else 5):
        t_raw.append(raw_once())
        a = ScoreOptions(pairs=str(tmp / "pairs" / "pairs.jsonl"), model=str(model), backend="vllm", url=[url],
                         out=str(tmp / f"scored{i}"), batch_size=batch, concurrency=concurrency, progress=False)
        t_ours.append(score(a)["wall_seconds"])
    return {"substeps": len(subs), "prompts": len(prompts), "raw_s": _stats(t_raw), "stepdpo_s": _stats(t_ours),
            "ratio": _ratio(t_ours, t_raw)}


def generate_vllm_vs_raw(quick: bool) -> dict:
    """`stepdpo generate --backend vllm` vs the same prompts sent to the same server as raw batched requests:
    samples per second (stepdpo / raw; the target is >= 0.8)."""
    return _on_judge_server(_generate_vllm_vs_raw, quick)


def _generate_vllm_vs_raw(quick: bool, model: Path, url: str, tmp: Path) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import requests
    from transformers import AutoTokenizer

    from stepdpo.data.pairs import render_prompt
    from stepdpo.data.synthetic import SynthOptions, synth
    from stepdpo.generate.generate import GenerateOptions, generate
    from stepdpo.generate.problems import read_problems

    n_problems = 64 if quick else 256
    synth(SynthOptions(out=str(tmp / "p.jsonl"), kind="problems", problems=n_problems, seed=3, max_value=9))
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [tok(render_prompt(p.text, [])).input_ids for p in read_problems(tmp / "p.jsonl")[0]]
    batch, concurrency, max_tokens = 16, 4, 32

    def raw_once():
        session = requests.Session()
        chunks = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]

        def post(chunk):
            r = session.post(f"{url}/v1/completions", json={"model": str(model), "prompt": chunk, "n": 1,
                                                             "max_tokens": max_tokens, "temperature": 0.0,
                                                             "top_p": 1.0, "seed": 0, "return_token_ids": True})
            r.raise_for_status()
            return r.json()

        t = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(post, chunks))
        return len(prompts) / (time.perf_counter() - t)

    raw_once()  # warm the server
    raw, ours = [], []
    for i in range(1 if quick else 5):
        raw.append(raw_once())
        report = generate(GenerateOptions(problems=str(tmp / "p.jsonl"), model=str(model), out=str(tmp / f"g{i}"),
                                          backend="vllm", url=[url], batch_size=batch, concurrency=concurrency,
                                          max_new_tokens=max_tokens, progress=False))
        ours.append(report["samples_per_second"])
    return {"prompts": len(prompts), "raw_samples_per_s": _stats(raw), "stepdpo_samples_per_s": _stats(ours),
            "ratio": _ratio(ours, raw)}


# --------------------------------------------------------------------------------------------- training
def _pairs_file(n_problems: int) -> Path:
    from stepdpo.data.prepare import PrepareOptions, prepare
    from stepdpo.data.synthetic import SynthConfig, write_synthetic

    tmp = Path(tempfile.mkdtemp())
    write_synthetic(tmp / "prm.jsonl", SynthConfig(problems=n_problems, seed=3, max_value=9))
    prepare([tmp / "prm.jsonl"], tmp / "pairs", PrepareOptions(progress=False))
    return tmp / "pairs" / "pairs.jsonl"


def _common(steps: int, out: str) -> dict:
    return dict(output_dir=out, beta=0.1, learning_rate=1e-4, max_steps=steps, per_device_train_batch_size=8,
                logging_steps=10_000, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                gradient_checkpointing=False, disable_tqdm=True, bf16=False)


def trainer_vs_trl(quick: bool) -> dict:
    """Time per training step: StepwiseDPOTrainer (dpo mode, append_eos) vs trl.DPOTrainer, same everything."""
    from benchmarks.train_run import main as train_run

    model = _trainer_model(quick)  # Mistral's proportions (MLP 3.5x hidden)
    pairs_path = _pairs_file(200)
    steps = 8 if quick else 60
    spec = {"model": str(model), "pairs": str(pairs_path), "steps": steps, "batch": 8, "memory": False, "warmup": 5}
    ours_t, trl_t = [], []
    for rep in range(1 if quick else 3):  # --quick checks the harness runs, not its numbers
        trl_t.append(train_run(dict(spec, trainer="trl"))["step_s"])
        ours_t.append(train_run(dict(spec, trainer="stepdpo"))["step_s"])
    return {"steps": steps, "trl_step_s": _stats(trl_t), "stepdpo_step_s": _stats(ours_t), "ratio": _ratio(ours_t, trl_t)}


def precompute_vs_live(quick: bool) -> dict:
    """Time per step after the reference log-probs are precomputed vs with a live reference model."""
    from benchmarks.train_run import StepMeter
    from stepdpo.train.config import StepwiseDPOConfig
    from stepdpo.train.run import build_trainer

    model = _trainer_model(quick)
    pairs_path = _pairs_file(200)
    steps = 8 if quick else 60
    live_t, pre_t, precompute_s = [], [], []
    for rep in range(1 if quick else 3):  # --quick checks the harness runs, not its numbers
        for precompute in (False, True):
            timer = StepMeter(memory=False)
            t0 = time.perf_counter()
            tr = build_trainer(StepwiseDPOConfig(model_name_or_path=str(model), train_pairs=str(pairs_path),
                                                 precompute_ref_log_probs=precompute, **_common(steps, tempfile.mkdtemp())))
            if precompute:
                precompute_s.append(time.perf_counter() - t0)
            tr.add_callback(timer.callback)
            tr.train()
            (pre_t if precompute else live_t).append(statistics.median(timer.times[5:]))
    return {"steps": steps, "live_step_s": _stats(live_t), "precomputed_step_s": _stats(pre_t),
            "build_with_precompute_s": _stats(precompute_s), "ratio": _ratio(pre_t, live_t)}


def _shaped_pairs(model: Path, prefix_steps: int, n: int = 160, terse: bool = False) -> tuple[Path, float]:
    """Step pairs in the one schema whose prompt is `prefix_steps` earlier steps long (plus the problem), and the
    measured ratio of prompt tokens to step tokens (medians, through the trainer's renderer and tokenizer)."""
    import random

    from transformers import AutoTokenizer

    from stepdpo.data.pairs import make_pair, render_pair, write_jsonl

    rng = random.Random(0)
    pairs = []
    for i in range(n):
        value = rng.randint(1, 9)
        steps = []
        for _ in range(prefix_steps + 1):
            b = rng.randint(1, 9)
            steps.append(f"{value} + {b} = {value + b}")
            value += b
        problem = (f"Add {b}." if terse else
                   f"Start with {steps[0].split()[0]}. Add the numbers in turn. What is the result?")
        wrong = steps[-1].rsplit("=", 1)[0] + f"= {value + rng.randint(1, 5)}"
        pairs.append(make_pair(kind="step", problem=problem, prefix_steps=steps[:-1], chosen_steps=[steps[-1]],
                               rejected_steps=[wrong], source=[{"file": "benchmark", "line": i}]))
    out = Path(tempfile.mkdtemp()) / "pairs.jsonl"
    write_jsonl(out, pairs)
    tok = AutoTokenizer.from_pretrained(model)
    prompt_len = [len(tok(render_pair(p)[0])["input_ids"]) for p in pairs]
    step_len = [len(tok(render_pair(p)[1], add_special_tokens=False)["input_ids"]) for p in pairs]
    return out, statistics.median(prompt_len) / statistics.median(step_len)


def _prefix_sharing(quick: bool, prefix_steps: int, terse: bool = False) -> dict:
    """stepdpo (prefix sharing on) vs trl.DPOTrainer on the same pairs: time per training step (back-to-back runs
    in this process) and peak memory per step (each run in its own process; benchmarks/train_run.py)."""
    import subprocess
    import sys

    from benchmarks.train_run import main as train_run

    model = _trainer_model(quick)  # Mistral's proportions (MLP 3.5x hidden)
    pairs, ratio = _shaped_pairs(model, prefix_steps, terse=terse)
    steps = 8 if quick else 40
    spec = {"model": str(model), "pairs": str(pairs), "batch": 8}
    t = {"trl": [], "stepdpo": []}
    for rep in range(1 if quick else 3):
        for which in ("trl", "stepdpo"):
            t[which].append(train_run(dict(spec, trainer=which, steps=steps, memory=False))["step_s"])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    m = {}
    for which in ("trl", "stepdpo"):
        res = subprocess.run([sys.executable, "-m", "benchmarks.train_run", json.dumps(dict(spec, trainer=which, steps=6 if quick else 8))],
                             env=env, capture_output=True, text=True, cwd=REPO, check=True)
        m[which] = json.loads(res.stdout.strip().splitlines()[-1])["step_peak_mib"]
    return {"prompt_over_step_tokens": round(ratio, 2), "steps": steps, "batch": 8,
            "trl_step_s": _stats(t["trl"]), "stepdpo_step_s": _stats(t["stepdpo"]), "ratio": _ratio(t["stepdpo"], t["trl"]),
            "trl_step_peak_mib": m["trl"], "stepdpo_step_peak_mib": m["stepdpo"],
            "memory_ratio": {"median": m["stepdpo"] / m["trl"]}}


def prefix_sharing_long(quick: bool) -> dict:
    """Prompts about 8x a step (the problem and 4 earlier steps): where step pairs spend their tokens."""
    return _prefix_sharing(quick, prefix_steps=4)


def prefix_sharing_short(quick: bool) -> dict:
    """Prompts about 1.4x a step (a three-word problem, no earlier step): sharing must not cost time."""
    return _prefix_sharing(quick, prefix_steps=0, terse=True)


# --------------------------------------------------------------------------------------------- plans
def plans_7b(quick: bool) -> dict:
    from stepdpo.plan import make_plan

    out = {}
    for nodes in (1, 2):
        for mode in ("full", "lora", "qlora"):
            for zero in (2, 3):
                p = make_plan("mistralai/Mistral-7B-v0.1", nodes=nodes, gpus_per_node=8, mode=mode, zero=zero)
                out[f"{nodes}x8 {mode} zero{zero}"] = {"per_gpu_gib": p["per_gpu_total_gib"],
                                                       "per_node_cpu_gib": round(sum(p["per_node_cpu_gib"].values()), 2),
                                                       "load_peak_gib": p["per_gpu_load_peak_gib"]}
    return out


CASES = {
    "prepare_vs_json": prepare_vs_json,
    "prm_single_pass": prm_single_pass,
    "vllm_client_vs_raw": vllm_client_vs_raw,
    "generate_vllm_vs_raw": generate_vllm_vs_raw,
    "trainer_vs_trl": trainer_vs_trl,
    "precompute_vs_live": precompute_vs_live,
    "prefix_sharing_long": prefix_sharing_long,
    "prefix_sharing_short": prefix_sharing_short,
    "plans_7b": plans_7b,
}


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


os.environ.setdefault("TQDM_DISABLE", "1")
