"""`stepdpo score` end to end against hostile inputs: non-finite server answers, a poisoned cache, a model
swapped under the same path, model directories that ship code, credentials in URLs, two scorers on one cache."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from stepdpo.reward.score import ScoreOptions, score
from stepdpo.reward.scorer import ScoreCache, ScoreError, prob_first
from tests.unit.reward.test_vllm_client import Script, _serve


@pytest.fixture
def fake_server():
    started = []

    def make(logprob):
        script = Script()

        def body(payload):
            return {"choices": [{"index": i, "prompt_logprobs": [None] + [{str(t): {"logprob": logprob}}
                                                                        for t in prompt[1:]]}
                                for i, prompt in enumerate(payload["prompt"])]}

        script.body = body
        httpd = _serve(script)
        started.append(httpd)
        return script

    yield make
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


def opts(pairs, model, out, **kw):
    return ScoreOptions(pairs=str(pairs), model=str(model), out=str(out), batch_size=8, progress=False,
                        health_timeout=5, **kw)


def test_probabilities_are_stable_for_any_gap():
    assert prob_first(0.0, 800.0) == pytest.approx(0.0, abs=1e-300) and prob_first(800.0, 0.0) == 1.0
    assert prob_first(-1.0, -1.0) == 0.5 and prob_first(math.log(3), 0.0) == pytest.approx(0.75)


@pytest.mark.parametrize("bad", [float("-inf"), float("nan"), 0.5])
def test_non_finite_server_values_fail_naming_the_url_and_poison_nothing(bad, fake_server, tiny_mistral, synth_pairs,
                                                                          tmp_path):
    server = fake_server(bad)
    server.default = (200, None)
    pairs = synth_pairs / "test" / "pairs.jsonl"
    url_with_creds = server.url.replace("http://", "http://alice:s3cret@")
    with pytest.raises(ScoreError) as e:
        score(opts(pairs, tiny_mistral, tmp_path, backend="vllm", url=[url_with_creds]))
    msg = str(e.value)
    assert "127.0.0.1" in msg and "s3cret" not in msg and "***@" in msg
    cache = tmp_path / "score_cache.jsonl"
    assert not cache.exists() or cache.read_text() == ""  # nothing non-finite was cached
    assert not (tmp_path / "pairs.jsonl").exists()


def test_a_poisoned_cache_line_is_recomputed_not_served(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"key": "a", "reward": NaN}\n{"key": "b", "reward": true}\n{"key": "c", "reward": 0.25}\n'
                    '{"key": "d", "reward": 7}\n')
    cache = ScoreCache(path)
    assert "a" not in cache and "b" not in cache and "d" not in cache and cache.get("c") == 0.25
    with pytest.raises(ScoreError, match="not a probability"):
        cache.put_many([("e", float("nan"))])
    cache.close()


def test_one_scorer_per_cache(tmp_path):
    first = ScoreCache(tmp_path / "c.jsonl")
    with pytest.raises(ScoreError, match="in use by another `stepdpo score`"):
        ScoreCache(tmp_path / "c.jsonl")
    first.close()
    ScoreCache(tmp_path / "c.jsonl").close()  # free again


def test_the_cache_follows_the_model_not_its_path(tiny_mistral, synth_pairs, tmp_path):
    from stepdpo.tiny import build_tiny_model

    model = tmp_path / "model"
    shutil.copytree(tiny_mistral, model)
    pairs = synth_pairs / "test" / "pairs.jsonl"
    cache = tmp_path / "cache.jsonl"
    first = score(opts(pairs, model, tmp_path / "a", cache=str(cache)))
    assert first["cache_hits"] == 0
    again = score(opts(pairs, model, tmp_path / "b", cache=str(cache)))
    assert again["scored"] == 0  # same model: everything from the cache
    shutil.rmtree(model)
    shutil.copytree(build_tiny_model("mistral", tmp_path / "other", seed=5), model)  # another model, same path
    swapped = score(opts(pairs, model, tmp_path / "c", cache=str(cache)))
    assert swapped["cache_hits"] == 0 and swapped["scored"] == swapped["substeps"]


def test_model_code_runs_only_when_asked(tiny_mistral, synth_pairs, tmp_path):
    from transformers import AutoConfig

    model = tmp_path / "remote"
    shutil.copytree(tiny_mistral, model)
    marker = tmp_path / "code_ran"
    (model / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                            "from transformers import MistralForTokenClassification as EvilPRM\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["EvilProcessRewardModel"]
    cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilPRM"}
    (model / "config.json").write_text(json.dumps(cfg))
    assert AutoConfig.from_pretrained(model).auto_map
    with pytest.raises(ScoreError, match="ships its own Python code .* --trust-remote-code"):
        score(opts(synth_pairs / "test" / "pairs.jsonl", model, tmp_path / "o", method="prm", prm_head="classifier"))
    assert not marker.exists()


def test_a_missing_reward_head_is_an_error_not_a_random_init(tiny_mistral, synth_pairs, tmp_path):
    """A causal LM directory used as a 2-label classifier PRM: its head would be random."""
    with pytest.raises(ScoreError, match="no weights for the reward head"):
        score(opts(synth_pairs / "test" / "pairs.jsonl", tiny_mistral, tmp_path, method="prm", prm_head="classifier"))


@pytest.mark.parametrize("reconnect_timeout", [0, 30])
def test_a_server_lost_mid_run_is_waited_for_or_named_with_how_to_resume(reconnect_timeout, fake_server, tiny_mistral,
                                                                          synth_pairs, tmp_path):
    server = fake_server(-0.7)
    server.answers = [(200, {}), "drop"]  # /health at start, then the first batch's connection drops
    pairs = synth_pairs / "test" / "pairs.jsonl"
    o = opts(pairs, tiny_mistral, tmp_path, backend="vllm", url=[server.url], reconnect_timeout=reconnect_timeout,
             concurrency=1)
    if reconnect_timeout == 0:
        with pytest.raises(ScoreError, match=r"connection failed.*re-run to resume"):
            score(o)
        return
    report = score(o)  # /health answers again at once, so the run goes on and scores everything
    assert report["reconnects"] == 1 and report["scored"] == report["substeps"] > 0
    assert [s["path"] for s in server.seen[:3]] == ["/health", "/v1/completions", "/health"]
