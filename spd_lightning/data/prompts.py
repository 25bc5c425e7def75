"""Prompt sets: a raw JSONL file of questions and answers (e.g. GSM8K); toy prompts are toy/raw.py's.

Data preparation turns prompts into records; lossy decoding generates whole responses for them.
A prompt keeps the line it came from, so that messages and resumed runs can name it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from spd_lightning.data.textfiles import utf8_lines
from spd_lightning.errors import RecordError, SetupError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    index: int  # line number in the raw file (1-based), or position in a generated set
    text: str  # what the models are prompted with (the template filled in)
    answer: str | None  # the dataset's reference answer; None when the file has none


def _parse_line(line: str, where: str, question_key: str, answer_key: str | None, template: str) -> tuple[str, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise RecordError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object with a '{question_key}' field")
    question = obj.get(question_key)
    if not isinstance(question, str) or not question.strip():
        raise RecordError(f"{where}: field '{question_key}' must be a non-empty string (data.question_key)")
    answer = None
    if answer_key is not None:
        answer = obj.get(answer_key)
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
            raise RecordError(f"{where}: field '{answer_key}' must be a string or a number (data.answer_key)")
    try:
        text = template.format(**{**obj, "question": question})
    except (KeyError, IndexError, ValueError) as err:
        raise RecordError(f"{where}: data.template {template!r} cannot be filled from this line ({err})") from None
    return text, None if answer is None else str(answer)


class PromptList(list):
    """Prompts read from a file, how many malformed lines were skipped reading them, and how
    their text becomes token ids (`encode_prompts`)."""

    skipped: int = 0
    # Wrap each prompt in the tokenizer's chat template as the user's turn (instruct models).
    chat_template: bool = False
    # With chat_template: a system turn before it (None: the template's own default, if any).
    system_prompt: str | None = None

    @classmethod
    def from_jsonl(
        cls,
        raw: str,
        question_key: str = "question",
        answer_key: str | None = "answer",
        template: str = "{question}",
        on_error: str = "skip",
        limit: int | None = None,
        chat_template: bool = False,
        system_prompt: str | None = None,
        skip: int = 0,
    ) -> PromptList:
        """Prompts from a JSONL file, one JSON object per line.

        `template` is filled with the line's fields ("{question}" is the question_key field).
        A malformed line stops with its file and line number (on_error="fail") or is reported
        and skipped (on_error="skip"; `.skipped` counts them, task=prepare's stats report it).
        answer_key=None reads prompts without answers (then only reference=target can give
        records a reference). `chat_template` and `system_prompt` say how `encode_prompts` turns
        the prompts into token ids. `skip` passes over the file's first `skip` non-empty lines (a
        held-out set that continues an earlier one: skip=12 limit=12 reads lines 13-24)."""
        if on_error not in ("skip", "fail"):
            raise RecordError(f"data.on_error must be 'skip' or 'fail', got {on_error!r}")
        path = Path(raw)
        if not path.is_file():
            raise RecordError(f"prompt file {path} does not exist (data.raw=PATH, JSONL with '{question_key}' fields)")
        prompts = cls()
        skipped = passed = 0
        for lineno, line in utf8_lines(path, "prompt file", "data.raw"):
            if not line.strip():
                continue
            if passed < skip:
                passed += 1
                continue
            if limit is not None and len(prompts) >= limit:
                break
            try:
                text, answer = _parse_line(line, f"{path}:{lineno}", question_key, answer_key, template)
            except RecordError as err:
                if on_error == "fail":
                    raise
                log.warning("skipped %s", err)
                skipped += 1
                continue
            prompts.append(Prompt(lineno, text, answer))
        if skipped:
            log.warning(
                "%s: skipped %d malformed line(s) of %d (data.on_error=fail stops at the first)",
                path,
                skipped,
                skipped + len(prompts),
            )
        if not prompts:
            raise RecordError(f"prompt file {path} holds no usable prompts")
        prompts.skipped, prompts.chat_template, prompts.system_prompt = skipped, chat_template, system_prompt
        return prompts


def encode_prompts(tokenizer, prompts: list[Prompt]) -> list[list[int]]:
    """Token ids of every prompt: its text as is, or, for a PromptList with chat_template, the user's
    turn of the tokenizer's chat template with the assistant's turn opened. The same ids in
    prepare, eval and decode, whatever the backend."""
    if not getattr(prompts, "chat_template", False):
        return [tokenizer(p.text).input_ids for p in prompts]
    if not getattr(tokenizer, "chat_template", None):
        raise SetupError(
            f"data.chat_template=true, but the tokenizer {tokenizer.name_or_path} has no chat template: set "
            "data.chat_template=false and write the prompt format into data.template"
        )
    system = [{"role": "system", "content": prompts.system_prompt}] if prompts.system_prompt else []
    ids = []
    for p in prompts:
        messages = [*system, {"role": "user", "content": p.text}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids.append(tokenizer(text, add_special_tokens=False).input_ids)  # the template wrote the special tokens
    return ids
