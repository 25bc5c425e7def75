"""loss=exact: outcome probabilities, the exact expected reward's gradient, unverifiable records."""

from __future__ import annotations

import itertools

import pytest
import torch
from rollouts_from import on_rollouts
from torch.testing import assert_close

from spd_lightning.core.exact import ExactLoss, outcome_mask, outcome_probs
from spd_lightning.core.sampling import all_outcomes, first_reject

T, F = True, False


def brute_force_outcome_probs(probs: torch.Tensor, mismatch: torch.Tensor) -> torch.Tensor:
    """P(j) of one record by enumerating every decision vector over its mismatches. [K], [K] -> [K+1]."""
    k = len(mismatch)
    out = torch.zeros(k + 1, dtype=probs.dtype)
    positions = [i for i in range(k) if mismatch[i]]
    for choice in itertools.product([True, False], repeat=len(positions)):
        decisions = torch.ones(k, dtype=torch.bool)
        weight = torch.ones((), dtype=probs.dtype)
        for i, accept in zip(positions, choice):
            decisions[i] = accept
            weight = weight * (probs[i] if accept else 1 - probs[i])
        out = out + weight * torch.nn.functional.one_hot(first_reject(decisions), k + 1)
    return out


MISMATCH = torch.tensor([[T, F, T, T], [F, F, F, T], [T, T, T, T], [F, T, F, F]])


def test_all_outcomes_lists_each_reachable_first_reject():
    accept_len, possible = all_outcomes(MISMATCH)
    assert possible.tolist()[0] == [T, F, T, T, T]
    assert accept_len.tolist()[0] == [0, 4, 2, 3, 4]  # impossible column 1 points at K
    assert possible.sum(-1).tolist() == [4, 2, 5, 2]  # #mismatches + 1


def test_outcome_probs_match_enumeration_and_sum_to_one():
    torch.manual_seed(0)
    logits = torch.randn(4, 4, dtype=torch.float64)
    accept_len, possible = all_outcomes(MISMATCH)
    got = outcome_probs(logits, accept_len, MISMATCH, possible)  # [B, K+1]
    for b in range(4):
        assert_close(got[b], brute_force_outcome_probs(torch.sigmoid(logits[b]), MISMATCH[b]))
    assert_close(got.sum(-1), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("with_baseline", [True, False])
def test_gradient_is_minus_the_exact_expected_reward_gradient(with_baseline: bool):
    torch.manual_seed(1)
    logits = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    accept_len, possible = all_outcomes(MISMATCH)
    rewards = torch.randn(4, 5, dtype=torch.float64)
    loss_fn = ExactLoss(scale_std=False)
    advantages, _ = loss_fn.advantages(rewards, possible)
    if not with_baseline:
        advantages = rewards * possible
    stats = on_rollouts(loss_fn, logits, logits.detach(), accept_len, MISMATCH, advantages, possible)
    (grad,) = torch.autograd.grad(stats.loss, logits)
    expected = (
        sum(
            (brute_force_outcome_probs(torch.sigmoid(logits[b]), MISMATCH[b]) * rewards[b] * possible[b]).sum()
            for b in range(4)
        )
        / 4
    )
    (want,) = torch.autograd.grad(-expected, logits)
    assert_close(grad, want)
    # Matching positions carry no decision: no gradient there.
    assert grad[~MISMATCH].abs().max() == 0


def test_record_with_an_unverified_outcome_is_left_out():
    accept_len, possible = all_outcomes(MISMATCH[:2])
    verified = torch.tensor([[T, T, T, F, T], [T, T, T, T, T]])  # record 0: outcome j=3 failed
    mask = outcome_mask(verified, possible)
    assert not mask[0].any()
    assert mask[1].tolist() == possible[1].tolist()
    logits = torch.zeros(2, 4, requires_grad=True)
    rewards = torch.tensor([[1.0, 0.0, -1.0, 2.0, 0.5], [0.0, 0.0, 0.0, 1.0, 0.0]])
    loss_fn = ExactLoss()
    advantages, no_signal = loss_fn.advantages(rewards, mask)
    assert no_signal.tolist() == [True, False]
    stats = on_rollouts(loss_fn, logits, logits.detach(), accept_len, MISMATCH[:2], advantages, mask)
    stats.loss.backward()
    assert logits.grad[0].abs().sum() == 0 and logits.grad[1].abs().sum() > 0


def test_kl_needs_reference_and_is_zero_against_itself():
    accept_len, possible = all_outcomes(MISMATCH)
    logits = torch.randn(4, 4)
    adv = torch.zeros(4, 5)
    with pytest.raises(ValueError, match="ref_logits"):
        on_rollouts(ExactLoss(kl_coef=0.1), logits, logits, accept_len, MISMATCH, adv, possible)
    stats = on_rollouts(ExactLoss(kl_coef=0.1), logits, logits, accept_len, MISMATCH, adv, possible, ref_logits=logits)
    assert stats.kl.abs() < 1e-6 and stats.entropy > 0
