"""task=prepare: raw prompts -> SPD records (stub; see issue 5)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig


@dataclass
class PrepareConfig:
    # Where records.jsonl, stats.json and the resume state go.
    out: str = "prepared"
    # K: draft tokens per block.
    block_size: int = 4


def prepare(cfg: DictConfig) -> None:
    raise NotImplementedError("task=prepare")
