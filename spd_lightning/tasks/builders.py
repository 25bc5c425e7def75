"""Objects built from the composed config, shared by the tasks (train, eval, decode)."""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from spd_lightning.models.hf import check_covers_tokenizer
from spd_lightning.models.scorer import ScoringActor

# Keys of the model group that are not arguments of ScoringActor.from_pretrained.
MODEL_ONLY_KEYS = ("tokenizer", "served_model_name")


def build_scorer(model: DictConfig) -> ScoringActor:
    """ScoringActor.from_pretrained with the `model` group's arguments (`lora` becomes a LoraSpec)."""
    node = OmegaConf.to_container(model, resolve=True)
    return instantiate({k: v for k, v in node.items() if k not in MODEL_ONLY_KEYS}, _convert_="all")


def instantiate_dict(cfg: DictConfig | None) -> list:
    """Callbacks and loggers are dicts of named entries; an entry without _target_ is skipped."""
    return [instantiate(c) for c in (cfg or {}).values() if c is not None and "_target_" in c]


def check_shared_vocab(tokenizer, scorer, target) -> None:
    """Draft, target and scorer must share one vocabulary: speculative decoding compares token ids."""
    check_covers_tokenizer(scorer.backbone.config.vocab_size, tokenizer, "the scorer backbone (model.path)")
    target.check_tokenizer(tokenizer)
