"""A few GRPO (or loss=exact) steps on the default world change the scorer and move accept
probabilities the right way."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from spd_lightning.core.sampling import mismatch_mask
from spd_lightning.data.records import collate_records
from spd_lightning.tasks.train import build_components


def first_mismatch_labels(module, records):
    """For each record whose first mismatch m the target handles correctly when rejected
    (standard SD is right): harmless if accepting m (and rejecting the next mismatch) still
    reaches the reference, harmful if not. Labelled by verification, not by hand."""
    batch = collate_records(records)
    mismatch = mismatch_mask(batch.draft_ids, batch.target_ids)  # [B, K]
    k = mismatch.shape[1]
    first = mismatch.long().argmax(-1)  # [B]
    later = mismatch & (torch.arange(k)[None, :] > first[:, None])  # [B, K]
    second = torch.where(later.any(-1), later.long().argmax(-1), torch.full_like(first, k))  # [B]
    result = module.verifier.verify(records, torch.stack([first, second], dim=1))  # [B, 2]
    sd_correct, accept_correct = result.correct[:, 0], result.correct[:, 1]
    return batch, first, sd_correct & accept_correct, sd_correct & ~accept_correct


@torch.no_grad()
def accept_probs_at(module, batch, positions):
    probs = torch.sigmoid(module.accept_logits(batch))  # [B, K]
    return probs.gather(1, positions[:, None]).squeeze(1)  # [B]


@pytest.mark.parametrize("loss", ["grpo", "exact"])
def test_steps_learn_accept_harmless_reject_harmful(loss: str, toy_world: Path, tmp_path: Path, compose_train):
    cfg = compose_train([f"toy.out={toy_world}", "seed=0", f"loss={loss}"], tmp_path)
    L.seed_everything(0, verbose=False)
    datamodule, module = build_components(cfg)
    records = datamodule.val_records[:200]
    batch, first, harmless, harmful = first_mismatch_labels(module, records)
    assert harmless.sum() >= 20 and harmful.sum() >= 20, "the default world needs both kinds of mismatch"

    before_params = [p.detach().clone() for p in module.scorer.parameters()]
    before = accept_probs_at(module, batch, first)
    trainer = L.Trainer(
        max_steps=15,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=datamodule)
    after = accept_probs_at(module, batch, first)

    changed = sum(not torch.equal(a, b.detach()) for a, b in zip(before_params, module.scorer.parameters()))
    assert changed > 0
    # Harmless mismatches become more likely to be accepted, harmful ones less.
    assert after[harmless].mean() > before[harmless].mean() + 0.05
    assert after[harmful].mean() < before[harmful].mean() - 0.05
    assert after[harmless].mean() > after[harmful].mean() + 0.2
