"""task=eval: the trained scorer against baselines on held-out records (stub; see issue 5)."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig


@dataclass
class EvalConfig:
    # Accept thresholds of the trained scorer to sweep.
    thresholds: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])


def evaluate(cfg: DictConfig) -> float | None:
    raise NotImplementedError("task=eval")
