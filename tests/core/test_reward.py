"""The four-scenario reward (SPEC.md, "One training step", step 6)."""

import itertools

import pytest
import torch

from spd_lightning.core.reward import RewardWeights, compute_reward, compute_reward_tensor, scenario

T, F = True, False
K = 4
DEFAULT = RewardWeights()  # A=1, B=-1, C=0.5, D=0, token_bonus=0.5, bonus_only_if_correct=True
CUSTOM = RewardWeights(weight_a=2.0, weight_b=-3.0, weight_c=0.25, weight_d=-0.5, token_bonus=1.0)


def test_default_weights_are_what_the_docs_say():
    assert (DEFAULT.weight_a, DEFAULT.weight_b, DEFAULT.weight_c, DEFAULT.weight_d) == (1.0, -1.0, 0.5, 0.0)
    assert DEFAULT.token_bonus == 0.5 and DEFAULT.bonus_only_if_correct is True


@pytest.mark.parametrize(
    "accepted, correct, name",
    [(True, True, "A"), (True, False, "B"), (False, True, "C"), (False, False, "D")],
)
def test_scenario(accepted, correct, name):
    assert scenario(accepted, correct) == name


@pytest.mark.parametrize(
    "accepted, correct, j, expected",
    [
        (True, True, 2, 1.0 + 0.5 * 2 / 4),  # A: 1 + bonus 0.25 = 1.25
        (True, True, 4, 1.0 + 0.5),  # A, whole block kept: 1.5
        (True, False, 2, -1.0),  # B: wrong, so no bonus
        (False, True, 0, 0.5),  # C, rejected at 0: no bonus
        (False, True, 2, 0.5 + 0.5 * 2 / 4),  # C after two matches: 0.75
        (False, False, 1, 0.0),  # D: wrong, no bonus
    ],
)
def test_default_weights(accepted, correct, j, expected):
    assert compute_reward(accepted, correct, j, K, DEFAULT) == pytest.approx(expected)


@pytest.mark.parametrize(
    "accepted, correct, j, expected",
    [
        (True, True, 3, 2.0 + 1.0 * 3 / 4),  # A: 2.75
        (True, False, 3, -3.0),  # B
        (False, True, 0, 0.25),  # C
        (False, True, 1, 0.25 + 1.0 * 1 / 4),  # C after a match: 0.5
        (False, False, 0, -0.5),  # D
    ],
)
def test_custom_weights(accepted, correct, j, expected):
    assert compute_reward(accepted, correct, j, K, CUSTOM) == pytest.approx(expected)


def test_bonus_for_wrong_samples_only_when_allowed():
    always = RewardWeights(bonus_only_if_correct=False)
    # B with j=2: -1 + 0.5 * 2/4 = -0.75 ; D with j=1: 0 + 0.5 * 1/4 = 0.125
    assert compute_reward(True, False, 2, K, always) == pytest.approx(-0.75)
    assert compute_reward(False, False, 1, K, always) == pytest.approx(0.125)
    # the default withholds it
    assert compute_reward(True, False, 2, K, DEFAULT) == pytest.approx(-1.0)
    assert compute_reward(False, False, 1, K, DEFAULT) == pytest.approx(0.0)
    # correct samples get it either way: A with j=4 -> 1 + 0.5
    assert compute_reward(True, True, 4, K, always) == pytest.approx(1.5)


def test_zero_token_bonus_gives_the_bare_weights():
    w = RewardWeights(token_bonus=0.0, bonus_only_if_correct=False)
    assert [compute_reward(a, c, 4, K, w) for a, c in [(T, T), (T, F), (F, T), (F, F)]] == [1.0, -1.0, 0.5, 0.0]


@pytest.mark.parametrize(
    "weights", [DEFAULT, CUSTOM, RewardWeights(bonus_only_if_correct=False)], ids=["default", "custom", "bonus_always"]
)
def test_tensor_matches_scalar_on_every_combination(weights):
    combos = list(itertools.product([False, True], [False, True], range(K + 1)))
    accepted = torch.tensor([a for a, _, _ in combos])
    correct = torch.tensor([c for _, c, _ in combos])
    accept_len = torch.tensor([j for _, _, j in combos])
    got = compute_reward_tensor(accepted, correct, accept_len, K, weights)
    assert got.shape == (len(combos),) and got.is_floating_point()
    for i, (a, c, j) in enumerate(combos):
        assert got[i].item() == pytest.approx(compute_reward(a, c, j, K, weights)), (a, c, j)


def test_tensor_keeps_shape_and_hand_values():
    accepted = torch.tensor([[T, T], [F, F]])
    correct = torch.tensor([[T, F], [T, F]])
    accept_len = torch.tensor([[4, 3], [0, 2]])
    got = compute_reward_tensor(accepted, correct, accept_len, K, DEFAULT)
    # A j=4: 1.5 ; B: -1 ; C j=0: 0.5 ; D: 0
    torch.testing.assert_close(got, torch.tensor([[1.5, -1.0], [0.5, 0.0]]))
