"""prepare: every record accounted for, the layouts real PRM800K samples come in, output that appears whole."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from stepdpo.data import prepare as prepare_mod
from stepdpo.data.prepare import PrepareError, PrepareOptions, prepare
from tests.unit.data.test_prm800k import c, rec, step

# Shaped like real PRM800K lines (phase 1: alternatives at every step; phase 2: found_error, the erroneous
# step's text repeated as an alternative, alternatives all -1), written here by hand.
PHASE2_REPEAT = rec("Q", [step([c("s1", 1)], chosen=0),
                          step([c("wrong", -1), c("wrong", -1), c("right", 1), c("other", 1)])], finish="found_error")
PHASE2_ALL_NEG = rec("Q", [step([c("s1", 1)], chosen=0), step([c("w1", -1), c("w2", -1)])], finish="found_error")
ONLY_NEUTRAL = rec("N", [step([c("n1", 0), c("n2", 0)], chosen=0), step([c("n3", 0)], chosen=0)])
PHASE1 = rec("Q", [step([c("s1", 1), c("s1bad", -1)], chosen=0), step([c("right", 1), c("wrong", -1)], chosen=0)])
RECORDS = [PHASE2_REPEAT, PHASE2_ALL_NEG, ONLY_NEUTRAL, PHASE1]


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def opts(**kw):
    kw.setdefault("progress", False)
    return PrepareOptions(**kw)


def test_every_record_is_accounted_for(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    report = prepare([src], tmp_path / "o", opts())
    c_ = report["counts"]
    assert (c_["lines_read"], c_["records_with_pairs"], c_["records_without_pairs"]) == (4, 2, 2)
    rejects = lines(tmp_path / "o" / "rejects.jsonl")
    assert [(r["line"], r["status"], r["reason"]) for r in rejects] == [
        (2, "no_pairs", "found_error_no_positive_alternative"), (3, "no_pairs", "no_negative_step")]
    assert "0 candidates" in rejects[1]["detail"] and len(rejects) == c_["rejects_file_lines"]
    assert report["no_pairs_by_reason"] == {"found_error_no_positive_alternative": 1, "no_negative_step": 1}
    pairs = lines(tmp_path / "o" / "pairs.jsonl")
    for p in pairs:  # a (file, line) appears once per pair, even where a record repeats a text
        keys = [(s["file"], s["line"]) for s in p["source"]]
        assert len(keys) == len(set(keys))
        assert all(os.path.isabs(s["file"]) for s in p["source"])
    # the repeated "wrong" is one candidate: (right, wrong) and (other, wrong), once each
    got = {(p["chosen_steps"][0], p["rejected_steps"][0], tuple(p["prefix_steps"])) for p in pairs}
    assert got == {("right", "wrong", ("s1",)), ("other", "wrong", ("s1",)), ("s1", "s1bad", ())}
    shared = next(p for p in pairs if p["chosen_steps"] == ["right"])
    assert [s["line"] for s in shared["source"]] == [1, 4]  # the same pair from two records: both listed


def test_source_paths_resolve_from_anywhere(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "p.jsonl").write_text(json.dumps(PHASE1) + "\n")
    monkeypatch.chdir(tmp_path)
    prepare(["d/p.jsonl"], "o", opts())
    source = lines(tmp_path / "o" / "pairs.jsonl")[0]["source"][0]
    monkeypatch.chdir("/")
    assert os.path.isfile(source["file"])


@pytest.mark.parametrize("layout", ["jsonl", "array", "pretty", "pretty-array", "bom-array"])
def test_layouts_give_the_same_pairs(layout, tmp_path):
    text = {
        "jsonl": "\n".join(json.dumps(r) for r in RECORDS) + "\n",
        "array": json.dumps(RECORDS),
        "pretty": "".join(json.dumps(r, indent=4) + "\n" for r in RECORDS),  # concatenated, as shipped
        "pretty-array": json.dumps(RECORDS, indent=2),
        "bom-array": "\ufeff" + json.dumps(RECORDS),
    }[layout]
    (tmp_path / "in").write_text(text, encoding="utf-8")
    (tmp_path / "ref.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    got = prepare([tmp_path / "in"], tmp_path / "o", opts())
    want = prepare([tmp_path / "ref.jsonl"], tmp_path / "r", opts())
    key = lambda d: [(p["chosen_steps"], p["rejected_steps"], p["prefix_steps"]) for p in lines(d / "pairs.jsonl")]
    assert key(tmp_path / "o") == key(tmp_path / "r")
    assert got["counts"]["records_without_pairs"] == want["counts"]["records_without_pairs"] == 2
    if layout == "pretty":  # `line` is where each object starts
        starts = [i + 1 for i, l in enumerate(text.splitlines()) if l == "{"]
        assert [r["line"] for r in lines(tmp_path / "o" / "rejects.jsonl")] == [starts[1], starts[2]]


def test_a_broken_object_in_a_stream_is_one_reject(tmp_path):
    good = json.dumps(PHASE1, indent=4)
    (tmp_path / "s.json").write_text(good + "\n{\n    \"question\": oops\n}\n" + good + "\n")
    report = prepare([tmp_path / "s.json"], tmp_path / "o", opts())
    rejects = lines(tmp_path / "o" / "rejects.jsonl")
    assert report["counts"]["lines_read"] == 3 and rejects[0]["reason"] == "invalid_json"
    assert rejects[0]["line"] == good.count("\n") + 2 and rejects[0]["index"] == 2


def test_nothing_parses_is_an_error_with_a_layout_hint(tmp_path):
    (tmp_path / "x.txt").write_text("problem: 1+1\nanswer: 2\n" * 600)
    with pytest.raises(PrepareError, match="no record parsed as JSON .*JSON Lines .*JSON array .*concatenated"):
        prepare([tmp_path / "x.txt"], tmp_path / "o", opts())
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content", ["", "\ufeff[]", "\n\n"])
def test_no_pairs_is_an_error_unless_allowed(content, tmp_path):
    (tmp_path / "e.json").write_text(content, encoding="utf-8")
    with pytest.raises(PrepareError, match="no pair was written"):
        prepare([tmp_path / "e.json"], tmp_path / "o", opts())
    report = prepare([tmp_path / "e.json"], tmp_path / "o", opts(allow_empty=True))
    assert report["counts"]["pairs_written"] == 0


def test_invalid_utf8_early_and_deep_nesting_are_rejected_lines(tmp_path):
    (tmp_path / "u.jsonl").write_bytes(b'{"question": {"problem": "\xff\xfe"}}\n' + ("[" * 100_000).encode() + b"\n" +
                                       json.dumps(PHASE1).encode() + b"\n")
    report = prepare([tmp_path / "u.jsonl"], tmp_path / "o", opts())
    assert report["rejected_by_reason"] == {"invalid_json": 2} and report["counts"]["pairs_written"] == 2
    (tmp_path / "deep.json").write_text("[" * 100_000)
    with pytest.raises(PrepareError):
        prepare([tmp_path / "deep.json"], tmp_path / "o2", opts())


def test_a_non_empty_out_dir_needs_overwrite_and_is_replaced_whole(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    prepare([src], tmp_path / "o", opts(test_fraction=0.5))
    assert (tmp_path / "o" / "test" / "pairs.jsonl").exists()
    with pytest.raises(PrepareError, match="not empty; pass --overwrite"):
        prepare([src], tmp_path / "o", opts())
    prepare([src], tmp_path / "o", opts(overwrite=True))
    # the earlier run's split is gone: nothing stale beside the new files
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["pairs.jsonl", "rejects.jsonl", "report.json"]


def test_a_crash_while_writing_leaves_the_previous_output_whole(tmp_path, monkeypatch):
    src = tmp_path / "p.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    first = prepare([src], tmp_path / "o", opts(test_fraction=0.5, seed=1))
    before = {p.relative_to(tmp_path / "o"): p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()}
    real = prepare_mod.write_lines

    def dies_after_train(path, rows):
        if path.parent.name == "test":
            raise KeyboardInterrupt  # killed right after the new train split was written
        return real(path, rows)

    monkeypatch.setattr(prepare_mod, "write_lines", dies_after_train)
    with pytest.raises(KeyboardInterrupt):
        prepare([src], tmp_path / "o", opts(test_fraction=0.5, seed=2, overwrite=True))
    after = {p.relative_to(tmp_path / "o"): p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()}
    assert after == before and json.loads(after[Path("report.json")])["options"]["seed"] == 1
    assert first["split"] is not None
    assert not list(tmp_path.glob(".o.staging-*"))  # the staging directory went with the failed run


def test_solution_pairs_need_phase2_errors_of_the_same_problem(tmp_path):
    """Real phase 1 chooses a +1 step every time, so its trajectories have no error: a solution pair needs a
    phase-2 found_error trajectory of the same problem beside it."""
    phase1 = rec("Same", [step([c("a", 1), c("a-", -1)], chosen=0), step([c("b", 1), c("b-", -1)], chosen=0),
                          step([c("c", 1)], chosen=0)])
    phase2 = rec("Same", [step([c("a", 1)], chosen=0), step([c("b-", -1)])], finish="found_error")
    alone = tmp_path / "p1.jsonl"
    alone.write_text(json.dumps(phase1) + "\n")
    report = prepare([alone], tmp_path / "o1", opts(solution_pairs=5))
    assert report["counts"]["solution_pairs"] == 0
    mix = tmp_path / "mix.jsonl"
    mix.write_text(json.dumps(phase1) + "\n" + json.dumps(phase2) + "\n")
    report = prepare([mix], tmp_path / "o2", opts(solution_pairs=5))
    sol = [p for p in lines(tmp_path / "o2" / "pairs.jsonl") if p["kind"] == "solution"]
    assert report["counts"]["solution_pairs"] == 1 and len(sol) == 1
    assert (sol[0]["prefix_steps"], sol[0]["chosen_steps"], sol[0]["rejected_steps"]) == (["a"], ["b", "c"], ["b-"])
    assert [s["line"] for s in sol[0]["source"]] == [1, 2]


def test_piping_to_head_ends_quietly(tmp_path):
    import subprocess

    src = tmp_path / "p.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    proc = subprocess.run(f"{sys.executable} -m stepdpo.cli prepare --input {src} --out {tmp_path / 'o'} --no-progress"
                          " | head -c 1", shell=True, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
