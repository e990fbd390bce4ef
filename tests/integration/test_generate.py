"""`stepdpo generate` in-process: rendering, caching and resuming, and `grade` on what it wrote."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stepdpo.data.pairs import render_prompt
from stepdpo.data.synthetic import SynthOptions, synth
from stepdpo.generate.generate import GenerateOptions, generate
from stepdpo.generate.grade import GradeOptions, grade

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    path = tmp_path_factory.mktemp("problems") / "p.jsonl"
    synth(SynthOptions(out=str(path), kind="problems", problems=12, seed=1, max_value=9))
    return path


def test_greedy_hf_generation_is_the_models_argmax(tiny_mistral, problems, tmp_path):
    report = generate(GenerateOptions(problems=str(problems), model=str(tiny_mistral), out=str(tmp_path),
                                      max_new_tokens=8, batch_size=5, progress=False))
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert report["generated"] == 12 and len(rows) == 12 and report["samples_per_second"] > 0
    tok = AutoTokenizer.from_pretrained(tiny_mistral)
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral).eval()
    first = json.loads(problems.read_text().splitlines()[0])
    row = next(r for r in rows if r["problem_id"] == first["id"])
    ids = tok(render_prompt(first["problem"], [])).input_ids  # the one renderer, as in training
    for t in row["token_ids"]:  # each generated token is the argmax after the ones before it
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        assert nxt == t
        ids.append(t)
    assert row["text"] == tok.decode(row["token_ids"], skip_special_tokens=True)
    assert row["finish_reason"] in ("stop", "length") and isinstance(row["steps"], list)


def test_sampling_draws_from_the_whole_vocabulary_unless_top_k_says_otherwise(tiny_mistral, problems, tmp_path):
    """--top_k reaches transformers on the hf backend, and 0 means the whole vocabulary, as on vLLM. Left unset,
    transformers used its default of 50, so the two backends sampled from different distributions: on a random
    model no sampled token then ranked past 50th."""
    tok = AutoTokenizer.from_pretrained(tiny_mistral)
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral).eval()
    prompts = {json.loads(x)["id"]: json.loads(x)["problem"] for x in problems.read_text().splitlines()}

    def ranks(top_k):
        out = tmp_path / f"k{top_k}"
        generate(GenerateOptions(problems=str(problems), model=str(tiny_mistral), out=str(out), limit=4, n=2,
                                 temperature=1.0, top_k=top_k, max_new_tokens=6, batch_size=1, progress=False))
        found = []
        for row in map(json.loads, (out / "samples.jsonl").read_text().splitlines()):
            ids = tok(render_prompt(prompts[row["problem_id"]], [])).input_ids
            for t in row["token_ids"]:  # how many tokens the model ranks above the sampled one
                with torch.no_grad():
                    logits = model(torch.tensor([ids])).logits[0, -1]
                found.append(int((logits > logits[t]).sum()))
                ids.append(t)
        return found

    whole, top3 = ranks(0), ranks(3)
    assert len(whole) >= 8 and len(top3) >= 8
    assert max(top3) < 3
    assert sum(r >= 50 for r in whole) > len(whole) // 2, whole  # a random model: most tokens rank past 50


def test_generation_resumes_from_its_cache(tiny_mistral, problems, tmp_path):
    opts = dict(problems=str(problems), model=str(tiny_mistral), out=str(tmp_path), max_new_tokens=6, n=2,
                temperature=0.8, batch_size=4, progress=False)
    generate(GenerateOptions(**opts))
    full = (tmp_path / "samples.jsonl").read_text()
    cache = tmp_path / "generate_cache.jsonl"
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:10]) + "\n" + lines[10][:20])  # killed mid-write: 10 samples and a torn line
    again = generate(GenerateOptions(**opts))
    assert again["cache_hits"] == 10 and again["generated"] == 14
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 24
    assert [json.loads(x)["id"] for x in full.splitlines()] == \
        [json.loads(x)["id"] for x in (tmp_path / "samples.jsonl").read_text().splitlines()]


def test_grade_reads_generated_samples(tiny_mistral, problems, tmp_path):
    generate(GenerateOptions(problems=str(problems), model=str(tiny_mistral), out=str(tmp_path / "g"),
                             max_new_tokens=6, progress=False))
    report = grade(GradeOptions(problems=str(problems), samples=str(tmp_path / "g"), out=str(tmp_path / "r")))
    assert report["samples"] == 12 and 0.0 <= report["accuracy"] <= 1.0
    grades = [json.loads(x) for x in (tmp_path / "r" / "grades.jsonl").read_text().splitlines()]
    assert all(isinstance(g["correct"], bool) for g in grades)
