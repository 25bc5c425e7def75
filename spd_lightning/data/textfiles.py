"""Lines of the JSONL files a user names (records, prompts), with errors that point into the file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from spd_lightning.errors import RecordError


def utf8_lines(path: Path, what: str, key: str) -> Iterator[tuple[int, str]]:
    """(line number from 1, text) of each line; a line that is not UTF-8 stops with its file:line
    and the config `key` that named the file."""
    try:
        f = path.open("rb")
    except OSError as err:  # a directory, no permission
        raise RecordError(f"cannot read the {what} {path} ({key}): {err.strerror}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise RecordError(
                    f"{path}:{lineno}: not UTF-8 text (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                    f"the {what} ({key}) must be JSONL, one JSON object per line"
                ) from None


def json_lines(path: Path, what: str, key: str) -> Iterator[tuple[str, object]]:
    """("file:line", parsed JSON) of each non-blank line; a line that is not JSON stops with its
    file:line, so the user can open the file at the culprit."""
    for lineno, line in utf8_lines(path, what, key):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as err:
            raise RecordError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
