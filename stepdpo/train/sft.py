"""`stepdpo sft`: supervised fine-tuning on step-formatted correct solutions, with TRL's SFTTrainer.

Turns a base model (e.g. Mistral-7B-v0.1) into a step-by-step solver, the policy `generate`, `mine` and `train`
start from (Step-DPO starts from such a model). Training data, any of:
* PRM800K records: trajectories that end in `solution` with every walked step rated +1;
* Step-DPO rows with `full_chosen` (prompt + a whole correct solution);
* step lists: {"problem" (or "prompt"), "steps": [...]} (`stepdpo synth --kind problems` writes these);
* GSM8K rows: {"question", "answer"}: the reference steps (calculator annotations stripped unless
  `gsm8k_annotations`), then "The answer is N." (stepdpo.data.gsm8k).
The prompt is the one renderer's (`render_prompt`: plain text, or the chat template), the completion is the
steps joined by newlines and closed by EOS, so the model learns to stop after its answer. Loss on the
completion only. Launch modes, recipes, resume, auth and SLURM are `train`'s (launch/train.sh --stage sft).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from trl import SFTConfig

from stepdpo.data.jsonio import parsed_records
from stepdpo.errors import OptionsError, StepdpoError
from stepdpo.train.config import ModelArgs

logger = logging.getLogger("stepdpo.sft")
SFT_FORMATS = ("auto", "prm800k", "step-dpo", "steps", "gsm8k")


class SFTDataError(StepdpoError):
    pass


@dataclass
class StepSFTConfig(ModelArgs, SFTConfig):
    train_data: str | None = field(default=None, metadata={
        "help": "Correct step-by-step solutions: PRM800K records, Step-DPO rows with full_chosen, step lists, or "
                "GSM8K rows."})
    eval_data: str | None = field(default=None, metadata={"help": "Held-out solutions in the same formats."})
    data_format: str = field(default="auto", metadata={
        "help": "auto (detected per record), prm800k, step-dpo, steps or gsm8k.", "choices": list(SFT_FORMATS)})
    gsm8k_annotations: bool = field(default=False, metadata={
        "help": "GSM8K rows: keep the calculator annotations (<<48/2=24>>) in the reference steps."})
    max_train_examples: int | None = field(default=None, metadata={"help": "Use only the first N examples."})

    def __post_init__(self):
        if self.data_format not in SFT_FORMATS:
            raise OptionsError(f"data_format={self.data_format!r}: choose one of {', '.join(SFT_FORMATS)}")
        self._check_model_args()
        super().__post_init__()


def _solution_from(row, fmt: str, gsm8k_annotations: bool = False) -> tuple[str, list[str]]:
    """(problem, steps) of one record, or ValueError naming why it is not a correct solution."""
    from stepdpo.data import gsm8k
    from stepdpo.data.formats import split_steps

    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if fmt == "auto":
        fmt = ("prm800k" if isinstance(row.get("label"), dict) else "step-dpo" if "full_chosen" in row
               else "gsm8k" if "question" in row and "steps" not in row else "steps")
    if fmt == "gsm8k":
        if not gsm8k.is_gsm8k(row):
            raise ValueError("a GSM8K row needs string `question` and `answer` with a `#### N` last line")
        steps = gsm8k.solution_steps(row["answer"], gsm8k_annotations)
        if len(steps) < 2 or not row["question"].strip():
            raise ValueError("a GSM8K row needs a question and at least one reference step before `####`")
        return row["question"], steps
    if fmt == "prm800k":
        from stepdpo.data.prm800k import RecordError, walk_record

        try:
            walk = walk_record(row)
        except RecordError as e:
            raise ValueError(str(e)) from None
        if walk.finish_reason != "solution" or walk.has_error or not walk.trajectory:
            raise ValueError(f"not a correct solution (finish_reason {walk.finish_reason!r}, "
                             f"{'has' if walk.has_error else 'no'} -1 step)")
        if _has_unrated_pick(row):
            raise ValueError("a walked step is not rated +1")
        return walk.problem, walk.trajectory
    if fmt == "step-dpo":
        problem, solution = row.get("prompt"), row.get("full_chosen")
        if not isinstance(problem, str) or not isinstance(solution, str) or not solution.strip():
            raise ValueError("a Step-DPO row needs string `prompt` and `full_chosen`")
        return problem, split_steps(solution)
    problem = row.get("problem", row.get("prompt"))
    steps = row.get("steps")
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError("a step list needs `problem` (or `prompt`)")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
        raise ValueError("`steps` must be a non-empty list of non-empty strings")
    return problem, steps


def _has_unrated_pick(row) -> bool:
    for step in row["label"]["steps"]:
        i = step.get("chosen_completion")
        if i is not None and step["completions"][i].get("rating") != 1:
            return True
    return False


def read_solutions(path: str | Path, fmt: str = "auto",
                   gsm8k_annotations: bool = False) -> tuple[list[tuple[str, list[str]]], list[dict]]:
    path = Path(path)
    if not path.is_file():
        raise SFTDataError(f"{path}: no such file")
    out, rejects = [], []
    for line, row, invalid in parsed_records(path):
        try:
            if invalid:
                raise ValueError(invalid)
            out.append(_solution_from(row, fmt, gsm8k_annotations))
        except ValueError as e:
            rejects.append({"file": str(path), "line": line, "reason": str(e).splitlines()[0]})
    if not out:
        first = f"; first: line {rejects[0]['line']}: {rejects[0]['reason']}" if rejects else ""
        raise SFTDataError(f"{path}: no correct step-by-step solution to train on ({len(rejects)} records skipped{first})")
    return out, rejects


def tokenize_solutions(solutions, tokenizer, config, encoder_decoder: bool = False) -> tuple[list[dict], int]:
    """input_ids + labels (-100 on the prompt) per solution; (rows, dropped for max_length)."""
    from stepdpo.data.pairs import prompt_style, render_completion, render_prompt
    from stepdpo.train.tokenize import tokenize_texts

    style = prompt_style(tokenizer, config.chat_template, config.system_prompt, config.instruction)
    rows, dropped = [], 0
    for problem, steps in solutions:
        prompt, completion = render_prompt(problem, [], style), render_completion(steps)
        p, c, _ = tokenize_texts(tokenizer, prompt, completion, completion, append_eos=True,
                                 encoder_decoder=encoder_decoder, special=style.add_special_tokens)
        if config.max_length and len(p) + len(c) > config.max_length:
            dropped += 1  # never cut a solution: the model would learn to stop mid-way
            continue
        rows.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    return rows, dropped


def build_sft_trainer(config, callbacks=None):
    from datasets import Dataset

    from stepdpo.auth import resolve_token
    from stepdpo.train.modeling import load_model, load_tokenizer
    from stepdpo.train.seq2seq import is_encoder_decoder

    token = resolve_token(config.hf_token_file).value
    solutions, rejects = read_solutions(config.train_data, config.data_format, config.gsm8k_annotations)
    if config.max_train_examples:
        solutions = solutions[: config.max_train_examples]
    evals = (read_solutions(config.eval_data, config.data_format, config.gsm8k_annotations)[0] if config.eval_data
             else None)
    tokenizer = load_tokenizer(config.model_name_or_path, config.model_revision, token)
    model, peft_config = load_model(config, token=token)
    if is_encoder_decoder(model):
        raise OptionsError("stepdpo sft trains decoder-only models (TRL's SFTTrainer); flan-t5 is already instruction-tuned")
    rows, dropped = tokenize_solutions(solutions, tokenizer, config)
    if not rows:
        raise SFTDataError(f"no solution fits max_length={config.max_length}; raise --max_length")
    if dropped:
        logger.warning("%d of %d solutions are longer than max_length=%s and were left out", dropped, len(solutions),
                       config.max_length)
    eval_ds = Dataset.from_list(tokenize_solutions(evals, tokenizer, config)[0]) if evals else None
    trainer = _sft_trainer_class()(model=model, args=config, train_dataset=Dataset.from_list(rows), eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
    if not config.disable_tqdm:  # the same bar as `train`: latest loss on the bar, no dict lines
        from transformers.trainer_callback import ProgressCallback

        from stepdpo.train.trainer import StepProgress

        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(StepProgress)
    trainer.stepdpo_data = {"solutions": len(solutions), "used": len(rows), "too_long": dropped,
                            "skipped_records": len(rejects)}
    return trainer


def sft_main(config) -> dict:
    """Supervised fine-tuning on correct step-by-step solutions (TRL's SFTTrainer): the policy that generate, mine
    and train start from. Arguments: --config recipe.yaml plus any StepSFTConfig field as --field value."""
    from stepdpo.auth import preflight_for_training
    from stepdpo.train.checkpoint import mark_complete, save_fingerprint, save_run_config
    from stepdpo.train.run import resume_point
    from stepdpo.train.trainer import finished_on_every_rank

    if not config.model_name_or_path or not config.train_data:
        raise OptionsError("--model_name_or_path and --train_data are required (in the recipe or on the command line)")
    preflight_for_training(config)
    resume = resume_point(config)
    trainer = build_sft_trainer(config)
    start = time.time()
    trainer.train(resume_from_checkpoint=resume)
    final = Path(config.output_dir) / "final"
    trainer.save_model(str(final))
    summary = {"global_step": trainer.state.global_step, "resumed_from": resume, "data": trainer.stepdpo_data,
               "seconds": round(time.time() - start, 2), "log_history": trainer.state.log_history}
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(str(final))
        save_run_config(config, final)
        save_fingerprint(config, final)
        mark_complete(final)
        (Path(config.output_dir) / "sft_summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    trainer.accelerator.wait_for_everyone()
    finished_on_every_rank()
    return summary


def _sft_trainer_class():
    from trl import SFTTrainer

    from stepdpo.train.checkpoint import CompleteCheckpointsMixin
    from stepdpo.train.modeling import reentrant_checkpointing_for_peft_zero3

    class StepSFTTrainer(CompleteCheckpointsMixin, SFTTrainer):
        """TRL's SFTTrainer with stepdpo's complete-before-rotate checkpoints."""

        def __init__(self, model, args=None, *rest, peft_config=None, **kwargs):
            reentrant_checkpointing_for_peft_zero3(args, model, peft_config)
            super().__init__(model, args, *rest, peft_config=peft_config, **kwargs)

    return StepSFTTrainer


if __name__ == "__main__":  # `accelerate launch -m stepdpo.train.sft --config R.yaml ...`
    from stepdpo.cli import main
    from stepdpo.train.trainer import end_process

    end_process(main(["sft", *sys.argv[1:]]))
