"""Reward scoring in-process: values, errors before work, single-pass PRM, cache and resume."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stepdpo.reward.hf import load_hf_backend
from stepdpo.errors import OptionsError
from stepdpo.reward.score import ScoreOptions, score
from stepdpo.reward.scorer import MethodSpec, ScoreCache, ScoreError, Substep, judge_prompt, substeps_of_pair

SUBS = [Substep("Start with 3. Add 4.", (), "3 + 4 = 7"), Substep("Start with 3. Add 4.", (), "3 + 4 = 8"),
        Substep("Start with 3. Add 4, then subtract 2.", ("3 + 4 = 7",), "7 - 2 = 5")]


def test_judge_equals_next_token_probabilities(tiny_mistral):
    scorer = load_hf_backend(MethodSpec(str(tiny_mistral), "judge"))
    tok = AutoTokenizer.from_pretrained(tiny_mistral)
    model = AutoModelForCausalLM.from_pretrained(tiny_mistral)
    got = scorer.score_judge(SUBS)
    for sub, reward in zip(SUBS, got):
        ids = tok(judge_prompt(sub), return_tensors="pt").input_ids
        p = model(ids).logits[0, -1].softmax(-1)
        yes, no = tok(" yes", add_special_tokens=False).input_ids[0], tok(" no", add_special_tokens=False).input_ids[0]
        assert reward == pytest.approx((p[yes] / (p[yes] + p[no])).item(), abs=1e-5)


def test_judge_t5_reads_the_first_decoder_token(tiny_t5):
    from transformers import AutoModelForSeq2SeqLM

    got = load_hf_backend(MethodSpec(str(tiny_t5), "judge")).score_judge(SUBS)
    tok = AutoTokenizer.from_pretrained(tiny_t5)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5).eval()
    yes, no = tok(" yes", add_special_tokens=False).input_ids, tok(" no", add_special_tokens=False).input_ids
    if len(yes) != 1:
        yes, no = tok("yes", add_special_tokens=False).input_ids, tok("no", add_special_tokens=False).input_ids
    for sub, reward in zip(SUBS, got):
        ids = tok(judge_prompt(sub), return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(input_ids=ids, decoder_input_ids=torch.tensor([[model.config.decoder_start_token_id]])).logits
        p = logits[0, 0].softmax(-1)
        assert reward == pytest.approx((p[yes[0]] / (p[yes[0]] + p[no[0]])).item(), abs=1e-6)


def test_prm_single_pass_equals_scoring_every_prefix(tiny_mistral):
    scorer = load_hf_backend(MethodSpec(str(tiny_mistral), "prm"))
    steps = ["3 + 4 = 7", "7 - 2 = 5", "5 * 1 = 5", "5 + 4 = 9"]
    one_pass = scorer.score_prm([("Start with 3.", steps)])[0]
    per_prefix = [scorer.score_prm([("Start with 3.", steps[: k + 1])])[0][-1] for k in range(len(steps))]
    assert one_pass == pytest.approx(per_prefix, abs=1e-5)  # causal: later steps do not change earlier rewards


def test_judge_without_yes_no_tokens_fails_before_work(tmp_path, tiny_mistral):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>", "<s>", "</s>"] + list("abcdefghijklmnopqrstuvwxyz0123456789 "))}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    d = tmp_path / "m"
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="</s>").save_pretrained(d)
    (d / "config.json").write_text((tiny_mistral / "config.json").read_text())
    with pytest.raises(ScoreError, match="no single token for yes and no"):
        load_hf_backend(MethodSpec(str(d), "judge"))


def test_prm_without_step_tag_fails_before_work(tiny_mistral):
    with pytest.raises(ScoreError, match="step tag 'STEPTAG' is .* tokens, not one"):
        load_hf_backend(MethodSpec(str(tiny_mistral), "prm", step_tag="STEPTAG"))


def test_cache_survives_a_torn_line(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = ScoreCache(path)
    cache.put_many([("a", 0.25), ("b", 0.5)])
    cache.close()
    with path.open("a") as f:
        f.write('{"key": "c", "rew')  # a crash mid-write
    cache = ScoreCache(path)
    assert cache.get("a") == 0.25 and cache.get("b") == 0.5 and "c" not in cache


def test_keys_cover_model_method_and_context():
    spec = MethodSpec("m", "judge")
    k = spec.key(SUBS[0])
    assert k != MethodSpec("m2", "judge").key(SUBS[0]) and k != MethodSpec("m", "prm").key(SUBS[0])
    assert k != spec.key(Substep(SUBS[0].problem, ("x",), SUBS[0].step))


def args(pairs, model, out, **kw):
    return ScoreOptions(pairs=str(pairs), model=str(model), out=str(out), batch_size=8, progress=False,
                        health_timeout=5, **kw)


def test_score_report_and_resume_scores_only_what_is_missing(tiny_mistral, synth_pairs, tmp_path):
    pairs = synth_pairs / "test" / "pairs.jsonl"
    full = score(args(pairs, tiny_mistral, tmp_path / "full"))
    assert full["scored"] == full["substeps"] and full["cache_hits"] == 0
    assert set(full["reward_accuracy"]) == {"pairs", "per_step", "summed"}
    # a crashed run: keep only the first third of the cache
    lines = (tmp_path / "full" / "score_cache.jsonl").read_text().splitlines()
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "score_cache.jsonl").write_text("\n".join(lines[: len(lines) // 3]) + "\n")
    again = score(args(pairs, tiny_mistral, tmp_path / "again"))
    assert again["cache_hits"] == len(lines) // 3 and again["scored"] == full["substeps"] - len(lines) // 3
    a = [json.loads(x) for x in (tmp_path / "full" / "pairs.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "again" / "pairs.jsonl").read_text().splitlines()]
    # same pairs, same rewards (up to float noise: batches are composed differently after a resume)
    assert [{k: v for k, v in p.items() if not k.endswith("rewards")} for p in a] == \
        [{k: v for k, v in p.items() if not k.endswith("rewards")} for p in b]
    for p, q in zip(a, b):
        for side in ("chosen_step_rewards", "rejected_step_rewards"):
            assert p[side] == pytest.approx(q[side], abs=1e-5)
    assert len((tmp_path / "again" / "score_cache.jsonl").read_text().splitlines()) == len(lines)


def test_substeps_of_solution_pairs():
    pair = {"problem": "Q", "prefix_steps": ["p"], "chosen_steps": ["a", "b"], "rejected_steps": ["c"]}
    subs = substeps_of_pair(pair)
    assert [s.previous for s in subs["chosen"]] == [("p",), ("p", "a")]
    assert subs["rejected"][0] == Substep("Q", ("p",), "c")


def test_vllm_backend_needs_a_url(tiny_mistral, synth_pairs, tmp_path):
    with pytest.raises(OptionsError, match="needs at least one --url"):
        args(synth_pairs / "test" / "pairs.jsonl", tiny_mistral, tmp_path, backend="vllm")
