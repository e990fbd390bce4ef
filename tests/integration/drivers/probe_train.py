"""Test driver run by every rank under launch/train.sh --entry: trains with stepdpo, then records what
the tests check from outside: how a weight is partitioned on this rank, how activation checkpointing was
called, and the trained model's
logits on a fixed probe input (every rank joins the forward, as ZeRO-3 needs; rank 0 writes them)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

# first: it wraps torch's checkpoint before transformers binds it
from tests.integration.drivers import checkpoint_spy  # noqa: I001
from stepdpo.train.run import parse_config, train
from stepdpo.train.trainer import StepwiseDPOTrainer, end_process

PROBE = "Problem: Start with 3. Add 4.\nSolution:\n3 + 4 = 7"


class ProbeTrainer(StepwiseDPOTrainer):
    def __init__(self, model, *args, **kwargs):
        # dtypes of the frozen (non-4-bit) parameters as loaded, before DeepSpeed wraps and casts the model
        self.loaded_dtypes = sorted({str(getattr(p, "ds_tensor", p).dtype) for n, p in model.named_parameters()
                                     if p.dtype != torch.uint8 and "lora" not in n})
        super().__init__(model, *args, **kwargs)

    def train(self, *args, **kwargs):
        out = super().train(*args, **kwargs)
        rank = int(os.environ.get("RANK", "0"))
        target = Path(self.args.output_dir)
        info = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
        for name, p in self.model.named_parameters():
            if "layers.0.self_attn.q_proj" in name and name.endswith("weight") and "lora" not in name:
                info.update(name=name, numel=p.numel(), ds_numel=getattr(p, "ds_numel", None),
                            shard_numel=p.ds_tensor.numel() if hasattr(p, "ds_tensor") else None)
                break
        info["dtypes"] = self.loaded_dtypes
        info["use_reentrant"] = sorted(checkpoint_spy.SEEN)  # activation checkpointing's calls, if it was on
        policy = self.accelerator.unwrap_model(self.model)
        policy = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        info["prefix_sharing"] = self.prefix_sharing
        info["shared_forwards"] = getattr(policy, "_stepdpo_shared_calls", 0)
        (target / f"partition_rank{rank}.json").write_text(json.dumps(info))
        ids = self.processing_class(PROBE, return_tensors="pt")
        model = self.model_wrapped
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask).logits
        if rank == 0:
            torch.save(logits.float().cpu(), target / "probe_logits.pt")
        return out


if __name__ == "__main__":
    train(parse_config(sys.argv[1:]), trainer_cls=ProbeTrainer)
    end_process(0)
