"""The sample cache keeps every finished sample across runs, whatever characters its text holds."""

from stepdpo.generate.generate import SampleCache


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
