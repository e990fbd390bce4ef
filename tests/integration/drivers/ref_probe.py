"""Test driver run by every rank under launch/train.sh --entry: trains with stepdpo and records, per pair id, the
reference log-probabilities each training step used (precomputed before training, or computed live by the
reference model), and the losses; rank r writes ref_logps_rank{r}.json for the tests to compare from outside."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from stepdpo.train.run import parse_config, train
from stepdpo.train.trainer import EXTRA_KEYS, StepwiseDPOTrainer, end_process


class RefProbeTrainer(StepwiseDPOTrainer):
    def __init__(self, *args, **kwargs):
        self.seen_ref: dict[str, list[float]] = {}
        super().__init__(*args, **kwargs)

    def _compute_loss(self, model, inputs, return_outputs):
        result = super()._compute_loss(model, inputs, return_outputs)
        if self.model.training:
            if self.precompute_ref_logps:
                ref = (inputs["ref_chosen_logps"], inputs["ref_rejected_logps"])
            else:  # TRL computes the live reference inline; the same function precompute uses, on this batch
                # (every rank runs it: ZeRO-3 gathers the reference's shards for each forward)
                ref = self.compute_ref_log_probs(self.ref_model, inputs)
            ids = self.current_pair_ids()
            for i, pid in enumerate(ids):
                self.seen_ref[pid] = [float(ref[0][i]), float(ref[1][i])]
        return result

    def train(self, *args, **kwargs):
        out = super().train(*args, **kwargs)
        rank = int(os.environ.get("RANK", "0"))
        (Path(self.args.output_dir) / f"ref_logps_rank{rank}.json").write_text(json.dumps(self.seen_ref))
        return out


assert "pair_index" in EXTRA_KEYS  # current_pair_ids reads the batch's pair indices

if __name__ == "__main__":
    train(parse_config(sys.argv[1:]), trainer_cls=RefProbeTrainer)
    end_process(0)
