"""A run stopped and resumed mid-epoch trains on the batches the uninterrupted run would have."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from spd_lightning.training.shuffle import StreamShuffle, resumable_shuffle

ITEMS, BATCH = 16, 4  # four batches an epoch


class _Items(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        shuffle = resumable_shuffle(ITEMS, seed=3, batch_size=BATCH, trainer=self.trainer)
        return DataLoader(list(range(ITEMS)), batch_size=BATCH, sampler=shuffle, drop_last=True)


class _Recorder(L.LightningModule):
    def __init__(self, seen: list[list[int]]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen = seen

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch.tolist())
        return self.weight * batch.float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(steps: int, root: Path, seen: list, ckpt: Path | None = None) -> Path:
    trainer = L.Trainer(max_steps=steps, default_root_dir=root, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")  # fmt: skip
    trainer.fit(_Recorder(seen), datamodule=_Items(), ckpt_path=ckpt)
    return Path(trainer.checkpoint_callback.best_model_path)


@pytest.mark.parametrize("stop", [2, 4, 7])  # mid-epoch, at an epoch's end, in the second epoch
def test_a_resumed_run_serves_the_batches_of_the_uninterrupted_one(stop: int, tmp_path: Path):
    whole, parts = [], []
    _fit(10, tmp_path / "whole", whole)
    ckpt = _fit(stop, tmp_path / "parts", parts)
    _fit(10, tmp_path / "parts", parts, ckpt)
    assert parts == whole
    epochs = [sorted(sum(whole[i : i + 4], [])) for i in (0, 4)]
    assert epochs == [list(range(ITEMS))] * 2 and whole[:4] != whole[4:8]  # each epoch all items, reshuffled


def test_the_stream_is_one_permutation_after_another_whatever_the_batch():
    shuffle = StreamShuffle(10, seed=1, batch_size=4)  # passes of 8 items
    assert sorted(shuffle.items(0, 10)) == list(range(10)) and shuffle.items(0, 10) != shuffle.items(10, 10)
    assert shuffle.items(0, 24) == shuffle.items(0, 7) + shuffle.items(7, 17)
    assert list(StreamShuffle(10, seed=1, batch_size=4, trained_batches=lambda: 3)) == shuffle.items(12, 8)
    # Two ranks: a step trains a batch on each, and a pass is whole steps (8 of 10 items).
    two_ranks = StreamShuffle(10, seed=1, batch_size=2, trained_batches=lambda: 3, world_size=2)
    assert list(two_ranks) == shuffle.items(12, 8)
