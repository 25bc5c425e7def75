"""Dataclass schemas for the config groups, registered with Hydra's ConfigStore.

Each YAML file of a group lists its schema first in its defaults, so a misspelled key or
a value of the wrong type, in the file or in a command-line override, fails at compose
time with Hydra's message instead of deep inside the code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class RewardSchema:
    _target_: str = "spd_lightning.reward.RewardWeights"
    weight_a: float = 1.0
    weight_b: float = -1.0
    weight_c: float = 0.5
    weight_d: float = 0.0
    token_bonus: float = 0.5
    bonus_only_if_correct: bool = True


@dataclass
class LossSchema:
    _target_: str = "spd_lightning.grpo.GRPOLoss"
    num_samples: int = 8
    scale_std: bool = True
    ppo_epochs: int = 1
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    entropy_coef: float = 0.0


@dataclass
class DataSchema:
    _target_: str = "spd_lightning.data.RecordDataModule"
    path: str = "???"
    val_path: Optional[str] = None
    val_fraction: float = 0.1
    max_val_records: Optional[int] = None
    batch_size: int = 8
    val_batch_size: int = 64
    seed: int = 0
    num_workers: int = 0


@dataclass
class LocalTargetSchema:
    _target_: str = "spd_lightning.targets.LocalTarget"
    model_path: str = "???"
    max_new_tokens: int = 16
    batch_size: int = 64
    dtype: str = "float32"
    device: str = "cpu"


@dataclass
class ScorerSchema:
    _target_: str = "spd_lightning.scorer.ScoringActor.from_pretrained"
    path: str = "???"
    init_accept_prob: float = 0.5
    head_hidden: Optional[int] = None


@dataclass
class ModelSchema:
    scorer: ScorerSchema = field(default_factory=ScorerSchema)
    tokenizer: str = "???"


@dataclass
class VerifierSchema:
    _target_: str = "???"
    _partial_: bool = True


@dataclass
class LMSpecSchema:
    _target_: str = "spd_lightning.toy.train_lm.LMSpec"
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    steps: int = 1500
    lr: float = 3e-3
    batch_size: int = 64
    seed: int = 0


@dataclass
class ToySpecSchema:
    _target_: str = "spd_lightning.toy.build.ToyWorldSpec"
    target: LMSpecSchema = field(default_factory=LMSpecSchema)
    draft: LMSpecSchema = field(default_factory=LMSpecSchema)
    num_prompts: int = 600
    block_size: int = 4
    seed: int = 0


@dataclass
class ToySchema:
    out: str = "???"
    spec: ToySpecSchema = field(default_factory=ToySpecSchema)


SCHEMAS: dict[str, Any] = {
    "reward": RewardSchema,
    "loss": LossSchema,
    "data": DataSchema,
    "target": LocalTargetSchema,
    "model": ModelSchema,
    "verifier": VerifierSchema,
    "toy": ToySchema,
}


def register_schemas() -> None:
    cs = ConfigStore.instance()
    for group, node in SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=node)
