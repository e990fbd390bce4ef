"""`stepdpo loop`: does the model solve more problems afterwards? One round of the whole loop, measured against
controls trained the same way, with 95% intervals and paired tests.

    [convert] -> [sft] -> A0 -> mine (training problems) -> stepwise DPO -> A1
                            \\-> control: SFT on the reference solutions of the mined problems     -> AC
                             \\-> control: RFT on the policy's own right samples from the same mining -> AR
                              \\-> (optional) control: SFT at the SFT stage's learning rate

Every control starts from the policy DPO starts from and is trained with DPO's number of steps, learning rate,
schedule, warm-up, batch and adapter settings. Accuracy is greedy, graded by math-verify, on held-out problems
(`--evaluate test`) or on the validation problems carved from the training data (`--evaluate validation`: choose
settings there, then measure the held-out problems once). OUT/summary.json (and a copy per split,
OUT/summary_validation.json and OUT/summary_test.json) holds every accuracy with its Wilson 95%
interval, McNemar's exact test of A1 against A0 and against each control, the pairs mined, the generations spent
and, under `seconds`, the time of each stage (everything else in it is the same on every run of the same command).

Two kinds of task: `--problems synth`, generated multi-step arithmetic (stepdpo synth), or a problem file
(GSM8K's training split, read in place), selected by reference step count and split by problem with
`stepdpo problems`. The model: `tiny` (the demo's random-weight Mistral, built here) or any `--model` value (a
directory, a hub id, a GGUF file, `registry:smollm2-135m-instruct`). Recipes: configs/recipes/smollm2-135m/.
`stepdpo demo --loop` is this with the tiny model's settings (DEMO below).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from stepdpo.data.pairs import DEFAULT_INSTRUCTION
from stepdpo.errors import StepdpoError
from stepdpo.generate.mine import check_solution_sampling
from stepdpo.options import check, check_choice, opt
from stepdpo.train import DPOP_LAMBDA

CONTROLS = ("sft", "rft", "sft_at_sft_lr")
SCHEDULES = ("constant", "linear", "cosine", "constant_with_warmup")


@dataclass
class LoopOptions:
    """The defaults are the demo's (`stepdpo demo --loop`), measured on 2 CPU cores (README "The loop"): a tiny
    Mistral trained by SFT to solve about a fifth to a third of the held-out problems, then a round of mining and
    DPO. Among them: top_k 50, the sampling every setting was measured with (the hf backend used transformers'
    default of 50 before --top_k existed; over four mining draws each, A1 averaged 0.753 with 0 and 0.760 with 50);
    dpo_lr 5e-5, DPO's best of 2e-5, 5e-5, 1e-4 and 5e-4, measured on the held-out problems, so A1 is optimistic
    (the control, trained at the same rate, beat DPO at every one of them); loss [sigmoid, sft], DPO plus the chosen
    step's NLL as RPO, since plain DPO cost the tiny model accuracy. The real model's settings are recipes
    (configs/recipes/smollm2-135m/)."""

    out: str = opt("loop_out", "Output directory: summary.json, loop.log, every stage's files.")
    model: str = opt("tiny", "The model: tiny (a random-weight Mistral with Mistral-7B's config but the sizes, built "
                     "here), or a directory, hub id, GGUF file or registry model (registry:smollm2-135m-instruct); a "
                     "GGUF or registry model is converted once into OUT/model.")
    tiny_hidden: int = opt(64, "model tiny: hidden size.")
    tiny_layers: int = opt(2, "model tiny: layers.")
    # ---- the task
    problems: str = opt("synth", "synth: generated multi-step arithmetic; or a problem file (GSM8K's layout, MATH's, "
                        "stepdpo's), split by problem into training, validation and held-out problems.")
    synth_max_value: int = opt(9, "synth: every intermediate value stays in [0, N].")
    synth_min_ops: int = opt(2, "synth: fewest operations per problem.")
    synth_max_ops: int = opt(4, "synth: most operations per problem.")
    min_steps: int | None = opt(None, "Problem file: only problems whose reference solution has at least N steps.")
    max_steps: int | None = opt(None, "Problem file: only problems with at most N reference steps (GSM8K: 2).")
    train_problems: int = opt(600, "Training problems (SFT data; mining uses the first --mine-problems).")
    test_problems: float = opt(200, "Held-out problems: a count (synth: generated, then any that also occur in "
                               "training are dropped), or for a problem file a fraction below 1 of the problems it "
                               "selects, so a recipe fits files of any size.")
    validation_problems: float = opt(0, "Validation problems, carved from the training data (0: none): a count, or "
                                     "for a problem file a fraction below 1.")
    split_seed: int = opt(0, "Problem file: seed of the split.")
    evaluate: str = opt("test", "Where accuracy is measured: test (the held-out problems) or validation (to choose "
                        "settings on; needs --validation-problems).", choices=("test", "validation"))
    # ---- prompts (as in training)
    chat_template: str = opt("auto", "auto, always or never (see `stepdpo train --help`).",
                             choices=("auto", "always", "never"))
    system_prompt: str | None = opt(None, "System turn for chat templates (default: the template's own).")
    instruction: str = opt(DEFAULT_INSTRUCTION, "Appended to the problem in the user turn.")
    max_new_tokens: int = opt(64, "Most tokens per generated solution or continuation.")
    # ---- SFT (a base model becomes a step solver; 0 steps: the model already is one)
    sft_steps: int = opt(700, "SFT steps on the training problems' reference solutions (0: no SFT).")
    sft_lr: float = opt(3e-3, "SFT learning rate.")
    sft_scheduler: str = opt("constant", "SFT learning-rate schedule.", choices=SCHEDULES)
    sft_warmup: float = opt(0.0, "SFT warm-up: a fraction of its steps below 1, else a number of steps.")
    sft_peft: bool = opt(False, "SFT trains a LoRA adapter (merged into the model afterwards).")
    # ---- mining
    mine_problems: int = opt(600, "Training problems to mine (the first N); the SFT control trains on their "
                             "reference solutions.")
    samples: int = opt(4, "K: solutions sampled per problem.")
    rollouts: int = opt(4, "M: continuations per prefix.")
    max_wrong: int = opt(2, "Wrong solutions examined per problem.")
    temperature: float = opt(1.0, "Mining temperature.")
    sample_temperature: float | None = opt(None, "Mining: the K examined solutions' temperature (default: "
                                           "--temperature; 0: greedy, with --samples 1; see `stepdpo mine --help`).")
    top_k: int = opt(50, "Mining top_k (0: the whole vocabulary).")
    locate: str = opt("rollout", "How mining finds the wrong step: rollout, or equations (the first step stating a "
                      "false equation; see `stepdpo mine --help`).", choices=("rollout", "equations"))
    error_rule: str = opt("max_drop", "--locate rollout: first_zero or max_drop (see `stepdpo mine --help`).",
                          choices=("first_zero", "max_drop"))
    chosen_min_success: float = opt(0.5, "See `stepdpo mine --help`.")
    # ---- stepwise DPO, and every control (same steps, rate, schedule, batch, adapter)
    dpo_steps: int = opt(100, "Optimizer steps of the DPO stage and of each control (see --dpo-epochs).")
    dpo_epochs: float = opt(0.0, "Epochs of the mined pairs instead of a fixed --dpo-steps: once mining has counted "
                            "the pairs, the DPO stage and each control get ceil(epochs x pairs / batch) steps "
                            "(Step-DPO trains 8). 0: --dpo-steps.")
    dpo_lr: float = opt(5e-5, "Learning rate of the DPO stage and of the controls.")
    beta: float = opt(0.1, "DPO beta.")
    loss_type: list[str] = opt(factory=lambda: ["sigmoid", "sft"], help="TRL loss types (sigmoid: DPO; sft: the "
                               "chosen step's NLL, as RPO).")
    loss_weights: list[float] = opt(factory=lambda: [1.0, 1.0], help="One weight per loss type.")
    step_loss: str = opt("dpo", "dpo: TRL's loss, as --loss-type says. dpop: DPO-Positive (Smaug), which also "
                         "charges --dpop-lambda for every nat a chosen step falls below the reference; it computes "
                         "its own loss, so it takes --loss-type sigmoid --loss-weights 1.", choices=("dpo", "dpop"))
    dpop_lambda: float = opt(DPOP_LAMBDA, "--step-loss dpop: the penalty per nat (Smaug's 50).")
    lr_scheduler_type: str = opt("constant", "Schedule of the DPO stage and the controls.", choices=SCHEDULES)
    warmup: float = opt(0.0, "Warm-up of the DPO stage and the controls: a fraction of their steps below 1, else a "
                        "number of steps.")
    batch: int = opt(16, "Per-step batch (pairs, or solutions for SFT) of every training stage.")
    gradient_accumulation: int = opt(1, "Micro-batches per optimizer step (the batch is split into them).")
    use_peft: bool = opt(False, "The DPO stage and the controls train LoRA adapters (merged for evaluation).")
    lora_r: int = opt(16, "LoRA rank.")
    lora_alpha: int = opt(32, "LoRA alpha.")
    max_length: int | None = opt(None, "Most tokens per training row (None: no limit).")
    controls: list[str] = opt(factory=lambda: list(CONTROLS), help="Controls to train and measure: sft (reference "
                              "solutions), rft (the policy's right samples), sft_at_sft_lr.")
    # ---- running
    backend: str = opt("hf", "Generation in-process (hf) or on a vLLM CPU server, one per policy (vllm).",
                       choices=("hf", "vllm"))
    generate_batch: int = opt(64, "Prompts per generation batch.")
    vllm_args: list[str] = opt(factory=list, help="--backend vllm: more launch/serve_reward.sh options for each "
                               "policy's server (e.g. --max-model-len 1024 -- --kv-cache-memory-bytes 1G).")
    seed: int = opt(0, "Seed of the model, the data and the sampling.")
    quick: bool = opt(False, "Shrink everything to a few problems and steps: proves the path works, claims nothing.")
    reuse: bool = opt(False, "Reuse a training stage's model from an earlier run in --out when it is complete and was "
                      "trained with the same settings from the same model and data (generations are always reused "
                      "from the caches): change one setting and re-run, and only what it changes runs again.")
    progress: bool = opt(True, "Progress bars.")

    def __post_init__(self):
        check_choice(self.evaluate, "evaluate", ("test", "validation"))
        check_choice(self.backend, "backend", ("hf", "vllm"))
        for name in ("sft_scheduler", "lr_scheduler_type"):
            check_choice(getattr(self, name), name, SCHEDULES)
        for c in self.controls:
            check_choice(c, "controls", CONTROLS)
        check(self.evaluate != "validation" or self.validation_problems > 0, "evaluate",
              "validation needs --validation-problems N")
        check(len(self.loss_type) == len(self.loss_weights), "loss_weights", "one weight per --loss-type")
        # StepwiseDPOConfig checks the DPOP settings too, but the loop builds it only once mining is done: checked
        # here, a wrong setting fails before the run starts, not after its mining
        check_choice(self.step_loss, "step_loss", ("dpo", "dpop"))
        check(self.step_loss == "dpo" or (list(self.loss_type), list(self.loss_weights)) == (["sigmoid"], [1.0]),
              "loss_type", f"{list(self.loss_type)} with --step-loss dpop, which computes its own loss (DPO and its "
              "penalty, no NLL term): set --loss-type sigmoid --loss-weights 1")
        check(self.step_loss == "dpop" or self.dpop_lambda == DPOP_LAMBDA, "dpop_lambda", "is read by --step-loss dpop only")
        check(self.dpop_lambda >= 0, "dpop_lambda", f"{self.dpop_lambda}: a penalty >= 0 (0 is plain DPO)")
        check(self.batch % self.gradient_accumulation == 0, "gradient_accumulation", "must divide --batch")
        # mine's own check, here too: the loop builds MineOptions only once A0 is trained, and a wrong setting must
        # fail before the run starts
        check_solution_sampling(self.sample_temperature, self.samples)
        check(self.dpo_epochs >= 0, "dpo_epochs", f"{self.dpo_epochs}: a number of epochs >= 0 (0: --dpo-steps)")
        check(self.dpo_steps >= 1 and self.mine_problems >= 1 and self.train_problems >= 1, "dpo_steps",
              "--dpo-steps, --mine-problems and --train-problems must be >= 1")
        for name in ("test_problems", "validation_problems"):
            value = getattr(self, name)
            check(value >= 0 and (value < 1 or float(value).is_integer()), name,
                  f"{value}: a whole count, or for a problem file a fraction below 1")
            check(self.problems != "synth" or float(value).is_integer(), name,
                  f"{value}: --problems synth generates a whole count of problems (fractions are for problem files)")
            if float(value).is_integer():
                setattr(self, name, int(value))
        if self.quick:
            for name, value in QUICK.items():
                now = getattr(self, name)
                # a fraction of a problem file would be hundreds of problems: --quick takes its own few
                setattr(self, name, value if 0 < now < 1 else min(now, value) if name != "sft_steps" or now else 0)


# `--quick`: a few problems and steps, for CI (it proves the path works; its numbers mean nothing)
QUICK = {"train_problems": 8, "test_problems": 6, "validation_problems": 4, "mine_problems": 6, "samples": 2,
         "rollouts": 2, "sft_steps": 2, "dpo_steps": 2, "batch": 2, "gradient_accumulation": 1, "max_new_tokens": 40}


class LoopError(StepdpoError):
    pass


def dpo_steps_for(pairs: int, epochs: float, batch: int, cap: int | None = None) -> int:
    """Optimizer steps for `epochs` passes over `pairs` in batches of `batch` (the last one may be partial), at
    least one, at most `cap` (--quick's few steps)."""
    steps = max(1, math.ceil(epochs * pairs / batch))
    return min(steps, cap) if cap else steps


def loop(options: LoopOptions) -> dict:
    """One round of the loop, with its controls, measured (see the module's docstring). Writes OUT/summary.json and
    OUT/loop.log; prints the table."""
    from stepdpo.console import Console, quiet_libraries

    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    with Console(out / "loop.log", "loop", progress=options.progress) as console:
        quiet_libraries()
        summary = _run(options, out, console)
    return summary


def _run(o: LoopOptions, out: Path, console) -> dict:
    from stepdpo.generate.mine import MineOptions, mine
    from stepdpo.train.config import StepwiseDPOConfig
    from stepdpo.train.run import train

    times: dict[str, float] = {}
    with console.stage("model", times):
        model = _model(o, out)
    with console.stage("problems", times):
        files = _problems(o, out)
    prompts = dict(chat_template=o.chat_template, system_prompt=o.system_prompt, instruction=o.instruction)
    common = dict(use_cpu=True, report_to="none", save_strategy="no", resume="never", seed=o.seed,
                  per_device_train_batch_size=o.batch // o.gradient_accumulation,
                  gradient_accumulation_steps=o.gradient_accumulation, logging_steps=5,
                  disable_tqdm=not o.progress, **prompts, **({"max_length": o.max_length} if o.max_length else {}))

    def sft(start, run, data, peft, **kw):
        from stepdpo.train.sft import StepSFTConfig, sft_main

        _train_once(StepSFTConfig(model_name_or_path=str(start), train_data=str(data), output_dir=str(run), **kw),
                    sft_main, o.reuse)
        return _merged(run / "final", run / "merged") if peft else run / "final"

    policy = model
    if o.sft_steps:
        with console.stage("sft", times):
            policy = sft(model, out / "sft", files["train"], o.sft_peft, max_steps=o.sft_steps,
                         learning_rate=o.sft_lr, lr_scheduler_type=o.sft_scheduler, warmup_steps=o.sft_warmup,
                         **_peft(o.sft_peft, o), **common)
    servers = _Servers(out, o.backend, o.vllm_args)
    results: dict[str, dict] = {}
    try:
        with console.stage("answers A0", times):
            results["A0"] = _answers(policy, out / "answers_before", files["eval"], o, servers)
        with console.stage("mine", times):
            urls = servers.urls(policy)
            mined = mine(MineOptions(problems=str(files["mine"]), model=str(policy), out=str(out / "mine"),
                                     samples=o.samples, rollouts=o.rollouts, max_wrong=o.max_wrong,
                                     temperature=o.temperature, sample_temperature=o.sample_temperature,
                                     top_k=o.top_k, locate=o.locate,
                                     error_rule=o.error_rule,
                                     chosen_min_success=o.chosen_min_success, max_new_tokens=o.max_new_tokens,
                                     batch_size=o.generate_batch, seed=o.seed, backend="vllm" if urls else "hf",
                                     url=urls, progress=o.progress, **prompts))
        if not mined["pairs"]:
            # what was measured stays on record: A0 and the mining report, with why the loop stopped
            stopped = (f"mine found no pair in {mined['problems']} training problems (sample accuracy "
                       f"{mined['sample_accuracy']:.3f}); more --mine-problems, --samples or --max-wrong, or a "
                       "policy that solves more of them (more --sft-steps)")
            servers.stop()
            summary = _summary(o, files, results, mined, times, stopped=stopped)
            _write_summary(out, summary)
            raise LoopError(f"{stopped}; A0 and the mining report are in {out / 'summary.json'}")
        if o.dpo_epochs:
            # the steps follow the pairs: a fixed --dpo-steps is 8 epochs of 39 pairs and 46 of 7 (the GSM8K run)
            o.dpo_steps = dpo_steps_for(mined["pairs"], o.dpo_epochs, o.batch, QUICK["dpo_steps"] if o.quick else None)
            print(f"--dpo-epochs {o.dpo_epochs:g} of {mined['pairs']} pairs in batches of {o.batch}: "
                  f"{o.dpo_steps} steps for DPO and each control")
        # what DPO and every control share; built once the steps are known
        matched = dict(max_steps=o.dpo_steps, learning_rate=o.dpo_lr, lr_scheduler_type=o.lr_scheduler_type,
                       warmup_steps=o.warmup, **_peft(o.use_peft, o), **common)
        with console.stage("train (stepwise DPO)", times):
            servers.stop()  # an idle vLLM CPU server still takes a core and gigabytes from training
            _train_once(StepwiseDPOConfig(model_name_or_path=str(policy),
                                          train_pairs=str(out / "mine" / "pairs.jsonl"), output_dir=str(out / "dpo"),
                                          beta=o.beta, **_dpo_loss(o), **matched), train, o.reuse)
            after = _merged(out / "dpo" / "final", out / "dpo" / "merged") if o.use_peft else out / "dpo" / "final"
        with console.stage("answers A1", times):
            results["A1"] = _answers(after, out / "answers_after", files["eval"], o, servers)
        # Each control gets what the DPO stage got: the same start, steps, batch, learning rate, schedule and
        # adapter settings; only the data differs.
        data = {"sft": files["mine"], "rft": out / "mine" / "solved.jsonl", "sft_at_sft_lr": files["mine"]}
        for c in o.controls:
            kw = dict(matched, **({"learning_rate": o.sft_lr} if c == "sft_at_sft_lr" else {}))
            with console.stage(f"control {c}", times):
                servers.stop()
                model_c = sft(policy, out / f"control_{c}", data[c], o.use_peft, **kw)
            with console.stage(f"answers {c}", times):
                results[c] = _answers(model_c, out / f"answers_control_{c}", files["eval"], o, servers)
    finally:
        servers.stop()
    summary = _summary(o, files, results, mined, times)
    _write_summary(out, summary)
    _print(summary, console)
    return summary


# Settings that change what a training stage reports, not what it trains: --reuse ignores them (a model trained
# before the loop logged every 5 steps instead of 25 is the same model).
NOT_TRAINING = frozenset({"logging_steps", "logging_first_step", "disable_tqdm", "report_to", "logging_dir"})
# Where things lie, not what they are: the fingerprint compares the model and the data by content (mined pairs
# without their provenance, which names the problem file's path), and the output directory is the one being reused,
# so a run directory that was moved or renamed keeps every trained model (before, the saved paths differed and
# every stage trained again; then the DPO stage still did, its pairs naming the old problem file).
LOCATIONS = frozenset({"output_dir", "model_name_or_path", "train_pairs", "eval_pairs", "train_data", "eval_data"})


def _dpo_loss(o: LoopOptions) -> dict:
    """The DPO stage's loss settings: TRL's loss types, or DPOP, which takes none of them (checked in LoopOptions)."""
    if o.step_loss == "dpop":
        return dict(step_loss="dpop", dpop_lambda=o.dpop_lambda)
    return dict(loss_type=list(o.loss_type), loss_weights=list(o.loss_weights))


def _train_once(config, run, reuse: bool) -> None:
    """Run a training stage, or with --reuse keep the model an earlier run left in its output_dir when it is complete
    and was trained with these settings (the saved config) from the same model and data (the fingerprint)."""
    from stepdpo.train.checkpoint import FINGERPRINT, RUN_CONFIG, fingerprint_mismatches, is_complete

    final = Path(config.output_dir) / "final"
    if reuse and is_complete(final) and (final / RUN_CONFIG).is_file() and (final / FINGERPRINT).is_file():
        ignored = NOT_TRAINING | LOCATIONS
        saved = {k: v for k, v in json.loads((final / RUN_CONFIG).read_text()).items() if k not in ignored}
        now = json.loads(json.dumps(config.to_dict(), default=str))
        if saved == {k: v for k, v in now.items() if k in saved} and \
                not fingerprint_mismatches(json.loads((final / FINGERPRINT).read_text()), config, every_file=True):
            print(f"reused {final}: complete, same settings, model and data")
            return
    merged = final.parent / "merged"
    if merged.exists():  # a merge of another run's adapter must not survive this run
        shutil.rmtree(merged)
    run(config)


def _peft(on: bool, o: LoopOptions) -> dict:
    return dict(use_peft=True, lora_r=o.lora_r, lora_alpha=o.lora_alpha, lora_dropout=0.0) if on else {}


def _merged(adapter: Path, out: Path) -> Path:
    from stepdpo.generate.merge import MergeOptions, merge

    return merge(MergeOptions(adapter=str(adapter), out=str(out)))


def _model(o: LoopOptions, out: Path) -> Path | str:
    from stepdpo.convert import ConvertOptions, convert
    from stepdpo.models import model_ref, resolve_model_name

    if o.model == "tiny":
        from stepdpo.tiny import TinySize, build_tiny_model

        size = TinySize(hidden=o.tiny_hidden, layers=o.tiny_layers, heads=max(2, o.tiny_hidden // 32),
                        ffn=4 * o.tiny_hidden)
        return build_tiny_model("mistral", out / "model", seed=o.seed, size=size)
    name = resolve_model_name(o.model)
    if model_ref(name).is_gguf:  # dequantized once, not at every stage's load (and a vLLM server needs it so)
        target = out / "model"
        if not (target / "config.json").is_file():
            convert(ConvertOptions(model=o.model, out=str(target), overwrite=True))
        return target
    return name


def _problems(o: LoopOptions, out: Path) -> dict[str, Path]:
    """train.jsonl (SFT data), mine.jsonl (its first --mine-problems), eval.jsonl (held-out or validation)."""
    from stepdpo.generate.problems import ProblemsOptions, select_problems

    d = out / "problems"
    d.mkdir(parents=True, exist_ok=True)
    if o.problems == "synth":
        from stepdpo.data.synthetic import SynthOptions, synth

        # seeds as the demo always drew them: train seed+1, test seed+2 (validation: seed+3)
        for name, n, s in (("train", o.train_problems, o.seed + 1), ("test", o.test_problems, o.seed + 2),
                           ("validation", o.validation_problems, o.seed + 3)):
            if n:
                synth(SynthOptions(out=str(d / f"{name}.jsonl"), kind="problems", problems=n, seed=s,
                                   max_value=o.synth_max_value, min_ops=o.synth_min_ops, max_ops=o.synth_max_ops))
        seen = _problem_texts(d / "train.jsonl")
        for name in ("test", "validation"):
            if (d / f"{name}.jsonl").exists():  # held-out problems must be unseen: drop any training problem
                _keep(d / f"{name}.jsonl", lambda row: row["problem"] not in seen)
    else:
        select_problems(ProblemsOptions(input=o.problems, out=str(d), min_steps=o.min_steps, max_steps=o.max_steps,
                                        held_out=o.test_problems, validation=o.validation_problems,
                                        train=o.train_problems, seed=o.split_seed, overwrite=True))
    lines = (d / "train.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (d / "mine.jsonl").write_text("".join(lines[: o.mine_problems]), encoding="utf-8")
    return {"train": d / "train.jsonl", "mine": d / "mine.jsonl",
            "eval": d / ("validation.jsonl" if o.evaluate == "validation" else "test.jsonl")}


def _problem_texts(path: Path) -> set[str]:
    return {json.loads(x)["problem"] for x in path.read_text(encoding="utf-8").splitlines() if x.strip()}


def _keep(path: Path, keep) -> None:
    rows = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    path.write_text("".join(x + "\n" for x in rows if keep(json.loads(x))), encoding="utf-8")


def _answers(model, out: Path, problems: Path, o: LoopOptions, servers: "_Servers") -> dict:
    """Greedy solutions to `problems`, graded: the report, and each problem's outcome (by problem id)."""
    from stepdpo.generate.generate import GenerateOptions, generate
    from stepdpo.generate.grade import GradeOptions, grade

    urls = servers.urls(model)
    generate(GenerateOptions(problems=str(problems), model=str(model), out=str(out), max_new_tokens=o.max_new_tokens,
                             batch_size=o.generate_batch, backend="vllm" if urls else "hf", url=urls,
                             progress=o.progress, chat_template=o.chat_template, system_prompt=o.system_prompt,
                             instruction=o.instruction))
    report = grade(GradeOptions(problems=str(problems), samples=str(out), out=str(out / "graded")))
    # samples.jsonl is the split measured last; samples_<split>.jsonl keeps each split's (see _write_summary)
    shutil.copyfile(out / "samples.jsonl", out / f"samples_{o.evaluate}.jsonl")
    correct = {}
    for line in (out / "graded" / "grades.jsonl").read_text(encoding="utf-8").splitlines():
        g = json.loads(line)
        correct[g["problem_id"]] = bool(g["correct"])
    return {"report": report, "correct": correct}


NAMES = {"A0": "A0: the policy before (after sft)", "A1": "A1: + mine + stepwise DPO",
         "sft": "control: + as many SFT steps on the reference solutions",
         "rft": "control: + as many steps on its own right samples (RFT)",
         "sft_at_sft_lr": "control: SFT steps at the SFT stage's learning rate"}


def _summary(o: LoopOptions, files: dict, results: dict, mined: dict, times: dict, stopped: str | None = None) -> dict:
    from stepdpo.stats import accuracy_summary, paired_comparison

    accuracy = {}
    for name, r in results.items():
        accuracy[name] = {**accuracy_summary(list(r["correct"].values())), "invalid": r["report"]["invalid"],
                          "what": NAMES[name]}
    paired = {f"A1_vs_{name}": paired_comparison(results["A1"]["correct"], results[name]["correct"])
              for name in results if name != "A1" and "A1" in results}
    # each control against the policy it started from, on the same problems: whether further training of the
    # control's kind moved A0 at all is the yardstick for A1's change
    paired |= {f"{name}_vs_A0": paired_comparison(results[name]["correct"], results["A0"]["correct"])
               for name in results if name not in ("A0", "A1")}
    mine_report = {k: v for k, v in mined.items() if k not in ("stages", "vllm")}
    seconds = {"stages": times, "total": round(sum(times.values()), 2), "mine": mined.get("stages", {})}
    settings = dataclasses.asdict(o)
    settings.pop("out")
    settings.pop("progress")
    return {
        "task": {"problems": o.problems, "evaluate": o.evaluate, "eval_problems": len(results["A0"]["correct"]),
                 "train_problems": _count_lines(files["train"]), "mined_problems": _count_lines(files["mine"])},
        "model": o.model,
        "accuracy": accuracy,
        "paired_tests": paired,
        # the demo's summary keys, kept for its readers: before = A0, after = A1, control = the SFT control
        "answer_accuracy": {"before": accuracy["A0"]["accuracy"],
                            **({"after": accuracy["A1"]["accuracy"]} if "A1" in accuracy else {}),
                            **({"control": accuracy["sft"]["accuracy"]} if "sft" in accuracy else {})},
        "mined_pairs": mined["pairs"],
        "generations": {"mine": mined["generations"],
                        "answers": sum(r["report"]["samples"] for r in results.values())},
        "mine": mine_report,
        "backend": o.backend,
        "settings": settings,
        "seconds": seconds,
        # a run that could not finish says why (it has A0 and the mining report, no A1 and no controls)
        **({"stopped": stopped} if stopped else {}),
    }


def _write_summary(out: Path, summary: dict) -> None:
    """OUT/summary.json (the latest run) and OUT/summary_<validation|test>.json: the protocol measures both splits in
    one run directory (--evaluate validation, then --evaluate test --reuse), and the test run must not take the
    validation numbers with it (before, it overwrote the one summary). The answers_* folders keep each split's
    samples the same way (samples.jsonl and samples_<split>.jsonl)."""
    text = json.dumps(summary, indent=2) + "\n"
    (out / "summary.json").write_text(text)
    (out / f"summary_{summary['task']['evaluate']}.json").write_text(text)


def _count_lines(path: Path) -> int:
    return sum(1 for x in path.read_text(encoding="utf-8").splitlines() if x.strip())


def _print(s: dict, console) -> None:
    a, p = s["accuracy"], s["paired_tests"]
    console.result("")
    console.result(f"stepdpo loop ({s['model']}, {s['task']['eval_problems']} {s['task']['evaluate']} problems, "
                   f"{s['mined_pairs']} mined pairs, {s['backend']} generation)")
    # p: McNemar's exact test of A1 against the row's model, on the same problems
    console.result(f"{'answer accuracy':58s} {'value':>6s}  {'95% interval':>14s}  {'p vs A1':>8s}")
    for name, row in a.items():
        test = p.get(f"A1_vs_{name}")
        line = f"{NAMES[name]:58s} {row['accuracy']:6.3f}  [{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}]"
        console.result(line + (f"  {test['p_value']:8.3g}" if test else ""))
    gain = a["A1"]["accuracy"] - a["A0"]["accuracy"]
    best = max((k for k in a if k not in ("A0", "A1")), key=lambda k: a[k]["accuracy"], default=None)
    line = f"A1 - A0 = {100 * gain:+.1f} points (McNemar p = {p['A1_vs_A0']['p_value']:.3g})"
    if best:
        line += f"; A1 - best control ({best}) = {100 * (a['A1']['accuracy'] - a[best]['accuracy']):+.1f} points"
    console.result(line)
    console.note("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s["seconds"]["stages"].items())
                 + f"; total {s['seconds']['total']:.0f}")


class _Servers:
    """--backend vllm: one vLLM CPU server per policy (started from this checkout's launch/serve_reward.sh)."""

    def __init__(self, out: Path, backend: str, extra: list[str] = ()):
        self.out, self.backend, self.extra, self.current = out, backend, list(extra), None

    def urls(self, model) -> list[str]:
        if self.backend != "vllm":
            return []
        from stepdpo.testing import VLLMServer, vllm_available

        if not vllm_available():
            raise LoopError("--backend vllm needs .venv-vllm (bash launch/setup.sh --vllm)")
        if self.current is None or self.current.model != Path(model):
            self.stop()
            name = Path(model).name if Path(model).name not in ("final", "merged") else Path(model).parent.name
            self.current = VLLMServer(Path(model), "judge", self.out / f"vllm-{name}.log",
                                      extra=self.extra).start().wait()
        return [self.current.url]

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()
            self.current = None
