"""`stepdpo train`: one process of a (possibly multi-process) training run.

Launched directly for one CPU process, or by `accelerate launch -m stepdpo.train.run` (see
launch/train.sh) for DDP / DeepSpeed. Arguments: `--config recipe.yaml` plus any StepwiseDPOConfig
field as `--field value` (CLI overrides YAML).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger("stepdpo.train")


def parse_config(argv: list[str] | None = None):
    """StepwiseDPOConfig from `--config recipe.yaml` plus overrides (the same parser as `stepdpo train`)."""
    from stepdpo.cli import parse

    config, _ = parse("train", list(argv or []))
    return config


def check_config(config) -> None:
    from stepdpo.errors import OptionsError

    if not config.model_name_or_path:
        raise OptionsError("--model_name_or_path is required (in the recipe or on the command line)")
    if not config.train_pairs:
        raise OptionsError("--train_pairs is required: a pairs.jsonl from `stepdpo prepare`")


def build_trainer(config, callbacks=None, trainer_cls=None):
    """Load data, model and tokenizer as configured; return a ready StepwiseDPOTrainer."""
    from stepdpo.auth import resolve_token
    from stepdpo.data.pairs import read_pairs
    from stepdpo.train.modeling import load_model, load_tokenizer
    from stepdpo.train.trainer import StepwiseDPOTrainer

    token = resolve_token(config.hf_token_file).value
    # Read (and validate) both files before any model loads: unscored pairs for a step-reward loss, or a
    # malformed line, fail here, not at the first evaluation after hours of training.
    from stepdpo.train.losses import REWARD_LOSSES

    needs_rewards = config.step_loss in REWARD_LOSSES
    train_pairs = read_pairs(config.train_pairs, require_rewards=needs_rewards)
    if not train_pairs:
        from stepdpo.data.pairs import PairFileError

        raise PairFileError(f"--train_pairs {config.train_pairs}: the file holds no pairs; run `stepdpo prepare` "
                            "(it reports why records gave none)")
    if config.max_train_pairs:
        train_pairs = train_pairs[: config.max_train_pairs]
    eval_pairs = read_pairs(config.eval_pairs, require_rewards=needs_rewards) if config.eval_pairs else None
    tokenizer = load_tokenizer(config.model_name_or_path, config.model_revision, token)
    model, peft_config = load_model(config, token=token)
    ref_model = None
    if not config.use_peft and not config.precompute_ref_log_probs:
        # Full fine-tuning keeps a frozen reference. TRL would build it from model.config's path with
        # model_init_kwargs only: no revision and no token, so a pinned model_revision got a reference from
        # `main`, and a gated model 401. Loaded here exactly like the policy instead (TRL still prepares it
        # for DeepSpeed); the token stays out of the saved config.
        ref_model, _ = load_model(config, token=token, for_training=False)
    cls = trainer_cls or StepwiseDPOTrainer
    return cls(
        model=model,
        ref_model=ref_model,
        args=config,
        train_dataset=train_pairs,
        eval_dataset=eval_pairs,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )


def resume_point(config) -> str | None:
    """The checkpoint to resume from (checked against this run's model and data), or None."""
    from stepdpo.errors import OptionsError
    from stepdpo.train.checkpoint import check_fingerprint, find_resume_checkpoint

    if config.resume == "never":
        return None
    if config.resume != "auto":
        if not Path(config.resume).is_dir():
            raise OptionsError(f"--resume {config.resume}: no such checkpoint directory")
        check_fingerprint(config, config.resume)
        return config.resume
    found = find_resume_checkpoint(config.output_dir)
    if found is None:
        partial = sorted(Path(config.output_dir).glob("checkpoint-*")) if Path(config.output_dir).is_dir() else []
        if partial:
            logger.warning("%s has %d checkpoint(s) but none is complete (a save was interrupted); starting from "
                           "step 0", config.output_dir, len(partial))
        return None
    check_fingerprint(config, found)
    return str(found)


def train(config, trainer_cls=None) -> dict:
    from stepdpo.train.checkpoint import mark_complete, save_fingerprint, save_run_config
    from stepdpo.train.trainer import finished_on_every_rank, install_preemption_signal

    install_preemption_signal()
    resume = resume_point(config)  # before any model loads: a checkpoint of another run fails here
    trainer = build_trainer(config, trainer_cls=trainer_cls)
    if resume and trainer.is_world_process_zero():
        logger.warning("resuming from %s", resume)
    start = time.time()
    trainer.train(resume_from_checkpoint=resume)
    summary = {
        "global_step": trainer.state.global_step,
        "preempted": trainer.preempted,
        "resumed_from": resume,
        "seconds": round(time.time() - start, 2),
        "skipped_steps": trainer.skipped_steps,
        "truncation": trainer.truncation_stats,
        "log_history": trainer.state.log_history,
    }
    if not trainer.preempted:
        final = Path(config.output_dir) / "final"
        trainer.save_model(str(final))
        if trainer.is_world_process_zero():
            trainer.processing_class.save_pretrained(str(final))
            save_run_config(config, final)
            # what it was trained from, as sft's final and every checkpoint record: `stepdpo loop --reuse` keeps a
            # final model only when this matches (without it the DPO stage was retrained on every --reuse)
            save_fingerprint(config, final)
            mark_complete(final)
    if trainer.is_world_process_zero():
        out = Path(config.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    trainer.accelerator.wait_for_everyone()
    finished_on_every_rank()
    return summary


def train_main(config) -> dict:
    """Train with stepwise DPO. Arguments: --config recipe.yaml plus any StepwiseDPOConfig field as
    --field value (the command line overrides the file). Run under `accelerate launch` (launch/train.sh)
    for DDP / DeepSpeed; on its own for one process."""
    from stepdpo.auth import preflight_for_training

    check_config(config)
    preflight_for_training(config)  # gated or misspelled models fail here: one line, exit 3
    summary = train(config)
    if summary["preempted"]:
        logger.warning("stopped for pre-emption at step %d; a checkpoint was saved", summary["global_step"])
    return summary


if __name__ == "__main__":  # `accelerate launch -m stepdpo.train.run --config R.yaml ...`
    from stepdpo.cli import main
    from stepdpo.train.trainer import end_process

    end_process(main(["train", *sys.argv[1:]]))
