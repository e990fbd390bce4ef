"""The sample cache keeps every finished sample across runs, whatever characters its text holds."""

import json

from stepdpo.generate.generate import SampleCache, policy_identity


def test_samples_with_unicode_line_separators_survive_a_reopen(tmp_path):
    # A tiny model with a 32k vocabulary generates such characters; str.splitlines() broke these rows in two, so
    # they were dropped on reading and generated again on every re-run.
    texts = ["3 + 4 = 7\u2028more", "a\x85b", "c\u2029d", "e\x1cf", "plain"]
    cache = SampleCache(tmp_path / "cache.jsonl")
    cache.put([{"key": f"k{i}", "text": t} for i, t in enumerate(texts)])
    cache.close()
    again = SampleCache(tmp_path / "cache.jsonl")
    assert {k: r["text"] for k, r in again.rows.items()} == {f"k{i}": t for i, t in enumerate(texts)}
    again.close()


def test_a_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = SampleCache(path)
    cache.put([{"key": "a", "text": "x"}])
    cache.close()
    with path.open("a") as f:
        f.write('{"key": "b", "te')
    again = SampleCache(path)
    assert list(again.rows) == ["a"]
    again.close()


def test_vllm_samples_cached_before_the_n_per_prompt_fix_are_not_reused():
    # Before 530e5d7, vLLM got a problem's K samples as K copies of one prompt in one request, and seeds every
    # prompt of a request alike: the cache holds one sample K times under the keys of K samples. Those keys
    # (the pre-fix identity) must not be met again; the in-process keys never held such rows and stay valid.
    settings, style = {"temperature": 1.0, "seed": 0}, "plain"
    before_the_fix = json.dumps(["model@abc", settings, style])
    assert policy_identity("model@abc", settings, style, "hf") == before_the_fix
    assert policy_identity("model@abc", settings, style, "vllm") == json.dumps(
        ["model@abc", settings, style, {"sampling": "n-per-prompt"}])
