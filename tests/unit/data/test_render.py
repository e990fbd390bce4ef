"""The one renderer: plain text for base models, the chat template for instruct models (Step-DPO's way), the
same in every stage, and a step never closed by an end-of-turn token."""

from __future__ import annotations


import pytest
from transformers import AutoTokenizer

from stepdpo.data.formats import from_step_dpo
from stepdpo.data.pairs import DEFAULT_INSTRUCTION, PLAIN, make_pair, prompt_style, render_pair
from stepdpo.train.tokenize import PairTokenizer

# Qwen2-Instruct's chat template (the model family Step-DPO's headline result trains).
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Step-DPO's train.py, prompt == 'qwen2-boxed', written out
STEP_DPO_QWEN2_BOXED = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                        "<|im_start|>user\n{instruction}\nPlease reason step by step, and put your final answer "
                        "within \\boxed{{}}.<|im_end|>\n<|im_start|>assistant\n")
ROW = {"prompt": "What is $2+3\\cdot 4$?", "initial_reason_steps": "Let's think step by step.\nStep 1: $3\\cdot 4=12$.\n"
       "Step 2:", "chosen": " $2+12=14$.\nThe answer is: 14", "rejected": " $2+12=15$.\nThe answer is: 15"}


@pytest.fixture
def chat_tok(tiny_mistral):
    tok = AutoTokenizer.from_pretrained(tiny_mistral)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = QWEN2_TEMPLATE
    return tok


def test_step_dpo_row_through_the_chat_template_is_step_dpos_exact_text(chat_tok):
    kind, problem, prefix, chosen, rejected = from_step_dpo(ROW)
    pair = make_pair(kind, problem, prefix, chosen, rejected, [])
    style = prompt_style(chat_tok)  # auto: the tokenizer has a template
    assert style.chat and style.instruction == DEFAULT_INSTRUCTION
    prompt, c, r = render_pair(pair, style=style)
    expected_prompt = STEP_DPO_QWEN2_BOXED.format(instruction=ROW["prompt"])
    assert prompt + c == expected_prompt + ROW["initial_reason_steps"] + ROW["chosen"]
    assert prompt + r == expected_prompt + ROW["initial_reason_steps"] + ROW["rejected"]
    assert not c.endswith("<|im_end|>") and "<|im_end|>" not in c  # the step is not closed


def test_chat_rendered_tokens_carry_the_templates_specials_once(chat_tok):
    kind, problem, prefix, chosen, rejected = from_step_dpo(ROW)
    pair = make_pair(kind, problem, prefix, chosen, rejected, [])
    tp_maker = PairTokenizer.from_settings(chat_tok, {"chat_template": "auto"})
    tp = tp_maker(pair)
    prompt, c, _ = tp_maker.texts(pair, tp)
    assert tp.prompt_ids + tp.chosen_ids == chat_tok(prompt + c, add_special_tokens=False).input_ids
    assert tp.prompt_ids[0] == chat_tok.convert_tokens_to_ids("<|im_start|>")  # no BOS added on top
    im_end = chat_tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end not in tp.chosen_ids and chat_tok.eos_token_id not in tp.chosen_ids


def test_modes_and_system_prompt(chat_tok, tiny_mistral):
    assert prompt_style(chat_tok, "never") is PLAIN
    plain_tok = AutoTokenizer.from_pretrained(tiny_mistral)
    assert prompt_style(plain_tok, "auto") is PLAIN  # a base model's tokenizer: plain text
    with pytest.raises(ValueError, match="no chat template"):
        prompt_style(plain_tok, "always")
    style = prompt_style(chat_tok, "always", system_prompt="Be terse.", instruction="")
    assert style.problem_text("Q") == "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n" \
                                      "<|im_start|>assistant\n"
    assert style.key() != prompt_style(chat_tok).key() != PLAIN.key()  # caches tell them apart


def test_plain_rendering_is_unchanged():
    pair = make_pair("step", "P", ["a", "b"], ["c"], ["d"], [])
    assert render_pair(pair) == ("Problem: P\nSolution:\na\nb\n", "c", "d")
    assert render_pair(pair, drop_prefix_steps=1) == ("Problem: P\nSolution:\n...\nb\n", "c", "d")
