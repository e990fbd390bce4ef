"""One training run, for the prefix-sharing cases: time or peak memory per step.

    python -m benchmarks.train_run '{"trainer": "trl"|"stepdpo", "model": DIR, "pairs": FILE, "steps": N, ...}'

Also called in-process (`main`) for time-only runs, by the trainer and prefix-sharing cases.

Prints one JSON line: per-step seconds (median after warm-up) and, with "memory" (the default), per-step peak
memory (MiB above the memory held before the step). Timing runs are called in-process instead (`main`), since
the allocator settings below slow every allocation. Peak memory on CPU: the parent starts this process with MALLOC_MMAP_THRESHOLD_ fixed, so every tensor of any
size is its own mapping and goes back to the OS when freed; before each step glibc's free lists are trimmed,
the resident set is read and the kernel's high-water mark reset (/proc/self/clear_refs, "5"); after the step
the new high-water mark is read. What is measured is what the step itself allocates: activations, gradients,
optimizer temporaries; weights and optimizer state count once, in the baseline.
"""

from __future__ import annotations

import ctypes
import json
import statistics
import sys
import tempfile
import time

WARMUP = 3


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class StepMeter:
    def __init__(self, memory: bool = True):
        from transformers import TrainerCallback

        self.times, self.peaks = [], []
        libc = ctypes.CDLL("libc.so.6")
        meter = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if memory:
                    libc.malloc_trim(0)
                    meter.base = _status_kib("VmRSS")
                    with open("/proc/self/clear_refs", "w") as f:
                        f.write("5")
                meter.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                meter.times.append(time.perf_counter() - meter.t)
                if memory:
                    meter.peaks.append((_status_kib("VmHWM") - meter.base) / 1024)

        self.callback = CB()


def main(spec: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from stepdpo.data.pairs import read_pairs, render_pair
    from stepdpo.train.config import StepwiseDPOConfig
    from stepdpo.train.run import build_trainer

    from benchmarks.cases import _common

    common = dict(_common(spec["steps"], tempfile.mkdtemp()), per_device_train_batch_size=spec.get("batch", 8))
    memory = spec.get("memory", True)
    warmup = spec.get("warmup", WARMUP)
    meter = StepMeter(memory)
    if spec["trainer"] == "trl":
        rows = [render_pair(p) for p in read_pairs(spec["pairs"])]
        ds = Dataset.from_dict({"prompt": [r[0] for r in rows], "chosen": [r[1] for r in rows],
                                "rejected": [r[2] for r in rows]})
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(spec["model"]), args=DPOConfig(**common),
                             train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(spec["model"]),
                             callbacks=[meter.callback])
    else:
        trainer = build_trainer(StepwiseDPOConfig(model_name_or_path=spec["model"], train_pairs=spec["pairs"],
                                                  append_eos=True, prefix_sharing=spec.get("prefix_sharing", "auto"),
                                                  **common))
        trainer.add_callback(meter.callback)
    trainer.train()
    out = {"step_s": statistics.median(meter.times[warmup:])}
    if memory:
        out["step_peak_mib"] = statistics.median(meter.peaks[warmup:])
    return out


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
