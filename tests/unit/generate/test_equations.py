"""stepdpo.generate.equations: the equations a step states, checked exactly (hand-computed cases)."""

from __future__ import annotations

from stepdpo.generate.equations import equations, step_verdict


def test_equations_are_checked_exactly():
    assert equations("9 + 17 = 26, then 26 * 2 = 52") == [True, True]
    assert equations("47 + 38 = 114") == [False]
    assert equations("1. 9 - 4 = 6") == [False]  # SmolLM2 numbers its lines: the 1. is not an operand
    assert equations("7 / 2 = 3.5 and 3 x 4 = 12 and 5 ÷ 0 = 0") == [True, True, False]
    assert equations("The answer is 33.") == []
    assert [step_verdict(s) for s in ("3 * 4 = 12", "3 * 4 = 13", "so we add them")] == ["right", "wrong", "none"]


def test_a_chain_is_read_whole_with_the_usual_precedence():
    # read from its second number, "3 + 4 + 5 = 12" would be "4 + 5 = 12" (false) and "2 * 3 + 4 = 10" "3 + 4 = 10"
    assert equations("3 + 4 + 5 = 12") == [True]
    assert equations("2 * 3 + 4 = 10") == [True]
    assert equations("2 + 3 * 4 = 20") == [False]  # 14
    assert equations("12 / 3 * 2 = 8 and 20 - 5 - 3 = 12") == [True, True]
    assert equations("-3 + 5 = 2") == [True]


def test_a_running_total_is_two_equations():
    assert equations("2 * 3 = 6 + 4 = 10") == [True, True]
    assert equations("2 * 3 = 7 + 4 = 11") == [False, True]


def test_a_result_with_decimals_may_be_rounded_to_the_places_it_shows():
    assert equations("10 / 3 = 3.33") == [True]
    assert equations("10 / 3 = 3.34") == [False]
    assert equations("10 / 3 = 3") == [False]  # an integer result is exact
    assert equations("1 / 8 = 0.125 and 1 / 8 = 0.13") == [True, True]


def test_money_and_thousands_separators_are_numbers():
    assert equations("$5 x 3 = $15") == [True]
    assert equations("1,200 + 300 = 1,500") == [True]
    assert equations("1,200 + 300 = 1,600") == [False]
    assert equations("12 - 3 = 9.") == [True]  # a sentence's full stop is not a decimal point


def test_what_it_cannot_read_is_not_checked():
    # parentheses, units between the numbers, a result followed by more expression: never called false
    assert equations("(3 + 4) * 2 = 14") == []
    assert equations("4 * (3 + 2) = 20") == []
    assert equations("5 apples + 3 apples = 8 apples") == []
    assert equations("2 + 2 = 4(5)") == []
    assert equations("5 + 3 = 8 apples") == [True]
    assert step_verdict("20% of 50 = 10") == "none"


def test_an_equation_never_spans_a_line():
    # a whole solution, as loop_analysis reads it: the running total 49 ends line 2 and line 3 starts with a minus;
    # across the line break this read "49\n-44 - 44 = 0", which Python cannot even parse, and the analysis stopped
    text = "1 * 44 = 44\n5 + 44 = 49\n-44 - 44 = 0\nThe answer is 0."
    assert equations(text) == [True, True, False]  # -44 - 44 is -88
    assert equations("7 + 3 = 10\n- 2 = 8") == [True]  # an operator that starts a line has nothing before it
