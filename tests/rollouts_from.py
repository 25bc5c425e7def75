"""Rollouts built by hand from tensors, for the loss tests (training builds them with
`loss.rollouts` and `rollout.score`)."""

from __future__ import annotations

import torch

from spd_lightning.core.rollout import Rollouts


def on_rollouts(loss, logits: torch.Tensor, *tensors: torch.Tensor, ref_logits: torch.Tensor | None = None):
    """loss(logits, rollouts) with rollouts of (old_logits [B, K], accept_len [B, N], mismatch [B, K],
    advantages [B, N], valid [B, N])."""
    old_logits, accept_len, mismatch, advantages, valid = tensors
    probs = torch.full(accept_len.shape, 1 / accept_len.shape[1])
    reachable = torch.ones_like(accept_len, dtype=torch.bool)
    rollouts = Rollouts(mismatch, old_logits.detach(), accept_len, probs, reachable, valid=valid, advantages=advantages)
    return loss(logits, rollouts, ref_logits)
