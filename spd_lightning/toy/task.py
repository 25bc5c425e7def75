"""The synthetic task of the embedded default world: two-number addition with filler words.

    Q: 37+45= A: so the total is 82.

Every filler slot is drawn from a small set of synonyms, so a model trained on it
learns to reach the answer whatever filler it is given. A draft that proposes another
synonym is harmlessly wrong; a draft that proposes another digit is harmfully wrong.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

OPENERS = ("so", "thus", "hence", "then", "well")
DETERMINERS = ("the", "our", "this")
NOUNS = ("total", "sum", "result")
VERBS = ("is", "equals", "makes", "gives")
FILLER_SLOTS = (OPENERS, DETERMINERS, NOUNS, VERBS)

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)


@dataclass(frozen=True)
class Example:
    prompt: str  # "Q: 37+45= A:"
    response: str  # " so the total is 82."
    answer: str  # "82"


def make_example(rng: random.Random, max_operand: int = 99) -> Example:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    words = " ".join(rng.choice(slot) for slot in FILLER_SLOTS)
    answer = str(a + b)
    return Example(prompt=f"Q: {a}+{b}= A:", response=f" {words} {answer}.", answer=answer)


def vocabulary() -> list[str]:
    """Every token of the task: special tokens, words with their leading space, digits, symbols."""
    words = [f" {w}" for slot in FILLER_SLOTS for w in slot]
    digits = [str(d) for d in range(10)] + [f" {d}" for d in range(10)]
    symbols = ["Q", ":", "+", "=", " A", ".", " "]
    return list(SPECIAL_TOKENS) + words + digits + symbols
