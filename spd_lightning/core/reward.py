"""The four-scenario reward.

accepted = at least one mismatch was accepted; correct = the verifier's verdict.
A: accepted and correct    B: accepted and wrong
C: nothing accepted, correct   D: nothing accepted, wrong
plus an optional bonus per accepted draft token, token_bonus * j / K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RewardWeights:
    weight_a: float = 1.0  # accepted a mismatch and still correct: the speed-up we want
    weight_b: float = -1.0  # accepted a mismatch and the answer broke
    weight_c: float = 0.5  # rejected every mismatch, correct: safe but slow
    weight_d: float = 0.0  # rejected every mismatch, wrong: the target's own failure
    token_bonus: float = 0.5  # times j / K, the share of the block's draft tokens kept
    bonus_only_if_correct: bool = True  # a long block that breaks the answer earns nothing


def scenario(accepted: bool, correct: bool) -> str:
    if accepted:
        return "A" if correct else "B"
    return "C" if correct else "D"


def compute_reward(accepted: bool, correct: bool, accept_len: int, block_size: int, weights: RewardWeights) -> float:
    """The reward of one sample."""
    base = {"A": weights.weight_a, "B": weights.weight_b, "C": weights.weight_c, "D": weights.weight_d}
    reward = base[scenario(accepted, correct)]
    if correct or not weights.bonus_only_if_correct:
        reward += weights.token_bonus * accept_len / block_size
    return reward


def compute_reward_tensor(
    accepted: torch.Tensor, correct: torch.Tensor, accept_len: torch.Tensor, block_size: int, weights: RewardWeights
) -> torch.Tensor:
    """compute_reward for many samples at once: bool/long tensors of one shape -> float tensor."""
    reward = torch.where(
        accepted,
        torch.where(correct, weights.weight_a, weights.weight_b),
        torch.where(correct, weights.weight_c, weights.weight_d),
    ).float()
    bonus = weights.token_bonus * accept_len.float() / block_size
    if weights.bonus_only_if_correct:
        bonus = bonus * correct.float()
    return reward + bonus
