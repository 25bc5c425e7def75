"""task=decode: lossy speculative decoding end to end (stub; see issue 5)."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig


@dataclass
class DecodeConfig:
    # K: draft tokens per block.
    block_size: int = 4


def decode(cfg: DictConfig) -> float | None:
    raise NotImplementedError("task=decode")
