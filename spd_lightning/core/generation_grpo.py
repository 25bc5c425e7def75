"""GRPO on whole generations: G episodes per prompt, every executed decision in the loss.

An episode's decisions are the mismatches it met, each a Bernoulli draw (accept with p). Its
log-probability is the sum over them of log p (accepted) or log(1 - p) (rejected): unlike a
single block, a generation goes on after a rejection, so every decision met was executed. The
reward is the four-scenario reward lifted to the generation (accepted = any mismatch accepted,
correct = the final answer holds) plus a speed term in [0, 1]; advantages are normalised over
the G episodes of a prompt (core/grpo.group_advantages), and the loss is the PPO-clipped
surrogate averaged over all decisions of the batch (token-level, as DAPO). With ppo_epochs > 1
the same decisions make several updates (GRPO's mu), each clipped against the draws' logits:
an episode costs minutes of completions, an update of the head milliseconds.

Shapes: P prompts, G episodes per prompt (E = P * G), D decisions in all.
"""

from __future__ import annotations

import torch

from spd_lightning.core.grpo import DecisionLoss, GRPOStats, bernoulli_entropy, bernoulli_kl, clipped_surrogate
from spd_lightning.core.reward import RewardWeights, compute_reward_tensor

SPEEDS = ("calls_saved", "mismatches_kept")


def speed_term(
    kind: str,
    calls: torch.Tensor,
    tokens: torch.Tensor,
    sd_calls_per_token: torch.Tensor,
    kept: torch.Tensor,
    met: torch.Tensor,
) -> torch.Tensor:
    """[E] in [0, 1]. calls_saved: the share of standard SD's target calls per token saved (0 at
    standard SD's own cost, clamped there); mismatches_kept: accepted / met (0 when none met).
    calls, tokens, kept, met: [E] counts; sd_calls_per_token: [E] standard SD's on that prompt."""
    if kind == "calls_saved":
        per_token = calls.float() / tokens.float().clamp(min=1)  # [E]
        return (1 - per_token / sd_calls_per_token.clamp(min=1e-9)).clamp(0, 1)
    if kind == "mismatches_kept":
        return kept.float() / met.float().clamp(min=1)
    raise ValueError(f"speed term {kind!r}: choose among {list(SPEEDS)}")


def order_among(keys: list) -> torch.Tensor:
    """[M] long: each item's count of earlier items with the same key (a mismatch's order along its
    prompt's path, for mismatches listed path by path in response order)."""
    seen: dict = {}
    order = []
    for key in keys:
        order.append(seen.get(key, 0))
        seen[key] = order[-1] + 1
    return torch.tensor(order, dtype=torch.long)


def decision_chance(order: torch.Tensor, max_forks: int | None, accept_prob: float) -> torch.Tensor:
    """[M] long -> [M] float: the chance that an episode decides at the mismatch it meets
    order-th (0 first) along a path, when each decision accepts with accept_prob and decisions
    stop once max_forks are accepted: P(Binomial(order, accept_prob) < max_forks). 1 everywhere
    without a cap. With a cap of 2 and p = 0.5: 1, 1, 0.75, 0.5, 0.31, ...; the head's inputs
    are centred on the mismatches weighted so (training/generation.py, rollout.center)."""
    if max_forks is None:
        return torch.ones(order.shape, dtype=torch.float64)
    n = order.double()[:, None]  # [M, 1]
    k = torch.arange(max_forks, dtype=torch.float64)[None]  # [1, C]
    p = torch.tensor(accept_prob, dtype=torch.float64).clamp(1e-9, 1 - 1e-9)
    log_terms = (
        torch.lgamma(n + 1)
        - torch.lgamma(k + 1)
        - torch.lgamma((n - k).clamp(min=0) + 1)
        + k * p.log()
        + (n - k) * torch.log1p(-p)
    )  # [M, C]: log C(n, k) p^k (1 - p)^(n - k)
    return torch.where(k <= n, log_terms.exp(), 0.0).sum(-1).clamp(max=1.0)  # [M]


def generation_rewards(
    accepted: torch.Tensor, correct: torch.Tensor, speed: torch.Tensor, weights: RewardWeights
) -> torch.Tensor:
    """[P, G] bool, bool, float -> [P, G]: the scenario weight plus token_bonus * speed (only
    for correct episodes when weights.bonus_only_if_correct)."""
    return compute_reward_tensor(accepted, correct, speed, 1, weights)


class GenerationGRPOLoss(DecisionLoss):
    """The PPO-clipped surrogate over the decisions of whole-generation episodes."""

    def __init__(
        self,
        num_episodes: int = 4,
        scale_std: bool = True,
        ppo_epochs: int = 1,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        kl_coef: float = 0.0,
        entropy_coef: float = 0.0,
    ) -> None:
        super().__init__(("num_episodes", num_episodes), scale_std, clip_low, clip_high, kl_coef, entropy_coef)
        self.num_episodes, self.ppo_epochs = num_episodes, ppo_epochs

    def forward(
        self,
        logits: torch.Tensor,
        old_logits: torch.Tensor,
        accepted: torch.Tensor,
        episode: torch.Tensor,
        advantages: torch.Tensor,
        ref_logits: torch.Tensor | None = None,
    ) -> GRPOStats:
        """logits [D] (with grad), old_logits [D] (what the decisions were drawn with), accepted [D]
        bool, episode [D] long (index into the flattened [E] advantages), advantages [E]."""
        self.check_reference(ref_logits)
        adv = advantages.reshape(-1)[episode]  # [D]
        surrogate, clip_active = clipped_surrogate(logits, old_logits, accepted, adv, self.clip_low, self.clip_high)
        n = max(len(logits), 1)
        policy_loss = -surrogate.sum() / n
        entropy = bernoulli_entropy(logits).sum() / n
        kl = torch.zeros((), device=logits.device)
        if ref_logits is not None:
            kl = bernoulli_kl(logits, ref_logits.detach()).sum() / n
        loss = policy_loss + self.kl_coef * kl - self.entropy_coef * entropy
        clip_fraction = clip_active.float().sum() / n
        return GRPOStats(loss, policy_loss, kl, entropy, clip_fraction.detach(), torch.tensor(len(logits)))
