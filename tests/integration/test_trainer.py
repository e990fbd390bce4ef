"""StepwiseDPOTrainer on real tiny models: TRL equivalence, T5, step losses, resume, guards."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stepdpo.train.config import StepwiseDPOConfig
from stepdpo.data.pairs import read_pairs, render_pair, write_jsonl
from stepdpo.train.run import build_trainer, train
from stepdpo.train.trainer import NonFiniteError, StepwiseDPOTrainer

LN2 = math.log(2)


def config(tmp_path: Path, model: Path, pairs: Path, **kw) -> StepwiseDPOConfig:
    base = dict(
        output_dir=str(tmp_path / "run"), model_name_or_path=str(model), train_pairs=str(pairs), beta=0.1,
        learning_rate=1e-3, lr_scheduler_type="linear", max_steps=3, per_device_train_batch_size=4,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        gradient_checkpointing=False, resume="never", disable_tqdm=True, dataloader_drop_last=True,
    )
    base.update(kw)
    return StepwiseDPOConfig(**base)


def losses(history) -> list[float]:
    return [h["loss"] for h in history if "loss" in h and "train_loss" not in h]


@pytest.fixture(scope="module")
def scored_pairs(synth_pairs, tmp_path_factory):
    """Training pairs with step rewards that favour the chosen side (as labels would)."""
    pairs = read_pairs(synth_pairs / "train" / "pairs.jsonl")[:64]
    for i, p in enumerate(pairs):
        p["chosen_step_rewards"] = [0.8 + 0.001 * i for _ in p["chosen_steps"]]
        p["rejected_step_rewards"] = [0.3 for _ in p["rejected_steps"]]
    path = tmp_path_factory.mktemp("scored") / "pairs.jsonl"
    write_jsonl(path, pairs)
    return path


def test_dpo_mode_equals_trl(tiny_mistral, synth_pairs, tmp_path):
    """step_loss=dpo + append_eos on a decoder-only model: the same losses as trl.DPOTrainer."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    pairs_path = synth_pairs / "train" / "pairs.jsonl"
    pairs = read_pairs(pairs_path)[:48]
    write_jsonl(tmp_path / "p.jsonl", pairs)
    common = dict(beta=0.1, learning_rate=1e-3, max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                  save_strategy="no", report_to="none", use_cpu=True, seed=0, gradient_checkpointing=False,
                  disable_tqdm=True, lr_scheduler_type="linear", bf16=False)
    rows = [render_pair(p) for p in pairs]
    ds = Dataset.from_dict({"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows],
                            "rejected": [r[2] for r in rows]})
    tok = AutoTokenizer.from_pretrained(tiny_mistral)
    trl_trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_mistral), args=DPOConfig(
        output_dir=str(tmp_path / "trl"), **common), train_dataset=ds, processing_class=tok)
    trl_trainer.train()
    ours = build_trainer(StepwiseDPOConfig(output_dir=str(tmp_path / "ours"), model_name_or_path=str(tiny_mistral),
                                           train_pairs=str(tmp_path / "p.jsonl"), append_eos=True, **common))
    ours.train()
    a, b = losses(trl_trainer.state.log_history), losses(ours.state.log_history)
    assert len(a) == len(b) == 3
    assert b[0] == pytest.approx(LN2, abs=1e-6)
    assert b == pytest.approx(a, abs=1e-5)
    assert b[1] != pytest.approx(LN2, abs=1e-4)  # it does train
    # a drop-in: the very dataset given to trl.DPOTrainer works too, with the same losses
    same_rows = StepwiseDPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_mistral), args=StepwiseDPOConfig(
        output_dir=str(tmp_path / "rows"), append_eos=True, **common), train_dataset=ds, processing_class=tok)
    same_rows.train()
    assert losses(same_rows.state.log_history) == pytest.approx(a, abs=1e-5)


def test_no_eos_by_default(tiny_mistral, synth_pairs, tmp_path):
    trainer = build_trainer(config(tmp_path, tiny_mistral, synth_pairs / "train" / "pairs.jsonl", max_steps=1))
    eos = trainer.processing_class.eos_token_id
    row = trainer.train_dataset[0]
    assert row["chosen_ids"] and eos not in row["chosen_ids"] and eos not in row["rejected_ids"]


def test_t5_trains_with_the_same_trainer(tiny_t5, synth_pairs, tmp_path):
    cfg = config(tmp_path, tiny_t5, synth_pairs / "train" / "pairs.jsonl", max_steps=40, per_device_train_batch_size=8,
                 lr_scheduler_type="constant")
    summary = train(cfg)
    got = losses(summary["log_history"])
    assert got[0] == pytest.approx(LN2, abs=1e-6)
    assert sum(got[-10:]) / 10 < sum(got[:10]) / 10 - 0.05
    assert (Path(cfg.output_dir) / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("mode", ["step_weighted", "step_margin", "seed"])
def test_step_reward_losses(mode, tiny_mistral, scored_pairs, tmp_path):
    summary = train(config(tmp_path, tiny_mistral, scored_pairs, step_loss=mode, max_steps=16,
                           per_device_train_batch_size=8, lr_scheduler_type="constant"))
    got = losses(summary["log_history"])
    assert all(math.isfinite(x) for x in got)
    gaps = [h["step_reward_gap"] for h in summary["log_history"] if "step_reward_gap" in h]
    assert gaps and all(0.45 < g < 0.6 for g in gaps)
    if mode == "step_weighted":  # 2*sigmoid(~0.53) ~ 1.26 times ln 2 at the first step
        assert got[0] == pytest.approx(2 / (1 + math.exp(-gaps[0])) * LN2, rel=0.02)
    if mode == "step_margin":  # -log sigmoid(-gap) at the first step
        assert got[0] == pytest.approx(-math.log(1 / (1 + math.exp(gaps[0]))), rel=0.02)
    assert sum(got[-4:]) < sum(got[:4])


def test_dpop_holds_the_chosen_steps_up_where_dpo_lets_them_fall(tiny_mistral, synth_pairs, tmp_path):
    """DPO-Positive trains on unscored pairs. On these pairs plain DPO at this rate meets its objective partly by
    lowering the chosen steps too (their implicit reward beta * (c - c0) goes below zero, the likelihood displacement
    DPOP was made for); with the same data, seed and rate, DPOP's penalty keeps them above the reference."""
    pairs = synth_pairs / "train" / "pairs.jsonl"
    common = dict(max_steps=16, per_device_train_batch_size=8, lr_scheduler_type="constant")
    dpo = train(config(tmp_path / "dpo", tiny_mistral, pairs, **common))["log_history"]
    dpop = train(config(tmp_path / "dpop", tiny_mistral, pairs, step_loss="dpop", dpop_lambda=50.0,
                        **common))["log_history"]
    for history in (dpo, dpop):
        assert losses(history)[0] == pytest.approx(LN2, abs=1e-6)  # policy == reference: no penalty yet
        assert all(math.isfinite(x) for x in losses(history))
    chosen = {name: [h["rewards/chosen"] for h in history if "rewards/chosen" in h][1:]
              for name, history in (("dpo", dpo), ("dpop", dpop))}
    assert len(chosen["dpop"]) == 15
    assert all(r < 0 for r in chosen["dpo"])
    assert all(r > 0 for r in chosen["dpop"])


def test_step_losses_need_rewards(tiny_mistral, synth_pairs, tmp_path):
    from stepdpo.data.pairs import PairFileError

    with pytest.raises(PairFileError, match="stepdpo score"):
        build_trainer(config(tmp_path, tiny_mistral, synth_pairs / "train" / "pairs.jsonl", step_loss="seed"))


def test_unscored_eval_pairs_fail_before_training(tiny_mistral, scored_pairs, synth_pairs, tmp_path, monkeypatch):
    from stepdpo.data.pairs import PairFileError
    from stepdpo.train import modeling

    def no_model_load(*a, **k):
        raise AssertionError("the model was loaded before the eval pairs were checked")

    monkeypatch.setattr(modeling, "load_model", no_model_load)
    with pytest.raises(PairFileError, match=r"test/pairs.jsonl:1: .*stepdpo score"):
        build_trainer(config(tmp_path, tiny_mistral, scored_pairs, step_loss="step_margin",
                             eval_pairs=str(synth_pairs / "test" / "pairs.jsonl"), eval_strategy="steps", eval_steps=1))


def test_precomputed_reference_matches_live(tiny_mistral, synth_pairs, tmp_path):
    pairs = synth_pairs / "train" / "pairs.jsonl"
    live = train(config(tmp_path / "a", tiny_mistral, pairs))
    pre = train(config(tmp_path / "b", tiny_mistral, pairs, precompute_ref_log_probs=True))
    assert losses(pre["log_history"]) == pytest.approx(losses(live["log_history"]), abs=1e-5)


def test_lora_reference_is_the_disabled_adapter(tiny_mistral, synth_pairs, tmp_path):
    trainer = build_trainer(config(tmp_path, tiny_mistral, synth_pairs / "train" / "pairs.jsonl", use_peft=True,
                                   lora_r=4, max_steps=3))
    # ln 2 alone would not tell: a frozen copy gives it too. No second model is held: the reference is the
    # policy with its adapter switched off.
    assert trainer.ref_model is None
    assert sum(1 for m in trainer.model.modules() if type(m).__name__ == "MistralForCausalLM") == 1
    trainer.train()
    got = losses(trainer.state.log_history)
    assert got[0] == pytest.approx(LN2, abs=1e-6)


def test_full_finetuning_holds_a_frozen_reference(tiny_mistral, synth_pairs, tmp_path):
    trainer = build_trainer(config(tmp_path, tiny_mistral, synth_pairs / "train" / "pairs.jsonl", max_steps=1))
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    assert type(trainer.ref_model) is type(trainer.model)


def test_resume_reproduces_the_uninterrupted_run(tiny_mistral, synth_pairs, tmp_path):
    """3 steps, pre-emption (flag file), resume, 3 more == 6 uninterrupted steps: losses and weights."""
    from transformers import TrainerCallback

    pairs = synth_pairs / "train" / "pairs.jsonl"
    kw = dict(max_steps=6, save_strategy="steps", save_steps=3, resume="auto")
    full = train(config(tmp_path / "full", tiny_mistral, pairs, **kw))

    flag = tmp_path / "preempt.flag"

    class FlagAt3(TrainerCallback):
        def on_step_end(self, args, state, control, **k):
            if state.global_step == 3:
                flag.write_text("stop")

    class Interrupted(StepwiseDPOTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            # callbacks run in order: the flag must exist before the guard looks for it at step 3
            self.callback_handler.callbacks.insert(0, FlagAt3())

    cfg = config(tmp_path / "split", tiny_mistral, pairs, preempt_flag_file=str(flag), **kw)
    first = train(cfg, trainer_cls=Interrupted)
    assert first["preempted"] and first["global_step"] == 3
    ckpt = tmp_path / "split" / "run" / "checkpoint-3"
    assert (ckpt / "COMPLETED").is_file()
    # an incomplete later checkpoint (crash mid-save) must be ignored
    (tmp_path / "split" / "run" / "checkpoint-5").mkdir()
    flag.unlink()
    second = train(cfg)
    assert second["resumed_from"].endswith("checkpoint-3") and second["global_step"] == 6
    split_losses = losses(first["log_history"])[:3] + losses(second["log_history"])[3:]
    assert split_losses == pytest.approx(losses(full["log_history"]), abs=1e-6)
    w_full = load_file(tmp_path / "full" / "run" / "final" / "model.safetensors")
    w_split = load_file(tmp_path / "split" / "run" / "final" / "model.safetensors")
    assert all(torch.allclose(w_full[k], w_split[k], atol=1e-6) for k in w_full)


class NaNAt(StepwiseDPOTrainer):
    """Makes the loss of chosen optimizer steps NaN (1-based global step numbers)."""

    nan_steps: set = set()

    def _compute_loss(self, model, inputs, return_outputs):
        loss = super()._compute_loss(model, inputs, return_outputs)
        if self.state.global_step + 1 in self.nan_steps:
            loss = loss * float("nan")
        return loss


def test_nonfinite_step_is_skipped(tiny_mistral, synth_pairs, tmp_path):
    class Once(NaNAt):
        nan_steps = {2}

    cfg = config(tmp_path, tiny_mistral, synth_pairs / "train" / "pairs.jsonl", max_steps=3, max_nonfinite_steps=2)
    trainer = build_trainer(cfg, trainer_cls=Once)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    snapshots = []

    from transformers import TrainerCallback

    class Snap(TrainerCallback):
        def on_step_end(self, args, state, control, **k):
            snapshots.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})

    trainer.add_callback(Snap())
    trainer.train()
    assert trainer._guard.skipped == 1
    changed = lambda a, b: any(not torch.equal(a[n], b[n]) for n in a)  # noqa: E731
    assert changed(before, snapshots[0])
    assert not changed(snapshots[0], snapshots[1])  # step 2 skipped: no update at all
    assert changed(snapshots[1], snapshots[2])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_nonfinite_in_a_row_aborts(tiny_mistral, synth_pairs, tmp_path):
    class Always(NaNAt):
        nan_steps = {2, 3, 4, 5}

    cfg = config(tmp_path, tiny_mistral, synth_pairs / "train" / "pairs.jsonl", max_steps=6, max_nonfinite_steps=2)
    trainer = build_trainer(cfg, trainer_cls=Always)
    with pytest.raises(NonFiniteError, match=r"2 optimizer steps in a row .* at step 3 \(pairs \['"):
        trainer.train()


def test_truncations_are_counted_and_logged(tiny_mistral, synth_pairs, tmp_path):
    summary = train(config(tmp_path, tiny_mistral, synth_pairs / "train" / "pairs.jsonl", max_steps=2, max_length=48))
    stats = summary["truncation"]["train"]
    assert stats["truncated"] > 0 and stats["pairs"] > stats["truncated"]
    logged = [h["truncated_pairs"] for h in summary["log_history"] if "truncated_pairs" in h]
    assert logged and logged[0] == stats["truncated"]


def test_t5_step_is_never_cut_when_the_prompt_fills_max_length(tiny_t5, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_t5)
    long_problem = "Start with 7. " + "Add 1, then subtract 1. " * 6 + "What is the result?"
    pair = {"id": "p1", "kind": "step", "problem": long_problem, "prefix_steps": ["7 + 1 = 8", "8 - 1 = 7"],
            "chosen_steps": ["7 + 1 = 8 and so on for a while"], "rejected_steps": ["7 + 1 = 9"], "source": []}
    pairs_file = tmp_path / "p.jsonl"
    write_jsonl(pairs_file, [pair])
    prompt_len = len(tok(render_pair(pair)[0]).input_ids)
    max_length = prompt_len - 2  # the full prompt does not fit; without its prefix steps it does
    trainer = build_trainer(config(tmp_path, tiny_t5, pairs_file, max_length=max_length, max_steps=1,
                                   per_device_train_batch_size=1, dataloader_drop_last=False))
    row = trainer.train_dataset[0]
    assert len(row["prompt_ids"]) <= max_length < len(row["prompt_ids"]) + len(row["chosen_ids"])
    batch = trainer.data_collator([row])
    completion_tokens = batch["completion_mask"].sum(dim=1).tolist()
    assert completion_tokens == [len(row["chosen_ids"]), len(row["rejected_ids"])]  # whole steps


def test_t5_dropout_is_off_when_asked(tiny_t5, synth_pairs, tmp_path):
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tiny_t5).dropout_rate == 0.1  # flan-t5-small's real value, kept
    trainer = build_trainer(config(tmp_path, tiny_t5, synth_pairs / "train" / "pairs.jsonl", max_steps=1))
    attn = [m for m in trainer.model.modules() if type(m).__name__ == "T5Attention"]
    assert attn and all(m.dropout == 0.0 for m in attn)
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    from stepdpo.train.logps import sequence_logps

    with torch.no_grad():  # training mode twice, same numbers: nothing random is left
        a = sequence_logps(trainer.model, batch)
        b = sequence_logps(trainer.model, batch)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _hub_cache_with_two_revisions(home: Path, main_dir: Path, v1_dir: Path) -> None:
    """huggingface_hub's real cache layout for a repo `acme/tiny` with `main` and `v1` at different commits."""
    import shutil

    repo = home / "hub" / "models--acme--tiny"
    for ref, src, commit in (("main", main_dir, "a" * 40), ("v1", v1_dir, "b" * 40)):
        shutil.copytree(src, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def test_full_finetuning_reference_comes_from_the_pinned_revision(tiny_mistral, synth_pairs, tmp_path, monkeypatch):
    from stepdpo.tiny import build_tiny_model

    other = build_tiny_model("mistral", tmp_path / "other", seed=1)  # what `main` holds: other weights
    _hub_cache_with_two_revisions(tmp_path / "hf", other, tiny_mistral)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    trainer = build_trainer(config(tmp_path, "acme/tiny", synth_pairs / "train" / "pairs.jsonl", model_revision="v1",
                                   max_steps=1))
    ref = dict(trainer.ref_model.named_parameters())
    for name, p in trainer.model.named_parameters():  # the reference is the pinned revision, as the policy
        assert torch.equal(p, ref[name]), name
    trainer.train()
    assert losses(trainer.state.log_history)[0] == pytest.approx(LN2, abs=1e-6)


def test_a_crash_while_saving_keeps_the_last_complete_checkpoint(tiny_mistral, synth_pairs, tmp_path, monkeypatch):
    """save_total_limit 1: the old checkpoint is deleted only after the new one is complete."""
    from stepdpo.train import checkpoint as trainer_mod  # where the save-and-rotate lives
    from stepdpo.train.checkpoint import complete_checkpoints

    real = trainer_mod.mark_complete
    calls = []

    def killed_on_second_save(path):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies while checkpoint-4 is being finished
        real(path)

    monkeypatch.setattr(trainer_mod, "mark_complete", killed_on_second_save)
    cfg = config(tmp_path, tiny_mistral, synth_pairs / "train" / "pairs.jsonl", max_steps=6, save_strategy="steps",
                 save_steps=2, save_total_limit=1, resume="auto")
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert [p.name for p in complete_checkpoints(cfg.output_dir)] == ["checkpoint-2"]
    monkeypatch.setattr(trainer_mod, "mark_complete", real)
    summary = train(cfg)  # the re-run resumes from it, not from step 0
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 6
    assert [p.name for p in complete_checkpoints(cfg.output_dir)] == ["checkpoint-6"]
    assert not (Path(cfg.output_dir) / "checkpoint-4").exists()  # the interrupted one was cleared away


@pytest.mark.parametrize("other", ["weights", "architecture"])
def test_resume_refuses_a_checkpoint_of_another_model(other, tiny_mistral, tiny_t5, synth_pairs, tmp_path):
    from stepdpo.errors import OptionsError
    from stepdpo.tiny import build_tiny_model

    pairs = synth_pairs / "train" / "pairs.jsonl"
    train(config(tmp_path, tiny_mistral, pairs, max_steps=2, save_strategy="steps", save_steps=2, resume="auto"))
    swapped = build_tiny_model("mistral", tmp_path / "other", seed=7) if other == "weights" else tiny_t5
    with pytest.raises(OptionsError, match=r"checkpoint-2 belongs to another run: model .*--resume never"):
        train(config(tmp_path, swapped, pairs, max_steps=4, save_strategy="steps", save_steps=2, resume="auto"))
    # told to, it starts over
    summary = train(config(tmp_path, swapped, pairs, max_steps=2, save_strategy="no", resume="never"))
    assert summary["resumed_from"] is None and summary["global_step"] == 2
