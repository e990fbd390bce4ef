"""`stepdpo eval`: does the policy prefer the chosen step?

For each held-out pair: c, r = log p_policy(chosen | prompt), log p_policy(rejected | prompt), and with a
reference model c0, r0. Reported:
  pair_accuracy          fraction with c > r (ties count one half): the policy's own preference
  pair_accuracy_ref      fraction with (c - c0) > (r - r0): the implicit-reward (DPO) preference
  mean_reward_margin     mean of beta * ((c - c0) - (r - r0))
  mean_logp_margin       mean of c - r
  by_kind                the same per pair kind
  reward_model           for scored pairs: the reward model's accuracy (see `reward_accuracy`)
Tokenization is the trainer's (stepdpo.train.tokenize), so eval sees exactly what training saw.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from stepdpo.console import progress_bar
from stepdpo.data.pairs import DEFAULT_INSTRUCTION
from stepdpo.errors import StepdpoError
from stepdpo.options import REQUIRED, check, opt
from stepdpo.reward.accuracy import reward_accuracy
from stepdpo.train.logps import prepare_for_logps, sequence_logps
from stepdpo.train.tokenize import PairTokenizer

logger = logging.getLogger("stepdpo.eval")
DEFAULT_BETA = 0.1


class EvalError(StepdpoError):
    pass


@dataclass
class EvalOptions:
    pairs: str = opt(REQUIRED, "Held-out pairs.jsonl (or a directory holding one).")
    out: str = opt(REQUIRED, "Output directory: metrics.json (and training_curves.png with --run-dir).")
    model: str | None = opt(None, "Trained model directory (full model or PEFT adapter); default: RUN_DIR/final. "
                            "Without a model, --pairs must be scored and the reward model's accuracy is reported.")
    run_dir: str | None = opt(None, "The training output_dir: beta, max_length and append_eos come from its saved "
                              "config (so eval sees what training saw), and its curves are plotted.")
    ref_model: str | None = opt(None, "Reference model (default: for an adapter, its base with the adapter disabled; "
                                "for a full model from `stepdpo train`, the model its run started from; else none).")
    beta: float | None = opt(None, f"Beta of the implicit reward margin (default: the run's, else {DEFAULT_BETA}).")
    max_length: int | None = opt(None, "As in training (default: the run's); pairs that do not fit are skipped.")
    append_eos: bool | None = opt(None, "As in training (default: the run's, else false).")
    chat_template: str | None = opt(None, "auto, always or never, as in training (default: the run's, else auto).")
    system_prompt: str | None = opt(None, "As in training (default: the run's).")
    instruction: str | None = opt(None, "As in training (default: the run's, else Step-DPO's instruction).")
    batch_size: int = opt(32, "Pairs per forward pass.")
    hf_token_file: str | None = opt(None, "File holding a Hugging Face token (gated base models).")
    answers: str | None = opt(None, "A problem file with reference answers (MATH, GSM8K, PRM800K): also generate + "
                              "grade, and report answer accuracy before (the reference) and after (the policy).")
    answer_samples: int = opt(1, "--answers: samples per problem (maj@k and pass@k for k > 1).")
    answer_temperature: float = opt(0.0, "--answers: sampling temperature (0 = greedy).")
    answer_max_new_tokens: int = opt(256, "--answers: most tokens per solution.")
    allow_empty: bool = opt(False, "Succeed even when no pair is evaluated (otherwise that is an error).")
    progress: bool = opt(True, "Show a progress bar.")

    def __post_init__(self):
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.beta is None or self.beta > 0, "beta", "must be > 0")
        check(self.max_length is None or self.max_length > 0, "max_length", "must be > 0")


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _batches(tokenized: list, batch_size: int, pad: int):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    # The trainer's collator (no truncation: tokenize_pair already fitted every pair to max_length).
    collate = DataCollatorForPreference(pad_token_id=pad, max_length=None)
    for start in range(0, len(tokenized), batch_size):
        yield collate([{"prompt_ids": tp.prompt_ids, "chosen_ids": tp.chosen_ids, "rejected_ids": tp.rejected_ids}
                       for tp in tokenized[start : start + batch_size]])


@torch.no_grad()
def completion_logps(model, tokenizer, pairs: list[dict], *, batch_size: int = 32, max_length: int | None = None,
                     append_eos: bool = False, progress: bool = True, desc: str = "eval",
                     settings: dict | None = None) -> tuple[list, list, list]:
    """(chosen logps, rejected logps, kept pair indices) through the trainer's own tokenization, collator and
    log-prob helper. Pairs that cannot fit max_length are left out. `settings` (the run's: chat template,
    system prompt, instruction) renders prompts as training did."""
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    device = next(model.parameters()).device
    pair_tokenizer = PairTokenizer.from_settings(
        tokenizer, {**(settings or {}), "max_length": max_length, "append_eos": append_eos}, encoder_decoder=enc_dec)
    kept, tokenized = [], []
    for i, pair in enumerate(pairs):
        tp = pair_tokenizer(pair)
        if tp is not None:
            kept.append(i)
            tokenized.append(tp)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chosen, rejected = [], []
    model.eval()
    total = (len(tokenized) + batch_size - 1) // batch_size
    for batch in progress_bar(iterable=_batches(tokenized, batch_size, pad), total=total, desc=desc,
                              disable=not progress):
        c, r = sequence_logps(model, {k: v.to(device) for k, v in batch.items()})
        chosen += c.float().tolist()
        rejected += r.float().tolist()
    return chosen, rejected, kept


def pair_metrics(pairs: list[dict], c: list, r: list, kept: list, c0=None, r0=None, beta: float = 0.1) -> dict:
    def summarize(idx: list[int]) -> dict:
        if not idx:
            return {"pairs": 0}
        out = {
            "pairs": len(idx),
            "pair_accuracy": sum(1.0 if c[j] > r[j] else 0.5 if c[j] == r[j] else 0.0 for j in idx) / len(idx),
            "mean_logp_margin": sum(c[j] - r[j] for j in idx) / len(idx),
        }
        if c0 is not None:
            margins = [(c[j] - c0[j]) - (r[j] - r0[j]) for j in idx]
            out["pair_accuracy_ref"] = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(idx)
            out["mean_reward_margin"] = beta * sum(margins) / len(idx)
        return out

    all_idx = list(range(len(kept)))
    by_kind = defaultdict(list)
    for j, i in enumerate(kept):
        by_kind[pairs[i]["kind"]].append(j)
    metrics = summarize(all_idx)
    metrics["skipped_too_long"] = len(pairs) - len(kept)
    metrics["by_kind"] = {k: summarize(v) for k, v in sorted(by_kind.items())}
    rm = reward_accuracy(pairs)
    if rm:
        metrics["reward_model"] = rm
    return metrics


def _loading_args(run_cfg: dict | None) -> SimpleNamespace:
    """How to load the model as it was trained: dtype and 4-bit settings from the run's config (GPU), or
    float32 on CPU (exact, and what the tests compare against)."""
    cfg = run_cfg or {}
    on_gpu = _device().type == "cuda"
    dtype = cfg.get("dtype", "bfloat16" if on_gpu else "float32")
    if not on_gpu and not cfg.get("load_in_4bit"):
        dtype = "float32"
    return SimpleNamespace(load_in_4bit=bool(cfg.get("load_in_4bit")), dtype=dtype,
                           bnb_4bit_compute_dtype=cfg.get("bnb_4bit_compute_dtype", "bfloat16" if on_gpu else "float32"),
                           bnb_4bit_quant_storage=cfg.get("bnb_4bit_quant_storage"))


def load_for_eval(path: str, token: str | None = None, run_cfg: dict | None = None):
    """A full model directory, or a PEFT adapter directory on its base loaded as trained (a QLoRA adapter on
    the nf4 base), on the GPU when there is one. Returns (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from stepdpo.models import load_config, load_pretrained, load_tokenizer
    from stepdpo.train.checkpoint import adapter_base
    from stepdpo.train.modeling import DTYPES, quantization_config

    args = _loading_args(run_cfg)
    device = _device()
    base = adapter_base(path)
    base_name = base or path
    try:
        cfg = load_config(base_name, token=token)
    except OSError as e:
        what = f"the adapter's base model {base_name!r}" if base else f"--model {path}"
        raise EvalError(f"{what} cannot be loaded ({str(e).splitlines()[0]}); pass a local directory, or make the "
                        "hub id reachable (a token for gated models, a cached copy when offline)") from None
    cls = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    kwargs = {"dtype": DTYPES[args.dtype], "token": token}
    quant = quantization_config(args) if base else None
    if quant is not None:
        kwargs["quantization_config"] = quant
    model = load_pretrained(cls, base_name, **kwargs)
    if quant is None:
        model.to(device)
    prepare_for_logps(model, str((run_cfg or {}).get("prefix_sharing", "auto")).lower())  # before PEFT wraps it
    if base:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path)
        if quant is None:
            model.to(device)
    tok_dir = path if (Path(path) / "tokenizer_config.json").exists() else base_name
    return model, load_tokenizer(tok_dir, token=token)


def eval_settings(options: EvalOptions, run_cfg: dict | None) -> dict:
    """beta, max_length, append_eos: the flag when given, else the run's, else the default; with where each
    value came from."""
    cfg = run_cfg or {}
    out, source = {}, {}
    for key, default in (("beta", DEFAULT_BETA), ("max_length", None), ("append_eos", False),
                         ("chat_template", "auto"), ("system_prompt", None), ("instruction", DEFAULT_INSTRUCTION)):
        value = getattr(options, key)
        if value is not None:
            out[key], source[key] = value, "flag"
        elif key in cfg:
            out[key], source[key] = cfg[key], "run"
        else:
            out[key], source[key] = default, "default"
    out["from"] = source
    return out


def evaluate(model_path: str, pairs: list[dict], ref_model_path: str | None = None, *, beta: float = DEFAULT_BETA,
             batch_size: int = 32, max_length: int | None = None, append_eos: bool = False,
             progress: bool = True, token: str | None = None, run_cfg: dict | None = None,
             settings: dict | None = None, answers: dict | None = None) -> dict:
    """Pair metrics of the policy (and its reference); with `answers` ({problems, out, n, max_new_tokens,
    temperature}) also answer accuracy before (the reference) and after (the policy), from the same loaded models."""
    model, tokenizer = load_for_eval(model_path, token, run_cfg)
    kw = dict(batch_size=batch_size, max_length=max_length, append_eos=append_eos, progress=progress,
              settings=settings)
    c, r, kept = completion_logps(model, tokenizer, pairs, desc="policy", **kw)
    c0 = r0 = None
    accuracy = {}
    if answers:
        accuracy["after"] = answer_accuracy(model_path, model, answers, settings or {}, "after", progress)
    if hasattr(model, "disable_adapter") and ref_model_path is None:
        with model.disable_adapter():  # the base as trained is the reference: no second copy
            c0, r0, _ = completion_logps(model, tokenizer, pairs, desc="reference (adapter off)", **kw)
            if answers:
                accuracy["before"] = answer_accuracy(model_path, model, answers, settings or {}, "before", progress)
    elif ref_model_path:
        ref, _ = load_for_eval(ref_model_path, token)
        c0, r0, _ = completion_logps(ref, tokenizer, pairs, desc="reference", **kw)
        if answers:
            accuracy["before"] = answer_accuracy(ref_model_path, ref, answers, settings or {}, "before", progress)
    metrics = pair_metrics(pairs, c, r, kept, c0, r0, beta=beta)
    metrics["model"] = str(model_path)
    metrics["reference"] = ref_model_path or ("adapter disabled" if c0 is not None else None)
    if answers:
        metrics["answer_accuracy"] = {
            "before": accuracy.get("before", {}).get("accuracy"), "after": accuracy["after"]["accuracy"],
            "problems": accuracy["after"]["problems"], "details": accuracy}
    return metrics


def answer_accuracy(model_name: str, model, answers: dict, settings: dict, label: str, progress: bool) -> dict:
    """generate + grade with an already loaded model; the samples and grades stay in OUT/answers_<label>/."""
    from stepdpo.generate.generate import GenerateOptions, generate
    from stepdpo.generate.grade import GradeOptions, grade

    out = Path(answers["out"]) / f"answers_{label}"
    generate(GenerateOptions(problems=answers["problems"], model=model_name, out=str(out), n=answers["n"],
                             temperature=answers["temperature"], max_new_tokens=answers["max_new_tokens"],
                             chat_template=settings.get("chat_template") or "auto",
                             system_prompt=settings.get("system_prompt"),
                             instruction=settings.get("instruction") or DEFAULT_INSTRUCTION, progress=progress),
             model=model)
    report = grade(GradeOptions(problems=answers["problems"], samples=str(out), out=str(out / "graded")))
    return {k: v for k, v in report.items() if not isinstance(v, (dict, list))}


def run_eval(options: EvalOptions) -> dict:
    """Does the policy prefer the chosen step? Writes OUT/metrics.json (pair accuracy, with and without the
    reference, margins, per kind, the reward model's accuracy) and, with --run-dir, OUT/training_curves.png."""
    from stepdpo.auth import check_model, resolve_token
    from stepdpo.data.pairs import read_pairs
    from stepdpo.train.checkpoint import adapter_base, load_run_config

    pairs = read_pairs(options.pairs)
    model = options.model or (str(Path(options.run_dir) / "final") if options.run_dir else None)
    run_cfg = None
    for where in (options.run_dir, model):
        if where and run_cfg is None and Path(where).is_dir():
            run_cfg = load_run_config(where)
    settings = eval_settings(options, run_cfg)
    base = adapter_base(model) if model else None
    ref_model = options.ref_model
    if ref_model is None and run_cfg and not run_cfg.get("use_peft") and model and base is None:
        ref_model = run_cfg.get("model_name_or_path")  # a full fine-tune's reference: the model it started from
    token = resolve_token(options.hf_token_file)
    if model:  # every model this run loads, checked before any work
        for name, field in ((model, "--model"), (base, f"the base model in {model}/adapter_config.json"),
                            (ref_model, "--ref-model")):
            if name:
                check_model(name, token, field)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    if model:
        metrics = evaluate(model, pairs, ref_model, beta=settings["beta"], batch_size=options.batch_size,
                           max_length=settings["max_length"], append_eos=settings["append_eos"],
                           progress=options.progress, token=token.value,
                           run_cfg=run_cfg, settings=settings,
                           answers={"problems": options.answers, "out": str(out), "n": options.answer_samples,
                                    "temperature": options.answer_temperature,
                                    "max_new_tokens": options.answer_max_new_tokens} if options.answers else None)
        if metrics.get("pairs", 0) == 0 and not options.allow_empty:
            raise EvalError(f"--pairs {options.pairs}: no pair was evaluated ({len(pairs)} read, "
                            f"{metrics.get('skipped_too_long', 0)} longer than max_length={settings['max_length']}); "
                            "raise --max-length, or pass --allow-empty")
    else:
        metrics = {"pairs": len(pairs), "reward_model": reward_accuracy(pairs)}
        if metrics["reward_model"] is None:
            raise EvalError("without --model (or --run-dir), --pairs must be scored (run `stepdpo score`)")
    metrics["settings"] = settings
    if options.run_dir:
        png = plot_training_curves(options.run_dir, out / "training_curves.png")
        metrics["training_curves"] = str(png) if png else None
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}))
    return metrics


def plot_training_curves(run_dir: str | Path, out_png: str | Path) -> Path | None:
    """Loss, implicit-reward accuracy and margin per step from a run's log history."""
    run_dir = Path(run_dir)
    history = None
    summary = run_dir / "train_summary.json"
    if summary.is_file():
        history = json.loads(summary.read_text()).get("log_history")
    else:
        states = sorted(run_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1]))
        if states:
            history = json.loads(states[-1].read_text()).get("log_history")
    if not history:
        logger.warning("%s: no training log history found; no plot written", run_dir)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("loss", "loss"), ("rewards/accuracies", "implicit reward accuracy"), ("rewards/margins", "reward margin")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, (key, title) in zip(axes, keys):
        pts = [(h["step"], h[key]) for h in history if key in h and "step" in h]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
