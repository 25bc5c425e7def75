"""Answer checks: does a response still reach the reference answer?

Every answer check is `(response_text, reference) -> bool`. Numbers compare as numbers and
are word-bounded, so "18" never matches "180" or "18.5".
"""

from __future__ import annotations

import re
from collections.abc import Callable

AnswerCheck = Callable[[str, str], bool]

# Optional sign, digits with optional thousands commas, optional decimals.
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_HASHES_RE = re.compile(r"####\s*\$?\s*(" + _NUMBER + ")")
# What instruct models write at the end: "\boxed{18}" (also "\boxed{\$18}", "\boxed{18 \text{ km}}"),
# "The answer is $18.", "Final answer: **18**".
_BOXED_RE = re.compile(r"\\boxed\{\s*(?:\\?\$)?\s*(" + _NUMBER + ")")
_ANSWER_IS_RE = re.compile(r"answer(?: is|:)\s*[:*$\\(\s]*(" + _NUMBER + ")", re.IGNORECASE)


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def extract_final_number(text: str) -> str | None:
    """The final answer of a response: the number after the last '####' (GSM8K's own format), else
    in the last \\boxed{}, else after the last "answer is" / "answer:", else the last number."""
    for marker in (_HASHES_RE, _BOXED_RE, _ANSWER_IS_RE):
        marked = marker.findall(text)
        if marked:
            return marked[-1]
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def gsm8k_final_number(response: str, reference: str) -> bool:
    answer, expected = extract_final_number(response), extract_final_number(reference)
    if answer is None or expected is None:
        return False
    a, e = _to_number(answer.rstrip(",")), _to_number(expected.rstrip(","))
    return a is not None and e is not None and a == e


def contains(response: str, reference: str) -> bool:
    """The reference appears in the response as a whole word (a trailing period is allowed)."""
    ref = reference.strip()
    if not ref:
        return False
    # Not preceded by a word character, a digit separator or a sign; not followed by a
    # word character or by a decimal part, so "18" is not found in "180", "1.18" or "18.5".
    pattern = r"(?<![\w.,-])" + re.escape(ref) + r"(?![\w]|[.,]\d)"
    return re.search(pattern, response) is not None


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split()).rstrip(".")


def exact_match(response: str, reference: str) -> bool:
    """Equal after trimming, lower-casing, collapsing white space and dropping a final period."""
    return _normalise(response) == _normalise(reference)


ANSWER_CHECKS: dict[str, AnswerCheck] = {
    "gsm8k": gsm8k_final_number,
    "contains": contains,
    "exact": exact_match,
}


def get_answer_check(name: str) -> AnswerCheck:
    if name not in ANSWER_CHECKS:
        raise ValueError(f"unknown answer check {name!r}; choose one of {sorted(ANSWER_CHECKS)}")
    return ANSWER_CHECKS[name]


def token_holds_digit(tokenizer, token: int | None) -> bool:
    """Whether a token's text holds a digit: a mismatch there puts a number at stake."""
    return token is not None and any(c.isdigit() for c in tokenizer.decode([token]))
