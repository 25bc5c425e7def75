"""Training-free rules: features from hand-made logits, decisions only at mismatches."""

from __future__ import annotations

import math

import pytest
import torch

from spd_lightning.core.rules import (
    TokenFeatures,
    entropy_decisions,
    kl_decisions,
    quantile_thresholds,
    token_features,
    topk_decisions,
)

# One record, K=2, V=4. Position 0: target p = (1/2, 1/4, 1/8, 1/8), draft uniform.
# Position 1: the target is certain of token 0 (the others have probability 0), draft (1/2, 1/2, 0+, 0+).
TARGET_P0 = [0.5, 0.25, 0.125, 0.125]
NEG_INF = float("-inf")


def hand_logits():
    target = torch.tensor([[[math.log(p) for p in TARGET_P0], [0.0, NEG_INF, NEG_INF, NEG_INF], [0.0] * 4]])
    draft = torch.tensor([[[0.0] * 4, [0.0, 0.0, -30.0, -30.0], [0.0] * 4]])  # [1, K+1, V]
    return target, draft


def test_features_match_hand_computation():
    target, draft = hand_logits()
    f = token_features(target, draft, torch.tensor([[2, 1]]))
    # Position 0: tokens 0 and 1 are more likely than the draft's token 2; token 3 ties, not counted.
    assert f.rank.tolist() == [[2, 1]]
    entropy0 = -sum(p * math.log(p) for p in TARGET_P0)  # 1.75 bits = 1.213 nats
    assert f.target_entropy[0, 0].item() == pytest.approx(entropy0, abs=1e-5)
    # KL(target || uniform) = log V - H(target).
    assert f.kl[0, 0].item() == pytest.approx(math.log(4) - entropy0, abs=1e-5)
    assert f.target_top1[0, 0].item() == pytest.approx(0.5)
    # Position 1: tokens of probability 0 add nothing (no nan); KL = -log p_draft(0) = log 2.
    assert f.target_entropy[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    assert f.kl[0, 1].item() == pytest.approx(math.log(2), abs=1e-5)
    assert f.target_top1[0, 1].item() == pytest.approx(1.0)
    assert not any(torch.isnan(getattr(f, name)).any() for name in ("target_entropy", "kl"))


def test_vocabularies_padded_to_different_sizes_are_cut_to_the_shared_part():
    target, draft = hand_logits()
    padded = torch.cat([draft, torch.full((1, 3, 2), -50.0)], dim=-1)  # the draft pads 2 extra rows
    a = token_features(target, draft, torch.tensor([[2, 1]]))
    b = token_features(target, padded, torch.tensor([[2, 1]]))
    assert torch.allclose(a.kl, b.kl) and torch.equal(a.rank, b.rank)


def test_features_concatenate_over_batches():
    target, draft = hand_logits()
    f = token_features(target, draft, torch.tensor([[2, 1]]))
    both = TokenFeatures.cat([f, f])
    assert both.rank.shape == (2, 2) and torch.equal(both.kl[1], f.kl[0])


MISMATCH = torch.tensor([[True, False, True, True]])


def test_topk_accepts_mismatches_in_the_target_top_k_only():
    rank = torch.tensor([[1, 7, 3, 0]])  # position 1 is a match: accepted whatever its rank
    assert topk_decisions(rank, MISMATCH, 2).tolist() == [[True, True, False, True]]
    assert topk_decisions(rank, MISMATCH, 4).tolist() == [[True, True, True, True]]
    assert topk_decisions(rank, MISMATCH, 1).tolist() == [[False, True, False, True]]


def test_kl_accepts_small_divergence_unless_the_target_is_confident():
    kl = torch.tensor([[0.1, 9.0, 0.5, 0.05]])
    top1 = torch.tensor([[0.5, 0.5, 0.5, 0.95]])
    assert kl_decisions(kl, MISMATCH, 0.2).tolist() == [[True, True, False, True]]
    # The confidence mask: position 3's target is 95% sure of its own token, so it verifies strictly.
    assert kl_decisions(kl, MISMATCH, 0.2, top1, 0.9).tolist() == [[True, True, False, False]]


def test_entropy_accepts_where_the_target_is_unsure():
    entropy = torch.tensor([[1.1, 0.0, 0.01, 2.0]])
    assert entropy_decisions(entropy, MISMATCH, 1.0).tolist() == [[True, True, False, True]]
    assert entropy_decisions(entropy, MISMATCH, 5.0).tolist() == [[False, True, False, False]]  # standard SD


def test_quantile_thresholds_read_mismatch_positions_only():
    values = torch.tensor([[100.0, 5.0], [1.0, 3.0]])
    mismatch = torch.tensor([[False, True], [True, True]])
    assert quantile_thresholds(values, mismatch, 1) == [3.0]  # the median of 5, 1, 3; 100 is a match
    assert quantile_thresholds(values, mismatch, 3) == pytest.approx([2.0, 3.0, 4.0])
    assert quantile_thresholds(values, torch.zeros_like(mismatch), 3) == []
