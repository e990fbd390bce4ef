"""One command for every speed and memory target:

    .venv/bin/python -m benchmarks            # full: more repeats and larger inputs (~15 min on 2 cores)
    .venv/bin/python -m benchmarks --quick    # a few minutes; what CI runs so the harness never rots
    .venv/bin/python -m benchmarks --only trainer_vs_trl

Each case runs in its own process (its peak RSS is its own). Targets are ratios measured in the same
run (the machines are noisy; absolute times are context). Writes benchmarks/results.json and
benchmarks/RESULTS.md. Exit status: non-zero only when a case crashes, never for a missed target.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# (case, dotted key, comparison, target, what it means, issue)
TARGETS = [
    ("prepare_vs_json", "ratio.median", "<=", 3.0, "prepare time / json.loads time over the same lines"),
    ("prm_single_pass", "steps8.speedup.median", ">=", 4.0, "per-prefix / single-pass PRM time, 8 steps"),
    ("prm_single_pass", "doubling_16_over_8", "<=", 2.4, "single-pass time, 16 steps / 8 steps (2x, 1.2 slack)"),
    ("prm_single_pass", "doubling_32_over_16", "<=", 2.4, "single-pass time, 32 steps / 16 steps"),
    ("vllm_client_vs_raw", "ratio.median", "<=", 1.25, "stepdpo score --backend vllm / raw batched requests"),
    ("generate_vllm_vs_raw", "ratio.median", ">=", 0.8, "stepdpo generate --backend vllm / raw batched requests, samples/s"),
    ("trainer_vs_trl", "ratio.median", "<=", 1.05, "StepwiseDPOTrainer (dpo) / trl.DPOTrainer time per step"),
    ("precompute_vs_live", "ratio.median", "<=", 0.75, "time per step, precomputed / live reference"),
    ("prefix_sharing_long", "ratio.median", "<=", 0.6, "prefix sharing / trl.DPOTrainer time per step, prompts ~8x a step"),
    ("prefix_sharing_long", "memory_ratio.median", "<=", 0.75, "prefix sharing / trl.DPOTrainer peak step memory, prompts ~8x a step"),
    ("prefix_sharing_short", "ratio.median", "<=", 1.05, "prefix sharing / trl.DPOTrainer time per step, prompts ~1.4x a step"),
]


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(mem, 1), "python": platform.python_version(),
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}


def run_case(name: str, quick: bool, extra_env: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())),
               **(extra_env or {}))
    cmd = [sys.executable, "-m", "benchmarks", "--case", name] + (["--quick"] if quick else [])
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        return {"error": res.stderr[-3000:], "wall_s": round(time.perf_counter() - t, 1)}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(time.perf_counter() - t, 1)
    return out


def _one(name: str, quick: bool) -> None:
    """Child process: run one case, print its JSON (last line)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from benchmarks.cases import CASES, peak_rss_mib

    result = CASES[name](quick)
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    print(json.dumps(result))


def render(results: dict, mach: dict, quick: bool) -> str:
    lines = [f"Measured {mach['date']} on {mach['cpu']}, {mach['cores']} cores, {mach['ram_gib']} GiB RAM, "
             f"Python {mach['python']}, torch {mach['torch']} ({'--quick' if quick else 'full'} mode). "
             "Ratios are medians of back-to-back pairs; [min-max] is the spread.", "",
             "| target | measured | goal | met | peak RSS |", "| --- | --- | --- | --- | --- |"]
    for case, key, op, goal, what, *_ in TARGETS:
        if case not in results:
            continue
        r = results[case]
        if "skipped" in r or "error" in r:
            lines.append(f"| {what} | {'skipped: ' + r['skipped'] if 'skipped' in r else 'error'} | {op} {goal} | - | - |")
            continue
        value = _get(r, key)
        spread = _get(r, key.rsplit(".", 1)[0]) if key.endswith(".median") else None
        shown = f"{value:.3f}" + (f" [{spread['min']:.3f}-{spread['max']:.3f}]" if spread and "min" in spread else "")
        met = value <= goal if op == "<=" else value >= goal
        lines.append(f"| {what} | {shown} | {op} {goal} | {'yes' if met else '**no**'} | {r.get('peak_rss_mib', 0):.0f} MiB |")
    plans = results.get("plans_7b", {})
    if plans and "error" not in plans:
        lines += ["", "`stepdpo plan` for Mistral-7B (seq 1024, 2 pairs/GPU, gradient checkpointing), GiB per GPU "
                  "(per-node CPU RAM):", "", "| GPUs | full ZeRO-2 | full ZeRO-3 | LoRA ZeRO-2 | LoRA ZeRO-3 | "
                  "QLoRA ZeRO-2 | QLoRA ZeRO-3 |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for nodes in (1, 2):
            cells = []
            for mode in ("full", "lora", "qlora"):
                for zero in (2, 3):
                    p = plans[f"{nodes}x8 {mode} zero{zero}"]
                    cells.append(f"{p['per_gpu_gib']:.1f} ({p['per_node_cpu_gib']:.1f})")
            lines.append(f"| {nodes}x8 | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@contextmanager
def shared_vllm_server(names: list[str]):
    """One vLLM server for every vLLM case in this run (see benchmarks.cases.judge_server); the env for them. With
    STEPDPO_BENCH_VLLM already set (JSON [model dir, url] of a running judge server), the cases use that one."""
    import tempfile

    from benchmarks.cases import SHARED_SERVER_ENV, VLLM_CASES, judge_server
    from stepdpo.testing import vllm_available

    if os.environ.get(SHARED_SERVER_ENV):  # a server the caller runs (the test suite's judge): every case uses it
        yield {SHARED_SERVER_ENV: os.environ[SHARED_SERVER_ENV]}
        return
    if sum(n in VLLM_CASES for n in names) < 2 or not vllm_available():
        yield {}
        return
    print("[bench] starting the vLLM server the vLLM cases share ...", flush=True)
    with judge_server(Path(tempfile.mkdtemp())) as (model, url):
        yield {SHARED_SERVER_ENV: json.dumps([str(model), url])}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller inputs (CI)")
    parser.add_argument("--only", action="append", help="run only these cases (repeatable)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # child-process mode
    parser.add_argument("--out", default=str(HERE / "results.json"))
    a = parser.parse_args()
    if a.case:
        _one(a.case, a.quick)
        return 0
    from benchmarks.cases import CASES

    names = a.only or list(CASES)
    results, crashed = {}, False
    with shared_vllm_server(names) as extra_env:
        for name in names:
            print(f"[bench] {name} ...", flush=True)
            results[name] = run_case(name, a.quick, extra_env)
            crashed |= "error" in results[name]
            print(f"[bench] {name}: {json.dumps(results[name])[:400]}", flush=True)
    mach = machine()
    doc = {"machine": mach, "quick": a.quick, "results": results}
    Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
    table = render(results, mach, a.quick)
    if not a.only and not a.quick and Path(a.out) == HERE / "results.json":  # committed tables: full runs only
        from benchmarks.loop import write_results_md

        write_results_md()  # this table, and the real-model loop's runs (benchmarks/loop.py)
    print(table)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
