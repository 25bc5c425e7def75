"""GRPO over accept/reject decisions (SPEC.md, "One training step", step 7)."""

import math

import pytest
import torch
from rollouts_from import on_rollouts
from torch.testing import assert_close

from spd_lightning.core.grpo import GRPOLoss, bernoulli_entropy, bernoulli_kl, group_advantages

T, F = True, False
SQRT3 = math.sqrt(3.0)


def logit(p):
    return torch.logit(torch.tensor(p, dtype=torch.float64))


# ---------------------------------------------------------------- group_advantages


def test_advantages_scaled_by_unbiased_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    valid = torch.ones(1, 4, dtype=torch.bool)
    # mean 0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 1/sqrt(3) -> adv = +-0.5 * sqrt(3) = +-0.8660
    adv, zero_var = group_advantages(rewards, valid, scale_std=True, eps=0.0)
    h = 0.5 * SQRT3
    assert_close(adv, torch.tensor([[h, -h, -h, h]], dtype=torch.float64))
    assert zero_var.tolist() == [False]
    # default eps = 1e-6 in the denominator: 0.5 / (1/sqrt(3) + 1e-6)
    adv, _ = group_advantages(rewards, valid)
    assert adv[0, 0].item() == pytest.approx(0.5 / (1 / SQRT3 + 1e-6), rel=1e-9)


def test_advantages_mean_centred_only():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 4.0, 0.0, 6.0]])
    valid = torch.ones(2, 4, dtype=torch.bool)
    adv, zero_var = group_advantages(rewards, valid, scale_std=False)
    # row 1: mean 3 -> -1, 1, -3, 3
    assert_close(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5], [-1.0, 1.0, -3.0, 3.0]]))
    assert zero_var.tolist() == [False, False]


def test_single_valid_sample_and_equal_rewards_carry_no_signal():
    rewards = torch.tensor([[3.0, 1.0, 2.0], [0.5, 0.5, 0.5], [1.0, 0.0, 1.0], [7.0, 9.0, 9.0]])
    valid = torch.tensor([[T, F, F], [T, T, T], [T, T, T], [F, T, T]])
    # row 0: one valid sample; row 1: all equal; row 2: signal; row 3: the valid ones are equal
    for scale_std in (True, False):
        adv, zero_var = group_advantages(rewards, valid, scale_std=scale_std)
        assert zero_var.tolist() == [True, True, False, True]
        assert adv[[0, 1, 3]].eq(0).all()
        assert adv[2].abs().sum() > 0


def test_no_valid_sample_is_flagged_and_finite():
    adv, zero_var = group_advantages(torch.tensor([[1.0, 2.0]]), torch.tensor([[F, F]]))
    assert zero_var.tolist() == [True]
    assert adv.tolist() == [[0.0, 0.0]]


def test_invalid_samples_excluded_from_mean_and_std():
    rewards = torch.tensor([[1.0, 0.0, 100.0]], dtype=torch.float64)
    valid = torch.tensor([[T, T, F]])
    # over [1, 0]: mean 0.5, unbiased var = 0.5 / 1, std = 1/sqrt(2) -> +-0.5 * sqrt(2) = +-0.7071
    adv, zero_var = group_advantages(rewards, valid, eps=0.0)
    r = 0.5 * math.sqrt(2.0)
    assert_close(adv, torch.tensor([[r, -r, 0.0]], dtype=torch.float64))
    assert zero_var.tolist() == [False]
    adv, _ = group_advantages(rewards, valid, scale_std=False)
    assert_close(adv, torch.tensor([[0.5, -0.5, 0.0]], dtype=torch.float64))


# ---------------------------------------------------------------- Bernoulli KL and entropy


def test_bernoulli_kl_closed_form():
    got = bernoulli_kl(logit(0.7), logit(0.4)).item()
    # 0.7 ln(0.7/0.4) + 0.3 ln(0.3/0.6) = 0.391731 - 0.207944 = 0.183787
    assert got == pytest.approx(0.7 * math.log(0.7 / 0.4) + 0.3 * math.log(0.3 / 0.6), rel=1e-9)
    assert got == pytest.approx(0.183787, abs=1e-6)
    # KL is asymmetric: KL(0.4 || 0.7) = 0.4 ln(4/7) + 0.6 ln(2) = -0.223846 + 0.415888 = 0.192042
    assert bernoulli_kl(logit(0.4), logit(0.7)).item() == pytest.approx(0.192042, abs=1e-6)


def test_bernoulli_kl_zero_when_equal_and_non_negative():
    x = torch.linspace(-6, 6, 25, dtype=torch.float64)
    assert_close(bernoulli_kl(x, x), torch.zeros_like(x))
    p, q = torch.meshgrid(x, x, indexing="ij")
    assert (bernoulli_kl(p, q) >= -1e-12).all()


def test_bernoulli_entropy():
    assert bernoulli_entropy(torch.tensor(0.0)).item() == pytest.approx(math.log(2))
    # p = 0.9: -(0.9 ln 0.9 + 0.1 ln 0.1) = 0.094824 + 0.230259 = 0.325083
    assert bernoulli_entropy(logit(0.9)).item() == pytest.approx(0.325083, abs=1e-6)
    assert bernoulli_entropy(logit(0.1)).item() == pytest.approx(0.325083, abs=1e-6)


# ---------------------------------------------------------------- GRPOLoss


def test_on_policy_loss_is_minus_mean_advantage_over_executed_decisions():
    logits = torch.zeros(1, 2, dtype=torch.float64)
    mismatch = torch.tensor([[T, T]])
    # sample 0 accepts both (2 decisions, adv +1); sample 1 rejects at 0 (1 decision, adv -1)
    stats = on_rollouts(
        GRPOLoss(),
        logits,
        logits.clone(),
        torch.tensor([[2, 0]]),
        mismatch,
        torch.tensor([[1.0, -1.0]]),
        torch.tensor([[T, T]]),
    )
    # ratio = 1 everywhere: policy_loss = -(1 + 1 - 1) / 3
    assert stats.policy_loss.item() == pytest.approx(-1 / 3)
    assert stats.loss.item() == pytest.approx(-1 / 3)
    assert stats.num_decisions.item() == 3
    assert stats.clip_fraction.item() == 0.0
    assert stats.kl.item() == 0.0


def test_positive_advantage_on_accepted_mismatch_raises_its_logit():
    logits = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    mismatch = torch.tensor([[T, T]])
    # j = 1: accepted the mismatch at 0, rejected at 1; adv +1
    stats = on_rollouts(
        GRPOLoss(), logits, logits.detach(), torch.tensor([[1]]), mismatch, torch.tensor([[1.0]]), torch.tensor([[T]])
    )
    (grad,) = torch.autograd.grad(stats.loss, logits)
    # loss = -(r0 + r1) / 2; dr/dx = (1-p) = 0.5 for accept, -p = -0.5 for reject
    assert_close(grad, torch.tensor([[-0.25, 0.25]], dtype=torch.float64))
    stepped = logits.detach() - 1.0 * grad  # one gradient-descent step
    assert torch.sigmoid(stepped[0, 0]) > 0.5  # accepting the helpful mismatch became likelier
    assert torch.sigmoid(stepped[0, 1]) < 0.5  # and so did rejecting at position 1


def test_clipping_stops_the_gradient():
    # position 0: p = 0.8 now, 0.5 when sampled -> ratio 1.6 > 1.2 with adv > 0 -> clipped
    # position 1: unchanged, ratio 1
    logits = torch.stack([logit(0.8), logit(0.5)]).unsqueeze(0).requires_grad_(True)
    old = torch.zeros(1, 2, dtype=torch.float64)
    stats = on_rollouts(
        GRPOLoss(clip_low=0.2, clip_high=0.2),
        logits,
        old,
        torch.tensor([[1]]),
        torch.tensor([[T, T]]),
        torch.tensor([[1.0]]),
        torch.tensor([[T]]),
    )
    (grad,) = torch.autograd.grad(stats.loss, logits)
    assert grad[0, 0].item() == 0.0
    assert grad[0, 1].item() == pytest.approx(0.25)  # -(1/2) * 1 * (-p), p = 0.5
    assert stats.clip_fraction.item() == pytest.approx(0.5)  # 1 of 2 executed decisions
    assert stats.policy_loss.item() == pytest.approx(-(1.2 + 1.0) / 2)


def test_clipping_for_negative_advantage():
    # rejected at 0 with p: 0.5 -> 0.8, so ratio (1-0.8)/(1-0.5) = 0.4 < 0.8 with adv < 0 -> clipped
    logits = logit(0.8).reshape(1, 1).requires_grad_(True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    stats = on_rollouts(
        GRPOLoss(), logits, old, torch.tensor([[0]]), torch.tensor([[T]]), torch.tensor([[-1.0]]), torch.tensor([[T]])
    )
    (grad,) = torch.autograd.grad(stats.loss, logits)
    assert grad.item() == 0.0
    assert stats.clip_fraction.item() == 1.0
    assert stats.policy_loss.item() == pytest.approx(0.8)  # -min(0.4 * -1, 0.8 * -1)


# K = 3, all mismatches; sample 0 rejects at 0, sample 1 accepts 0 and rejects at 1; position 2 never runs.
KL_P = [0.7, 0.5, 0.9]
KL_ACCEPT_LEN = torch.tensor([[0, 1]])
KL_MISMATCH = torch.tensor([[T, T, T]])


def test_kl_zero_against_itself():
    logits = torch.stack([logit(p) for p in KL_P]).unsqueeze(0)
    stats = on_rollouts(
        GRPOLoss(kl_coef=0.5),
        logits,
        logits,
        KL_ACCEPT_LEN,
        KL_MISMATCH,
        torch.tensor([[1.0, -1.0]]),
        torch.tensor([[T, T]]),
        ref_logits=logits.clone(),
    )
    assert stats.kl.item() == pytest.approx(0.0, abs=1e-12)
    assert stats.loss.item() == pytest.approx(stats.policy_loss.item())


def test_kl_is_exact_mean_over_executed_decisions():
    logits = torch.stack([logit(p) for p in KL_P]).unsqueeze(0)
    ref = torch.stack([logit(q) for q in [0.4, 0.5, 0.1]]).unsqueeze(0)  # position 2 differs but never runs
    stats = on_rollouts(
        GRPOLoss(kl_coef=0.5),
        logits,
        logits,
        KL_ACCEPT_LEN,
        KL_MISMATCH,
        torch.tensor([[1.0, -1.0]]),
        torch.tensor([[T, T]]),
        ref_logits=ref,
    )
    # executed: position 0 twice (KL(0.7||0.4) = 0.183787), position 1 once (KL = 0) -> 2 * 0.183787 / 3
    assert stats.num_decisions.item() == 3
    assert stats.kl.item() == pytest.approx(2 * 0.1837869 / 3, abs=1e-6)
    assert stats.loss.item() == pytest.approx(stats.policy_loss.item() + 0.5 * stats.kl.item())


def test_entropy_bonus_lowers_the_loss():
    # only position 0 runs (rejected at 0), p = 0.5 there -> entropy ln 2; position 1 (p = 0.9) is ignored
    logits = torch.stack([logit(0.5), logit(0.9)]).unsqueeze(0)
    args = (logits, logits, torch.tensor([[0]]), torch.tensor([[T, T]]), torch.tensor([[1.0]]), torch.tensor([[T]]))
    plain = on_rollouts(GRPOLoss(), *args)
    bonus = on_rollouts(GRPOLoss(entropy_coef=0.1), *args)
    assert bonus.entropy.item() == pytest.approx(math.log(2))
    assert plain.loss.item() == pytest.approx(-1.0)  # on-policy, one decision, adv 1
    assert bonus.loss.item() == pytest.approx(-1.0 - 0.1 * math.log(2))


def test_invalid_samples_contribute_nothing():
    logits = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    # sample 0 valid, accepts both (adv 1); sample 1 failed verification, huge advantage
    stats = on_rollouts(
        GRPOLoss(),
        logits,
        logits.detach(),
        torch.tensor([[2, 0]]),
        torch.tensor([[T, T]]),
        torch.tensor([[1.0, 50.0]]),
        torch.tensor([[T, F]]),
    )
    assert stats.num_decisions.item() == 2
    assert stats.policy_loss.item() == pytest.approx(-1.0)
    (grad,) = torch.autograd.grad(stats.loss, logits)
    # only sample 0: -(1/2) * 1 * (1 - 0.5) at both positions
    assert_close(grad, torch.tensor([[-0.25, -0.25]], dtype=torch.float64))


def test_all_invalid_gives_zero_loss_and_no_decisions():
    logits = torch.zeros(1, 2, requires_grad=True)
    stats = on_rollouts(
        GRPOLoss(),
        logits,
        logits.detach(),
        torch.tensor([[2, 0]]),
        torch.tensor([[T, T]]),
        torch.tensor([[1.0, -1.0]]),
        torch.tensor([[F, F]]),
    )
    assert stats.num_decisions.item() == 0
    assert stats.loss.item() == 0.0 and math.isfinite(stats.loss.item())
