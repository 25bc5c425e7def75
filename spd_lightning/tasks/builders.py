"""Objects built from the composed config, shared by the tasks (train, eval, decode)."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from spd_lightning.errors import SetupError
from spd_lightning.models.scorer import ScoringActor
from spd_lightning.toy.build import build_toy_world

# How vocabulary messages name the scorer's backbone.
SCORER = "the scorer backbone (model.path)"
# Keys of the model group that are not arguments of ScoringActor.from_pretrained.
MODEL_ONLY_KEYS = ("tokenizer", "served_model_name")


# Keys that may name a file or model of the toy world (toy.out).
TOY_WORLD_KEYS = (
    "model.path", "model.tokenizer", "model.target_path", "pair.draft", "pair.target",
    "draft.model_path", "target.model_path", "data.path", "data.val_path",
)  # fmt: skip


def in_toy_world(cfg: DictConfig, key: str) -> bool:
    """Whether the value at `key` lies in the toy world (False without a toy group, ~toy)."""
    if not cfg.get("toy"):
        return False
    value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    return value is not None and str(value).startswith(str(cfg.toy.out))


def ensure_toy_world(cfg: DictConfig) -> None:
    """Builds (or checks) the embedded default world when the run uses a model or a file of it:
    the one guard every task calls before it loads anything from toy.out."""
    if any(in_toy_world(cfg, key) for key in TOY_WORLD_KEYS):
        build_toy_world(cfg.toy.out, instantiate(cfg.toy.spec))


def pair_path(cfg: DictConfig, role: str) -> str:
    """pair.draft or pair.target, the one place that names each model (conf/pair/); the defaults
    point into the toy world, which a user may have switched off (~toy)."""
    key = f"pair.{role}"
    try:
        path = OmegaConf.select(cfg, key, throw_on_missing=True)
    except OmegaConfBaseException:
        path = None
    if path is None:
        raise SetupError(f"{key} is not set (its default needs the toy world): python run.py {key}=PATH")
    return str(path)


def build_scorer(model: DictConfig) -> ScoringActor:
    """ScoringActor.from_pretrained with the `model` group's arguments (`lora` becomes a LoraSpec)."""
    node = OmegaConf.to_container(model, resolve=True)
    return instantiate({k: v for k, v in node.items() if k not in MODEL_ONLY_KEYS}, _convert_="all")


def instantiate_dict(cfg: DictConfig | None) -> list:
    """Callbacks and loggers are dicts of named entries; an entry without _target_ is skipped."""
    return [instantiate(c) for c in (cfg or {}).values() if c is not None and "_target_" in c]
