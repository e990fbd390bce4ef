"""The loop on a real model, as a long experiment: `stepdpo loop` with a SmolLM2-135M-Instruct recipe, every run
recorded in benchmarks/loop_results.json (the configuration, where it was measured, every accuracy with its 95%
interval, the paired tests, the pairs mined, the time) and rendered into benchmarks/RESULTS.md.

    .venv/bin/python -m benchmarks.loop --task arith --evaluate validation [-- --dpo-lr 1e-5 ...]
    .venv/bin/python -m benchmarks.loop --task gsm8k --evaluate test
    .venv/bin/python -m benchmarks.loop --task gsm8k --quick          # what CI runs: the path works, no claim

Protocol: settings are chosen on the validation problems (carved from the training data); the held-out problems
are measured once per configuration reported. Every run is recorded, validation and test, good or bad: the table
shows them all. A full run takes about an hour on 2 CPU cores (run it in the background); --quick a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "loop_results.json"
RECIPES = {"arith": REPO / "configs/recipes/smollm2-135m/loop_arith.yaml",
           "gsm8k": REPO / "configs/recipes/smollm2-135m/loop_gsm8k.yaml"}
TASKS = {"arith": "generated multi-step arithmetic", "gsm8k": "GSM8K, two-step problems"}


def gsm8k_train() -> Path | None:
    """GSM8K's training split, read in place (../shared/realdata beside the checkout; STEPDPO_REALDATA overrides)."""
    for candidate in (os.environ.get("STEPDPO_REALDATA"), REPO.parent / "shared" / "realdata", "/work/shared/realdata"):
        if candidate and (Path(candidate) / "gsm8k" / "train.jsonl").is_file():
            return Path(candidate) / "gsm8k" / "train.jsonl"
    return None


def record(summary: dict, task: str, quick: bool, overrides: list[str], note: str, wall: float) -> dict:
    from benchmarks.__main__ import machine

    return {"task": task, "evaluate": summary["task"]["evaluate"], "quick": quick, "overrides": overrides,
            "note": note, "machine": machine(), "wall_s": round(wall, 1),
            "eval_problems": summary["task"]["eval_problems"], "mined_pairs": summary["mined_pairs"],
            "accuracy": summary["accuracy"], "paired_tests": summary["paired_tests"],
            "generations": summary["generations"], "seconds": summary["seconds"], "settings": summary["settings"],
            **({"stopped": summary["stopped"]} if "stopped" in summary else {})}


def render(doc: dict) -> str:
    """benchmarks/RESULTS.md's section: every recorded full run, in the order they ran."""
    runs = [r for r in doc.get("runs", []) if not r["quick"]]
    lines = ["## The loop on a real model: SmolLM2-135M-Instruct", "",
             "Every run of `python -m benchmarks.loop` (benchmarks/loop_results.json), in order, validation and test "
             "alike: greedy accuracy graded by math-verify, [95% Wilson interval], and McNemar's exact p of A1 against "
             "each. A0: after SFT; A1: + mine + stepwise DPO; SFT / RFT: the controls, trained with DPO's steps, "
             "learning rate, schedule and batch from the same policy.", "",
             "| # | task | measured on | changed from the recipe | pairs | A0 | A1 | SFT control | RFT control | "
             "p A1 vs A0 | p A1 vs SFT | p A1 vs RFT | minutes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def cell(r, name):
        a = r["accuracy"].get(name)
        return f"{a['accuracy']:.3f} [{a['ci95'][0]:.2f}, {a['ci95'][1]:.2f}]" if a else "-"

    def p(r, name):
        t = r["paired_tests"].get(f"A1_vs_{name}")
        return f"{t['p_value']:.3g}" if t else "-"

    for i, r in enumerate(runs, 1):
        changed = " ".join(r["overrides"]) or "as shipped"
        lines.append(f"| {i} | {r['task']} | {r['evaluate']} ({r['eval_problems']}) | `{changed}` | "
                     f"{r['mined_pairs']} | {cell(r, 'A0')} | {cell(r, 'A1')} | {cell(r, 'sft')} | {cell(r, 'rft')} | "
                     f"{p(r, 'A0')} | {p(r, 'sft')} | {p(r, 'rft')} | {r['wall_s'] / 60:.0f} |")
    notes = [f"- run {i}: " + " ".join(x for x in (r.get("note"), r.get("stopped") and f"(stopped: {r['stopped']})")
                                       if x)
             for i, r in enumerate(runs, 1) if r.get("note") or r.get("stopped")]
    if notes:
        lines += ["", *notes]
    # configurations tried whose run did not finish (no summary.json to record): entered by hand in
    # loop_results.json's "unfinished" list, so that every configuration tried is on the record
    unfinished = doc.get("unfinished", [])
    if unfinished:
        lines += ["", "Tried, not finished (what was measured before the run stopped; not in the table):"]
        lines += [f"- {u['task']}, {u['evaluate']}, `{' '.join(u['overrides']) or 'as shipped'}` ({u['date']}): "
                  f"{u['measured']}" for u in unfinished]
    return "\n".join(lines) + "\n"


def write_results_md() -> None:
    """RESULTS.md = the speed and memory table (benchmarks/results.json) + the loop's runs (loop_results.json)."""
    from benchmarks.__main__ import render as render_speed

    parts = []
    speed = HERE / "results.json"
    if speed.is_file():
        doc = json.loads(speed.read_text())
        if not doc.get("quick"):
            parts.append(render_speed(doc["results"], doc["machine"], doc["quick"]))
    if RESULTS.is_file():
        parts.append(render(json.loads(RESULTS.read_text())))
    (HERE / "RESULTS.md").write_text("\n".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(RECIPES), required=True)
    parser.add_argument("--evaluate", choices=("validation", "test"), default="validation")
    parser.add_argument("--quick", action="store_true", help="a few problems and steps (CI); recorded as quick")
    parser.add_argument("--backend", choices=("hf", "vllm"), help="override the recipe's (vllm)")
    parser.add_argument("--problems", help="gsm8k: GSM8K's training split (default: ../shared/realdata/gsm8k)")
    parser.add_argument("--out", help="run directory (default: runs/loop-TASK-EVALUATE)")
    parser.add_argument("--results", default=str(RESULTS), help="the record to append to")
    parser.add_argument("--note", default="", help="what this run tried, for the table")
    parser.add_argument("overrides", nargs="*", help="after --: `stepdpo loop` options that change the recipe")
    a = parser.parse_args(argv)
    out = a.out or str(REPO / "runs" / f"loop-{a.task}-{a.evaluate}{'-quick' if a.quick else ''}")
    cmd = [sys.executable, "-m", "stepdpo.cli", "loop", "--config", str(RECIPES[a.task]), "--out", out,
           "--evaluate", a.evaluate, "--no-progress", "--reuse"]
    if a.task == "gsm8k":
        problems = a.problems or gsm8k_train()
        if problems is None:
            raise SystemExit("benchmarks.loop: GSM8K's training split not found; pass --problems PATH or set "
                             "STEPDPO_REALDATA (the folder holding gsm8k/train.jsonl)")
        cmd += ["--problems", str(problems)]
    cmd += (["--quick"] if a.quick else []) + (["--backend", a.backend] if a.backend else []) + list(a.overrides)
    start, started = time.perf_counter(), time.time()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(cmd, env=env)
    path = Path(out) / "summary.json"
    if res.returncode != 0:
        # a run that stopped (mine found no pair) wrote what it measured: on record too; any other failure is not a
        # run (and a summary.json older than this run is an earlier run's)
        if not (path.is_file() and path.stat().st_mtime >= started and "stopped" in json.loads(path.read_text())):
            return res.returncode
    summary = json.loads(path.read_text())
    results = Path(a.results)
    doc = json.loads(results.read_text()) if results.is_file() else {"runs": []}
    doc["runs"].append(record(summary, a.task, a.quick, list(a.overrides), a.note, time.perf_counter() - start))
    results.write_text(json.dumps(doc, indent=2) + "\n")
    if results == RESULTS and not a.quick:
        write_results_md()
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
