"""The rollouts of one training step: what was sampled, what the target verified, what it earned.

A loss makes its own rollouts (`GRPOLoss.rollouts` draws N decision vectors per record;
`ExactLoss.rollouts` takes every reachable outcome, N = K+1, with its probability), the target
verifies each rollout's hybrid prefix, and `score` turns the verdicts into rewards and
advantages. The same typed value then goes into the loss and into the logged metrics.
Shapes: B records, K draft tokens per block, N rollouts per record.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import torch

from spd_lightning.core.reward import RewardWeights, compute_reward_tensor
from spd_lightning.core.sampling import accepted_any_mismatch


@dataclass(frozen=True)
class Rollouts:
    mismatch: torch.Tensor  # [B, K] bool: draft != target
    old_logits: torch.Tensor  # [B, K] accept logits the rollouts were made with (detached)
    accept_len: torch.Tensor  # [B, N] first rejected position j of each rollout
    probs: torch.Tensor  # [B, N] each rollout's weight under the policy: 1/N for samples, P(j) for outcomes
    reachable: torch.Tensor  # [B, N] bool: rollouts the policy can produce (every sample; outcomes up to a mismatch)
    # Set by `score`, after verification:
    correct: torch.Tensor | None = None  # [B, N] bool: the hybrid response keeps the reference answer
    valid: torch.Tensor | None = None  # [B, N] bool: verified, and entering the loss
    accepted: torch.Tensor | None = None  # [B, N] bool: at least one mismatch was accepted
    rewards: torch.Tensor | None = None  # [B, N]
    advantages: torch.Tensor | None = None  # [B, N]
    zero_variance: torch.Tensor | None = None  # [B] bool: groups that carry no signal

    @property
    def block_size(self) -> int:
        return self.mismatch.shape[1]

    @cached_property
    def weights(self) -> torch.Tensor:
        """[B, N] probs over the valid rollouts, renormalised: each valid record's row sums to 1,
        so expectations under the policy are (x * weights).sum() / records. Computed once (after
        `score`; a frozen dataclass still lets cached_property fill its __dict__)."""
        w = self.probs * self.valid  # [B, N]
        return w / w.sum(-1, keepdim=True).clamp(min=1e-12)

    @cached_property
    def _records(self) -> torch.Tensor:
        """How many records have a valid rollout (at least 1): the denominator of `expected`."""
        return (self.weights.sum(-1) > 0).sum().clamp(min=1)

    def expected(self, x: torch.Tensor) -> torch.Tensor:
        """The policy's expectation of x [B, N] over the records with a valid rollout (a scalar)."""
        return (x.float() * self.weights).sum() / self._records


def score(rollouts: Rollouts, correct: torch.Tensor, verified: torch.Tensor, loss, weights: RewardWeights) -> Rollouts:
    """The rollouts with their verdicts, rewards and advantages. correct, verified: [B, N] bool
    from the target; `loss` says which rollouts enter it (`loss.entering`) and how advantages
    are formed (`loss.advantages`)."""
    valid = loss.entering(verified, rollouts.reachable)  # [B, N]
    accepted = accepted_any_mismatch(rollouts.accept_len, rollouts.mismatch)  # [B, N]
    rewards = compute_reward_tensor(accepted, correct, rollouts.accept_len, rollouts.block_size, weights)  # [B, N]
    advantages, zero_variance = loss.advantages(rewards, valid)  # [B, N], [B]
    return replace(
        rollouts,
        correct=correct,
        valid=valid,
        accepted=accepted,
        rewards=rewards,
        advantages=advantages,
        zero_variance=zero_variance,
    )
