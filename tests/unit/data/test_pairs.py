import json

import pytest

from stepdpo.data.pairs import PairFileError, make_pair, pair_id, read_pairs, render_pair, validate_pair


def good_pair(**kw):
    p = make_pair("step", "Q", ["s1"], ["a"], ["b"], [{"file": "f", "line": 1}])
    p.update(kw)
    return p


def test_id_is_stable_and_content_addressed():
    assert pair_id("Q", ["s1"], ["a"], ["b"]) == good_pair()["id"]
    assert pair_id("Q", ["s1"], ["a"], ["b"]) != pair_id("Q", ["s1"], ["b"], ["a"])
    assert pair_id("Q", ["s1", "x"], ["a"], ["b"]) != pair_id("Q", ["s1x"], ["a"], ["b"])


@pytest.mark.parametrize("bad, field", [
    ({"kind": "other"}, "kind"), ({"problem": ""}, "problem"), ({"chosen_steps": []}, "chosen_steps"),
    ({"rejected_steps": ["a", "b"]}, "rejected_steps"), ({"prefix_steps": [""]}, "prefix_steps"),
    ({"chosen_step_rewards": [0.1, 0.2]}, "chosen_step_rewards"), ({"rejected_step_rewards": [float("nan")]}, "rejected_step_rewards"),
])
def test_validation_names_the_field(bad, field):
    assert field in validate_pair(good_pair(**bad))


def test_read_pairs_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(good_pair()) + "\n" + json.dumps(good_pair(kind="x")) + "\n")
    with pytest.raises(PairFileError, match=r"p\.jsonl:2: field 'kind'"):
        read_pairs(path)
    path.write_text(json.dumps(good_pair()) + "\n")
    with pytest.raises(PairFileError, match="stepdpo score"):
        read_pairs(path, require_rewards=True)


def test_render_no_eos_and_truncation_marker():
    p = make_pair("step", "Q", ["s1", "s2"], ["a"], ["b"], [])
    assert render_pair(p) == ("Problem: Q\nSolution:\ns1\ns2\n", "a", "b")
    assert render_pair(p, drop_prefix_steps=1)[0] == "Problem: Q\nSolution:\n...\ns2\n"
