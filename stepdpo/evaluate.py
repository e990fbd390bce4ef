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
from pathlib import Path

import torch
from tqdm import tqdm

from stepdpo.train.tokenize import tokenize_pair

logger = logging.getLogger("stepdpo.eval")


def reward_accuracy(pairs: list[dict]) -> dict | None:
    """The reward model's agreement with the labels on scored pairs.

    per_step: the first step after the shared prefix, chosen reward > rejected reward;
    summed:   sum of chosen step rewards > sum of rejected step rewards. Ties count one half.
    """
    scored = [p for p in pairs if "chosen_step_rewards" in p and "rejected_step_rewards" in p]
    if not scored:
        return None

    def acc(values):
        return sum(1.0 if v > 0 else 0.5 if v == 0 else 0.0 for v in values) / len(values)

    return {
        "pairs": len(scored),
        "per_step": acc([p["chosen_step_rewards"][0] - p["rejected_step_rewards"][0] for p in scored]),
        "summed": acc([sum(p["chosen_step_rewards"]) - sum(p["rejected_step_rewards"]) for p in scored]),
    }


@torch.no_grad()
def completion_logps(model, tokenizer, pairs: list[dict], *, batch_size: int = 32, max_length: int | None = None,
                     append_eos: bool = False, progress: bool = True, desc: str = "eval") -> tuple[list, list, list]:
    """(chosen logps, rejected logps, kept pair indices). Pairs that cannot fit max_length are left out."""
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    device = next(model.parameters()).device
    items = []
    for i, pair in enumerate(pairs):
        tp = tokenize_pair(pair, tokenizer, max_length=max_length, append_eos=append_eos, encoder_decoder=enc_dec)
        if tp is not None:
            items.append((i, tp))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    chosen, rejected = [], []
    model.eval()
    for start in tqdm(range(0, len(items), batch_size), desc=desc, disable=not progress):
        batch = items[start : start + batch_size]
        for side, out in (("chosen_ids", chosen), ("rejected_ids", rejected)):
            prompts = [tp.prompt_ids for _, tp in batch]
            comps = [getattr(tp, side) for _, tp in batch]
            out.extend(_batch_logps(model, prompts, comps, pad, enc_dec, device))
    return chosen, rejected, [i for i, _ in items]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def _batch_logps(model, prompts, comps, pad, enc_dec, device) -> list[float]:
    if enc_dec:
        enc = _pad(prompts, pad).to(device)
        mask = _pad([[1] * len(p) for p in prompts], 0).to(device)
        labels = _pad(comps, -100).to(device)
        logits = model(input_ids=enc, attention_mask=mask, labels=labels).logits.float()
        targets = labels
    else:
        seqs = [p + c for p, c in zip(prompts, comps)]
        ids = _pad(seqs, pad).to(device)
        mask = _pad([[1] * len(s) for s in seqs], 0).to(device)
        labels = _pad([[-100] * len(p) + c for p, c in zip(prompts, comps)], -100).to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
    logp = torch.log_softmax(logits, dim=-1)
    valid = targets != -100
    tok = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    return tok.sum(dim=1).tolist()


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


def load_for_eval(path: str, token: str | None = None):
    """A full model directory, or a PEFT adapter directory (its base is the reference)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    adapter = Path(path) / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel

        base_name = json.loads(adapter.read_text())["base_model_name_or_path"]
        cfg = AutoConfig.from_pretrained(base_name, token=token)
        cls = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
        base = cls.from_pretrained(base_name, dtype=torch.float32, token=token)
        model = PeftModel.from_pretrained(base, path)
        tok_dir = path if (Path(path) / "tokenizer_config.json").exists() else base_name
        return model, AutoTokenizer.from_pretrained(tok_dir, token=token)
    cfg = AutoConfig.from_pretrained(path, token=token)
    cls = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32, token=token), AutoTokenizer.from_pretrained(path, token=token)


def evaluate(model_path: str, pairs: list[dict], ref_model_path: str | None = None, *, beta: float = 0.1,
             batch_size: int = 32, max_length: int | None = None, append_eos: bool = False,
             progress: bool = True, token: str | None = None) -> dict:
    model, tokenizer = load_for_eval(model_path, token)
    kw = dict(batch_size=batch_size, max_length=max_length, append_eos=append_eos, progress=progress)
    c, r, kept = completion_logps(model, tokenizer, pairs, desc="policy", **kw)
    c0 = r0 = None
    if hasattr(model, "disable_adapter") and ref_model_path is None:
        with model.disable_adapter():
            c0, r0, _ = completion_logps(model, tokenizer, pairs, desc="reference (adapter off)", **kw)
    elif ref_model_path:
        ref, _ = load_for_eval(ref_model_path, token)
        c0, r0, _ = completion_logps(ref, tokenizer, pairs, desc="reference", **kw)
    metrics = pair_metrics(pairs, c, r, kept, c0, r0, beta=beta)
    metrics["model"] = str(model_path)
    metrics["reference"] = ref_model_path or ("adapter disabled" if c0 is not None else None)
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
