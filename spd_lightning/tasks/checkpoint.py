"""The trained scorer back from a training run's Lightning checkpoint, for evaluation and decoding."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from omegaconf import DictConfig

from spd_lightning.errors import SetupError
from spd_lightning.models.scorer import ScoringActor
from spd_lightning.tasks.builders import build_scorer

PREFIX = "scorer."


def load_trained_scorer(model: DictConfig, ckpt_path: str | None, task: str) -> tuple[ScoringActor, dict]:
    """(scorer in eval mode, the run's module hyperparameters: threshold, ...).

    The scorer is built from the `model` group exactly as training built it (same backbone,
    LoRA and head settings), then the checkpoint's `scorer.*` weights are loaded into it."""
    if not ckpt_path:
        raise SetupError(
            f"task={task} needs the trained scorer: ckpt_path=outputs/train/runs/<time>/checkpoints/last.ckpt"
        )
    path = Path(ckpt_path)
    if path.is_dir():
        raise SetupError(
            f"{path} is a sharded checkpoint folder (trainer=fsdp2). Convert it to one file first: "
            f"python -m torch.distributed.checkpoint.format_utils dcp_to_torch {path} last.ckpt"
        )
    if not path.is_file():
        raise SetupError(f"checkpoint {path} does not exist (ckpt_path=...)")
    ckpt = read_checkpoint(path)
    state = {k[len(PREFIX) :]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(PREFIX)}
    if not state:
        raise SetupError(f"{path} holds no scorer weights: is it a checkpoint of `python run.py` (task=train)?")
    scorer = build_scorer(model)
    missing, unexpected = scorer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SetupError(
            f"{path} does not fit the scorer built from model={model.path} "
            f"({len(missing)} missing, {len(unexpected)} unexpected weights, e.g. {(missing or unexpected)[0]}). "
            "Use the model settings (model=..., model.lora.r, model.head_hidden) of the training run."
        )
    return scorer.eval(), dict(ckpt.get("hyper_parameters", {}))


def check_resume_checkpoint(ckpt_path: str | None) -> None:
    """task=train with ckpt_path: the file must exist and be a Lightning checkpoint, checked
    before any model is built (Lightning would fail deep inside fit, after minutes of loading).
    A folder is a sharded checkpoint of trainer=fsdp2, which Lightning reads itself."""
    if not ckpt_path:
        return
    path = Path(ckpt_path)
    if path.is_dir():
        return
    if not path.is_file():
        raise SetupError(
            f"checkpoint {path} does not exist (ckpt_path=...): give a run's checkpoints/last.ckpt, or drop "
            "ckpt_path to start from scratch"
        )
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "global_step" not in ckpt:
        raise SetupError(f"{path} is not a Lightning checkpoint of `python run.py` (ckpt_path=...): nothing to resume")


def read_checkpoint(path: Path) -> dict:
    """torch.load of a checkpoint file, memory-mapped (a scorer's checkpoint can hold gigabytes of
    optimizer state); a truncated or foreign file is one message naming it and ckpt_path."""
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise SetupError(f"cannot read checkpoint {path} (ckpt_path=...): not a torch checkpoint, or truncated")
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # damaged inside, or pickled objects beyond tensors: not torch's internals
        raise SetupError(f"cannot read checkpoint {path} (ckpt_path=...): {str(err).splitlines()[0][:200]}") from None
