"""Dataclass schemas for the config groups, registered with Hydra's ConfigStore.

Each YAML file of a group lists its schema first in its defaults, so a misspelled key or
a value of the wrong type, in the file or in a command-line override, fails at compose
time with Hydra's message instead of deep inside the code. The schemas are derived from
the constructors they configure, so a schema can never drift from its class.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from spd_lightning.core.exact import ExactLoss
from spd_lightning.core.generation_grpo import GenerationGRPOLoss
from spd_lightning.core.grpo import GRPOLoss
from spd_lightning.core.reward import RewardWeights
from spd_lightning.data.prompts import PromptList
from spd_lightning.judge.zero_cost import ZeroCostJudge
from spd_lightning.models.scorer import ScoringActor
from spd_lightning.targets import LocalTarget
from spd_lightning.targets.vllm import VLLMTarget
from spd_lightning.tasks.decode import DecodeConfig
from spd_lightning.tasks.evaluate import EvalConfig
from spd_lightning.tasks.judge import JudgeConfig
from spd_lightning.tasks.prepare import PrepareConfig
from spd_lightning.toy.build import SHIPPED_WORLD, ToyWorldSpec
from spd_lightning.toy.raw import toy_prompts
from spd_lightning.training.datamodule import RecordDataModule
from spd_lightning.training.generation import RolloutConfig
from spd_lightning.training.module import SPDModule
from spd_lightning.verification.hybrid import HybridVerifier

_PLAIN = (int, float, bool, str)


def _field_type(hint: Any) -> Any:
    """The OmegaConf-checkable form of a constructor annotation."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return Optional[_field_type(inner)]  # noqa: UP045 (OmegaConf reads typing.Optional, not X | None)
    if hint in _PLAIN:
        return hint
    if typing.get_origin(hint) is list:
        return list[_field_type(args[0])]
    if dataclasses.is_dataclass(hint):
        return schema_for(hint)
    return Any  # objects built elsewhere (models, modules): not configured from YAML


def schema_for(target: Callable) -> type:
    """A dataclass with `_target_` and one typed field per argument of `target`."""
    hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    fields: list[tuple] = [("_target_", str, dataclasses.field(default=f"{target.__module__}.{target.__qualname__}"))]
    for p in inspect.signature(target).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        typ = _field_type(hints.get(p.name, Any))
        default = MISSING if p.default is p.empty else p.default
        if dataclasses.is_dataclass(typ) and default is MISSING:
            fields.append((p.name, typ, dataclasses.field(default_factory=typ)))
        else:
            fields.append((p.name, typ, dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"{target.__name__}Schema", fields)


@dataclasses.dataclass
class ModelSchema(schema_for(ScoringActor.from_pretrained)):  # type: ignore[misc]
    """The `model` group: the arguments of ScoringActor.from_pretrained, plus the keys below."""

    # Tokenizer shared by draft, target and scorer.
    tokenizer: str = MISSING
    # The name a vLLM server must report for the target in /v1/models (target=vllm reads it).
    served_model_name: Optional[str] = None  # noqa: UP045


@dataclasses.dataclass
class JudgeModelSchema(schema_for(ZeroCostJudge.from_paths)):  # type: ignore[misc]
    """`model=judge`: the arguments of ZeroCostJudge.from_paths, plus the keys below."""

    tokenizer: str = MISSING
    served_model_name: Optional[str] = None  # noqa: UP045


@dataclasses.dataclass
class AnswerSchema:
    _target_: str = MISSING
    _partial_: bool = True


ToySpecSchema = schema_for(ToyWorldSpec)


def settings_schema(target: Callable) -> type:
    """A dataclass of the plain (number, flag, text) arguments of `target`, without `_target_`:
    a config section whose values a task hands to `target` beside objects built elsewhere."""
    full = schema_for(target)
    keep = [(f.name, f.type, f) for f in dataclasses.fields(full) if f.type in _PLAIN and f.name != "_target_"]
    return dataclasses.make_dataclass(f"{target.__name__}Settings", keep)


@dataclasses.dataclass
class ToySchema:
    out: str = MISSING
    spec: ToySpecSchema = dataclasses.field(default_factory=ToySpecSchema)  # type: ignore[valid-type]


# (group, schema name) -> schema. A YAML file lists `<name>` first in its defaults.
SCHEMAS: dict[tuple[str, str], Any] = {
    ("reward", "reward_schema"): schema_for(RewardWeights),
    ("loss", "loss_schema"): schema_for(GRPOLoss),
    ("loss", "exact_schema"): schema_for(ExactLoss),
    ("loss", "generation_grpo_schema"): schema_for(GenerationGRPOLoss),
    ("rollout", "rollout_schema"): RolloutConfig,
    ("data", "data_schema"): schema_for(RecordDataModule),
    ("data", "prompts_schema"): schema_for(PromptList.from_jsonl),
    ("data", "toy_prompts_schema"): schema_for(toy_prompts),
    ("target", "target_schema"): schema_for(LocalTarget),
    ("target", "target_vllm_schema"): schema_for(VLLMTarget),
    ("model", "model_schema"): ModelSchema,
    ("model", "judge_schema"): JudgeModelSchema,
    ("answer", "answer_schema"): AnswerSchema,
    ("toy", "toy_schema"): ToySchema,
    # The sections of the tasks other than training (conf/task/*.yaml: `/schema@prepare: prepare`).
    ("schema", "prepare"): PrepareConfig,
    ("schema", "eval"): EvalConfig,
    ("schema", "decode"): DecodeConfig,
    ("schema", "judge"): JudgeConfig,
    # train.yaml's `module:` (SPDModule's settings) and `verify:` (HybridVerifier's).
    ("schema", "module"): settings_schema(SPDModule),
    ("schema", "verify"): settings_schema(HybridVerifier),
}


def register_schemas() -> None:
    """The schemas, and `${spd.shipped_world:}`: the directory of the world shipped with the package."""
    OmegaConf.register_new_resolver("spd.shipped_world", lambda: str(SHIPPED_WORLD), replace=True)
    cs = ConfigStore.instance()
    for (group, name), node in SCHEMAS.items():
        cs.store(group=group, name=name, node=node)
