"""Prompt sets: raw JSONL files (GSM8K-style) and fresh toy prompts (spd_lightning/data/prompts.py)."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest

from spd_lightning.data.prompts import Prompt, PromptList, encode_prompts
from spd_lightning.errors import RecordError, SetupError
from spd_lightning.toy.raw import toy_prompts, write_raw_prompts
from spd_lightning.toy.task import make_example


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_questions_answers_and_line_numbers(tmp_path):
    raw = write(
        tmp_path / "gsm8k.jsonl",
        [
            json.dumps({"question": "Tom has 3 apples...", "answer": "He has 3 + 4 = 7 #### 7"}),
            "",  # blank lines are neither prompts nor errors
            json.dumps({"question": "How many?", "answer": 12}),
        ],
    )
    assert PromptList.from_jsonl(str(raw)) == [
        Prompt(1, "Tom has 3 apples...", "He has 3 + 4 = 7 #### 7"),
        Prompt(3, "How many?", "12"),  # numbers become strings
    ]


def test_template_keys_and_limit(tmp_path):
    lines = [json.dumps({"q": f"{i}+1=", "a": str(i + 1), "topic": "sums"}) for i in range(5)]
    raw = write(tmp_path / "p.jsonl", lines)
    template = "[{topic}] {question} A:"
    prompts = PromptList.from_jsonl(str(raw), question_key="q", answer_key="a", template=template, limit=2)
    assert [(p.index, p.text, p.answer) for p in prompts] == [(1, "[sums] 0+1= A:", "1"), (2, "[sums] 1+1= A:", "2")]
    assert [p.answer for p in PromptList.from_jsonl(str(raw), question_key="q", answer_key=None)] == [None] * 5
    # skip continues where an earlier set stopped; line numbers stay the file's.
    later = PromptList.from_jsonl(str(raw), question_key="q", answer_key="a", skip=2, limit=2)
    assert [(p.index, p.answer) for p in later] == [(3, "3"), (4, "4")]


def test_malformed_lines_are_skipped_and_counted(tmp_path, caplog):
    raw = write(
        tmp_path / "messy.jsonl",
        [
            '{"question": "a", "answer": "1"}',
            "{broken",
            '["a list"]',
            '{"question": "b"}',
            '{"question": "c", "answer": "3"}',
        ],
    )
    with caplog.at_level("WARNING"):
        prompts = PromptList.from_jsonl(str(raw))
    assert [p.index for p in prompts] == [1, 5] and prompts.skipped == 3
    for lineno, what in ((2, "not valid JSON"), (3, "expected a JSON object"), (4, "field 'answer'")):
        assert f"{raw}:{lineno}: {what}" in caplog.text
    assert "skipped 3 malformed line(s) of 5" in caplog.text


def test_on_error_fail_stops_at_the_first_bad_line(tmp_path):
    raw = write(tmp_path / "bad.jsonl", ['{"question": "a", "answer": "1"}', '{"question": "", "answer": "2"}'])
    with pytest.raises(RecordError, match=rf"{raw}:2: field 'question' must be a non-empty string"):
        PromptList.from_jsonl(str(raw), on_error="fail")


def test_template_that_cannot_be_filled_names_the_line(tmp_path):
    raw = write(tmp_path / "t.jsonl", ['{"question": "a", "answer": "1"}'])
    with pytest.raises(RecordError, match=rf"{raw}:1: data.template"):
        PromptList.from_jsonl(str(raw), template="{question} {missing}", on_error="fail")


@pytest.mark.parametrize(
    "kwargs, match",
    [({"on_error": "ignore"}, "data.on_error must be"), ({"raw": "no/such/file.jsonl"}, "does not exist")],
)
def test_bad_settings_are_clear_errors(tmp_path, kwargs, match):
    raw = write(tmp_path / "p.jsonl", ['{"question": "a", "answer": "1"}'])
    with pytest.raises(RecordError, match=match):
        PromptList.from_jsonl(**{"raw": str(raw), **kwargs})


def test_a_file_without_usable_prompts_is_an_error(tmp_path):
    raw = write(tmp_path / "empty.jsonl", ["{oops", ""])
    with pytest.raises(RecordError, match="holds no usable prompts"):
        PromptList.from_jsonl(str(raw))


def test_toy_prompts_are_the_worlds_task_and_deterministic():
    rng = random.Random(0)
    expected = [make_example(rng) for _ in range(5)]
    assert [(p.text, p.answer) for p in toy_prompts(5, seed=0)] == [(e.prompt, e.answer) for e in expected]
    assert toy_prompts(5, seed=3) == toy_prompts(5, seed=3) != toy_prompts(5, seed=4)


def test_raw_toy_file_round_trips(tmp_path):
    raw = write_raw_prompts(tmp_path / "toy.jsonl", 7, seed=2)
    loaded = PromptList.from_jsonl(str(raw))
    assert [(p.text, p.answer) for p in loaded] == [(p.text, p.answer) for p in toy_prompts(7, seed=2)]
    assert [p.index for p in loaded] == list(range(1, 8))


# A chat template in the toy vocabulary: the system turn, the user's turn, and " so" opening the answer.
TOY_CHAT = "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %} so{% endif %}"


def test_chat_template_wraps_each_prompt_as_the_users_turn(tmp_path, toy_tokenizer):
    raw = write(tmp_path / "p.jsonl", [json.dumps({"question": "Q: 3+4= A:", "answer": "7"})])
    plain = PromptList.from_jsonl(str(raw))
    assert encode_prompts(toy_tokenizer, plain) == [toy_tokenizer("Q: 3+4= A:").input_ids]
    chat = PromptList.from_jsonl(str(raw), chat_template=True)
    tokenizer = copy.deepcopy(toy_tokenizer)
    tokenizer.chat_template = TOY_CHAT
    assert encode_prompts(tokenizer, chat) == [toy_tokenizer("Q: 3+4= A: so").input_ids]
    with_system = PromptList.from_jsonl(str(raw), chat_template=True, system_prompt="Q: 1+1= A: 2.")
    assert encode_prompts(tokenizer, with_system) == [toy_tokenizer("Q: 1+1= A: 2.Q: 3+4= A: so").input_ids]


def test_chat_template_without_one_in_the_tokenizer_is_one_clear_error(tmp_path, toy_tokenizer):
    raw = write(tmp_path / "p.jsonl", [json.dumps({"question": "Q: 3+4= A:", "answer": "7"})])
    with pytest.raises(SetupError, match="data.chat_template=true, but the tokenizer .* has no chat template"):
        encode_prompts(toy_tokenizer, PromptList.from_jsonl(str(raw), chat_template=True))


def test_a_prompt_file_that_is_not_utf8_names_its_line_and_key(tmp_path):
    from spd_lightning.errors import RecordError

    path = tmp_path / "raw.jsonl"
    path.write_bytes(b'{"question": "Q: 1+1= A:", "answer": "2"}\n{"question": "\xe9t\xe9"}\n')
    with pytest.raises(RecordError) as err:
        PromptList.from_jsonl(str(path))
    assert str(err.value).startswith(f"{path}:2: not UTF-8 text (byte 0xe9") and "(data.raw)" in str(err.value)
