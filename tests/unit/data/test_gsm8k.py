"""GSM8K's layout, on its real training split (read in place) and on lines written out here."""

import json

from stepdpo.data import gsm8k

ROW = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                   "How many clips did Natalia sell altogether in April and May?",
       "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                 "altogether in April and May.\n#### 72"}


def test_reference_steps_strip_the_annotations_unless_kept():
    assert gsm8k.reference_steps(ROW["answer"]) == ["Natalia sold 48/2 = 24 clips in May.",
                                                    "Natalia sold 48+24 = 72 clips altogether in April and May."]
    assert gsm8k.reference_steps(ROW["answer"], keep_annotations=True)[0] == "Natalia sold 48/2 = <<48/2=24>>24 clips in May."
    assert gsm8k.final_answer(ROW["answer"]) == "72"
    assert gsm8k.solution_steps(ROW["answer"])[-1] == "The answer is 72."
    assert gsm8k.is_gsm8k(ROW) and not gsm8k.is_gsm8k({"question": "q", "answer": "no marker"})


def test_the_real_training_split(gsm8k_train):
    rows = [json.loads(x) for x in gsm8k_train.read_text().splitlines()]
    assert len(rows) == 7473 and all(gsm8k.is_gsm8k(r) for r in rows)
    counts = {}
    for r in rows:
        steps = gsm8k.reference_steps(r["answer"])
        assert steps and all(s.strip() == s and "<<" not in s and ">>" not in s for s in steps)
        counts[len(steps)] = counts.get(len(steps), 0) + 1
    # by non-blank lines before ####: the raw line counts (SOURCES.md: 2: 1,960; 3: 2,149; 4: 1,660; 5: 954 ...) count
    # four blank lines as steps (problems at lines 481, 2618, 2816 and 5403)
    assert counts == {2: 1961, 3: 2149, 4: 1659, 5: 955, 6: 419, 7: 227, 8: 90, 9: 13}
    # line 2816: two steps with a blank line between them
    assert gsm8k.reference_steps(rows[2815]["answer"]) == ["Terry will be 4*10=40 years old in 10 years",
                                                           "Currently, Terry is 40-10 = 30 years old."]
    assert gsm8k.final_answer(rows[0]["answer"]) == "72"
