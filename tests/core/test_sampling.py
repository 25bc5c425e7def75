"""Decisions with speculative semantics (SPEC.md, "One training step", steps 2-3)."""

import math

import pytest
import torch
from torch.testing import assert_close

from spd_lightning.core.sampling import (
    accepted_any_mismatch,
    changed_at,
    decision_log_probs,
    executed_masks,
    first_reject,
    hybrid_prefix,
    mismatch_mask,
    sample_decisions,
    sequence_log_prob,
    threshold_changing_at_most,
    threshold_decisions,
)

T, F = True, False


def test_mismatch_mask():
    draft = torch.tensor([[5, 6, 7, 8], [1, 1, 1, 1]])
    target = torch.tensor([[5, 9, 7, 0], [1, 1, 1, 1]])
    assert mismatch_mask(draft, target).tolist() == [[F, T, F, T], [F, F, F, F]]


def test_first_reject():
    decisions = torch.tensor([[T, T, T], [F, T, T], [T, F, T], [T, T, F], [F, F, F]])
    # all accepted -> K = 3; otherwise the index of the first False
    assert first_reject(decisions).tolist() == [3, 0, 1, 2, 0]
    assert first_reject(decisions).dtype == torch.long


def test_first_reject_keeps_leading_dims():
    decisions = torch.tensor([[[T, F], [T, T]], [[F, F], [T, T]]])  # [B=2, N=2, K=2]
    assert first_reject(decisions).tolist() == [[1, 2], [0, 2]]


def test_sample_decisions_forces_accept_at_matches():
    # p = 0 everywhere: every mismatch is rejected, every match is still accepted.
    mismatch = torch.tensor([[F, T, F, T]])
    decisions = sample_decisions(torch.zeros(1, 4), mismatch, num_samples=5, generator=torch.Generator().manual_seed(0))
    assert decisions.shape == (1, 5, 4)
    assert decisions.tolist() == [[[T, F, T, F]] * 5]
    # so the block ends at the first mismatch, never at a match
    assert first_reject(decisions).tolist() == [[1] * 5]


def test_sample_decisions_p_one_and_p_zero():
    mismatch = torch.tensor([[T, T, T], [F, T, T]])
    gen = torch.Generator().manual_seed(1)
    ones = sample_decisions(torch.ones(2, 3), mismatch, num_samples=7, generator=gen)
    assert ones.shape == (2, 7, 3)
    assert bool(ones.all())
    assert first_reject(ones).tolist() == [[3] * 7, [3] * 7]
    zeros = sample_decisions(torch.zeros(2, 3), mismatch, num_samples=7, generator=gen)
    # reject at the first mismatch: position 0 for record 0, position 1 for record 1
    assert first_reject(zeros).tolist() == [[0] * 7, [1] * 7]


def test_sample_decisions_empirical_frequency():
    # One set of probs per record, shared by all N samples; record 1 has its own probs.
    probs = torch.tensor([[0.3, 0.8, 0.5], [0.9, 0.1, 0.6]])
    mismatch = torch.ones(2, 3, dtype=torch.bool)
    n = 20000  # binomial std of a frequency <= sqrt(0.25 / 20000) ~ 0.0035
    decisions = sample_decisions(probs, mismatch, num_samples=n, generator=torch.Generator().manual_seed(1234))
    freq = decisions.float().mean(dim=1)  # [B, K]
    assert_close(freq, probs, atol=0.02, rtol=0.0)


def test_sample_decisions_seeded_is_reproducible_and_detached():
    probs = torch.full((1, 4), 0.5, requires_grad=True)
    mismatch = torch.ones(1, 4, dtype=torch.bool)
    a = sample_decisions(probs, mismatch, 50, generator=torch.Generator().manual_seed(7))
    b = sample_decisions(probs, mismatch, 50, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert a.dtype == torch.bool and not a.requires_grad


def test_threshold_decisions():
    probs = torch.tensor([[0.25, 0.5, 0.75, 0.1]])
    mismatch = torch.tensor([[T, T, T, F]])
    # 0.25 < 0.5 rejected; 0.5 == 0.5 accepted (boundary); 0.75 accepted; match always accepted
    assert threshold_decisions(probs, mismatch, 0.5).tolist() == [[F, T, T, T]]
    assert threshold_decisions(probs, mismatch, 0.0).tolist() == [[T, T, T, T]]
    assert threshold_decisions(probs, mismatch, 0.8).tolist() == [[F, F, F, T]]


def test_executed_masks():
    mismatch = torch.tensor([[T, F, T, T]])
    # j = 0 (reject first), 2, 3 (reject mismatches), 4 = K (all accepted)
    accept_len = torch.tensor([[0, 2, 3, 4]])
    accepted, rejected = executed_masks(accept_len, mismatch)
    assert accepted.shape == rejected.shape == (1, 4, 4)
    # accepted: mismatches strictly before j (position 1 is a match: no decision)
    assert accepted[0].tolist() == [
        [F, F, F, F],
        [T, F, F, F],
        [T, F, T, F],
        [T, F, T, T],
    ]
    # rejected: exactly position j, nothing when j == K
    assert rejected[0].tolist() == [
        [T, F, F, F],
        [F, F, T, F],
        [F, F, F, T],
        [F, F, F, F],
    ]


# p = 0.8, 0.3, 0.6, 0.9 at positions 0..3; position 1 is a match.
PROBS = torch.tensor([[0.8, 0.3, 0.6, 0.9]], dtype=torch.float64)
MISMATCH = torch.tensor([[T, F, T, T]])


def test_decision_log_probs_per_position():
    logits = torch.logit(PROBS)
    per_pos = decision_log_probs(logits, torch.tensor([[3]]), MISMATCH)
    # j = 3: accept at 0 (log 0.8), nothing at match 1, accept at 2 (log 0.6), reject at 3 (log 0.1)
    expected = torch.tensor([[[math.log(0.8), 0.0, math.log(0.6), math.log(0.1)]]], dtype=torch.float64)
    assert_close(per_pos, expected)


def test_sequence_log_prob_hand_computed():
    logits = torch.logit(PROBS)
    accept_len = torch.tensor([[3, 0, 2, 4]])
    got = sequence_log_prob(logits, accept_len, MISMATCH)
    expected = torch.tensor(
        [
            [
                math.log(0.8) + math.log(0.6) + math.log(1 - 0.9),  # j=3: -0.2231 - 0.5108 - 2.3026 = -3.0365
                math.log(1 - 0.8),  # j=0: only the reject at 0, -1.6094
                math.log(0.8) + math.log(1 - 0.6),  # j=2: -0.2231 - 0.9163 = -1.1394
                math.log(0.8) + math.log(0.6) + math.log(0.9),  # j=K: no reject term, -0.8393
            ]
        ],
        dtype=torch.float64,
    )
    assert_close(got, expected)
    assert got[0, 0].item() == pytest.approx(-3.036554, abs=1e-5)


def test_log_prob_gradients_zero_after_j_and_at_matches():
    logits = torch.logit(PROBS).requires_grad_(True)
    # d/dx log sigmoid(x) = 1 - p; d/dx log(1 - sigmoid(x)) = -p.
    (grad,) = torch.autograd.grad(sequence_log_prob(logits, torch.tensor([[2]]), MISMATCH).sum(), logits)
    # j = 2: accept at 0 -> 0.2, match 1 -> 0, reject at 2 -> -0.6, after j -> exactly 0
    assert_close(grad, torch.tensor([[0.2, 0.0, -0.6, 0.0]], dtype=torch.float64))
    assert grad[0, 1].item() == 0.0 and grad[0, 3].item() == 0.0
    (grad,) = torch.autograd.grad(sequence_log_prob(logits, torch.tensor([[3]]), MISMATCH).sum(), logits)
    assert_close(grad, torch.tensor([[0.2, 0.0, 0.4, -0.9]], dtype=torch.float64))
    assert grad[0, 1].item() == 0.0
    (grad,) = torch.autograd.grad(sequence_log_prob(logits, torch.tensor([[0]]), MISMATCH).sum(), logits)
    assert_close(grad, torch.tensor([[-0.8, 0.0, 0.0, 0.0]], dtype=torch.float64))
    assert grad[0, 1:].eq(0).all()


def test_accepted_any_mismatch():
    mismatch = torch.tensor([[F, T, T], [F, F, F]])
    # record 0: j=1 rejects the first mismatch after accepting only a match -> False;
    # j=2 and j=3 accepted the mismatch at 1 -> True. record 1: no mismatches at all -> False.
    accept_len = torch.tensor([[1, 2, 3], [3, 3, 3]])
    assert accepted_any_mismatch(accept_len, mismatch).tolist() == [[F, T, T], [F, F, F]]


def test_hybrid_prefix():
    context, draft, target = [1, 2], [10, 11, 12], [20, 21, 22]
    assert hybrid_prefix(context, draft, target, 0) == [1, 2, 20]  # reject at 0: target token only
    assert hybrid_prefix(context, draft, target, 2) == [1, 2, 10, 11, 22]  # draft[:2] + target[2]
    assert hybrid_prefix(context, draft, target, 3) == [1, 2, 10, 11, 12]  # j == K: no target token
    assert context == [1, 2]  # inputs are not mutated


@pytest.mark.parametrize(
    "tolerance,changed",
    [(0.0, 0), (0.2, 1), (0.39, 1), (0.4, 2), (0.6, 3), (0.8, 4), (0.99, 4)],
)
def test_the_lowest_threshold_within_a_tolerance_changes_at_most_that_share(tolerance: float, changed: int):
    # Five generations: one met no mismatch (None), so no threshold changes it.
    watched = [None, 0.5, 0.99999994, 1.0, 0.3]
    threshold = threshold_changing_at_most(watched, tolerance)
    assert changed_at(watched, threshold) == changed <= math.floor(tolerance * 5)
    # ... and it is the lowest such threshold: one float step lower changes more, unless all already change.
    lower = math.nextafter(threshold, -math.inf)
    assert changed == 4 or changed_at(watched, lower) > changed


def test_no_threshold_at_or_below_one_keeps_a_probability_of_one():
    threshold = threshold_changing_at_most([1.0, 0.2], 0.0)
    assert threshold > 1.0 and changed_at([1.0, 0.2], threshold) == 0  # the policy is standard SD
    assert changed_at([1.0, 0.2], 1.0) == 1
