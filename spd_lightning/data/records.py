"""SPD records: loading and validation, the train/val split, batching (the DataModule is training/datamodule.py)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spd_lightning.data.textfiles import json_lines
from spd_lightning.errors import RecordError

REQUIRED_FIELDS = ("context_ids", "prompt_len", "draft_ids", "target_ids", "reference")


@dataclass
class Record:
    context_ids: list[int]  # prompt + the target's response so far
    prompt_len: int  # the response starts at context_ids[prompt_len]
    draft_ids: list[int]  # K draft proposals
    target_ids: list[int]  # K target greedy tokens, target_ids[i] after context + draft[:i]
    reference: str  # the answer the response must still reach
    # Where the record was read from ("file:line"), for messages about it; empty when built in memory.
    source: str = field(default="", compare=False, repr=False)

    @property
    def block_size(self) -> int:
        return len(self.draft_ids)


def _is_id_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)


def parse_record(obj: object, where: str) -> Record:
    """Checks one decoded JSON line; `where` is "file:line" for the error message."""
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object with fields {', '.join(REQUIRED_FIELDS)}")
    missing = [f for f in REQUIRED_FIELDS if f not in obj]
    if missing:
        raise RecordError(f"{where}: missing field(s) {', '.join(missing)}")
    for name in ("context_ids", "draft_ids", "target_ids"):
        if not _is_id_list(obj[name]) or not obj[name]:
            raise RecordError(f"{where}: field '{name}' must be a non-empty list of token ids (ints >= 0)")
    ctx, plen = obj["context_ids"], obj["prompt_len"]
    if not isinstance(plen, int) or isinstance(plen, bool) or not 0 < plen <= len(ctx):
        raise RecordError(f"{where}: field 'prompt_len' must be an int in 1..len(context_ids)={len(ctx)}, got {plen!r}")
    if len(obj["target_ids"]) != len(obj["draft_ids"]):
        raise RecordError(
            f"{where}: field 'target_ids' has {len(obj['target_ids'])} tokens but 'draft_ids' has "
            f"{len(obj['draft_ids'])}; both hold the K tokens of one block"
        )
    if not isinstance(obj["reference"], str):
        raise RecordError(f"{where}: field 'reference' must be a string, got {type(obj['reference']).__name__}")
    return Record(list(ctx), plen, list(obj["draft_ids"]), list(obj["target_ids"]), obj["reference"], where)


def load_records(path: str | Path, key: str = "data.path") -> list[Record]:
    """Reads a JSONL file of records; any malformed line stops with its file, line and field.
    `key`: the config key that named the file, for the messages."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"record file {path} does not exist; build records first or set {key}")
    records: list[Record] = []
    for where, obj in json_lines(path, "records file", key):
        record = parse_record(obj, where)
        if records and record.block_size != records[0].block_size:
            raise RecordError(
                f"{where}: field 'draft_ids' has K={record.block_size} tokens, but earlier records have "
                f"K={records[0].block_size}; one file holds one block size"
            )
        records.append(record)
    if not records:
        raise RecordError(f"record file {path} holds no records")
    return records


def check_vocab(records: list[Record], vocab_size: int, source: str) -> None:
    """Every token id must exist in the shared vocabulary of draft, target and scorer."""
    for i, r in enumerate(records):
        for name in ("context_ids", "draft_ids", "target_ids"):
            top = max(getattr(r, name))
            if top >= vocab_size:
                where = r.source or f"{source}: record {i}"
                raise RecordError(
                    f"{where}: field '{name}' holds token id {top}, but the tokenizer has "
                    f"{vocab_size} tokens; were these records built with another tokenizer?"
                )


def split_by_prompt(records: list[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Deterministic split that keeps all blocks of one prompt on the same side, so validation
    never sees a prompt the scorer trained on."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    train, val = [], []
    for r in records:
        key = zlib.crc32(f"{seed}:{r.context_ids[: r.prompt_len]}".encode()) / 2**32
        (val if key < val_fraction else train).append(r)
    return train, val


@dataclass
class RecordBatch:
    """B records and their scorer inputs. Lightning moves the tensors to the device."""

    records: list[Record]
    input_ids: torch.Tensor  # [B, L] context + draft, right-padded
    attention_mask: torch.Tensor  # [B, L]
    context_len: torch.Tensor  # [B]
    draft_ids: torch.Tensor  # [B, K]
    target_ids: torch.Tensor  # [B, K]

    def __len__(self) -> int:
        return len(self.records)


def collate_records(records: list[Record], pad_id: int = 0) -> RecordBatch:
    rows = [r.context_ids + r.draft_ids for r in records]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row)
        attention_mask[b, : len(row)] = 1
    return RecordBatch(
        records=list(records),
        input_ids=input_ids,
        attention_mask=attention_mask,
        context_len=torch.tensor([len(r.context_ids) for r in records]),
        draft_ids=torch.tensor([r.draft_ids for r in records]),
        target_ids=torch.tensor([r.target_ids for r in records]),
    )
