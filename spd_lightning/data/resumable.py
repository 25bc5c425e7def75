"""A JSONL file written chunk by chunk that an interrupted run continues without duplicates or gaps.

    writer = ResumableJsonl(out_dir, settings, overwrite=False)
    for chunk in chunks[writer.done:]:          # what an earlier run already wrote is skipped
        writer.commit(rows, done=..., counts={...})

A commit appends its rows to records.jsonl, flushes and fsyncs it, then atomically replaces
progress.json with the number of items done, the byte length of records.jsonl and the running
counts. A run killed anywhere leaves a progress.json that describes a prefix of records.jsonl:
the next run truncates the file to that length (dropping a half-written chunk) and goes on
from `done`. The settings of the run are kept too; a rerun with other settings refuses, so
that one file never mixes records of two configurations.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from spd_lightning.errors import SetupError

RECORDS, PROGRESS = "records.jsonl", "progress.json"


def _canonical(value):
    """JSON's view of a value (tuples become lists), so saved and fresh settings compare equal."""
    return json.loads(json.dumps(value))


def _flatten(settings: dict, prefix: str = "") -> dict:
    """{"data": {"seed": 1}} -> {"data.seed": 1}, so a refusal names the exact setting."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _differences(saved: dict, current: dict) -> list[str]:
    saved, current = _flatten(saved), _flatten(current)
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never a half-written one."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ResumableJsonl:
    def __init__(self, out: str | Path, settings: dict, overwrite: bool = False, fix_hint: str = "") -> None:
        """`fix_hint` names the settings that start over elsewhere (e.g. "prepare.overwrite=true or another
        prepare.out"); it ends every refusal."""
        self.out = Path(out)
        self.records_path, self.progress_path = self.out / RECORDS, self.out / PROGRESS
        self.settings = _canonical(settings)
        self.out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            self.progress_path.unlink(missing_ok=True)
            self.records_path.unlink(missing_ok=True)
        hint = f": {fix_hint}" if fix_hint else ""
        if self.progress_path.is_file():
            self.state = json.loads(self.progress_path.read_text())
            changed = _differences(self.state["settings"], self.settings)
            if changed:
                raise SetupError(
                    f"{self.out} holds records prepared with other settings ({'; '.join(changed)}). "
                    f"Rerun with the same settings to resume, or start over{hint}"
                )
            self._truncate(self.state["bytes"], hint)
        elif self.records_path.is_file() and self.records_path.stat().st_size > 0:
            raise SetupError(f"{self.records_path} exists but {PROGRESS} does not, so it cannot be resumed{hint}")
        else:
            self.state = {"settings": self.settings, "done": 0, "bytes": 0, "counts": {}}
            self.records_path.write_bytes(b"")
            self._save()

    def _truncate(self, length: int, hint: str) -> None:
        size = self.records_path.stat().st_size if self.records_path.is_file() else -1
        if size < length:
            raise SetupError(
                f"{self.records_path} is shorter ({size} bytes) than {PROGRESS} says ({length}): it was changed "
                f"outside this task{hint}"
            )
        if size > length:  # the rows of a chunk whose commit did not finish
            with self.records_path.open("r+b") as f:
                f.truncate(length)

    def _save(self) -> None:
        write_atomically(self.progress_path, json.dumps(self.state, indent=1) + "\n")

    @property
    def done(self) -> int:
        """Items (e.g. prompts) whose rows are all in the file."""
        return int(self.state["done"])

    @property
    def counts(self) -> dict:
        return dict(self.state["counts"])

    def commit(self, rows: list[dict], done: int, counts: dict) -> None:
        """Appends `rows` durably, then records that the first `done` items are finished."""
        data = "".join(json.dumps(row) + "\n" for row in rows).encode()
        with self.records_path.open("ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self.state = {**self.state, "done": done, "bytes": self.state["bytes"] + len(data), "counts": counts}
        self._save()
