"""The Lightning DataModule of `rollout=generation`: prompts with their answers, not records."""

from __future__ import annotations

import random

import lightning as L
from torch.utils.data import DataLoader

from spd_lightning.data.prompts import Prompt, encode_prompts
from spd_lightning.errors import RecordError
from spd_lightning.training.shuffle import resumable_shuffle

PromptRow = tuple[tuple[int, ...], str]  # (prompt ids, reference answer)


def _as_list(rows: list[PromptRow]) -> list[PromptRow]:
    return list(rows)


class PromptDataModule(L.LightningDataModule):
    """Serves (prompt ids, answer) rows; a seeded share of the prompts is held out for validation."""

    def __init__(self, prompts: list[Prompt], tokenizer, block_size: int, val_fraction: float = 0.25,
                 batch_size: int = 8, val_batch_size: int = 64, seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.prompts, self.tokenizer, self.block_size = prompts, tokenizer, block_size
        self.val_fraction, self.batch_size, self.val_batch_size, self.seed = (
            val_fraction,
            batch_size,
            val_batch_size,
            seed,
        )
        self.train_records: list[PromptRow] = []
        self.val_records: list[PromptRow] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_records:
            return
        rows = [
            (tuple(ids), p.answer or "") for ids, p in zip(encode_prompts(self.tokenizer, self.prompts), self.prompts)
        ]
        random.Random(self.seed).shuffle(rows)
        held = max(1, round(len(rows) * self.val_fraction))
        self.val_records, self.train_records = rows[:held], rows[held:]
        if len(self.train_records) < self.batch_size:
            raise RecordError(
                f"{len(self.train_records)} train prompts cannot fill one batch of rollout.batch_size="
                f"{self.batch_size}; use more prompts or lower it"
            )

    def train_dataloader(self) -> DataLoader:
        shuffle = resumable_shuffle(len(self.train_records), self.seed, self.batch_size, self.trainer)
        return DataLoader(self.train_records, batch_size=self.batch_size, sampler=shuffle, collate_fn=_as_list,
                          drop_last=True)  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_records, batch_size=self.val_batch_size, shuffle=False, collate_fn=_as_list)
