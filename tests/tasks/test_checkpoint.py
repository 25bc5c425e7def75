"""Checkpoints a user names: missing, corrupt or foreign files are one message before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spd_lightning.errors import SetupError
from spd_lightning.tasks.checkpoint import check_resume_checkpoint


def test_a_missing_checkpoint_is_named_with_its_key(tmp_path: Path):
    with pytest.raises(SetupError, match=r"checkpoint .*nope\.ckpt does not exist \(ckpt_path=\.\.\.\)"):
        check_resume_checkpoint(str(tmp_path / "nope.ckpt"))


def test_a_corrupt_checkpoint_is_named_with_its_key(tmp_path: Path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"not a torch file at all")
    with pytest.raises(SetupError, match=r"cannot read checkpoint .*last\.ckpt \(ckpt_path=\.\.\.\)"):
        check_resume_checkpoint(str(path))


def test_a_torch_file_that_is_no_lightning_checkpoint_is_refused(tmp_path: Path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(SetupError, match="is not a Lightning checkpoint"):
        check_resume_checkpoint(str(path))


def test_no_checkpoint_a_lightning_file_and_a_sharded_folder_pass(tmp_path: Path):
    check_resume_checkpoint(None)
    check_resume_checkpoint(str(tmp_path))  # trainer=fsdp2 writes a folder
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"scorer.w": torch.zeros(1)}, "global_step": 3}, path)
    check_resume_checkpoint(str(path))


def test_train_with_a_missing_checkpoint_stops_before_building_anything(tmp_path: Path, toy_world: Path, compose_train):
    from spd_lightning.tasks.train import train

    cfg = compose_train([f"toy.out={toy_world}", f"ckpt_path={tmp_path}/gone.ckpt"], tmp_path)
    with pytest.raises(SetupError, match="gone.ckpt does not exist"):
        train(cfg)
