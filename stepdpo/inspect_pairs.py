"""`stepdpo inspect`: what the trainer sees for a few pairs, through the trainer's own tokenization.

For each pair: the prompt, chosen and rejected texts after templating and truncation, their token counts,
and the token boundary between prompt and step. The settings (max_length, append_eos, chat template, system
prompt, instruction) come from the flags or from a training recipe (`--config R.yaml`), exactly as `stepdpo
train` would read them; the tokenization is `stepdpo.train.tokenize.PairTokenizer`, the trainer's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from stepdpo.data.pairs import DEFAULT_INSTRUCTION
from stepdpo.options import REQUIRED, check, opt


@dataclass
class InspectOptions:
    """Field names follow the training recipe's, so `--config R.yaml` takes the model and the settings from it."""

    pairs: str = opt(REQUIRED, "pairs.jsonl (or a directory holding one).")
    model_name_or_path: str = field(default=None, metadata={
        "help": "Model (directory or hub id) whose tokenizer training uses.", "aliases": ["--model"]})
    model_revision: str | None = opt(None, "Hub revision of the model.")
    n: int = field(default=3, metadata={"help": "How many pairs to show.", "aliases": ["-n"]})
    start: int = opt(0, "Index of the first pair to show.")
    max_length: int | None = opt(None, "As in training: the oldest prefix steps are dropped to fit.")
    append_eos: bool = opt(False, "As in training.")
    chat_template: str = opt("auto", "As in training: auto, always or never.", choices=("auto", "always", "never"))
    system_prompt: str | None = opt(None, "As in training.")
    instruction: str = opt(DEFAULT_INSTRUCTION, "As in training.")
    hf_token_file: str | None = opt(None, "File holding a Hugging Face token (gated models).")
    json: bool = opt(False, "Machine-readable output: one JSON object per pair, with the token ids.")

    def __post_init__(self):
        check(bool(self.model_name_or_path), "model", "is required (or model_name_or_path in --config)")
        check(self.n >= 1 and self.start >= 0, "n", "needs n >= 1 and start >= 0")


def inspect_pairs(options: InspectOptions) -> list[dict]:
    """Show exactly what the trainer sees for a few pairs: texts after templating and truncation, token counts,
    and the token boundary between prompt and step."""
    from stepdpo.auth import model_token
    from stepdpo.models import load_config
    from stepdpo.data.pairs import read_pairs
    from stepdpo.train.modeling import load_tokenizer
    from stepdpo.train.tokenize import PairTokenizer

    token = model_token(options.model_name_or_path, options.hf_token_file, revision=options.model_revision)
    pairs = read_pairs(options.pairs)[options.start : options.start + options.n]
    tokenizer = load_tokenizer(options.model_name_or_path, options.model_revision, token)
    config = load_config(options.model_name_or_path, revision=options.model_revision, token=token)
    pair_tokenizer = PairTokenizer.from_settings(tokenizer, options,
                                                 encoder_decoder=bool(getattr(config, "is_encoder_decoder", False)))
    shown = []
    for pair in pairs:
        tp = pair_tokenizer(pair)
        row: dict = {"id": pair["id"], "style": pair_tokenizer.style.key()}
        if tp is None:
            row["too_long"] = f"does not fit max_length={options.max_length} even without prefix steps (dropped)"
            shown.append(row)
            continue
        prompt, chosen, rejected = pair_tokenizer.texts(pair, tp)
        row.update(dropped_prefix_steps=tp.dropped_prefix_steps, prompt=prompt, chosen=chosen, rejected=rejected,
                   text_chosen=prompt + chosen, text_rejected=prompt + rejected,
                   tokens={"prompt": len(tp.prompt_ids), "chosen": len(tp.chosen_ids), "rejected": len(tp.rejected_ids)},
                   boundary={"prompt_end": tokenizer.convert_ids_to_tokens(tp.prompt_ids[-3:]),
                             "chosen_start": tokenizer.convert_ids_to_tokens(tp.chosen_ids[:3]),
                             "rejected_start": tokenizer.convert_ids_to_tokens(tp.rejected_ids[:3])},
                   ids={"prompt": tp.prompt_ids, "chosen": tp.chosen_ids, "rejected": tp.rejected_ids})
        shown.append(row)
    if options.json:
        for row in shown:
            print(json.dumps(row, ensure_ascii=False))
    else:
        for row in shown:
            print(_format(row))
    return shown


def _format(row: dict) -> str:
    rule = "-" * 78
    if "too_long" in row:
        return f"{rule}\npair {row['id']}: {row['too_long']}"
    t = row["tokens"]
    b = row["boundary"]
    lines = [rule, f"pair {row['id']}  ({row['style']}; {row['dropped_prefix_steps']} oldest prefix steps dropped)",
             f"PROMPT ({t['prompt']} tokens):", row["prompt"],
             f"CHOSEN ({t['chosen']} tokens):", row["chosen"],
             f"REJECTED ({t['rejected']} tokens):", row["rejected"],
             f"boundary: ...{b['prompt_end']} | chosen {b['chosen_start']}... | rejected {b['rejected_start']}..."]
    return "\n".join(lines)
