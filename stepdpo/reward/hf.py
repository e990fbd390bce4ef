"""In-process reward scoring with transformers (CPU or one GPU): a RewardBackend (stepdpo.reward.scorer)."""

from __future__ import annotations

import torch

from stepdpo.reward.scorer import (MethodSpec, RewardBackend, ScoreError, Substep, judge_prompt, judge_token_ids,
                                   prm_text, prm_token_ids)


def _right_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class HFScorer(RewardBackend):
    def __init__(self, spec: MethodSpec, tokenizer, config, token: str | None = None, dtype=torch.float32,
                 device: torch.device | None = None, trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        from stepdpo.models import load_pretrained

        self.spec = spec
        self.device = device or default_device()
        self.tokenizer = tokenizer
        self.encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        # Resolve the special tokens first: a wrong model fails here, before any weights load.
        if spec.method == "judge":
            self.yes_id, self.no_id = judge_token_ids(self.tokenizer, spec.model)
        else:
            if self.encoder_decoder:
                raise ScoreError(f"{spec.model}: --method prm needs a decoder-only process reward model")
            self.tag_id, self.good_id, self.bad_id = prm_token_ids(self.tokenizer, spec)
        if spec.method == "prm" and spec.head == "classifier":
            self.model = _load_classifier_prm(spec.model, config, dtype, token, trust_remote_code)
        else:
            cls = AutoModelForSeq2SeqLM if self.encoder_decoder else AutoModelForCausalLM
            self.model = load_pretrained(cls, spec.model, dtype=dtype, token=token,
                                         trust_remote_code=trust_remote_code).eval()
        self.model.to(self.device)
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def run(self, method: str, batches: list, on_result) -> None:
        score = self.score_judge if method == "judge" else self.score_prm
        for i, batch in enumerate(batches):
            on_result(i, score(batch))

    # ---- judge: one prompt per substep
    def judge_ids(self, sub: Substep) -> list[int]:
        style = self.spec.style
        return self.tokenizer(judge_prompt(sub, style), add_special_tokens=style.add_special_tokens)["input_ids"]

    @torch.no_grad()
    def score_judge(self, subs: list[Substep]) -> list[float]:
        rows = [self.judge_ids(s) for s in subs]
        ids, mask = (t.to(self.device) for t in _right_pad(rows, self.pad))
        if self.encoder_decoder:
            start = torch.full((len(rows), 1), self.model.config.decoder_start_token_id, device=self.device)
            logits = self.model(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits[:, 0]
        else:
            last = mask.sum(dim=1) - 1
            logits = self.model(input_ids=ids, attention_mask=mask).logits
            logits = logits[torch.arange(len(rows), device=self.device), last]
        logp = torch.log_softmax(logits.float(), dim=-1)
        # P(yes) / (P(yes) + P(no)) = sigmoid(log P(yes) - log P(no))
        return torch.sigmoid(logp[:, self.yes_id] - logp[:, self.no_id]).tolist()

    # ---- prm: one pass per solution, a reward at every step tag
    def prm_ids(self, problem: str, steps: list[str]) -> list[int]:
        style = self.spec.style
        return self.tokenizer(prm_text(problem, steps, self.spec.step_tag, style),
                              add_special_tokens=style.add_special_tokens)["input_ids"]

    @torch.no_grad()
    def score_prm(self, solutions: list[tuple[str, list[str]]]) -> list[list[float]]:
        rows = [self.prm_ids(p, s) for p, s in solutions]
        ids, mask = (t.to(self.device) for t in _right_pad(rows, self.pad))
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


def load_hf_backend(spec: MethodSpec, token: str | None = None, dtype: str = "auto", trust_remote_code: bool = False,
                    tokenizer=None, config=None) -> HFScorer:
    """The in-process backend on the GPU when there is one, in bf16 there where supported (as models are
    trained), and float32 on CPU."""
    from stepdpo.models import load_config, load_tokenizer
    from stepdpo.train.modeling import DTYPES

    tokenizer = tokenizer or load_tokenizer(spec.model, token=token)
    config = config or load_config(spec.model, token=token)
    device = default_device()
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return HFScorer(spec, tokenizer, config, token=token, dtype=DTYPES[dtype], device=device,
                    trust_remote_code=trust_remote_code)


def _load_classifier_prm(name: str, config, dtype, token, trust_remote_code: bool):
    """A 2-label token-classification PRM: *ForTokenClassification, or Qwen2.5-Math-PRM's remote-code
    *ForProcessRewardModel (which returns the (bad, good) logits per token as its first output). Remote code
    runs only when asked (--trust-remote-code); a head missing from the checkpoint is an error, never a
    random initialisation."""
    from transformers import AutoModel, AutoModelForTokenClassification

    archs = getattr(config, "architectures", None) or []
    if any("ProcessRewardModel" in a for a in archs) or getattr(config, "auto_map", None):
        if not trust_remote_code:
            raise ScoreError(f"{name}: this model ships its own Python code (auto_map / {archs}); stepdpo runs it "
                             "only with --trust-remote-code. Read the code first, then pass the flag.")
        model, info = AutoModel.from_pretrained(name, dtype=dtype, token=token, trust_remote_code=True,
                                                output_loading_info=True)
    else:
        model, info = AutoModelForTokenClassification.from_pretrained(name, dtype=dtype, token=token,
                                                                      output_loading_info=True)
        if model.config.num_labels != 2:
            raise ScoreError(f"{name}: a classifier PRM needs 2 labels (bad, good), this one has "
                             f"{model.config.num_labels}")
    missing = [k for k in info.get("missing_keys", []) if "score" in k or "classifier" in k or "head" in k]
    if missing:
        raise ScoreError(f"{name}: the checkpoint has no weights for the reward head ({', '.join(missing[:4])}); it "
                         "would be randomly initialised. Use a trained PRM checkpoint, or --prm-head lm.")
    return model.eval()
