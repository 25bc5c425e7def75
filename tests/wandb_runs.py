"""wandb offline runs for the logger tests: an environment that keeps every wandb directory under a
test's tmp_path, and a reader of what an offline run recorded."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path


def wandb_env(tmp_path: Path) -> dict[str, str]:
    """Offline, with every wandb directory (run, cache, config, data) under tmp_path."""
    dirs = {k: tmp_path / "wandb-home" / k.lower() for k in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")}
    return {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), **{k: str(v) for k, v in dirs.items()}}


def wandb_records(run_file: Path):
    """The protobuf records of an offline run's .wandb file: a LevelDB-style log (7-byte file
    header ":W&B" + magic + version, then 32 KiB blocks of chunks: crc32 u32, length u16, type u8;
    type 1 = a whole record, 2/3/4 = its first/middle/last piece). wandb 0.31 ships no reader."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf = run_file.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", run_file
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero fill up to the end of the block
            pos += block - pos % block
            continue
        if pos + 7 + length > len(data):  # still being written
            return
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def read_wandb_run(run_dir: Path, wait_s: float = 30.0) -> tuple[dict, list[dict], int | None]:
    """(config, history rows, exit code) of one offline run; nested keys joined with '/'. wandb's
    service writes the run file in the background: `wandb.finish()` (0.31) can return before the
    file holds more than its header, so this reads again until the exit record is there or
    `wait_s` has passed (then the exit code is None)."""
    deadline = time.monotonic() + wait_s
    while True:
        config, history, exit_code = _read_run_file(run_dir)
        if exit_code is not None or time.monotonic() > deadline:
            return config, history, exit_code
        time.sleep(0.2)


def _read_run_file(run_dir: Path) -> tuple[dict, list[dict], int | None]:
    (run_file,) = run_dir.glob("run-*.wandb")
    config: dict = {}
    history: list[dict] = []
    exit_code = None
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            items = record.run.config.update if kind == "run" else record.config.update
            config.update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items})
        elif kind == "history":
            history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return config, history, exit_code
