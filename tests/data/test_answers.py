"""Answer checks (SPEC.md, "One training step", step 5): "18" must not match "180"."""

import pytest

from spd_lightning.data.answers import (
    ANSWER_CHECKS,
    contains,
    exact_match,
    extract_final_number,
    get_answer_check,
    gsm8k_final_number,
)

# ---------------------------------------------------------------- gsm8k_final_number


def test_hash_marker_wins_over_later_numbers():
    response = "So the total is #### 42\nThat took 7 steps and 3 minutes."
    assert extract_final_number(response) == "42"
    assert gsm8k_final_number(response, "42")
    assert not gsm8k_final_number(response, "3")  # 3 is the last number, but the marker wins


def test_last_marker_wins_when_there_are_several():
    assert gsm8k_final_number("#### 5 ... corrected: #### 6", "6")
    assert not gsm8k_final_number("#### 5 ... corrected: #### 6", "5")


def test_last_number_without_marker():
    response = "She had 3 apples and bought 5 more, so 8 in total"
    assert gsm8k_final_number(response, "8")
    assert not gsm8k_final_number(response, "5")
    assert not gsm8k_final_number(response, "3")


@pytest.mark.parametrize("response, reference", [("The answer is 18", "180"), ("The answer is 180", "18")])
def test_prefix_numbers_do_not_match(response, reference):
    assert not gsm8k_final_number(response, reference)


def test_thousands_separator():
    assert gsm8k_final_number("It costs 1,234 dollars", "1234")
    assert gsm8k_final_number("It costs 1234 dollars", "1,234")
    assert gsm8k_final_number("In total 1,234, which is a lot", "1234")  # trailing comma is not part of it


def test_sentence_final_period():
    assert gsm8k_final_number("So she pays 82.", "82")


def test_numeric_comparison():
    assert gsm8k_final_number("The result is 82.0", "82")  # 82.0 == 82 as numbers
    assert gsm8k_final_number("The result is 82", "82.00")
    assert not gsm8k_final_number("The result is 82.5", "82")


def test_negative_numbers():
    assert gsm8k_final_number("The temperature fell to -5", "-5")
    assert not gsm8k_final_number("The temperature fell to -5", "5")
    assert not gsm8k_final_number("The temperature rose to 5", "-5")
    assert gsm8k_final_number("#### -12", "-12")


def test_no_number_is_false():
    assert not gsm8k_final_number("I do not know", "42")
    assert not gsm8k_final_number("", "42")
    assert not gsm8k_final_number("The answer is 42", "forty-two")  # reference without a number


def test_reference_in_gsm8k_format():
    assert gsm8k_final_number("so the answer is 82", "Janet sells 16 - 3 - 4 = 9 eggs ... #### 82")
    assert gsm8k_final_number("so the answer is 82", "#### 82")
    assert not gsm8k_final_number("so the answer is 9", "#### 82")


@pytest.mark.parametrize(
    "response",
    [
        "18 + 0 = 18, so she has\n#### 18",
        "Adding them up gives $\\boxed{18}$. That took 2 steps.",
        "So Janet makes \\boxed{\\$18} every day, 7 days a week.",
        "The distance is \\boxed{18 \\text{ km}} after 3 hours.",
        "Therefore, the answer is $18. She works 5 days.",
        "**Final answer:** 18 (after 3 days)",
        "The answer is: 18.00",
    ],
)
def test_instruct_model_answer_formats_are_read(response):
    """What instruct models write at the end of a GSM8K answer; the later numbers are not the answer."""
    assert gsm8k_final_number(response, "18")
    assert not gsm8k_final_number(response.replace("18", "180"), "18")


# ---------------------------------------------------------------- contains


@pytest.mark.parametrize("response", ["the answer is 180", "the answer is 118", "it is 18.5", "it is 1.18", "x18"])
def test_contains_is_word_bounded(response):
    assert not contains(response, "18")


@pytest.mark.parametrize("response", ["the answer is 18.", "18, then we stop", "18", "(18)", "so: 18 apples"])
def test_contains_finds_whole_word(response):
    assert contains(response, "18")


def test_contains_words_and_empty_reference():
    assert contains("The capital is Paris.", "Paris")
    assert not contains("The capital is Parisian.", "Paris")
    assert not contains("anything at all", "")
    assert not contains("anything at all", "   ")
    assert contains("answer: 18 ", " 18 ")  # reference is trimmed


def test_contains_escapes_regex_characters():
    assert contains("the cost is $5 today", "$5")
    assert not contains("the cost is 5 today", "5.0")  # "." is literal, not "any character"
    assert not contains("the cost is 5x0 today", "5.0")


# ---------------------------------------------------------------- exact_match


def test_exact_match_normalises():
    assert exact_match("  The Answer   is\tParis. ", "the answer is paris")
    assert exact_match("PARIS", "paris.")
    assert exact_match("paris\n", "Paris")


def test_exact_match_rejects_different_strings():
    assert not exact_match("Paris", "London")
    assert not exact_match("paris is nice", "paris")
    assert not exact_match("18", "180")


# ---------------------------------------------------------------- registry


def test_get_answer_check_known_names():
    assert get_answer_check("gsm8k") is gsm8k_final_number
    assert get_answer_check("contains") is contains
    assert get_answer_check("exact") is exact_match


def test_get_answer_check_unknown_name_lists_choices():
    with pytest.raises(ValueError) as info:
        get_answer_check("nope")
    message = str(info.value)
    assert "nope" in message
    for name in ANSWER_CHECKS:
        assert name in message
