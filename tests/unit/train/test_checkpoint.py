"""What a checkpoint was trained from (stepdpo.train.checkpoint's fingerprint): pair files by their records, not by
where their sources lie, and one comparison for resuming and for `loop --reuse`."""

from __future__ import annotations

import json
from types import SimpleNamespace

from stepdpo.identity import RECORDS, file_fingerprint, records_fingerprint
from stepdpo.train.checkpoint import fingerprint_mismatches, run_fingerprint

PAIR = {"id": "p1", "kind": "step", "problem": "Start with 14. Subtract 1, then subtract 7.",
        "prefix_steps": ["14 - 1 = 13"], "chosen_steps": ["13 - 7 = 6"], "rejected_steps": ["13 - 7 = 4"]}


def _pairs(path, *records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _args(tmp_path, pairs):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text('{"model_type": "llama"}')
    return SimpleNamespace(model_name_or_path=str(model), train_pairs=str(pairs))


def test_pairs_are_fingerprinted_by_what_they_train_not_where_they_came_from(tmp_path):
    here = _pairs(tmp_path / "a.jsonl", dict(PAIR, source=[{"file": "/old/run/problems/mine.jsonl"}]))
    moved = _pairs(tmp_path / "b.jsonl", dict(PAIR, source=[{"file": "/new/run/problems/mine.jsonl"}]))
    reordered = tmp_path / "c.jsonl"
    reordered.write_text(json.dumps(dict(reversed(list(PAIR.items())))) + "\n\n")  # key order, a blank line
    assert file_fingerprint(here) != file_fingerprint(moved)  # what made a moved run's DPO train again
    assert records_fingerprint(here) == records_fingerprint(moved) == records_fingerprint(reordered)
    assert records_fingerprint(here).startswith(RECORDS)
    other = _pairs(tmp_path / "d.jsonl", dict(PAIR, rejected_steps=["13 - 7 = 5"]))
    swapped = _pairs(tmp_path / "e.jsonl", PAIR, dict(PAIR, id="p2"))
    for path in (other, swapped, _pairs(tmp_path / "f.jsonl", dict(PAIR, id="p2"), PAIR)):
        assert records_fingerprint(path) != records_fingerprint(here)
    assert records_fingerprint(swapped) != records_fingerprint(tmp_path / "f.jsonl")  # the order is the data's
    broken = tmp_path / "g.jsonl"
    broken.write_text('{"id": \n')  # not JSON: hashed as it is, not an error here (read_pairs names the line)
    assert records_fingerprint(broken).startswith(RECORDS)


def test_one_comparison_for_resuming_and_for_reuse(tmp_path):
    pairs = _pairs(tmp_path / "pairs.jsonl", dict(PAIR, source=[{"file": "/old/mine.jsonl"}]))
    args = _args(tmp_path, pairs)
    saved = run_fingerprint(args)
    _pairs(pairs, dict(PAIR, source=[{"file": "/new/mine.jsonl"}]))  # the run directory moved
    assert fingerprint_mismatches(saved, args, every_file=True) == []
    _pairs(pairs, dict(PAIR, chosen_steps=["13 - 7 = 7"]))
    assert fingerprint_mismatches(saved, args, every_file=False) == ["train_pairs differs from the file it was "
                                                                     "trained on"]
    # a file one run names and the other does not: a mismatch for reuse; resuming compares what both name
    _pairs(pairs, PAIR)
    with_eval = SimpleNamespace(**vars(args), eval_pairs=str(pairs))
    assert fingerprint_mismatches(saved, with_eval, every_file=True) == ["eval_pairs not named by the run that "
                                                                         "trained it"]
    assert fingerprint_mismatches(saved, with_eval, every_file=False) == []
    other_model = SimpleNamespace(model_name_or_path=str(tmp_path), train_pairs=str(pairs))
    assert fingerprint_mismatches(saved, other_model, every_file=False)[0].startswith(f"model {tmp_path / 'model'} (")


def test_a_fingerprint_from_before_records_compares_the_files_bytes(tmp_path):
    pairs = _pairs(tmp_path / "pairs.jsonl", dict(PAIR, source=[{"file": "/old/mine.jsonl"}]))
    args = _args(tmp_path, pairs)
    legacy = dict(run_fingerprint(args), data={"train_pairs": file_fingerprint(pairs)})
    assert fingerprint_mismatches(legacy, args, every_file=True) == []  # an older checkpoint still resumes
    _pairs(pairs, dict(PAIR, source=[{"file": "/new/mine.jsonl"}]))
    assert fingerprint_mismatches(legacy, args, every_file=True) == ["train_pairs differs from the file it was "
                                                                     "trained on"]
