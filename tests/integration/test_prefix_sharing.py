"""Prefix sharing gives the same per-pair log-probabilities, gradients and losses as TRL's two-row layout.

Run on the tiny Mistral with Mistral-7B-v0.1's own tokenizer (32,000 pieces) and real step pairs; DDP and
ZeRO-3 are covered in test_distributed.py (their reference run is unshared, the launched runs share).
"""

from __future__ import annotations

import logging

import pytest
import torch

from stepdpo.data.pairs import read_pairs, render_pair, write_jsonl
from stepdpo.train.config import StepwiseDPOConfig
from stepdpo.train.logps import sequence_logps
from stepdpo.train.prefix_sharing import PrefixSharingUnavailable
from stepdpo.train.run import build_trainer
from stepdpo.train.trainer import EXTRA_KEYS, StepwiseDPOTrainer

TOL = 1e-5  # fp32, per pair (the bar)
# A log-prob is a sum over the step's tokens (-72 for some of these pairs), and float32 keeps 7 significant digits:
# two layouts that add the same terms in another order differ by a few units of the last place of the sum, which is
# 1.5e-5 at -72 on some CPUs (seen in CI: -72.38772583 vs -72.38774109, a relative 2e-7) and 0 on others. So sums are
# compared within 1e-5 or a relative 1e-6 (8 float32 ulps), whichever is larger.
REL = 1e-6


@pytest.fixture(scope="module")
def pairs(synth_pairs, tmp_path_factory):
    """Step pairs with step rewards, so every loss mode can run on them."""
    rows = read_pairs(synth_pairs / "train" / "pairs.jsonl")[:24]
    for i, p in enumerate(rows):
        p["chosen_step_rewards"] = [0.7 + 0.01 * i for _ in p["chosen_steps"]]
        p["rejected_step_rewards"] = [0.2 for _ in p["rejected_steps"]]
    path = tmp_path_factory.mktemp("sharing") / "pairs.jsonl"
    write_jsonl(path, rows)
    return path


def config(tmp_path, model, pairs, sharing, **kw):
    base = dict(output_dir=str(tmp_path / f"run-{sharing}"), model_name_or_path=str(model), train_pairs=str(pairs),
                beta=0.1, learning_rate=1e-3, max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                save_strategy="no", report_to="none", use_cpu=True, seed=0, resume="never", disable_tqdm=True,
                gradient_checkpointing=False, lr_scheduler_type="linear", prefix_sharing=sharing)
    base.update(kw)
    return StepwiseDPOConfig(**base)


def policy_base(trainer):
    m = trainer.accelerator.unwrap_model(trainer.model)
    return m.get_base_model() if hasattr(m, "get_base_model") else m


def logps_and_grads(trainer):
    """Per-pair policy log-probs, their gradients, and the reference log-probs, on the first 4 pairs."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    inputs = {k: v for k, v in batch.items() if k not in EXTRA_KEYS}
    model = trainer.model
    model.train()
    chosen, rejected = sequence_logps(model, inputs)
    (chosen.sum() - 2 * rejected.sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    ref = trainer.compute_ref_log_probs(trainer.ref_model if trainer.ref_model is not None else model, inputs)
    return chosen.detach(), rejected.detach(), grads, ref


SETUPS = {
    "sdpa": dict(attn_implementation="sdpa"),
    "eager": dict(attn_implementation="eager"),
    "lora": dict(use_peft=True, lora_r=4, lora_dropout=0.0),
    "qlora": dict(load_in_4bit=True, lora_r=4, lora_dropout=0.0, bnb_4bit_compute_dtype="float32",
                  bnb_4bit_quant_storage="float32"),
    "gradient_checkpointing": dict(gradient_checkpointing=True),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_same_logps_and_gradients_as_two_rows(setup, tiny_mistral_v1, pairs, tmp_path):
    got = {}
    for sharing in ("false", "true"):
        trainer = build_trainer(config(tmp_path, tiny_mistral_v1, pairs, sharing, **SETUPS[setup]))
        assert trainer.prefix_sharing is (sharing == "true")
        got[sharing] = logps_and_grads(trainer)
        models = {id(policy_base(trainer)): policy_base(trainer)}
        if trainer.ref_model is not None:
            models[id(trainer.ref_model)] = trainer.accelerator.unwrap_model(trainer.ref_model)
        shared_calls = sum(getattr(m, "_stepdpo_shared_calls", 0) for m in models.values())
        assert shared_calls == (2 if sharing == "true" else 0)  # the policy forward and the reference forward
    (c0, r0, g0, ref0), (c1, r1, g1, ref1) = got["false"], got["true"]
    assert torch.allclose(c1, c0, atol=TOL, rtol=REL) and torch.allclose(r1, r0, atol=TOL, rtol=REL)
    assert torch.allclose(ref1[0], ref0[0], atol=TOL, rtol=REL) and torch.allclose(ref1[1], ref0[1], atol=TOL, rtol=REL)
    assert g0.keys() == g1.keys() and g0
    for name in g0:
        assert torch.allclose(g1[name], g0[name], atol=1e-5, rtol=1e-4), name


LOSSES = {
    "sigmoid": dict(),
    "ipo": dict(loss_type=["ipo"]),
    "sigmoid+sft": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0]),
    "ld_alpha+weighting": dict(ld_alpha=0.5, use_weighting=True),
    "precomputed_reference": dict(precompute_ref_log_probs=True),
    "step_weighted": dict(step_loss="step_weighted"),
    "step_margin": dict(step_loss="step_margin"),
    "seed": dict(step_loss="seed"),
    "dpop": dict(step_loss="dpop", dpop_lambda=5.0),
}


@pytest.mark.parametrize("mode", list(LOSSES))
def test_every_loss_mode_trains_the_same(mode, tiny_mistral_v1, pairs, tmp_path):
    history = {}
    for sharing in ("false", "true"):
        # SGD: AdamW divides each gradient element by its own magnitude, so float-order noise in near-zero
        # gradients (1e-9) becomes a difference of up to lr in a weight; TRL's own two-row layout differs from
        # itself by 2e-5 in the loss after two AdamW steps at lr=1e-3 when only the padding changes. SGD keeps
        # the noise at its own size, so three steps test the whole training loop at the per-pair bar.
        trainer = build_trainer(config(tmp_path, tiny_mistral_v1, pairs, sharing, optim="sgd", learning_rate=0.05,
                                       **LOSSES[mode]))
        trainer.train()
        history[sharing] = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
        assert (getattr(policy_base(trainer), "_stepdpo_shared_calls", 0) > 0) is (sharing == "true")
    assert len(history["true"]) == 3
    for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
        a = [h[key] for h in history["false"]]
        b = [h[key] for h in history["true"]]
        assert b == pytest.approx(a, abs=TOL, rel=REL), key
    assert history["true"][2]["loss"] != pytest.approx(history["true"][0]["loss"], abs=1e-3)  # it does train


def test_flex_attention_reference_is_the_same(tiny_mistral_v1, pairs, tmp_path):
    """Flex attention takes the shared mask as a BlockMask. PyTorch has no flex-attention backward on CPU, so this
    checks the forward: reference and eval log-probs."""
    from transformers import AutoModelForCausalLM

    from stepdpo.train.logps import prepare_for_logps

    trainer = build_trainer(config(tmp_path, tiny_mistral_v1, pairs, "false"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    inputs = {k: v for k, v in batch.items() if k not in EXTRA_KEYS}
    out = {}
    for impl, sharing in (("sdpa", "false"), ("flex_attention", "true")):
        model = AutoModelForCausalLM.from_pretrained(tiny_mistral_v1, attn_implementation=impl).eval()
        prepare_for_logps(model, sharing)
        with torch.no_grad():
            out[impl] = sequence_logps(model, inputs)
        assert getattr(model, "_stepdpo_shared_calls", 0) == (1 if sharing == "true" else 0)
    for a, b in zip(out["sdpa"], out["flex_attention"]):
        assert torch.allclose(a, b, atol=TOL, rtol=REL)


def test_t5_runs_the_encoder_once_per_pair(tiny_t5, pairs, tmp_path):
    got = {}
    for sharing in ("false", "true"):
        trainer = build_trainer(config(tmp_path, tiny_t5, pairs, sharing))
        encoder_rows = []
        policy_base(trainer).get_encoder().register_forward_hook(
            lambda mod, args, kwargs, out: encoder_rows.append(kwargs["input_ids"].size(0)), with_kwargs=True)
        got[sharing] = logps_and_grads(trainer)
        assert encoder_rows[0] == (4 if sharing == "true" else 8)  # 4 pairs: 4 encoder rows instead of 8
    (c0, r0, g0, ref0), (c1, r1, g1, ref1) = got["false"], got["true"]
    assert torch.allclose(c1, c0, atol=TOL, rtol=REL) and torch.allclose(r1, r0, atol=TOL, rtol=REL)
    assert torch.allclose(ref1[0], ref0[0], atol=TOL, rtol=REL) and torch.allclose(ref1[1], ref0[1], atol=TOL, rtol=REL)
    for name in g0:
        assert torch.allclose(g1[name], g0[name], atol=1e-5, rtol=1e-4), name


def test_rows_whose_prompts_differ_after_truncation_run_unshared(tiny_mistral_v1, pairs, tmp_path):
    """TRL-format rows cut with keep_end lose a different number of prompt tokens in the chosen and the rejected
    row: those batches cannot share, and must give TRL's numbers."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [render_pair(p) for p in read_pairs(pairs)]
    # rejected steps of other lengths than the chosen ones, so keep_end cuts the two rows' prompts differently
    ds = Dataset.from_dict({"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows],
                            "rejected": [r[2] + " and so on" * (i % 3) for i, r in enumerate(rows)]})
    tok = AutoTokenizer.from_pretrained(tiny_mistral_v1)
    history = {}
    for sharing in ("false", "true"):
        args = config(tmp_path, tiny_mistral_v1, pairs, sharing, max_length=40, truncation_mode="keep_end",
                      optim="sgd", learning_rate=0.05)  # SGD: see test_every_loss_mode_trains_the_same
        args.train_pairs = None
        trainer = StepwiseDPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_mistral_v1), args=args,
                                     train_dataset=ds, processing_class=tok)
        trainer.train()
        history[sharing] = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    assert history["true"] == pytest.approx(history["false"], abs=TOL)


def test_auto_falls_back_and_says_so_once_true_fails(tiny_mistral_v1, pairs, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="stepdpo.train"):
        trainer = build_trainer(config(tmp_path, tiny_mistral_v1, pairs, "auto", padding_free=True))
    assert trainer.prefix_sharing is False
    said = [r.getMessage() for r in caplog.records if "prefix_sharing=auto" in r.getMessage()]
    assert len(said) == 1 and "padding_free" in said[0]
    with pytest.raises(PrefixSharingUnavailable, match="prefix_sharing=true: padding_free"):
        build_trainer(config(tmp_path, tiny_mistral_v1, pairs, "true", padding_free=True))


def test_yaml_booleans_and_bad_values(tmp_path):
    assert StepwiseDPOConfig(output_dir=str(tmp_path), prefix_sharing=True).prefix_sharing == "true"
    assert StepwiseDPOConfig(output_dir=str(tmp_path), prefix_sharing=False).prefix_sharing == "false"
    with pytest.raises(ValueError, match="prefix_sharing='sometimes': choose auto, true or false"):
        StepwiseDPOConfig(output_dir=str(tmp_path), prefix_sharing="sometimes")
