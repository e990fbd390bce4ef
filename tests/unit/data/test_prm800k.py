"""PRM800K rules on a hand-written file of edge cases; expected pairs and rejects worked out by hand."""

import json

import pytest

from stepdpo.data.prepare import PrepareError, PrepareOptions, prepare


def rec(problem, steps, finish="solution", **extra):
    return {"question": {"problem": problem, "ground_truth_answer": "1"},
            "label": {"steps": steps, "finish_reason": finish}, **extra}


def c(text, rating, flagged=False):
    return {"text": text, "rating": rating, "flagged": flagged}


def step(completions, chosen=None, human=None):
    return {"completions": completions, "chosen_completion": chosen, "human_completion": human}


LINES = [
    # 1: alternatives; prefix extends with the chosen completion
    rec("P1", [step([c("a1", 1), c("b1", -1), c("n1", 0)], chosen=0),
               step([c("a2", 1), c("b2", -1), c("b2x", -1)], chosen=0)]),
    # 2: flagged and null-rated candidates are ignored; human completion (string) is +1 and extends the prefix
    rec("P2", [step([c("f", -1, flagged=True), c("z", None), c("w", -1)], human="h1"),
               step([c("g", 1), c("x", -1)], chosen=None)]),
    # 3: human completion as an object; no chosen and no human at step 2 -> walk stops after step 2's pairs
    rec("P3", [step([c("q", -1)], human={"text": "hq", "rating": None}),
               step([c("r", 1), c("s", -1)]),
               step([c("never", 1), c("seen", -1)], chosen=0)]),
    # 4: bad_problem is skipped
    rec("P4", [step([c("a", 1), c("b", -1)], chosen=0)], finish="bad_problem"),
    # 5: give_up is used
    rec("P5", [step([c("ok", 1), c("bad", -1)], chosen=0)], finish="give_up"),
    # 6: exact duplicate of line 1 -> pairs written once with both sources
    rec("P1", [step([c("a1", 1), c("b1", -1), c("n1", 0)], chosen=0),
               step([c("a2", 1), c("b2", -1), c("b2x", -1)], chosen=0)]),
    # 7: non-ASCII text, quality-control question is used
    rec("Résoudre ∑ 東京", [step([c("√4 = 2 ✓", 1), c("√4 = 3", -1)], chosen=0)], is_quality_control_question=True),
    "",  # 8: blank line, ignored
    "{not json",  # 9
    "[1, 2]",  # 10: not an object
    rec("", [step([c("a", 1)], chosen=0)]),  # 11: empty problem
    {"question": {"problem": "P"}, "label": {"steps": "nope"}},  # 12: steps not a list
    rec("P", [step([c("", 1)], chosen=0)]),  # 13: empty completion text
    rec("P", [step([c("a", 2)], chosen=0)]),  # 14: rating outside the set
    rec("P", [step([c("a", True)], chosen=0)]),  # 15: a boolean is not a rating
    rec("P", [step([c("a", 1)], chosen=1)]),  # 16: chosen index out of range
    rec("P", [step([c("a", 1)], chosen=-1)]),  # 17: negative index
    rec("P", [step([c(7, 1)], chosen=0)]),  # 18: text not a string
    rec("P", [step([c("a", "1")], chosen=0)]),  # 19: rating as a string
    # 20: neutral-only step yields nothing by default; chosen extends the prefix
    rec("P20", [step([c("m", 0), c("k", 1)], chosen=1), step([c("y", 1), c("n", -1)], chosen=0)]),
    # 21: the same text rated +1 and -1 is no preference: counted, not written
    rec("P21", [step([c("same", 1), c("same", -1)], chosen=0)]),
]

EXPECTED = {
    ("P1", (), "a1", "b1"), ("P1", ("a1",), "a2", "b2"), ("P1", ("a1",), "a2", "b2x"),
    ("P2", (), "h1", "w"), ("P2", ("h1",), "g", "x"),
    ("P3", (), "hq", "q"), ("P3", ("hq",), "r", "s"),
    ("P5", (), "ok", "bad"),
    ("Résoudre ∑ 東京", (), "√4 = 2 ✓", "√4 = 3"),
    ("P20", ("k",), "y", "n"),
}
REJECTED = {9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19}


@pytest.fixture
def edge_file(tmp_path):
    path = tmp_path / "edge.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for line in LINES:
            f.write((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + "\n")
    return path


def read(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def test_pairs_and_rejects_match_the_rules(edge_file, tmp_path):
    report = prepare([edge_file], tmp_path / "out", PrepareOptions(progress=False))
    pairs = read(tmp_path / "out" / "pairs.jsonl")
    got = {(p["problem"], tuple(p["prefix_steps"]), p["chosen_steps"][0], p["rejected_steps"][0]) for p in pairs}
    assert got == EXPECTED
    assert len(pairs) == len(EXPECTED)
    rejects = read(tmp_path / "out" / "rejects.jsonl")
    assert {r["line"] for r in rejects if r["status"] == "rejected"} == REJECTED
    assert {r["line"] for r in rejects if r["status"] == "skipped"} == {4}
    reasons = {r["line"]: r["reason"] for r in rejects}
    assert reasons[9] == "invalid_json" and reasons[10] == "not_object" and reasons[11] == "missing_problem"
    assert reasons[12] == "missing_steps" and reasons[13] == "bad_completion_text" and reasons[14] == "bad_rating"
    assert reasons[15] == "bad_rating" and reasons[16] == "bad_chosen_completion" and reasons[4] == "bad_problem"
    # duplicates: line 1 and line 6 give the same three pairs, kept once with both sources
    p1 = [p for p in pairs if p["problem"] == "P1"]
    assert all([s["line"] for s in p["source"]] == [1, 6] for p in p1)
    counts = report["counts"]
    assert counts["lines_read"] == 20 and counts["rejected"] == 11 and counts["skipped"] == 1
    assert counts["identical_sides_skipped"] == 1
    assert counts["duplicates_removed"] == 3 and counts["pairs_written"] == 10
    assert report["rejected_by_reason"]["bad_rating"] == 3


def test_every_pair_follows_the_schema(edge_file, tmp_path):
    from stepdpo.data.pairs import read_pairs

    prepare([edge_file], tmp_path / "out", PrepareOptions(progress=False))
    for p in read_pairs(tmp_path / "out" / "pairs.jsonl"):
        assert p["kind"] == "step" and len(p["id"]) == 20


def test_neutral_policy(edge_file, tmp_path):
    prepare([edge_file], tmp_path / "pos", PrepareOptions(progress=False, neutral="positive"))
    pairs = read(tmp_path / "pos" / "pairs.jsonl")
    got = {(p["problem"], p["chosen_steps"][0], p["rejected_steps"][0]) for p in pairs}
    assert ("P1", "n1", "b1") in got  # neutral as +1 vs the -1 alternative
    prepare([edge_file], tmp_path / "neg", PrepareOptions(progress=False, neutral="negative"))
    got = {(p["problem"], p["chosen_steps"][0], p["rejected_steps"][0]) for p in read(tmp_path / "neg" / "pairs.jsonl")}
    assert ("P1", "a1", "n1") in got and ("P20", "k", "m") in got


def test_strict_names_file_line_and_reason(edge_file, tmp_path):
    with pytest.raises(PrepareError, match=r"edge\.jsonl:9: invalid_json"):
        prepare([edge_file], tmp_path / "o", PrepareOptions(progress=False, strict=True))


def test_max_bad_fraction(edge_file, tmp_path):
    with pytest.raises(PrepareError, match="11 of 20 lines"):
        prepare([edge_file], tmp_path / "o", PrepareOptions(progress=False, max_bad_fraction=0.5))
    prepare([edge_file], tmp_path / "o2", PrepareOptions(progress=False, max_bad_fraction=0.6))


def test_split_by_problem_has_no_overlap(tmp_path):
    from stepdpo.data.synthetic import SynthConfig, write_synthetic

    write_synthetic(tmp_path / "s.jsonl", SynthConfig(problems=200, seed=1))
    report = prepare([tmp_path / "s.jsonl"], tmp_path / "o", PrepareOptions(progress=False, test_fraction=0.3, seed=5))
    train = {p["problem"] for p in read(tmp_path / "o" / "train" / "pairs.jsonl")}
    test = {p["problem"] for p in read(tmp_path / "o" / "test" / "pairs.jsonl")}
    assert train and test and not train & test
    assert report["split"]["test_problems"] == len(test)
    assert report["split"]["train_pairs"] + report["split"]["test_pairs"] == report["counts"]["pairs_written"]


def test_solution_pairs(tmp_path):
    good = rec("S", [step([c("s1", 1)], chosen=0), step([c("s2", 1)], chosen=0)])
    bad = rec("S", [step([c("s1", 1)], chosen=0), step([c("t2", -1)])], finish="found_error")
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    prepare([path], tmp_path / "o", PrepareOptions(progress=False, solution_pairs=3))
    sol = [p for p in read(tmp_path / "o" / "pairs.jsonl") if p["kind"] == "solution"]
    assert len(sol) == 1
    assert sol[0]["prefix_steps"] == ["s1"] and sol[0]["chosen_steps"] == ["s2"] and sol[0]["rejected_steps"] == ["t2"]
