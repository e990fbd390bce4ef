"""In-process reward scoring with transformers (CPU or one GPU)."""

from __future__ import annotations

import torch

from stepdpo.reward.scorer import MethodSpec, ScoreError, Substep, judge_prompt, judge_token_ids, prm_text, prm_token_ids


def _right_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


class HFScorer:
    def __init__(self, spec: MethodSpec, token: str | None = None, dtype=torch.float32):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model, token=token)
        config = AutoConfig.from_pretrained(spec.model, token=token)
        self.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        # Resolve the special tokens first: a wrong model fails here, before any weights load.
        if spec.method == "judge":
            self.yes_id, self.no_id = judge_token_ids(self.tokenizer, spec.model)
        else:
            if self.encoder_decoder:
                raise ScoreError(f"{spec.model}: --method prm needs a decoder-only process reward model")
            self.tag_id, self.good_id, self.bad_id = prm_token_ids(self.tokenizer, spec)
        if spec.method == "prm" and spec.head == "classifier":
            self.model = _load_classifier_prm(spec.model, config, dtype, token)
        else:
            cls = AutoModelForSeq2SeqLM if self.encoder_decoder else AutoModelForCausalLM
            self.model = cls.from_pretrained(spec.model, dtype=dtype, token=token).eval()
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    # ---- judge: one prompt per substep
    def judge_ids(self, sub: Substep) -> list[int]:
        return self.tokenizer(judge_prompt(sub))["input_ids"]

    @torch.no_grad()
    def score_judge(self, subs: list[Substep]) -> list[float]:
        rows = [self.judge_ids(s) for s in subs]
        ids, mask = _right_pad(rows, self.pad)
        if self.encoder_decoder:
            start = torch.full((len(rows), 1), self.model.config.decoder_start_token_id)
            logits = self.model(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits[:, 0]
        else:
            last = mask.sum(dim=1) - 1
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            logits = logits[torch.arange(len(rows)), last]
        logp = torch.log_softmax(logits.float(), dim=-1)
        # P(yes) / (P(yes) + P(no)) = sigmoid(log P(yes) - log P(no))
        return torch.sigmoid(logp[:, self.yes_id] - logp[:, self.no_id]).tolist()

    # ---- prm: one pass per solution, a reward at every step tag
    def prm_ids(self, problem: str, steps: list[str]) -> list[int]:
        return self.tokenizer(prm_text(problem, steps, self.spec.step_tag))["input_ids"]

    @torch.no_grad()
    def score_prm(self, solutions: list[tuple[str, list[str]]]) -> list[list[float]]:
        rows = [self.prm_ids(p, s) for p, s in solutions]
        ids, mask = _right_pad(rows, self.pad)
        out = self.model(input_ids=ids, attention_mask=mask)
        logits = (out.logits if hasattr(out, "logits") else out[0]).float()
        if self.spec.head == "classifier":  # 2 labels (bad, good): P(good)
            pair = logits.softmax(dim=-1)[..., 1]
        else:  # LM head: P(good) among {good, bad}
            pair = logits[..., [self.good_id, self.bad_id]].softmax(dim=-1)[..., 0]
        out = []
        for b, (row, (_, steps)) in enumerate(zip(rows, solutions)):
            positions = [i for i, t in enumerate(row) if t == self.tag_id]
            if len(positions) != len(steps):
                raise ScoreError(
                    f"{self.spec.model}: found {len(positions)} step tags for {len(steps)} steps; a step text "
                    f"contains the step tag {self.spec.step_tag!r} or the tag merges with its neighbours"
                )
            out.append(pair[b, positions].tolist())
        return out


def _load_classifier_prm(name: str, config, dtype, token):
    """A 2-label token-classification PRM: *ForTokenClassification, or Qwen2.5-Math-PRM's remote-code
    *ForProcessRewardModel (which returns the (bad, good) logits per token as its first output)."""
    from transformers import AutoModel, AutoModelForTokenClassification

    archs = getattr(config, "architectures", None) or []
    if any("ProcessRewardModel" in a for a in archs):
        return AutoModel.from_pretrained(name, dtype=dtype, token=token, trust_remote_code=True).eval()
    model = AutoModelForTokenClassification.from_pretrained(name, dtype=dtype, token=token).eval()
    if model.config.num_labels != 2:
        raise ScoreError(f"{name}: a classifier PRM needs 2 labels (bad, good), this one has {model.config.num_labels}")
    return model
