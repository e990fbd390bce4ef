"""Step-aware tokenization: no EOS after a step, truncation drops the oldest prefix steps, never a step."""

import pytest
from transformers import AutoTokenizer

from stepdpo.data.pairs import make_pair
from stepdpo.train.tokenize import tokenize_pair

PAIR = make_pair("step", "Start with 3. Add 4, then add 5, then add 6.", ["3 + 4 = 7", "7 + 5 = 12", "12 + 6 = 18"],
                 ["18 + 1 = 19"], ["18 + 1 = 20"], [])


@pytest.fixture(scope="module", params=["trained", "mistral-v1"])
def tok(request, tiny_mistral, tiny_mistral_v1):
    """Every test runs on the tiny trained tokenizer and on Mistral-7B-v0.1's own (sentencepiece, 32,000)."""
    return AutoTokenizer.from_pretrained(tiny_mistral if request.param == "trained" else tiny_mistral_v1)


def test_no_eos_unless_asked(tok):
    plain = tokenize_pair(PAIR, tok)
    assert tok.eos_token_id not in plain.chosen_ids and tok.decode(plain.chosen_ids) == "18 + 1 = 19"
    with_eos = tokenize_pair(PAIR, tok, append_eos=True)
    assert with_eos.chosen_ids[-1] == tok.eos_token_id and with_eos.chosen_ids[:-1] == plain.chosen_ids
    assert plain.prompt_ids[0] == tok.bos_token_id and plain.dropped_prefix_steps == 0


def test_truncation_drops_oldest_prefix_steps_first(tok):
    full = tokenize_pair(PAIR, tok)
    longest = len(full.prompt_ids) + max(len(full.chosen_ids), len(full.rejected_ids))
    cut = tokenize_pair(PAIR, tok, max_length=longest - 1)
    assert cut.dropped_prefix_steps == 1
    prompt = tok.decode(cut.prompt_ids, skip_special_tokens=True)
    assert "Start with 3." in prompt and "3 + 4 = 7" not in prompt and "7 + 5 = 12" in prompt and "..." in prompt
    assert cut.chosen_ids == full.chosen_ids and cut.rejected_ids == full.rejected_ids  # steps intact
    assert len(cut.prompt_ids) + max(len(cut.chosen_ids), len(cut.rejected_ids)) <= longest - 1


def test_a_pair_that_cannot_fit_without_cutting_a_step_is_dropped(tok):
    assert tokenize_pair(PAIR, tok, max_length=10) is None


def test_encoder_decoder_budget_is_per_side(tiny_t5):
    t5 = AutoTokenizer.from_pretrained(tiny_t5)
    tp = tokenize_pair(PAIR, t5, encoder_decoder=True)
    assert tp.prompt_ids[-1] == t5.eos_token_id  # T5 encoder input ends with </s>
    assert t5.eos_token_id not in tp.chosen_ids  # the decoder target is the bare step
    fit = tokenize_pair(PAIR, t5, encoder_decoder=True, max_length=len(tp.prompt_ids))
    assert fit.dropped_prefix_steps == 0


def test_prompt_and_step_tokens_are_the_tokens_of_the_whole_text(tok):
    """The boundary: prompt ids + step ids are exactly the tokenization of prompt + step (no token is split,
    merged or added at the join; sentencepiece's leading '▁' included), and no EOS follows the step."""
    from stepdpo.data.pairs import render_pair

    for pair in (PAIR, make_pair("step", "Ünïcode: 5 + 5?", ["Let me think."], ["5 + 5 = 10"], ["5+5=11"], [])):
        prompt, chosen, rejected = render_pair(pair)
        tp = tokenize_pair(pair, tok)
        assert tp.prompt_ids + tp.chosen_ids == tok(prompt + chosen).input_ids
        assert tp.prompt_ids + tp.rejected_ids == tok(prompt + rejected).input_ids
        assert tok.eos_token_id not in tp.chosen_ids + tp.rejected_ids
        assert tok.decode(tp.chosen_ids).strip() == chosen


def test_step_tag_is_one_token_in_and_out_of_context(tok):
    from stepdpo.reward.scorer import DEFAULT_STEP_TAG, MethodSpec, prm_text, prm_token_ids

    tag, good, bad = prm_token_ids(tok, MethodSpec("m", "prm"))
    assert tok(DEFAULT_STEP_TAG, add_special_tokens=False).input_ids[-1] == tag
    steps = ["3 + 4 = 7", "Step 2: 7 - 2 = 5.", "so the answer is $\\boxed{5}$", "x"]
    ids = tok(prm_text("Start with 3.", steps, DEFAULT_STEP_TAG)).input_ids
    assert ids.count(tag) == len(steps)
    if tok.vocab_size == 32000:  # Mistral's: math-shepherd's ids
        assert (tag, good, bad) == (12902, 648, 387)
