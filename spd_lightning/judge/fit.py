"""Training a judge on an outcome table: every reachable outcome of each record was verified once
(outcomes.OutcomeTable), so no objective below calls the target, and the three differ only in
what they minimise:
- supervised: binary cross-entropy against AutoJudge's labels (judge.autojudge_labels);
- grpo: N sampled decision vectors per record, rewarded by reward.py, GRPOLoss (as training);
- exact: the exact expected reward over every outcome, ExactLoss (as loss=exact).

A judge is anything with parameters and a `logits(index) -> [B, K]` for records `index`, so the
zero-cost JudgeHead and today's ScoringActor head train through the same loops.
Shapes: N records, B a batch of them, K draft tokens per block, S samples per record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spd_lightning.core.exact import ExactLoss
from spd_lightning.core.grpo import GRPOLoss
from spd_lightning.core.reward import RewardWeights
from spd_lightning.core.rollout import score
from spd_lightning.verification.outcomes import OutcomeTable

Logits = Callable[[torch.Tensor], torch.Tensor]  # record indices [B] -> accept logits [B, K]


@dataclass
class FitSettings:
    steps: int = 300  # optimiser steps
    lr: float = 1e-2
    weight_decay: float = 1e-2  # AdamW's; the L2 prior of a logistic regression
    batch_size: int = 64  # records per step
    num_samples: int = 8  # GRPO's group size
    seed: int = 0


def _batches(n: int, settings: FitSettings, generator: torch.Generator):
    """An endless stream of record indices [B], reshuffled every epoch."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, settings.batch_size):
            yield order[start : start + settings.batch_size]


def _optimise(params, settings: FitSettings, loss_of: Callable[[torch.Tensor], torch.Tensor], n: int) -> list[float]:
    """settings.steps AdamW steps on loss_of(batch indices); returns the loss of every step."""
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    losses, stream = [], _batches(n, settings, generator)
    for _ in range(settings.steps):
        loss = loss_of(next(stream))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def fit_supervised(
    logits: Logits, params, labels: torch.Tensor, defined: torch.Tensor, settings: FitSettings
) -> list[float]:
    """Binary cross-entropy at the labelled mismatches. labels, defined: [N, K] bool."""
    rows = defined.any(-1).nonzero().squeeze(1)  # records with at least one label
    if len(rows) == 0:
        raise ValueError("no labelled mismatch to train the supervised judge on")

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        index = rows[index]
        mask = defined[index]  # [B, K]
        return F.binary_cross_entropy_with_logits(logits(index)[mask], labels[index][mask].float())

    return _optimise(params, settings, loss_of, len(rows))


def fit_rl(
    logits: Logits,
    params,
    table: OutcomeTable,
    loss: GRPOLoss | ExactLoss,
    reward: RewardWeights,
    settings: FitSettings,
) -> list[float]:
    """GRPO (sampled decisions) or the exact expected reward, with rewards read from `table`."""
    generator = torch.Generator().manual_seed(settings.seed + 1)

    def loss_of(index: torch.Tensor) -> torch.Tensor:
        scores = logits(index)  # [B, K]
        rollouts = loss.rollouts(scores, table.mismatch[index], generator)  # accept_len [B, S]
        right = table.correct[index].gather(1, rollouts.accept_len)  # [B, S]
        verified = table.verified[index, None].expand_as(rollouts.accept_len)  # [B, S]
        return loss(scores, score(rollouts, right, verified, loss, reward)).loss

    return _optimise(params, settings, loss_of, len(table.mismatch))
