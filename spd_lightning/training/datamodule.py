"""The Lightning DataModule that serves SPD records in batches of whole records."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader

from spd_lightning.data.records import Record, RecordError, collate_records, load_records, split_by_prompt
from spd_lightning.training.shuffle import resumable_shuffle


class RecordDataModule(L.LightningDataModule):
    """Serves records from a JSONL file (or a separate val file) in batches of whole records."""

    def __init__(
        self,
        path: str,
        val_path: str | None = None,
        val_fraction: float = 0.1,
        max_val_records: int | None = None,
        batch_size: int = 8,
        val_batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.path, self.val_path = path, val_path
        self.val_fraction, self.max_val_records = val_fraction, max_val_records
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.seed, self.num_workers = seed, num_workers
        self.train_records: list[Record] = []
        self.val_records: list[Record] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_records:
            return
        records = load_records(self.path)
        if self.val_path:
            train, val = records, load_records(self.val_path, "data.val_path")
        else:
            train, val = split_by_prompt(records, self.val_fraction, self.seed)
        if self.max_val_records is not None:
            val = val[: self.max_val_records]
        if not train or not val:
            raise RecordError(
                f"{self.path}: the split left {len(train)} train and {len(val)} val "
                "records; use more records or change data.val_fraction"
            )
        if len(train) < self.batch_size:
            raise RecordError(
                f"{self.path}: {len(train)} train records cannot fill one batch of "
                f"data.batch_size={self.batch_size}; lower it or use more records"
            )
        self.train_records, self.val_records = train, val

    @property
    def block_size(self) -> int:
        return self.train_records[0].block_size

    def train_dataloader(self) -> DataLoader:
        shuffle = resumable_shuffle(len(self.train_records), self.seed, self.batch_size, self.trainer)
        return DataLoader(
            self.train_records,
            batch_size=self.batch_size,
            sampler=shuffle,
            collate_fn=collate_records,
            num_workers=self.num_workers,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_records,
            batch_size=self.val_batch_size,
            shuffle=False,
            collate_fn=collate_records,
            num_workers=self.num_workers,
        )
