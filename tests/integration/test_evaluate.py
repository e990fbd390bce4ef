"""`stepdpo eval`: the trainer's own log-prob path, and the settings of the run it evaluates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stepdpo.data.pairs import read_pairs, render_pair
from stepdpo.evaluate import EvalOptions, completion_logps, load_for_eval, run_eval
from stepdpo.train.config import StepwiseDPOConfig
from stepdpo.train.run import train

pytestmark = pytest.mark.integration


def _reference_logps(model_dir, pairs):
    """log p(step | prompt) summed over the step's tokens, computed here from plain logits (not our helper)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for pair in pairs:
        prompt, chosen, _ = render_pair(pair)
        p, full = tok(prompt).input_ids, tok(prompt + chosen).input_ids
        n = next(i for i in range(len(p) + 1) if i == len(p) or p[i] != full[i])
        with torch.no_grad():
            logp = model(torch.tensor([full])).logits[0].log_softmax(-1)
        out.append(sum(logp[i - 1, full[i]].item() for i in range(n, len(full))))
    return out


def test_eval_logps_equal_plain_logits(tiny_mistral, synth_pairs):
    pairs = read_pairs(synth_pairs / "test" / "pairs.jsonl")[:12]
    model, tok = load_for_eval(str(tiny_mistral))
    chosen, _, kept = completion_logps(model, tok, pairs, batch_size=5, progress=False)
    assert kept == list(range(12))
    assert chosen == pytest.approx(_reference_logps(tiny_mistral, pairs), abs=1e-4)


def test_eval_takes_beta_and_max_length_from_the_run(tiny_mistral, synth_pairs, tmp_path):
    run = tmp_path / "run"
    train(StepwiseDPOConfig(output_dir=str(run), model_name_or_path=str(tiny_mistral),
                            train_pairs=str(synth_pairs / "train" / "pairs.jsonl"), beta=0.5, max_length=48,
                            learning_rate=1e-3, max_steps=3, per_device_train_batch_size=4, save_strategy="no",
                            report_to="none", use_cpu=True, resume="never", disable_tqdm=True))
    test = str(synth_pairs / "test" / "pairs.jsonl")
    got = run_eval(EvalOptions(pairs=test, out=str(tmp_path / "e"), run_dir=str(run), ref_model=str(tiny_mistral),
                               progress=False))
    assert got["settings"]["beta"] == 0.5 and got["settings"]["max_length"] == 48
    assert set(got["settings"]["from"].values()) == {"run"}  # beta, max_length, append_eos, the chat settings
    assert got["skipped_too_long"] > 0  # max_length 48 really applied
    saved = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert saved["settings"]["beta"] == 0.5
    # the same evaluation with the values spelled out gives the same numbers; a flag overrides the run
    same = run_eval(EvalOptions(pairs=test, out=str(tmp_path / "f"), model=str(run / "final"), beta=0.5,
                                max_length=48, ref_model=str(tiny_mistral), progress=False))
    assert same["mean_reward_margin"] == pytest.approx(got["mean_reward_margin"], abs=1e-6)
    other = run_eval(EvalOptions(pairs=test, out=str(tmp_path / "g"), run_dir=str(run), beta=0.1,
                                 ref_model=str(tiny_mistral), progress=False))
    assert other["settings"]["from"]["beta"] == "flag"
    assert other["mean_reward_margin"] == pytest.approx(got["mean_reward_margin"] / 5, rel=1e-5)


def test_eval_of_nothing_is_an_error(tiny_mistral, synth_pairs, tmp_path):
    from stepdpo.evaluate import EvalError

    with pytest.raises(EvalError, match="no pair was evaluated"):
        run_eval(EvalOptions(pairs=str(synth_pairs / "test" / "pairs.jsonl"), out=str(tmp_path / "e"),
                             model=str(tiny_mistral), max_length=3, progress=False))


def test_a_qlora_adapter_is_evaluated_on_its_4bit_base(tiny_mistral, synth_pairs, tmp_path):
    """Eval loads the base as it was trained (nf4, from the run's config), not an unquantised copy."""
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    from stepdpo.cli import parse
    from stepdpo.train.logps import prepare_for_logps

    recipe = Path(__file__).resolve().parents[2] / "configs" / "recipes" / "tiny" / "mistral_qlora_zero3_cpu.yaml"
    config, _ = parse("train", ["--config", str(recipe), "--model_name_or_path", str(tiny_mistral), "--train_pairs",
                                str(synth_pairs / "train" / "pairs.jsonl"), "--output_dir", str(tmp_path / "run"),
                                "--max_steps", "3", "--report_to", "none", "--disable_tqdm", "true"])
    train(config)
    pairs = read_pairs(synth_pairs / "test" / "pairs.jsonl")[:8]
    model, tok = load_for_eval(str(tmp_path / "run" / "final"),
                               run_cfg=json.loads((tmp_path / "run" / "final" / "stepdpo_config.json").read_text()))
    got, _, _ = completion_logps(model, tok, pairs, progress=False)

    def with_base(**load):
        base = AutoModelForCausalLM.from_pretrained(tiny_mistral, **load)
        prepare_for_logps(base)
        peft = PeftModel.from_pretrained(base, tmp_path / "run" / "final")
        return completion_logps(peft, tok, pairs, progress=False)[0]

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)
    as_trained = with_base(quantization_config=quant, dtype=torch.float32)
    unquantised = with_base(dtype=torch.float32)
    assert got == pytest.approx(as_trained, abs=1e-5)
    assert max(abs(a - b) for a, b in zip(got, unquantised)) > 1e-3  # the difference the wrong base makes


def test_eval_reports_answer_accuracy_before_and_after(tiny_mistral, synth_pairs, tmp_path):
    from stepdpo.data.synthetic import SynthOptions, synth

    synth(SynthOptions(out=str(tmp_path / "p.jsonl"), kind="problems", problems=6, seed=3, max_value=9))
    run = tmp_path / "run"
    train(StepwiseDPOConfig(output_dir=str(run), model_name_or_path=str(tiny_mistral), use_peft=True, lora_r=4,
                            train_pairs=str(synth_pairs / "train" / "pairs.jsonl"), learning_rate=1e-2, max_steps=3,
                            per_device_train_batch_size=4, save_strategy="no", report_to="none", use_cpu=True,
                            resume="never", disable_tqdm=True))
    got = run_eval(EvalOptions(pairs=str(synth_pairs / "test" / "pairs.jsonl"), out=str(tmp_path / "e"),
                               run_dir=str(run), answers=str(tmp_path / "p.jsonl"), answer_max_new_tokens=8,
                               progress=False))
    acc = got["answer_accuracy"]
    assert acc["problems"] == 6 and 0 <= acc["before"] <= 1 and 0 <= acc["after"] <= 1
    after = [json.loads(x) for x in (tmp_path / "e" / "answers_after" / "samples.jsonl").read_text().splitlines()]
    before = [json.loads(x) for x in (tmp_path / "e" / "answers_before" / "samples.jsonl").read_text().splitlines()]
    assert len(after) == len(before) == 6
    assert any(a["token_ids"] != b["token_ids"] for a, b in zip(after, before))  # the adapter was on, then off
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["answer_accuracy"]["after"] == acc["after"]
