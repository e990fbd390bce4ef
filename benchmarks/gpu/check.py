"""The 7B path on a real GPU, in one command: the shipped recipes' code on one GPU, each measurement with a pass/fail
line, written to OUT/gpu_report.json and OUT/gpu_report.md.

    python -m benchmarks.gpu.check --out DIR            # on the GPU machine (benchmarks/gpu/run.sh calls it)
    python -m benchmarks.gpu.check --out DIR --dry      # the same code on CPU at tiny sizes (CI), so it cannot rot

1. qlora_7b: a Mistral-7B-shaped model (Mistral-7B-v0.1's config and its own tokenizer, random weights: no hub) under
   configs/recipes/mistral-7b/qlora_zero3.yaml's settings in one process: nf4 4-bit (bitsandbytes on CUDA), bf16,
   LoRA r=64, gradient checkpointing. Optimizer steps on a small fixed set of pairs: the loss is finite and falls;
   peak GPU memory within 10% of `stepdpo plan` for the same settings (TRL's two-row layout, which plan models).
2. prefix_sharing_7b: on that model, per-pair log-probs with prefix sharing against the two-row layout, in bf16
   (tolerance: |difference| <= 0.05 + 0.01 |log-prob|: bf16 keeps 8 bits of mantissa, and a step's log-prob is a sum
   over its tokens); time per step and peak memory against trl.DPOTrainer on the same pairs, prompts 8x a step
   (target: at most 0.6x the time).
3. full_bf16_1b: one full bf16 fine-tuning step of a ~1B Mistral-shaped model (a frozen reference copy), under
   DeepSpeed ZeRO-3 with world size 1 where DeepSpeed imports, so the non-LoRA path runs.
4. loop_smollm2: the real-model loop (configs/recipes/smollm2-135m/loop_arith.yaml at --quick, hf generation on the
   GPU) when a converted SmolLM2 directory is given (--smollm2 DIR); else skipped, saying why.
--dry: the same four on CPU, the 7B- and 1B-shaped models shrunk to a tiny Mistral (memory is reported, not
checked: there is no GPU allocator to read). Exit status 0 when every check that ran passed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / ".gpu_assets" / "mistral-7b"
RECIPE = REPO / "configs" / "recipes" / "mistral-7b" / "qlora_zero3.yaml"
GIB = 1024**3
BF16_TOL = (0.05, 0.01)  # absolute, relative: see the module's docstring


class Env:
    def __init__(self, dry: bool, work: Path):
        import torch

        self.dry, self.work = dry, work
        self.cuda = torch.cuda.is_available() and not dry
        self.device = "cuda" if self.cuda else "cpu"

    def train_overrides(self) -> list[str]:
        if self.cuda:
            return []
        return ["--use_cpu", "true", "--dtype", "float32", "--bf16", "false", "--bnb_4bit_compute_dtype", "float32"]

    def peak_reset(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        import torch

        if not self.cuda:
            return None
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / GIB


# ------------------------------------------------------------------------------------------------ models, data
def mistral_dir(env: Env, name: str, size: dict | None = None) -> Path:
    """A Mistral-shaped model with random weights written to disk, so the stages load it as they load any model:
    Mistral-7B-v0.1's config (with `size` applied) and its own tokenizer. --dry: the tiny Mistral."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = env.work / name
    if (out / "config.json").is_file():
        return out
    if env.dry:
        from stepdpo.tiny import build_tiny_model

        try:
            return build_tiny_model("mistral", out, seed=0, tokenizer="mistral-v1")
        except Exception:  # no mistral-common here: the tiny model's own offline tokenizer
            return build_tiny_model("mistral", out, seed=0)
    config = AutoConfig.from_pretrained(ASSETS)
    for key, value in (size or {}).items():
        setattr(config, key, value)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="5GB")
    AutoTokenizer.from_pretrained(ASSETS).save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


def shaped_pairs(env: Env, model: Path, n: int, prefix_steps: int = 7) -> tuple[Path, float, int]:
    """Step pairs whose prompt is the problem and `prefix_steps` earlier steps, each step a sentence of arithmetic:
    prompts about 8x a step. Returns the file, the measured prompt/step token ratio, the longest row (tokens)."""
    from stepdpo.data.pairs import make_pair, render_pair, write_jsonl
    from stepdpo.models import load_tokenizer

    rng = random.Random(0)
    words = ("apples", "pears", "coins", "marbles", "cards", "stamps")
    pairs = []
    for i in range(n):
        value, steps = rng.randint(1, 50), []
        for _ in range(prefix_steps + 1):
            b, item = rng.randint(1, 50), rng.choice(words)
            steps.append(f"Next, the box gets {b} more {item}, so it holds {value} + {b} = {value + b} {item} in all, "
                         f"which we carry into the following step of the calculation.")
            value += b
        wrong = steps[-1].replace(f"= {value}", f"= {value + rng.randint(1, 9)}")
        problem = "A box starts with some items and receives more at every step. How many does it hold at the end?"
        pairs.append(make_pair("step", problem, steps[:-1], [steps[-1]], [wrong], [{"file": "gpu-check", "line": i}]))
    path = env.work / f"pairs_{n}_{prefix_steps}.jsonl"
    write_jsonl(path, pairs)
    tok = load_tokenizer(str(model))
    prompt = [len(tok(render_pair(p)[0])["input_ids"]) for p in pairs]
    step = [len(tok(render_pair(p)[1], add_special_tokens=False)["input_ids"]) for p in pairs]
    return path, statistics.median(prompt) / statistics.median(step), max(prompt) + max(step)


def recipe_config(env: Env, model: Path, pairs: Path, out: Path, *overrides):
    """The shipped QLoRA recipe, as `stepdpo train --config RECIPE` parses it, for one process on one device."""
    from stepdpo.cli import parse

    argv = ["--config", str(RECIPE), "--model_name_or_path", str(model), "--train_pairs", str(pairs),
            "--eval_pairs", "", "--output_dir", str(out), "--gradient_accumulation_steps", "1",
            "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--logging_steps", "1",
            "--resume", "never", "--disable_tqdm", "true", *env.train_overrides(), *map(str, overrides)]
    config, _ = parse("train", argv)
    config.eval_pairs = None
    return config


class StepMeter:
    """Seconds and peak device memory of every optimizer step (a trainer callback)."""

    def __init__(self, env: Env):
        from transformers import TrainerCallback

        self.times, self.peaks = [], []
        meter = self

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                env.peak_reset()
                meter.t = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                peak = env.peak_gib()
                meter.times.append(time.perf_counter() - meter.t)
                meter.peaks.append(peak)

        self.callback = CB()

    def summary(self, warmup: int = 2) -> dict:
        warmup = min(warmup, len(self.times) - 1)
        times, peaks = self.times[warmup:] or self.times, self.peaks[warmup:] or self.peaks
        return {"step_s": statistics.median(times),
                "peak_gib": max(peaks) if peaks and peaks[0] is not None else None}


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]


# ------------------------------------------------------------------------------------------------------ checks
def qlora_7b(env: Env, state: dict) -> dict:
    from stepdpo.plan import make_plan
    from stepdpo.train.run import build_trainer

    model = mistral_dir(env, "mistral7b")
    state["model7b"] = model
    pairs, ratio, longest = shaped_pairs(env, model, n=16, prefix_steps=3)
    steps = 6 if env.dry else 10
    config = recipe_config(env, model, pairs, env.work / "qlora", "--max_steps", steps, "--learning_rate", "2e-4",
                           "--prefix_sharing", "false", "--warmup_steps", 0, "--lr_scheduler_type", "constant")
    trainer = build_trainer(config)
    meter = StepMeter(env)
    trainer.add_callback(meter.callback)
    env.peak_reset()
    trainer.train()
    got = losses(trainer)
    peak = env.peak_gib()
    plan = make_plan(str(model), nodes=1, gpus_per_node=1, mode="qlora", zero=2, seq_len=longest,
                     micro_batch=config.per_device_train_batch_size, lora_r=config.lora_r,
                     gradient_checkpointing=bool(config.activation_checkpointing))
    predicted = plan["per_gpu_total_gib"]
    finite = all(math.isfinite(x) for x in got)
    falls = len(got) >= 4 and statistics.mean(got[-3:]) < statistics.mean(got[:3])
    result = {"steps": steps, "losses": got, "pairs": 16, "longest_row_tokens": longest, "prompt_over_step": ratio,
              "batch": config.per_device_train_batch_size, "lora_r": config.lora_r, "dtype": config.dtype,
              "load_in_4bit": config.load_in_4bit, "gradient_checkpointing": bool(config.activation_checkpointing),
              "peak_gib": peak, "plan_gib": predicted, "plan": plan["per_gpu_gib"], **meter.summary()}
    lines = [(finite and falls, f"loss finite and falling over {steps} steps: {got[0]:.4f} -> {got[-1]:.4f}")]
    if peak is None:
        lines.append((None, f"peak memory: not read on CPU (plan predicts {predicted:.2f} GiB)"))
    else:
        lines.append((abs(peak / predicted - 1) <= 0.10,
                      f"peak GPU memory {peak:.2f} GiB vs stepdpo plan {predicted:.2f} GiB "
                      f"(ratio {peak / predicted:.3f}; target within 10%)"))
    del trainer
    return {**result, "lines": lines}


def prefix_sharing_7b(env: Env, state: dict) -> dict:
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from stepdpo.data.pairs import read_pairs, render_pair
    from stepdpo.train.logps import sequence_logps
    from stepdpo.train.modeling import load_model, load_tokenizer
    from stepdpo.train.run import build_trainer
    from stepdpo.train.trainer import EXTRA_KEYS

    model = state.get("model7b") or mistral_dir(env, "mistral7b")
    batch, steps = (4, 3) if env.dry else (8, 8)
    pairs, ratio, longest = shaped_pairs(env, model, n=batch * (steps + 1))
    # 1. per-pair log-probs of the same pairs, shared and unshared, from the same weights (the trainer's collator)
    logps = {}
    for sharing in ("false", "true"):
        trainer = build_trainer(recipe_config(env, model, pairs, env.work / f"lp-{sharing}", "--max_steps", 1,
                                              "--prefix_sharing", sharing, "--per_device_train_batch_size", batch))
        rows = trainer.data_collator([trainer.train_dataset[i] for i in range(batch)])
        inputs = {k: v.to(trainer.accelerator.device) if hasattr(v, "to") else v for k, v in rows.items()
                  if k not in EXTRA_KEYS}
        trainer.model.eval()
        with torch.no_grad():
            c, r = sequence_logps(trainer.model, inputs)
        logps[sharing] = torch.cat([c, r]).float().cpu()
        del trainer
    a, b = logps["false"], logps["true"]
    worst = float(((b - a).abs() - (BF16_TOL[0] + BF16_TOL[1] * a.abs())).max())
    # 2. time per step and peak step memory: stepdpo (sharing on) against trl.DPOTrainer, same pairs and settings
    meters = {}
    for which in ("trl", "stepdpo"):
        config = recipe_config(env, model, pairs, env.work / f"t-{which}", "--max_steps", steps,
                               "--per_device_train_batch_size", batch, "--prefix_sharing", "true")
        meter = StepMeter(env)
        if which == "stepdpo":
            trainer = build_trainer(config)
        else:  # TRL's own trainer on the same rendered texts, with the same model loading and LoRA
            texts = [render_pair(p) for p in read_pairs(pairs)]
            ds = Dataset.from_dict({"prompt": [t[0] for t in texts], "chosen": [t[1] for t in texts],
                                    "rejected": [t[2] for t in texts]})
            policy, peft_config = load_model(config)
            fields = {f for f in DPOConfig.__dataclass_fields__}
            trl_args = DPOConfig(**{k: v for k, v in config.to_dict().items() if k in fields and k not in
                                    ("model_init_kwargs", "ref_model_init_kwargs", "pad_token")})
            trainer = DPOTrainer(model=policy, args=trl_args, train_dataset=ds, peft_config=peft_config,
                                 processing_class=load_tokenizer(str(model)))
        trainer.add_callback(meter.callback)
        trainer.train()
        meters[which] = meter.summary()
        del trainer
    time_ratio = meters["stepdpo"]["step_s"] / meters["trl"]["step_s"]
    lines = [(worst <= 0, f"per-pair log-probs shared vs two rows: max |diff| {float((b - a).abs().max()):.4f} "
                          f"(tolerance 0.05 + 0.01 |logp|) over {len(a)} values"),
             (time_ratio <= 0.6, f"time per step with sharing / trl.DPOTrainer: {time_ratio:.3f} "
                                 f"(prompts {ratio:.1f}x a step; target <= 0.6)")]
    mem = None
    if meters["trl"]["peak_gib"]:
        mem = meters["stepdpo"]["peak_gib"] / meters["trl"]["peak_gib"]
        lines.append((None, f"peak memory per step, sharing / TRL: {mem:.3f} ({meters['stepdpo']['peak_gib']:.2f} vs "
                            f"{meters['trl']['peak_gib']:.2f} GiB)"))
    return {"prompt_over_step": ratio, "longest_row_tokens": longest, "batch": batch, "steps": steps,
            "logp_max_abs_diff": float((b - a).abs().max()), "trl": meters["trl"], "stepdpo": meters["stepdpo"],
            "time_ratio": time_ratio, "memory_ratio": mem, "lines": lines}


def full_bf16_1b(env: Env, state: dict) -> dict:
    import importlib.util

    from stepdpo.testing import free_port
    from stepdpo.train.run import build_trainer

    size = {"hidden_size": 2048, "intermediate_size": 7168, "num_hidden_layers": 16, "num_attention_heads": 16,
            "num_key_value_heads": 8}
    model = mistral_dir(env, "mistral1b", size)
    pairs, _, _ = shaped_pairs(env, model, n=8, prefix_steps=3)
    extra = ["--use_peft", "false", "--load_in_4bit", "false", "--learning_rate", "1e-5", "--max_steps", 3,
             "--per_device_train_batch_size", 2]
    deepspeed = importlib.util.find_spec("deepspeed") is not None
    if deepspeed:  # ZeRO-3 with world size 1: the multi-GPU recipe's code path in one process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        if env.dry:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        extra += ["--deepspeed", str(REPO / "configs" / "deepspeed" / "zero3.json")]
    config = recipe_config(env, model, pairs, env.work / "full1b", *extra)
    trainer = build_trainer(config)
    meter = StepMeter(env)
    trainer.add_callback(meter.callback)
    env.peak_reset()
    trainer.train()
    got = losses(trainer)
    from stepdpo.train.modeling import zero_stage

    stage = zero_stage(config)
    params = sum(p.numel() for p in trainer.model.parameters())
    del trainer
    ok = len(got) == 3 and all(math.isfinite(x) for x in got)
    return {"parameters_on_rank": params, "zero_stage": stage, "losses": got, **meter.summary(warmup=1),
            "lines": [(ok, f"full bf16 fine-tuning, {'ZeRO-%d' % stage if stage else 'no DeepSpeed'}: "
                           f"3 steps, losses {', '.join(f'{x:.4f}' for x in got)}")]}


def loop_smollm2(env: Env, state: dict) -> dict:
    import subprocess

    model = state.get("smollm2")
    if not model:
        return {"lines": [(None, "skipped: no converted SmolLM2 directory given (--smollm2 DIR; the 538 MB of "
                                 "weights exceed the 64 MiB a device call carries, and the GGUF the 98 MB)")]}
    out = env.work / "loop"
    cmd = [sys.executable, "-m", "stepdpo.cli", "loop", "--config",
           str(REPO / "configs/recipes/smollm2-135m/loop_arith.yaml"), "--model", str(model), "--quick",
           "--backend", "hf", "--out", str(out), "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if res.returncode != 0:
        return {"error": res.stderr[-2000:], "lines": [(False, "the loop failed (see error)")]}
    s = json.loads((out / "summary.json").read_text())
    return {"summary": {k: s[k] for k in ("accuracy", "paired_tests", "mined_pairs", "seconds")},
            "lines": [(True, f"the loop at --quick size ran in {s['seconds']['total']:.0f} s")]}


CHECKS = {"qlora_7b": qlora_7b, "prefix_sharing_7b": prefix_sharing_7b, "full_bf16_1b": full_bf16_1b,
          "loop_smollm2": loop_smollm2}


def machine(env: Env) -> dict:
    import torch
    import transformers

    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
           "torch": torch.__version__, "transformers": transformers.__version__, "dry": env.dry,
           "device": "cpu (--dry)" if not env.cuda else torch.cuda.get_device_name(0)}
    if env.cuda:
        props = torch.cuda.get_device_properties(0)
        out.update(gpu_memory_gib=round(props.total_memory / GIB, 1), cuda=torch.version.cuda,
                   bf16=torch.cuda.is_bf16_supported())
    for name in ("trl", "peft", "bitsandbytes", "deepspeed", "accelerate"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # report what is missing instead of failing the whole check
            out[name] = f"not importable ({type(e).__name__})"
    return out


def render(report: dict) -> str:
    m = report["machine"]
    lines = [f"# GPU check ({'dry run on CPU' if m['dry'] else m['device']})", "",
             f"{m['date']}; torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']}, peft {m['peft']}, "
             f"bitsandbytes {m['bitsandbytes']}, deepspeed {m['deepspeed']}" +
             (f"; {m['gpu_memory_gib']} GiB, CUDA {m['cuda']}" if "cuda" in m else ""), ""]
    for name, r in report["checks"].items():
        lines.append(f"## {name} ({r.get('seconds', 0):.0f} s)")
        for ok, text in r["lines"]:
            lines.append(f"- {'PASS' if ok else 'FAIL' if ok is False else 'INFO'}: {text}")
        if r.get("error"):
            lines += ["", "```", r["error"][-1500:], "```"]
        lines.append("")
    lines.append(f"**{'all checks passed' if report['passed'] else 'some checks failed'}** "
                 f"in {report['seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_report.json and gpu_report.md")
    parser.add_argument("--dry", action="store_true", help="on CPU at tiny sizes (what CI runs)")
    parser.add_argument("--only", action="append", choices=sorted(CHECKS), help="run only these checks")
    parser.add_argument("--smollm2", help="a converted SmolLM2-135M-Instruct directory (stepdpo convert), for check 4")
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    a = parser.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = Env(a.dry, Path(a.work or tempfile.mkdtemp(prefix="stepdpo-gpu-")))
    if not a.dry and not env.cuda:
        print("benchmarks.gpu.check: no CUDA device here; use --dry for the CPU run", file=sys.stderr)
        return 2
    if not a.dry and not (ASSETS / "tokenizer.json").is_file():
        print(f"benchmarks.gpu.check: {ASSETS} is missing: run bash benchmarks/gpu/prepare.sh here and carry "
              ".gpu_assets", file=sys.stderr)
        return 2
    state = {"smollm2": a.smollm2}
    report = {"machine": machine(env), "checks": {}}
    start = time.perf_counter()
    for name in a.only or list(CHECKS):
        t = time.perf_counter()
        print(f"[gpu-check] {name} ...", flush=True)
        try:
            result = CHECKS[name](env, state)
        except Exception:
            result = {"error": traceback.format_exc(), "lines": [(False, "raised (see error)")]}
        result["seconds"] = round(time.perf_counter() - t, 1)
        report["checks"][name] = result
        for ok, text in result["lines"]:
            print(f"[gpu-check] {name}: {'PASS' if ok else 'FAIL' if ok is False else 'INFO'}: {text}", flush=True)
        if result.get("error"):
            print(result["error"], flush=True)
        (out / "gpu_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")  # as it goes
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["passed"] = all(ok is not False for r in report["checks"].values() for ok, _ in r["lines"])
    (out / "gpu_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "gpu_report.md").write_text(render(report))
    print(render(report))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
