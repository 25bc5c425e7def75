"""loss=exact: minus the exact expected reward of each record, a zero-variance alternative to GRPO.

Within a block only the first rejected mismatch matters, so the policy's decisions on a record
lead to one of at most (#mismatches + 1) outcomes j (sampling.all_outcomes), each with a known
probability under the scorer:

    P(j) = prod_{i<j, m_i} p_i * (1 - p_j)   for a mismatch j < K,    P(K) = prod_{m_i} p_i.

Verifying every outcome once gives its reward r_j, and E[r] = sum_j P(j) r_j is then exact: no
samples, no sampling noise. The loss is -sum_j P(j) (r_j - b) with b the mean reward of the
record's outcomes (the group baseline). As sum_j P(j) = 1, b leaves the gradient of E[r]
unchanged; it only keeps the loss near 0. With scale_std the advantages are divided by the
outcomes' std, as GRPO divides by the samples' std, so every record weighs alike.

A record with an outcome that could not be verified is left out entirely (its expectation
would be incomplete): it is counted, like GRPO's zero-variance groups.
"""

from __future__ import annotations

import torch
from torch import nn

from spd_lightning.core.grpo import GRPOStats, bernoulli_entropy, bernoulli_kl, group_advantages
from spd_lightning.core.rollout import Rollouts
from spd_lightning.core.sampling import all_outcomes, executed_masks, sequence_log_prob


def outcome_mask(verified: torch.Tensor, possible: torch.Tensor) -> torch.Tensor:
    """Outcomes that enter the loss: reachable ones of records whose reachable outcomes were all
    verified. verified, possible: [B, K+1] bool -> [B, K+1] bool."""
    complete = (verified | ~possible).all(-1, keepdim=True)  # [B, 1]
    return possible & complete


def outcome_probs(logits: torch.Tensor, accept_len: torch.Tensor, mismatch: torch.Tensor, mask: torch.Tensor):
    """P(j) of every outcome, 0 where masked. logits [B, K], accept_len [B, K+1] -> [B, K+1]."""
    return sequence_log_prob(logits, accept_len, mismatch).exp() * mask


class ExactLoss(nn.Module):
    """-E[r - b] over every outcome of each record, with exact KL and entropy terms."""

    # One optimiser step per verified batch: the objective has no ratio to clip.
    ppo_epochs = 1

    def __init__(self, scale_std: bool = False, kl_coef: float = 0.0, entropy_coef: float = 0.0) -> None:
        super().__init__()
        self.scale_std, self.kl_coef, self.entropy_coef = scale_std, kl_coef, entropy_coef

    def rollouts(self, logits: torch.Tensor, mismatch: torch.Tensor, generator: torch.Generator | None = None):
        """Every reachable outcome of each record, with P(j) under sigmoid(logits [B, K]): Rollouts with
        N = K+1 (unreachable ones carry probability 0). Nothing is drawn: `generator` is unused."""
        old_logits = logits.detach()  # [B, K]
        accept_len, possible = all_outcomes(mismatch)  # [B, K+1] each
        probs = outcome_probs(old_logits, accept_len, mismatch, possible)  # [B, K+1]
        return Rollouts(mismatch, old_logits, accept_len, probs, possible)

    def entering(self, verified: torch.Tensor, reachable: torch.Tensor) -> torch.Tensor:
        """[B, K+1] outcomes that enter the loss: those of records whose every reachable outcome was verified."""
        return outcome_mask(verified, reachable)

    def advantages(self, rewards: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, K+1] rewards of the outcomes -> ([B, K+1] r - b, [B] records without signal)."""
        return group_advantages(rewards, mask, self.scale_std)

    def forward(self, logits: torch.Tensor, rollouts: Rollouts, ref_logits: torch.Tensor | None = None) -> GRPOStats:
        """logits: [B, K] accept logits of the scorer being trained; rollouts: every outcome, scored
        (rollout.score); ref_logits: [B, K] of the frozen initial scorer, needed when kl_coef > 0."""
        if self.kl_coef > 0 and ref_logits is None:
            raise ValueError("ExactLoss: kl_coef > 0 needs ref_logits from the frozen initial scorer")
        accept_len, mismatch = rollouts.accept_len, rollouts.mismatch  # [B, K+1], [B, K]
        mask = rollouts.valid  # [B, K+1]
        advantages = rollouts.advantages  # [B, K+1]
        probs = outcome_probs(logits, accept_len, mismatch, mask)  # [B, K+1]
        records = mask.any(-1)  # [B] records that enter the loss
        n = records.sum().clamp(min=1)
        policy_loss = -(probs * advantages).sum() / n
        # Expected per-decision terms: each outcome's executed decisions, weighted by P(j).
        accepted, rejected = executed_masks(accept_len, mismatch)  # [B, K+1, K]
        executed = (accepted | rejected).float() * probs.detach().unsqueeze(-1)  # [B, K+1, K]
        weight = executed.sum(1)  # [B, K] probability that each decision is executed
        decisions = weight.sum().clamp(min=1e-8)
        entropy = (weight * bernoulli_entropy(logits)).sum() / decisions
        kl = torch.zeros((), device=logits.device)
        if ref_logits is not None:
            kl = (weight * bernoulli_kl(logits, ref_logits.detach())).sum() / decisions
        loss = policy_loss + self.kl_coef * kl - self.entropy_coef * entropy
        zero = torch.zeros((), device=logits.device)
        return GRPOStats(loss, policy_loss, kl, entropy, zero, (mismatch & records[:, None]).sum())
