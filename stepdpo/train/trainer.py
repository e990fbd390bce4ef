"""StepwiseDPOTrainer: TRL's DPOTrainer for step pairs.

What it changes, and why:
* Data: takes step pairs (the schema of stepdpo.data.pairs) and tokenizes them with the shared
  renderer: no EOS after a step unless `append_eos`, step-aware truncation (never cuts a step).
* Loss: `step_loss="dpo"` is TRL's own `_compute_loss`, untouched, so every TRL `loss_type` works and
  the losses equal `trl.DPOTrainer`'s. The step-reward modes (`step_weighted`, `step_margin`, `seed`)
  and DPO-Positive (`dpop`, which needs no step rewards) are computed here from the same
  policy/reference log-probabilities (stepdpo.train.losses).
* Encoder-decoder models (flan-t5), which TRL 1.16 rejects at the first step: see seq2seq.py.
* Reliability: a non-finite loss skips backward and the update on every rank together (DeepSpeed
  included), a non-finite gradient skips the optimizer step, and K in a row abort the run; checkpoints get a COMPLETED marker; a pre-emption flag file makes
  every rank save and stop together.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from typing import NoReturn

import torch
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from stepdpo.errors import StepdpoError
from stepdpo.train import losses, prefix_sharing
from stepdpo.train.checkpoint import CompleteCheckpointsMixin
from stepdpo.train.logps import sequence_logps
from stepdpo.train.modeling import disable_dropout, reentrant_checkpointing_for_peft_zero3
from stepdpo.train.seq2seq import add_seq2seq_fused_head, is_encoder_decoder
from stepdpo.train.tokenize import PairTokenizer, tokenize_texts

logger = logging.getLogger("stepdpo.train")

# Columns the collator carries next to TRL's, popped before the model sees the batch.
EXTRA_KEYS = ("step_reward_gap", "pair_index")


class NonFiniteError(StepdpoError, RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class PairsDoNotFit(StepdpoError, ValueError):
    """No pair fits max_length even without its prefix steps."""


class StepRewardsMissing(StepdpoError, ValueError):
    """A step-reward loss was asked for on pairs that have no step rewards."""


def _is_trl_rows(columns) -> bool:
    """TRL's preference format (prompt/chosen/rejected) rather than step pairs."""
    return "problem" not in columns and {"prompt", "chosen", "rejected"} <= set(columns)


def pairs_to_dataset(pairs: list[dict]) -> Dataset:
    """Pairs -> a datasets.Dataset with the columns tokenization needs (sources are left out).
    Rows in TRL's preference format (prompt/chosen/rejected strings) are taken as they are."""
    if pairs and _is_trl_rows(pairs[0]):
        return Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    columns = {
        "id": [p["id"] for p in pairs],
        "kind": [p["kind"] for p in pairs],
        "problem": [p["problem"] for p in pairs],
        "prefix_steps": [p["prefix_steps"] for p in pairs],
        "chosen_steps": [p["chosen_steps"] for p in pairs],
        "rejected_steps": [p["rejected_steps"] for p in pairs],
    }
    if pairs and all("chosen_step_rewards" in p for p in pairs):
        columns["step_reward_gap"] = [
            float(sum(p["chosen_step_rewards"]) - sum(p["rejected_step_rewards"])) for p in pairs
        ]
    return Dataset.from_dict(columns)


class StepPreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator, also carrying the step-reward gap and the pair index."""

    def torch_call(self, examples):
        out = super().torch_call(examples)
        for key in EXTRA_KEYS:
            if key in examples[0]:
                out[key] = torch.tensor([e[key] for e in examples])
        return out


class _Guard(TrainerCallback):
    """Non-finite detection at the optimizer step and pre-emption, agreed by every rank."""

    def __init__(self, trainer: "StepwiseDPOTrainer"):
        self.trainer = trainer
        self.in_a_row = 0
        self.skipped = 0

    def _any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.trainer.accelerator.device)
        if self.trainer.accelerator.num_processes > 1:
            t = self.trainer.accelerator.reduce(t, reduction="sum")
        return bool(t.item() > 0)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        bad = trainer._nonfinite_loss_seen
        if grads and not bad:
            # One fused multi-tensor norm: a gradient holding inf or NaN has a non-finite norm. (A per-tensor
            # isfinite().all() cost ~3% of a tiny model's step.)
            bad = not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
        trainer._nonfinite_loss_seen = False
        if not self._any_rank(bad):
            self.in_a_row = 0
            return
        # Dropping the gradients makes the optimizer skip every parameter this step (AdamW skips
        # grad=None), on every rank, since all ranks reached the same verdict above.
        for p in trainer.model.parameters():
            p.grad = None
        self.skipped += 1
        self.in_a_row += 1
        ids = trainer.current_pair_ids()
        logger.warning(
            "step %d: non-finite loss or gradient; optimizer step skipped (%d in a row, %d total); pairs %s",
            state.global_step + 1, self.in_a_row, self.skipped, ids,
        )
        if self.in_a_row >= args.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient, the last at step "
                f"{state.global_step + 1} (pairs {ids}). Lower the learning rate, check the data, or raise "
                f"max_nonfinite_steps."
            )

    def on_step_end(self, args, state, control, **kwargs):
        flag = args.preempt_flag_file
        requested = _PREEMPT_SIGNAL_SEEN or bool(flag and os.path.exists(flag))
        if self._any_rank(requested):
            logger.warning("step %d: pre-emption requested; every rank saves a checkpoint and stops", state.global_step)
            self.trainer.preempted = True
            control.should_save = True
            control.should_training_stop = True
        return control



class StepProgress(ProgressCallback):
    """transformers' progress bar (with ETA), showing the latest loss, implicit-reward accuracy and margin
    on the bar instead of printing every log dict as a line."""

    _SHOW = (("loss", "loss"), ("rewards/accuracies", "acc"), ("rewards/margins", "margin"),
             ("mean_token_accuracy", "token_acc"),
             ("eval_loss", "eval_loss"), ("eval_rewards/accuracies", "eval_acc"))

    def on_train_begin(self, args, state, control, **kwargs):
        from stepdpo.console import progress_bar

        if state.is_world_process_zero:  # on a Console's terminal when one is open (stepdpo.console)
            self.training_bar = progress_bar(total=state.max_steps, desc="train", unit="step")
        self.current_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        shown = {short: f"{logs[key]:.4g}" for key, short in self._SHOW if isinstance(logs.get(key), (int, float))}
        if shown:
            self.training_bar.set_postfix(shown, refresh=False)


_PREEMPT_SIGNAL_SEEN = False


def install_preemption_signal(signum: int = signal.SIGUSR1) -> None:
    """Let a signal that reaches the Python process request pre-emption too (e.g. srun --signal)."""

    def handler(_sig, _frame):
        global _PREEMPT_SIGNAL_SEEN
        _PREEMPT_SIGNAL_SEEN = True

    signal.signal(signum, handler)


_FINISHED_UNDER_GROUP = False


def finished_on_every_rank() -> bool:
    """Record that a training stage returned on every rank of a torch.distributed group (call it after the
    stage's last barrier), so that `end_process` ends this process without the interpreter's teardown. Returns
    whether there is a group."""
    global _FINISHED_UNDER_GROUP
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        _FINISHED_UNDER_GROUP = True
        return True
    return False


def end_process(code: int = 0) -> NoReturn:
    """The end of a training process (`python -m stepdpo.train.run`, `... .sft`, the `stepdpo` command): after a
    stage that finished on every rank of a process group, destroy the group, run the atexit handlers (log
    files, writers), flush, and leave with os._exit, skipping the interpreter's teardown; otherwise sys.exit.

    Why: gloo's worker threads free the work objects of the last collectives on their own, and a barrier's work
    frees the earlier all-gathers' tensors, whose Python objects need the GIL. When that lands after the
    interpreter began finalizing, Python ends the thread with pthread_exit, the unwinding meets a noexcept
    destructor and the rank dies with `terminate called without an active exception` (SIGABRT), so the launch
    fails after a run that saved everything (core file: ~AsyncBarrierWork -> ~AsyncAllgatherWork ->
    TensorImpl::decref_pyobject -> gil_scoped_acquire -> PyThread_exit_thread). It hit 1 in ~10 two-process
    ZeRO-3 launches on 2 loaded cores. destroy_process_group alone does not stop it: DeepSpeed and accelerate
    still hold the groups, so their threads live on. pytorch/pytorch#179291 (an atexit destroy, abandoned
    upstream as insufficient) and #190489."""
    if _FINISHED_UNDER_GROUP:
        import atexit

        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        atexit._run_exitfuncs()  # what a normal exit would run, while the interpreter is whole
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach it
                pass
        os._exit(code)
    sys.exit(code)


class StepwiseDPOTrainer(CompleteCheckpointsMixin, DPOTrainer):
    """DPOTrainer for step pairs; `args` is a StepwiseDPOConfig. See the module docstring."""

    _tag_names = ["trl", "dpo", "stepdpo"]

    def __init__(self, model, ref_model=None, args=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, data_collator=None, callbacks=None, **kwargs):
        if isinstance(train_dataset, list):
            train_dataset = pairs_to_dataset(train_dataset)
        if isinstance(eval_dataset, list):
            eval_dataset = pairs_to_dataset(eval_dataset)
        for name, ds in (("training", train_dataset), ("eval", eval_dataset)):
            if ds is not None and args.step_loss in losses.REWARD_LOSSES and "step_reward_gap" not in ds.column_names:
                raise StepRewardsMissing(
                    f"step_loss={args.step_loss!r} needs step rewards, but the {name} pairs have no "
                    "chosen_step_rewards/rejected_step_rewards: score them first with `stepdpo score`, or use "
                    "step_loss=dpo or dpop."
                )
        self._encoder_decoder = is_encoder_decoder(model)
        self.truncation_stats: dict[str, dict] = {}
        self._pair_ids: dict[str, list[str]] = {}
        self._batch_pair_index = None
        self._nonfinite_loss_seen = False
        self.preempted = False
        self._guard = None
        if data_collator is None and processing_class is not None:
            pad = processing_class.pad_token_id
            if pad is None:
                pad = processing_class.eos_token_id
            # Step pairs are already fitted to max_length by tokenize_pair (oldest prefix steps dropped, a step
            # never cut). TRL's collator would cut prompt + step together, keeping the start: for an
            # encoder-decoder model, whose prompt goes to the encoder, that cut the step. So it truncates only
            # decoder-only TRL-format rows, as trl.DPOTrainer does.
            data_collator = StepPreferenceCollator(pad_token_id=pad,
                                                   max_length=None if self._encoder_decoder else args.max_length,
                                                   truncation_mode=args.truncation_mode,
                                                   pad_to_multiple_of=args.pad_to_multiple_of)
        reentrant_checkpointing_for_peft_zero3(args, model, kwargs.get("peft_config"))
        super().__init__(model=model, ref_model=ref_model, args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class,
                         data_collator=data_collator, callbacks=callbacks, **kwargs)
        self._ensure_seq2seq_heads()
        self._install_prefix_sharing()
        self._keep_fp32_adapters(args)
        if args.disable_dropout:
            for m in (self.model, self.ref_model):
                if m is not None:
                    disable_dropout(m)
        self._guard = _Guard(self)
        self.add_callback(self._guard)
        self._guard_backward()
        if not args.disable_tqdm:
            self.remove_callback(ProgressCallback)
            self.add_callback(StepProgress)

    def _guard_backward(self):
        """Decide before backward, on every rank together, whether this step's loss is usable. Under DeepSpeed
        the optimizer step runs inside the backward call (accelerate's DeepSpeedEngineWrapper.backward calls
        engine.backward then engine.step) and ZeRO leaves p.grad None, so a check at the optimizer step comes too
        late and sees nothing; skipping backward on all ranks skips the update there too."""
        backward = self.accelerator.backward

        def guarded_backward(loss, **kwargs):
            bad = not bool(torch.isfinite(loss.detach()).all())
            if self._guard._any_rank(bad):
                self._nonfinite_loss_seen = True
                return None
            return backward(loss, **kwargs)

        self.accelerator.backward = guarded_backward

    def _keep_fp32_adapters(self, args):
        """TRL casts QLoRA adapters to bf16 (the QLoRA paper's choice for bf16 compute). With fp32 compute
        (CPU, or when asked) that only loses precision, and the saved adapter would not reproduce the
        trained logits, so the adapters go back to fp32."""
        if not getattr(self.model, "is_loaded_in_4bit", False) or getattr(args, "bnb_4bit_compute_dtype", None) != "float32":
            return
        for p in self.model.parameters():
            if p.requires_grad and p.dtype == torch.bfloat16:
                p.data = p.data.float()

    # ---------------------------------------------------------------- encoder-decoder
    def _ensure_seq2seq_heads(self):
        """Replace TRL's decoder-only fused head with the encoder-decoder one (idempotent)."""
        if not self._encoder_decoder or getattr(self, "_seq2seq_patched", False):
            return
        policy = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        add_seq2seq_fused_head(self.accelerator.unwrap_model(policy))
        if self.ref_model is not None:
            add_seq2seq_fused_head(self.accelerator.unwrap_model(self.ref_model))
        self._seq2seq_patched = True

    def _install_prefix_sharing(self):
        """Resolve prefix_sharing (auto|true|false) once and install it on the policy and the reference
        (stepdpo.train.prefix_sharing); idempotent."""
        if getattr(self, "_prefix_sharing_done", False):
            return
        self._prefix_sharing_done = True
        policy = self.accelerator.unwrap_model(self.model)
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        self.prefix_sharing = prefix_sharing.resolve(self.args.prefix_sharing, base, self.args, self._encoder_decoder)
        if not self.prefix_sharing:
            return
        models = [base] + ([self.accelerator.unwrap_model(self.ref_model)] if self.ref_model is not None else [])
        for m in models:
            self.prefix_sharing = prefix_sharing.enable(m, "true", self.args) and self.prefix_sharing

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # TRL precomputes inside its __init__, before ours resumes
        self._ensure_seq2seq_heads()
        self._install_prefix_sharing()
        if self.accelerator.num_processes == 1:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        return self._precompute_ref_logps_on_every_rank(dataset, name, batch_size)

    def _precompute_ref_logps_on_every_rank(self, dataset, name, batch_size):
        """TRL 1.16's precompute with several processes, without its cache file. TRL has rank 0 write the log-probs
        to a file named by `dataset._get_cache_file_path` and every rank read it back; for an in-memory dataset (the
        pairs stepdpo builds) that name is a random one in each process's own temporary directory, so the other
        ranks failed with FileNotFoundError (under DDP and ZeRO-3 alike: huggingface/trl#2985 reports precompute
        broken under ZeRO-3, and users fall back to ZeRO-2). The same forwards (TRL's compute_ref_log_probs, and
        under DeepSpeed TRL's inference engine over the sharded policy), gathered in dataset order as TRL does; then
        each rank adds the columns to its own copy of the dataset."""
        from torch.utils.data import DataLoader
        from trl.models import prepare_deepspeed

        loader = self.accelerator.prepare(DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator,
                                                     num_workers=self.args.dataloader_num_workers, shuffle=False))
        if self.ref_model is None and self.is_deepspeed_enabled:
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        else:
            model = self.ref_model or self.model
        chosen, rejected = [], []
        for batch in loader:
            c, r = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch))
            chosen.append(c.cpu())
            rejected.append(r.cpu())
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        if len(chosen) != len(dataset):
            raise RuntimeError(f"precomputed {len(chosen)} reference log-probs for {len(dataset)} {name} pairs")
        return dataset.add_column("ref_chosen_logps", chosen.tolist()).add_column("ref_rejected_logps",
                                                                                  rejected.tolist())

    # ---------------------------------------------------------------- data
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" in dataset.column_names:
            return dataset
        tokenizer = self._tokenizer
        enc_dec = self._encoder_decoder
        if _is_trl_rows(dataset.column_names):
            return self._prepare_text_dataset(dataset, args, dataset_name)

        pair_tokenizer = PairTokenizer.from_settings(tokenizer, args, encoder_decoder=enc_dec)

        def tokenize(example, index):
            tp = pair_tokenizer(example)
            if tp is None:
                return {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "dropped_prefix_steps": -1,
                        "pair_index": index}
            return {"prompt_ids": tp.prompt_ids, "chosen_ids": tp.chosen_ids, "rejected_ids": tp.rejected_ids,
                    "dropped_prefix_steps": tp.dropped_prefix_steps, "pair_index": index}

        self._pair_ids[dataset_name] = list(dataset["id"])
        keep = {"step_reward_gap"}
        tokenized = dataset.map(tokenize, with_indices=True, desc=f"Tokenizing {dataset_name} step pairs",
                                remove_columns=[c for c in dataset.column_names if c not in keep])
        dropped = tokenized["dropped_prefix_steps"]
        stats = {
            "pairs": len(dropped),
            "truncated": sum(1 for d in dropped if d > 0),
            "too_long_dropped": sum(1 for d in dropped if d < 0),
        }
        self.truncation_stats[dataset_name] = stats
        if stats["truncated"] or stats["too_long_dropped"]:
            logger.warning(
                "%s: %d of %d pairs lost their oldest prefix steps to fit max_length=%s; %d did not fit even "
                "without prefix steps and were dropped (raise max_length to keep them)",
                dataset_name, stats["truncated"], stats["pairs"], args.max_length, stats["too_long_dropped"],
            )
        if stats["too_long_dropped"]:
            tokenized = tokenized.filter(lambda e: e["dropped_prefix_steps"] >= 0)
            if len(tokenized) == 0:
                raise PairsDoNotFit(f"{dataset_name}: no pair fits max_length={args.max_length}, even without its "
                                    "prefix steps (a step is never cut); raise --max_length")
        return tokenized.remove_columns(["dropped_prefix_steps"])

    def _prepare_text_dataset(self, dataset, args, dataset_name):
        """TRL-format rows (prompt/chosen/rejected strings): a drop-in for trl.DPOTrainer's datasets,
        tokenized the same way but without EOS unless append_eos; length is left to the collator."""
        if isinstance(dataset[0]["prompt"], list):
            raise ValueError(f"{dataset_name}: conversational rows are not supported; use step pairs "
                             "(`stepdpo prepare`) or plain-text prompt/chosen/rejected")
        tokenizer, enc_dec = self._tokenizer, self._encoder_decoder

        def tokenize(example, index):
            p, c, r = tokenize_texts(tokenizer, example["prompt"], example["chosen"], example["rejected"],
                                     append_eos=args.append_eos, encoder_decoder=enc_dec)
            return {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r, "pair_index": index}

        self._pair_ids[dataset_name] = [f"{dataset_name}-row-{i}" for i in range(len(dataset))]
        self.truncation_stats[dataset_name] = {"pairs": len(dataset), "truncated": 0, "too_long_dropped": 0}
        return dataset.map(tokenize, with_indices=True, desc=f"Tokenizing {dataset_name} rows",
                           remove_columns=[c for c in dataset.column_names if c != "step_reward_gap"])

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for key in EXTRA_KEYS:
            if key not in self._signature_columns:
                self._signature_columns.append(key)

    def current_pair_ids(self) -> list[str]:
        if self._batch_pair_index is None:
            return []
        ids = self._pair_ids.get("train", [])
        return [ids[i] for i in self._batch_pair_index.tolist() if i < len(ids)]

    # ---------------------------------------------------------------- loss
    def compute_ref_log_probs(self, model, inputs):
        inputs = {k: v for k, v in inputs.items() if k not in EXTRA_KEYS}
        return super().compute_ref_log_probs(model, inputs)

    def _compute_loss(self, model, inputs, return_outputs):
        inputs = dict(inputs)
        extras = {k: inputs.pop(k) for k in EXTRA_KEYS if k in inputs}
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            self._batch_pair_index = extras.get("pair_index")
        if self.args.step_loss == "dpo":
            result = super()._compute_loss(model, inputs, return_outputs)
        else:
            result = self._stepwise_loss(model, inputs, extras.get("step_reward_gap"), mode)
        self._log_step_metrics(extras, mode)
        return result

    def _stepwise_loss(self, model, inputs, reward_gap, mode):
        args = self.args
        chosen, rejected = sequence_logps(model, inputs)
        gap = None if reward_gap is None else reward_gap.to(chosen.device, chosen.dtype)  # None: dpop, unscored
        if args.step_loss == "seed":
            per_pair = losses.seed_loss(chosen, rejected, gap)
            chosen_rewards, rejected_rewards = chosen.detach(), rejected.detach()
        else:
            if self.precompute_ref_logps:
                ref_c, ref_r = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                ref_c, ref_r = self.compute_ref_log_probs(self.ref_model if self.ref_model is not None else model, inputs)
            ref_c, ref_r = ref_c.to(chosen), ref_r.to(chosen)
            delta = losses.implicit_delta(chosen, rejected, ref_c, ref_r)
            if args.step_loss == "dpop":
                per_pair = losses.dpop_loss(delta, chosen, ref_c, args.beta, args.dpop_lambda)
            elif args.step_loss == "step_weighted":
                per_pair = losses.step_weighted_loss(delta, gap, args.beta, args.step_weight_fn, args.step_reward_gamma)
            else:
                per_pair = losses.step_margin_loss(delta, gap, args.beta, args.step_reward_gamma)
            chosen_rewards = args.beta * (chosen - ref_c).detach()
            rejected_rewards = args.beta * (rejected - ref_r).detach()
        loss = per_pair.mean()
        gather = self.accelerator.gather_for_metrics
        m = self._metrics[mode]
        c, r = gather(chosen_rewards), gather(rejected_rewards)
        m["rewards/chosen"].append(c.mean().item())
        m["rewards/rejected"].append(r.mean().item())
        m["rewards/accuracies"].append((c > r).float().mean().item())
        m["rewards/margins"].append((c - r).mean().item())
        m["logps/chosen"].append(gather(chosen.detach()).mean().item())
        m["logps/rejected"].append(gather(rejected.detach()).mean().item())
        return loss

    def _log_step_metrics(self, extras, mode):
        m = self._metrics[mode]
        gap = extras.get("step_reward_gap")
        if gap is not None:
            m["step_reward_gap"].append(self.accelerator.gather_for_metrics(gap.float()).mean().item())
        stats = self.truncation_stats.get("train" if mode == "train" else "eval", {})
        m["truncated_pairs"] = [stats.get("truncated", 0)]
        m["too_long_dropped_pairs"] = [stats.get("too_long_dropped", 0)]
        m["skipped_steps"] = [self.skipped_steps]

    @property
    def skipped_steps(self) -> int:
        return self._guard.skipped if self._guard else 0

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if not math.isfinite(float(loss)):  # the guard skips the optimizer step on every rank
            self._nonfinite_loss_seen = True
        return loss
