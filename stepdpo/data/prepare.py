"""`stepdpo prepare`: read every input line, validate it, build step pairs, deduplicate, split by problem.

Writes DIR/pairs.jsonl, DIR/rejects.jsonl, DIR/report.json and, with a test fraction,
DIR/train/pairs.jsonl and DIR/test/pairs.jsonl (no problem on both sides).
"""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path


from stepdpo.console import progress_bar
from stepdpo.data.formats import CONVERTERS
from stepdpo.data.jsonio import LAYOUT_HINT, Unparsable, records
from stepdpo.data.jsonio import loads as fast_loads
from stepdpo.data.pairs import pair_id, to_json_line, write_lines
from stepdpo.data.prm800k import NEUTRAL_POLICIES, RecordError, solution_pairs, walk_record
from stepdpo.errors import StepdpoError
from stepdpo.options import check, check_choice, opt

FORMATS = ("prm800k", "step-dpo", "steps", "trl")


class PrepareError(StepdpoError, RuntimeError):
    """A run that must stop: --strict on a bad line, too many bad lines, an unreadable input."""


@dataclass
class PrepareOptions:
    input: list[str] = opt(factory=list, help="Input file(s): JSON Lines, or a JSON array. Repeat the flag or "
                           "list several files.")
    out: str = opt(None, "Output directory: pairs.jsonl, rejects.jsonl, report.json (and train/, test/).")
    format: str = opt("prm800k", "Input format.", choices=FORMATS)
    neutral: str = opt("skip", "PRM800K: how to treat rating-0 steps.", choices=NEUTRAL_POLICIES)
    solution_pairs: int = opt(0, "PRM800K: also write up to N kind=solution pairs per problem (0 = none).",
                              metavar="N")
    test_fraction: float = opt(0.0, "Hold out this fraction of problems as DIR/test/pairs.jsonl (split by problem).")
    seed: int = opt(0, "Seed of the held-out split.")
    strict: bool = opt(False, "Stop at the first bad line (naming file, line, reason).")
    max_bad_fraction: float | None = opt(None, "Fail when more than this fraction of lines is rejected.")
    overwrite: bool = opt(False, "Replace a non-empty --out directory (the new run's files replace it whole).")
    allow_empty: bool = opt(False, "Succeed even when no pair is written (otherwise that is an error).")
    progress: bool = opt(True, "Show a progress bar.")

    def __post_init__(self):
        check_choice(self.format, "format", FORMATS)
        check_choice(self.neutral, "neutral", NEUTRAL_POLICIES)
        check(0.0 <= self.test_fraction < 1.0, "test_fraction", f"must be in [0, 1), got {self.test_fraction}")
        check(self.solution_pairs >= 0, "solution_pairs", "must be >= 0")
        check(self.max_bad_fraction is None or 0.0 <= self.max_bad_fraction <= 1.0, "max_bad_fraction",
              "must be in [0, 1]")


@dataclass
class _Run:
    # (problem, prefix, chosen, rejected) -> (kind, sources), in first-seen order. Deduplicating on plain
    # tuples (hashed in C, strings cache their hash) and building ids and dicts once per unique pair
    # at the end keeps the per-pair cost low on the hot path.
    pairs: dict = field(default_factory=dict)
    rejects: list = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    rejected_by_reason: Counter = field(default_factory=Counter)
    skipped_by_reason: Counter = field(default_factory=Counter)
    no_pairs_by_reason: Counter = field(default_factory=Counter)
    walks_by_problem: dict = field(default_factory=lambda: defaultdict(list))
    layouts: dict = field(default_factory=dict)


def _add_pair(run: _Run, kind, problem, prefix, chosen, rejected, source) -> None:
    key = (problem, tuple(prefix), tuple(chosen), tuple(rejected))
    existing = run.pairs.get(key)
    if existing is None:
        run.pairs[key] = (kind, [source])
    else:
        existing[1].append(source)
        run.counts["duplicates_removed"] += 1


def _materialise(run: _Run) -> list[dict]:
    # Tuples stay tuples: they encode to the same JSON arrays as lists, and copying costs time here.
    return [{"id": pair_id(problem, prefix, chosen, rejected), "kind": kind, "problem": problem,
             "prefix_steps": prefix, "chosen_steps": chosen, "rejected_steps": rejected, "source": sources}
            for (problem, prefix, chosen, rejected), (kind, sources) in run.pairs.items()]


def _reject(run: _Run, opts: PrepareOptions, file: str, line: int, reason: str, detail: str, status="rejected",
            index: int | None = None):
    """status: rejected (malformed), skipped (bad_problem), no_pairs (valid, but nothing to pair). `line` is where
    the record starts; `index` (JSON arrays and concatenated objects) is its 1-based position in the file."""
    row = {"file": file, "line": line, "reason": reason, "detail": detail, "status": status}
    if index is not None:
        row["index"] = index
    run.rejects.append(row)
    if status == "rejected":
        run.rejected_by_reason[reason] += 1
        if opts.strict:
            raise PrepareError(f"{file}:{line}: {reason}: {detail} (drop --strict to skip bad lines)")
    elif status == "skipped":
        run.skipped_by_reason[reason] += 1
    else:
        run.no_pairs_by_reason[reason] += 1


def _process_file(path: Path, run: _Run, opts: PrepareOptions) -> None:
    file = str(path.resolve())  # resolves later from any working directory
    convert = CONVERTERS.get(opts.format)
    size = path.stat().st_size
    bar = progress_bar(total=size, unit="B", unit_scale=True, desc=f"prepare {path.name}", disable=not opts.progress)
    pending = 0
    # Hot loop: local counters, written back to `run` once at the end.
    lines_read = records_used = without_pairs = pairs_generated = identical = duplicates = 0
    layout: dict = {}
    index = None
    for line, raw, is_text in records(path, layout):
        if not is_text:
            index = (index or 0) + 1
        if raw.__class__ is Unparsable:
            lines_read += 1
            _reject(run, opts, file, line, "invalid_json", raw.detail, index=index)
            continue
        if is_text:
            pending += len(raw)
            if pending > 1 << 20:
                bar.update(pending)
                pending = 0
            if not raw.strip():
                continue  # blank lines are ignored
            lines_read += 1
            try:
                row = fast_loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
                detail = (f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else
                          "not valid UTF-8" if isinstance(e, UnicodeDecodeError) else "nested too deeply to parse")
                _reject(run, opts, file, line, "invalid_json", detail)
                continue
        else:
            lines_read += 1
            row = raw
        try:
            if convert is None:
                walk = walk_record(row, opts.neutral)
            else:
                kind, problem, prefix, chosen, rejected = convert(row)
        except RecordError as e:
            _reject(run, opts, file, line, e.reason, str(e), index=index)
            continue
        source = {"file": file, "line": line} if index is None else {"file": file, "line": line, "index": index}
        if convert is not None:
            records_used += 1
            _add_pair(run, kind, problem, prefix, chosen, rejected, source)
            pairs_generated += 1
            continue
        if walk.finish_reason == "bad_problem":
            _reject(run, opts, file, line, "bad_problem", "finish_reason is bad_problem", status="skipped", index=index)
            continue
        records_used += 1
        if not walk.step_pairs:
            without_pairs += 1
            if not opts.solution_pairs:  # with --solution-pairs the record may still give a solution pair
                reason, detail = walk.no_pair_reason()
                _reject(run, opts, file, line, reason, detail, status="no_pairs", index=index)
        identical += walk.identical_sides
        problem = walk.problem
        pairs = run.pairs
        # _add_pair inlined: a call per pair here costs about a tenth of prepare's time (measured 2.7x ->
        # 3.0x json.loads), and this loop sees every PRM800K pair.
        for prefix, chosen, rejected in walk.step_pairs:
            key = (problem, prefix, (chosen,), (rejected,))  # prefix is a tuple shared by the step
            existing = pairs.get(key)
            if existing is None:
                pairs[key] = ("step", [source])
            else:
                if existing[1][-1] is not source:  # one record lists itself once per pair
                    existing[1].append(source)
                duplicates += 1
        pairs_generated += len(walk.step_pairs)
        if opts.solution_pairs:
            run.walks_by_problem[walk.problem].append((walk, source))
    bar.update(size - bar.n)
    bar.close()
    run.layouts[file] = layout.get("name", "jsonl")
    if lines_read and records_used == 0 and lines_read == sum(
            1 for r in run.rejects if r["file"] == file and r["reason"] == "invalid_json"):
        raise PrepareError(f"--input {path}: no record parsed as JSON ({lines_read} tried as "
                           f"{run.layouts[file]}). {LAYOUT_HINT}; see the first errors with --strict.")
    c = run.counts
    c["lines_read"] += lines_read
    c["records_used"] += records_used
    c["records_without_step_pairs"] += without_pairs
    c["pairs_generated"] += pairs_generated
    c["identical_sides_skipped"] += identical
    c["duplicates_removed"] += duplicates


def _add_solution_pairs(run: _Run, cap: int) -> None:
    for problem, entries in run.walks_by_problem.items():
        for prefix, good, bad in solution_pairs([w for w, _ in entries], cap):
            good_src = next(s for w, s in entries if w.trajectory == prefix + good)
            bad_src = next(s for w, s in entries if w.trajectory == prefix + bad)
            key = (problem, tuple(prefix), tuple(good), tuple(bad))
            if key not in run.pairs:
                run.pairs[key] = ("solution", [good_src, bad_src])
                run.counts["solution_pairs"] += 1


def split_by_problem(pairs: list[dict], test_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Held-out split by problem text: no problem has pairs on both sides."""
    problems = sorted({p["problem"] for p in pairs})
    random.Random(seed).shuffle(problems)
    n_test = round(len(problems) * test_fraction)
    if test_fraction > 0 and n_test == 0 and len(problems) > 1:
        n_test = 1
    test_problems = set(problems[:n_test])
    train = [p for p in pairs if p["problem"] not in test_problems]
    test = [p for p in pairs if p["problem"] in test_problems]
    return train, test


def run_prepare(options: PrepareOptions) -> dict:
    """Turn PRM800K, Step-DPO, step-list or TRL preference data into step pairs: DIR/pairs.jsonl,
    DIR/rejects.jsonl (every unused line with its reason), DIR/report.json."""
    check(bool(options.input), "input", "is required: one or more input files")
    check(bool(options.out), "out", "is required: the output directory")
    report = prepare(options.input, options.out, options)
    c = report["counts"]
    print(f"{c['lines_read']} records read: {c['records_with_pairs']} gave pairs, {c['records_without_pairs']} valid "
          f"without pairs, {c['rejected']} rejected, {c['skipped']} skipped; {c['pairs_written']} pairs written "
          f"({c['duplicates_removed']} duplicates removed)")
    if report["split"]:
        s = report["split"]
        print(f"split by problem: train {s['train_pairs']} pairs / {s['train_problems']} problems, "
              f"test {s['test_pairs']} pairs / {s['test_problems']} problems")
    print(f"report: {Path(options.out) / 'report.json'}")
    return report


def prepare(inputs: list[str | Path], out: str | Path, opts: PrepareOptions) -> dict:
    # prepare builds hundreds of thousands of long-lived objects and frees almost none: the cyclic GC
    # would rescan them over and over for nothing (more than half the run time on large inputs).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _prepare(inputs, out, opts)
    finally:
        if gc_was_enabled:
            gc.enable()


def _prepare(inputs: list[str | Path], out: str | Path, opts: PrepareOptions) -> dict:
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.is_file():
            raise PrepareError(f"--input {p}: no such file")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} is a file; name a directory")
    if out.is_dir() and any(out.iterdir()) and not opts.overwrite:
        raise PrepareError(f"--out {out} is not empty; pass --overwrite to replace it with this run's files (the whole "
                           "directory is replaced, so no file of an earlier run stays beside them), or name a new one")
    start = time.perf_counter()
    run = _Run()
    for path in paths:
        _process_file(path, run, opts)
    if opts.solution_pairs and opts.format == "prm800k":
        _add_solution_pairs(run, opts.solution_pairs)
        used = {id(src) for _, sources in run.pairs.values() for src in sources}
        for walks in run.walks_by_problem.values():
            for walk, source in walks:
                if not walk.step_pairs and id(source) not in used:
                    reason, detail = walk.no_pair_reason()
                    _reject(run, opts, source["file"], source["line"], reason, detail, status="no_pairs",
                            index=source.get("index"))
    pairs = _materialise(run)
    bad = sum(run.rejected_by_reason.values())
    n_lines = run.counts["lines_read"]
    if not pairs and not opts.allow_empty:
        where = ", ".join(f"{p} ({run.layouts.get(str(p.resolve()), '?')})" for p in paths)
        raise PrepareError(f"no pair was written from {where}: {n_lines} records read, {bad} rejected, "
                           f"{sum(run.no_pairs_by_reason.values())} valid without pairs ({dict(run.no_pairs_by_reason)}). "
                           f"Check --format {opts.format}, or pass --allow-empty")
    if opts.max_bad_fraction is not None and n_lines and bad / n_lines > opts.max_bad_fraction:
        first = "; ".join(f"line {r['line']}: {r['reason']}" for r in run.rejects[:3] if r["status"] == "rejected")
        raise PrepareError(
            f"{bad} of {n_lines} lines ({bad / n_lines:.1%}) were rejected, above --max-bad-fraction "
            f"{opts.max_bad_fraction} (first: {first}); nothing was written"
        )

    # Everything is written into a staging directory beside --out, then swapped in: a killed run leaves the
    # previous output whole (or nothing), never a mix of two runs, and report.json always describes exactly
    # the files beside it.
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        report = _write_outputs(stage, paths, opts, run, pairs, start)
        _swap_in(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return report


def _write_outputs(stage: Path, paths: list[Path], opts: PrepareOptions, run: _Run, pairs: list[dict],
                   start: float) -> dict:
    files = {"pairs": "pairs.jsonl", "rejects": "rejects.jsonl", "report": "report.json"}
    lines = {p["id"]: to_json_line(p) for p in pairs}  # encode each pair once, write it up to twice
    write_lines(stage / files["pairs"], lines.values())
    write_lines(stage / files["rejects"], map(to_json_line, run.rejects))
    split = None
    if opts.test_fraction > 0:
        train, test = split_by_problem(pairs, opts.test_fraction, opts.seed)
        write_lines(stage / "train" / "pairs.jsonl", (lines[p["id"]] for p in train))
        write_lines(stage / "test" / "pairs.jsonl", (lines[p["id"]] for p in test))
        files.update(train="train/pairs.jsonl", test="test/pairs.jsonl")
        split = {
            "train_pairs": len(train),
            "test_pairs": len(test),
            "train_problems": len({p["problem"] for p in train}),
            "test_problems": len({p["problem"] for p in test}),
        }
    no_pairs = sum(run.no_pairs_by_reason.values())
    counts = {
        "lines_read": run.counts["lines_read"],
        "records_used": run.counts["records_used"],
        "records_with_pairs": run.counts["records_used"] - no_pairs,
        "records_without_pairs": no_pairs,
        "records_without_step_pairs": run.counts["records_without_step_pairs"],
        "pairs_generated": run.counts["pairs_generated"],
        "duplicates_removed": run.counts["duplicates_removed"],
        "identical_sides_skipped": run.counts["identical_sides_skipped"],
        "solution_pairs": run.counts["solution_pairs"],
        "pairs_written": len(pairs),
        "rejected": sum(run.rejected_by_reason.values()),
        "skipped": sum(run.skipped_by_reason.values()),
        "rejects_file_lines": len(run.rejects),
    }
    # every record read is accounted for exactly once
    assert counts["lines_read"] == counts["records_with_pairs"] + no_pairs + counts["rejected"] + counts["skipped"]
    assert counts["rejects_file_lines"] == no_pairs + counts["rejected"] + counts["skipped"]
    report = {
        "inputs": [str(p.resolve()) for p in paths],
        "layouts": run.layouts,
        "options": asdict(opts),
        "counts": counts,
        "rejected_by_reason": dict(run.rejected_by_reason),
        "skipped_by_reason": dict(run.skipped_by_reason),
        "no_pairs_by_reason": dict(run.no_pairs_by_reason),
        "pair_kinds": dict(Counter(p["kind"] for p in pairs)),
        "split": split,
        "files": files,
        "seconds": round(time.perf_counter() - start, 3),
    }
    (stage / files["report"]).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def _swap_in(stage: Path, out: Path) -> None:
    """Replace `out` by `stage`. Between the two renames `out` is briefly absent, never half-written; an old
    copy left by a run killed right there is removed by the next run."""
    for leftover in out.parent.glob(f".{out.name}.old-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out)
