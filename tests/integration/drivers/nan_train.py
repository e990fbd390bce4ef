"""Test driver for the non-finite guard across processes: rank 0 alone sees a NaN loss at the second
optimizer step; after every step rank 0 saves one gathered weight (ZeRO-3 shards it), so the test can
check that the NaN step left the weights exactly as they were, on every rank's behalf."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from stepdpo.train.run import parse_config, train
from stepdpo.train.trainer import StepwiseDPOTrainer, end_process

NAN_AT_STEP = 1  # state.global_step during the second optimizer step


class _SaveWeight(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model_wrapped)
        name, param = next((n, p) for n, p in model.named_parameters() if "layers.0.mlp.down_proj" in n)
        if hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                value = param.detach().clone()
        else:
            value = param.detach().clone()
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(value, Path(args.output_dir) / f"weight_step{state.global_step}.pt")


class NaNTrainer(StepwiseDPOTrainer):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.add_callback(_SaveWeight(self))

    def _compute_loss(self, model, inputs, return_outputs):
        loss = super()._compute_loss(model, inputs, return_outputs)
        if self.model.training and self.state.global_step == NAN_AT_STEP and int(os.environ.get("RANK", "0")) == 0:
            loss = loss * float("nan")
        return loss


if __name__ == "__main__":
    train(parse_config(sys.argv[1:]), trainer_cls=NaNTrainer)
    end_process(0)
