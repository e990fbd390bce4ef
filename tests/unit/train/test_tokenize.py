"""Step-aware tokenization: no EOS after a step, truncation drops the oldest prefix steps, never a step."""

import pytest
from transformers import AutoTokenizer

from stepdpo.data.pairs import make_pair
from stepdpo.train.tokenize import tokenize_pair

PAIR = make_pair("step", "Start with 3. Add 4, then add 5, then add 6.", ["3 + 4 = 7", "7 + 5 = 12", "12 + 6 = 18"],
                 ["18 + 1 = 19"], ["18 + 1 = 20"], [])


@pytest.fixture(scope="module")
def tok(tiny_mistral):
    return AutoTokenizer.from_pretrained(tiny_mistral)


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
