"""judge/ranking.py: labels from a completion store, ROC-AUC and its interval, folds of problems."""

import itertools
import math

import pytest
import torch

from spd_lightning.judge.ranking import (
    accepted_outcomes,
    agreed_after,
    auc_interval,
    average_ranks,
    cross_validated,
    harmless,
    problem_folds,
    roc_auc,
    roc_curve,
    stored_completion,
    stored_path,
    stored_root,
)

PROMPT = (1, 2)
# The prompt's response 5 6 7 8 #; at 6 a policy accepted the draft's 9 (the target went on 7 0 #),
# then at the path's 0 another mismatch was met and not accepted.
STORE = {PROMPT: [5, 6, 7, 8, 99], PROMPT + (5, 9): [7, 0, 99]}


def test_the_path_through_a_context_is_its_deepest_stored_prefix_and_its_completion():
    assert stored_path(STORE, PROMPT + (5,)) == PROMPT + (5, 6, 7, 8, 99)
    assert stored_path(STORE, PROMPT + (5, 9, 7)) == PROMPT + (5, 9, 7, 0, 99)
    assert stored_path(STORE, PROMPT + (5, 9, 7, 0, 99)) is None  # nothing stored runs past its end
    assert stored_root(STORE, PROMPT + (5, 9, 7)) == PROMPT
    assert stored_root(STORE, (3,)) is None


def test_only_accepted_mismatches_with_both_branches_stored_are_outcomes():
    keys = [(list(PROMPT + (5,)), 9), (list(PROMPT + (5, 9, 7)), 4), ((4, 4), 1)]
    outcomes = accepted_outcomes(STORE, keys)
    assert [o.row for o in outcomes] == [0]  # the second was not accepted, the third is nobody's
    (o,) = outcomes
    assert o.problem == PROMPT and o.at == 3
    assert o.path == PROMPT + (5, 6, 7, 8, 99) and o.hybrid == PROMPT + (5, 9, 7, 0, 99)
    # Both responses reach the label without the prompt: the answers are the last numbers.
    seen = []
    labels = harmless(outcomes, lambda hybrid, path: seen.append((hybrid, path)) or hybrid[-2] == path[-2])
    assert seen == [((5, 9, 7, 0, 99), (5, 6, 7, 8, 99))]
    assert labels.tolist() == [False]


def test_completions_stored_a_segment_at_a_time_are_followed_and_a_hybrid_left_part_way_is_no_outcome():
    # STORE's paths in segments of two; a second hybrid (8 for the path's 7) was left after 8 1.
    store = {PROMPT: [5, 6, 7, 8, 99], PROMPT + (5, 9): [7, 0], PROMPT + (5, 9, 7, 0): [99], PROMPT + (5, 6, 8): [8, 1]}
    assert stored_completion(store, PROMPT + (5, 9)) == (7, 0, 99)
    assert stored_path(store, PROMPT + (5, 9, 7)) == PROMPT + (5, 9, 7, 0, 99)
    keys = [(PROMPT + (5,), 9), (PROMPT + (5, 6), 8)]
    whole = lambda prompt, ids: ids[-1] == 99  # noqa: E731  # ended (no budget reached here)
    assert [o.row for o in accepted_outcomes(store, keys)] == [0, 1]  # read as whole: the second's answer is wrong
    (o,) = accepted_outcomes(store, keys, whole)
    assert o.row == 0 and o.hybrid == PROMPT + (5, 9, 7, 0, 99)


def test_agreement_after_a_mismatch_counts_the_draft_tokens_the_target_takes_next():
    (o,) = accepted_outcomes(STORE, [(PROMPT + (5,), 9)])  # hybrid response 5 9 7 0 99, the mismatch at 9
    # proposals[p]: the draft's token after p response tokens; p = 2, 3, 4 predict the 7, the 0, the end.
    assert agreed_after(o, [5, 9, 7, 0, 99], window=8) == 3  # the 7, the 0 and the end, then the hybrid ends
    assert agreed_after(o, [5, 9, 7, 1, 99], window=8) == 1
    assert agreed_after(o, [5, 9, 4, 0, 99], window=8) == 0
    assert agreed_after(o, [5, 9, 7, 0, 99], window=1) == 1
    assert agreed_after(o, [5, 9], window=8) is None  # not computed that far


def test_a_key_whose_draft_token_is_the_targets_own_is_no_mismatch():
    store = {PROMPT: [5, 6], PROMPT + (5,): [6]}
    assert accepted_outcomes(store, [(PROMPT, 5)]) == []


def test_auc_counts_pairs_and_halves_ties():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40,), generator=generator).double()  # many ties
    labels = torch.rand(40, generator=generator) < 0.4
    pairs = [(p, n) for p, n in itertools.product(scores[labels], scores[~labels])]
    brute = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)
    assert roc_auc(scores, labels) == pytest.approx(brute)
    assert roc_auc(torch.tensor([3.0, 2, 1]), torch.tensor([True, True, False])) == 1.0
    assert roc_auc(torch.tensor([-torch.inf, 2, 1]), torch.tensor([True, False, False])) == 0.0
    assert roc_auc(torch.ones(4), torch.tensor([True, False, True, False])) == 0.5
    assert math.isnan(roc_auc(torch.ones(3), torch.ones(3, dtype=torch.bool)))  # one class: no pairs


def test_average_ranks_share_ties():
    assert average_ranks(torch.tensor([10.0, 20, 10, -torch.inf])).tolist() == [2.5, 4.0, 2.5, 1.0]


def test_the_roc_curve_runs_corner_to_corner_and_its_area_is_the_auc():
    generator = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 8, (60,), generator=generator).double()
    labels = torch.rand(60, generator=generator) < 0.5
    fpr, tpr = roc_curve(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert bool((fpr.diff() >= 0).all() and (tpr.diff() >= 0).all())
    assert torch.trapezoid(tpr, fpr).item() == pytest.approx(roc_auc(scores, labels))


def test_the_interval_resamples_whole_problems_and_holds_the_estimate():
    generator = torch.Generator().manual_seed(2)
    labels = torch.rand(300, generator=generator) < 0.5
    scores = labels.double() + torch.randn(300, generator=generator)
    groups = torch.arange(300) // 10
    low, high = auc_interval(scores, labels, groups, reps=200)
    assert low < roc_auc(scores, labels) < high and high - low < 0.2
    # One problem holding everything: every resample is the sample itself.
    assert auc_interval(scores, labels, torch.zeros(300), reps=20) == pytest.approx((roc_auc(scores, labels),) * 2)


def test_folds_keep_a_problem_whole_and_fits_never_see_their_held_out_rows():
    groups = torch.arange(50) // 5  # 10 problems of 5 mismatches
    folds = problem_folds(groups, 3)
    assert all(len(set(folds[groups == g].tolist())) == 1 for g in range(10))
    assert set(folds.tolist()) == {0, 1, 2}

    def fit_and_score(train, held):
        assert not set(train.tolist()) & set(held.tolist())
        assert set(folds[train].tolist()).isdisjoint(folds[held].tolist())
        return held.double()

    assert cross_validated(fit_and_score, folds, 50).tolist() == list(range(50))
