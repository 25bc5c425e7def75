"""GRPO over accept/reject decisions.

Group = the N samples of one record. How this departs from GRPO as published
(DeepSeekMath, Shao et al. 2024):
- The "tokens" of the ratio objective are the executed accept/reject decisions of a
  block, not generated tokens; decisions after the first reject never ran and are masked.
- The KL to the frozen initial scorer is the exact Bernoulli KL at every executed
  decision, not the k3 estimator, because both distributions are known in closed form.
- Samples whose verification failed are excluded from the group statistics and the
  loss (`valid` mask), never scored 0: 0 would read as "wrong".
- `scale_std=False` gives Dr. GRPO (Liu et al. 2025): mean-centred advantages only.
- The loss is averaged over all executed decisions of the batch (token-level, as DAPO),
  so records with many mismatches weigh more than records with one.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from spd_lightning.core.rollout import Rollouts
from spd_lightning.core.sampling import executed_masks, first_reject, sample_decisions


def group_advantages(
    rewards: torch.Tensor, valid: torch.Tensor, scale_std: bool = True, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-normalised advantages.

    rewards: [B, N], valid: [B, N] bool -> (advantages [B, N], zero_variance [B] bool).
    Invalid samples get advantage 0. A group with fewer than two valid samples, or whose
    valid rewards are all equal, carries no signal: zero advantages, flagged zero_variance.
    """
    w = valid.float()  # [B, N]
    count = w.sum(-1, keepdim=True)  # [B, 1]
    mean = (rewards * w).sum(-1, keepdim=True) / count.clamp(min=1)  # [B, 1]
    centred = (rewards - mean) * w  # [B, N]
    # Unbiased std over the valid samples, as torch.std and TRL's GRPO use.
    var = (centred**2).sum(-1, keepdim=True) / (count - 1).clamp(min=1)  # [B, 1]
    std = var.sqrt()  # [B, 1]
    zero_variance = (count.squeeze(-1) < 2) | (std.squeeze(-1) < 1e-8)  # [B]
    adv = centred / (std + eps) if scale_std else centred  # [B, N]
    adv = torch.where(zero_variance.unsqueeze(-1), torch.zeros_like(adv), adv)
    return adv, zero_variance


def bernoulli_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact KL(Bern(p) || Bern(q)) elementwise, from logits of p and q."""
    log_p, log_1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
    log_q, log_1mq = F.logsigmoid(ref_logits), F.logsigmoid(-ref_logits)
    p = torch.sigmoid(logits)
    return p * (log_p - log_q) + (1 - p) * (log_1mp - log_1mq)


def bernoulli_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of Bern(sigmoid(logits)) elementwise, in nats."""
    p = torch.sigmoid(logits)
    return -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits))


class GRPOStats(NamedTuple):
    loss: torch.Tensor  # scalar, what is minimised
    policy_loss: torch.Tensor  # scalar, the clipped surrogate
    kl: torch.Tensor  # scalar, mean Bernoulli KL to the reference at executed decisions
    entropy: torch.Tensor  # scalar, mean Bernoulli entropy at executed decisions
    clip_fraction: torch.Tensor  # scalar, share of executed decisions whose ratio was clipped
    num_decisions: torch.Tensor  # scalar, executed decisions that entered the loss


def clipped_surrogate(
    logits: torch.Tensor, old_logits: torch.Tensor, accepted: torch.Tensor, adv: torch.Tensor,
    clip_low: float, clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """PPO's clipped ratio objective of Bernoulli decisions, elementwise: logits (with grad),
    old_logits (what the decisions were drawn with), accepted (bool) and adv broadcast to one
    shape [...] -> (surrogate [...], clip_active [...] bool)."""
    # The log-probability of the decision taken: log p to accept, log(1 - p) to reject.
    sign = torch.where(accepted, 1.0, -1.0)
    ratio = torch.exp(F.logsigmoid(sign * logits) - F.logsigmoid(sign * old_logits.detach()))
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    # The clip is active where min() took the clipped branch with a different value.
    clip_active = ((adv > 0) & (ratio > 1 + clip_high)) | ((adv < 0) & (ratio < 1 - clip_low))
    return surrogate, clip_active


class DecisionLoss(nn.Module):
    """What both GRPO losses share: the group size check, the clip range, the KL and entropy
    coefficients, and group-normalised advantages."""

    def __init__(self, group: tuple[str, int], scale_std: bool, clip_low: float, clip_high: float, kl_coef: float,
                 entropy_coef: float) -> None:  # fmt: skip
        super().__init__()
        name, size = group
        if size < 2:
            raise ValueError(f"loss.{name} must be >= 2 for a group baseline, got {size}")
        self.scale_std, self.clip_low, self.clip_high = scale_std, clip_low, clip_high
        self.kl_coef, self.entropy_coef = kl_coef, entropy_coef

    def advantages(self, rewards: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N] rewards -> ([B, N] advantages, [B] zero-variance flags) for this loss's settings."""
        return group_advantages(rewards, valid, self.scale_std)

    def check_reference(self, ref_logits: torch.Tensor | None) -> None:
        if self.kl_coef > 0 and ref_logits is None:
            raise ValueError(f"{type(self).__name__}: kl_coef > 0 needs ref_logits from the frozen initial scorer")


class GRPOLoss(DecisionLoss):
    """PPO-clipped ratio objective over executed decisions, with optional KL and entropy terms."""

    def __init__(
        self,
        num_samples: int = 8,
        scale_std: bool = True,
        ppo_epochs: int = 1,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        kl_coef: float = 0.0,
        entropy_coef: float = 0.0,
    ) -> None:
        super().__init__(("num_samples", num_samples), scale_std, clip_low, clip_high, kl_coef, entropy_coef)
        self.num_samples, self.ppo_epochs = num_samples, ppo_epochs

    def rollouts(self, logits: torch.Tensor, mismatch: torch.Tensor, generator: torch.Generator | None = None):
        """num_samples decision vectors per record, drawn from sigmoid(logits [B, K]): Rollouts with N samples."""
        old_logits = logits.detach()  # [B, K]
        decisions = sample_decisions(torch.sigmoid(old_logits), mismatch, self.num_samples, generator)  # [B, N, K]
        accept_len = first_reject(decisions)  # [B, N]
        probs = torch.full(accept_len.shape, 1 / self.num_samples, device=logits.device)  # [B, N]
        return Rollouts(mismatch, old_logits, accept_len, probs, torch.ones_like(accept_len, dtype=torch.bool))

    def entering(self, verified: torch.Tensor, reachable: torch.Tensor) -> torch.Tensor:
        """[B, N] samples that enter the loss: every verified one (a failed one is left out, never scored 0)."""
        return verified & reachable

    def forward(self, logits: torch.Tensor, rollouts: Rollouts, ref_logits: torch.Tensor | None = None) -> GRPOStats:
        """logits: [B, K] accept logits of the scorer being trained; rollouts: scored (rollout.score);
        ref_logits: [B, K] of the frozen initial scorer, needed when kl_coef > 0."""
        self.check_reference(ref_logits)
        accept_len, mismatch, valid = rollouts.accept_len, rollouts.mismatch, rollouts.valid  # [B, N], [B, K], [B, N]
        old_logits, advantages = rollouts.old_logits, rollouts.advantages  # [B, K], [B, N]
        accepted, rejected = executed_masks(accept_len, mismatch)  # [B, N, K] each
        executed = (accepted | rejected) & valid.unsqueeze(-1)  # [B, N, K]
        surrogate, clip_active = clipped_surrogate(
            logits.unsqueeze(1), old_logits.unsqueeze(1), accepted, advantages.unsqueeze(-1), self.clip_low,
            self.clip_high,
        )  # [B, N, K] each  # fmt: skip
        n = executed.sum().clamp(min=1)  # scalar

        def mean(x: torch.Tensor) -> torch.Tensor:
            return (x * executed).sum() / n

        policy_loss = -mean(surrogate)
        entropy = mean(bernoulli_entropy(logits).unsqueeze(1).expand_as(surrogate))
        kl = torch.zeros((), device=logits.device)
        if ref_logits is not None:
            kl = mean(bernoulli_kl(logits, ref_logits.detach()).unsqueeze(1).expand_as(surrogate))
        loss = policy_loss + self.kl_coef * kl - self.entropy_coef * entropy
        clip_fraction = mean(clip_active.float())
        return GRPOStats(loss, policy_loss, kl, entropy, clip_fraction.detach(), executed.sum())
