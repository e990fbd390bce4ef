"""Generated data: PRM800K's schema (checked by an independent validator) and no surface shortcut."""

import json
import random
import re

import numpy as np

from stepdpo.data.synthetic import SynthConfig, generate_records, write_synthetic

FINISH = {"solution", "found_error", "give_up", "bad_problem"}


def check_prm800k(rec):
    """An independent reading of PRM800K's schema (not the package's validator)."""
    assert set(rec) >= {"labeler", "timestamp", "generation", "is_quality_control_question",
                        "is_initial_screening_question", "question", "label"}
    q, label = rec["question"], rec["label"]
    assert isinstance(q["problem"], str) and q["problem"] and isinstance(q["ground_truth_answer"], str)
    assert label["finish_reason"] in FINISH and isinstance(label["total_time"], int)
    assert isinstance(label["steps"], list) and label["steps"]
    for st in label["steps"]:
        assert set(st) == {"completions", "human_completion", "chosen_completion"}
        for comp in st["completions"]:
            assert set(comp) == {"text", "rating", "flagged"}
            assert isinstance(comp["text"], str) and comp["text"]
            assert comp["rating"] in (-1, 0, 1, None) and type(comp["rating"]) in (int, type(None))
            assert isinstance(comp["flagged"], bool)
        cc, hc = st["chosen_completion"], st["human_completion"]
        assert cc is None or (type(cc) is int and 0 <= cc < len(st["completions"]))
        assert hc is None or isinstance(hc, str) or (isinstance(hc, dict) and isinstance(hc["text"], str))
    if rec["generation"] is not None:  # phase 2
        assert isinstance(q["pre_generated_steps"], list)


def test_schema_and_both_phases(tmp_path):
    path = tmp_path / "s.jsonl"
    n = write_synthetic(path, SynthConfig(problems=400, seed=7))
    lines = path.read_text().splitlines()
    assert n == len(lines) == 400
    recs = [json.loads(x) for x in lines]
    for rec in recs:
        check_prm800k(rec)
    phase2 = [r for r in recs if r["generation"] is not None]
    assert phase2 and len(phase2) < len(recs)
    assert any(len(s["completions"]) > 1 for r in recs if r["generation"] is None for s in r["label"]["steps"])
    assert any(r["label"]["finish_reason"] == "found_error" for r in phase2)
    assert {r["label"]["finish_reason"] for r in recs} == FINISH
    ratings = {c["rating"] for r in recs for s in r["label"]["steps"] for c in s["completions"]}
    assert {-1, 0, 1} <= ratings


def test_same_seed_same_bytes(tmp_path):
    write_synthetic(tmp_path / "a", SynthConfig(problems=50, seed=3))
    write_synthetic(tmp_path / "b", SynthConfig(problems=50, seed=3))
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


def _steps(rating):
    out = []
    for rec in generate_records(SynthConfig(problems=3000, seed=11)):
        for s in rec["label"]["steps"]:
            out += [c["text"] for c in s["completions"] if c["rating"] == rating]
    return out


def _features(text):
    counts = [text.count(ch) for ch in "0123456789 +-*="]
    return [len(text), len(text.split())] + counts


def test_wrong_steps_have_no_surface_signal():
    """A classifier on length and character counts cannot tell +1 from -1 steps."""
    good, bad = _steps(1), _steps(-1)
    rng = random.Random(0)
    n = min(len(good), len(bad), 4000)
    good, bad = rng.sample(good, n), rng.sample(bad, n)
    assert abs(np.mean(list(map(len, good))) - np.mean(list(map(len, bad)))) < 0.1
    x = np.array([_features(t) for t in good + bad], dtype=float)
    y = np.array([1] * n + [0] * n)
    idx = np.random.default_rng(0).permutation(2 * n)
    x, y = x[idx], y[idx]
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    x = np.hstack([x, np.ones((len(x), 1))])
    half = len(x) // 2
    w = np.zeros(x.shape[1])
    for _ in range(500):  # logistic regression, plain gradient descent
        p = 1 / (1 + np.exp(-x[:half] @ w))
        w -= 0.5 * x[:half].T @ (p - y[:half]) / half
    acc = ((x[half:] @ w > 0) == y[half:]).mean()
    assert acc < 0.56, f"surface features separate correct from wrong steps (held-out accuracy {acc:.3f})"


def test_wrong_steps_differ_only_in_the_result():
    for rec in generate_records(SynthConfig(problems=200, seed=2)):
        for s in rec["label"]["steps"]:
            texts = {c["rating"]: c["text"] for c in s["completions"] if c["rating"] in (1, -1)}
            if 1 in texts and -1 in texts:
                g, b = texts[1], texts[-1]
                assert len(g) == len(b)
                assert re.sub(r"\d+\.?$", "", g) == re.sub(r"\d+\.?$", "", b)
