"""judge/replay.py: GRPO replayed on labelled mismatches."""

import torch

from spd_lightning.core.reward import RewardWeights
from spd_lightning.judge.head import JudgeHead, JudgeInputs
from spd_lightning.judge.ranking import roc_auc
from spd_lightning.judge.replay import (
    ReplayLabels,
    ReplaySettings,
    center_as_drawn,
    draw_groups,
    play,
    train_replay,
)


def test_an_episode_stops_deciding_after_its_cap_and_takes_the_first_harmful_hybrids_answer():
    # Certain accepts (logit 20) at 4 mismatches; the second and fourth are harmful.
    logits = torch.full((1, 4), 20.0)
    labels = ReplayLabels(
        harmless=torch.tensor([[True, False, True, False]]),
        path_right=torch.tensor([[False, False, False, False]]),
        hybrid_right=torch.tensor([[False, True, False, False]]),
    )
    settings = ReplaySettings(mismatches_per_episode=4, max_forks=2, episodes=3)
    accept, executed, any_, correct, speed = play(logits, labels, settings, torch.Generator().manual_seed(0))
    assert executed[0, 0].tolist() == [True, True, False, False]  # two accepts, then no decision
    assert accept[0, 0].tolist() == [True, True, False, False]
    assert any_.all() and torch.equal(speed, torch.full((1, 3), 0.5))
    assert correct.all()  # the harmful second mismatch's hybrid happens to be right
    uncapped = play(logits, labels, ReplaySettings(mismatches_per_episode=4, episodes=3), torch.Generator())
    assert uncapped[1].all() and torch.equal(uncapped[4], torch.ones(1, 3))
    # Certain rejects: the path's answer decides.
    rejected = play(-logits, labels, settings, torch.Generator().manual_seed(0))
    assert not rejected[2].any() and not rejected[3].any()


def test_against_the_targets_own_answer_only_a_harmful_accept_is_wrong():
    labels = ReplayLabels.against_target(torch.tensor([[True, False]]))
    _, _, _, correct, _ = play(torch.tensor([[20.0, -20.0]]), labels, ReplaySettings(2, episodes=2), torch.Generator())
    assert correct.all()
    _, _, _, correct, _ = play(torch.tensor([[20.0, 20.0]]), labels, ReplaySettings(2, episodes=2), torch.Generator())
    assert not correct.any()


def test_groups_hold_mismatches_of_one_problem_in_response_order():
    problems = [torch.tensor([0, 3, 5, 9]), torch.tensor([10, 11, 14, 20, 21])]
    rows = draw_groups(problems, ReplaySettings(mismatches_per_episode=3, prompts=20), torch.Generator().manual_seed(1))
    assert rows.shape == (20, 3)
    for row in rows:
        assert any(set(row.tolist()) <= set(p.tolist()) for p in problems)
        assert torch.equal(row, row.sort().values)


def _synthetic(n: int = 600, seed: int = 0):
    """Feature 0 says whether a mismatch is harmless; the other 7 are noise. 30 problems."""
    g = torch.Generator().manual_seed(seed)
    harmless = torch.rand(n, generator=g) < 0.6
    tokens = torch.randn(n, 1, 8, generator=g)
    tokens[:, 0, 0] += 2.0 * harmless.float()
    data = JudgeInputs(torch.ones(n, 1, dtype=torch.bool), tokens, None)
    problems = [torch.arange(i, n, 30) for i in range(30)]
    return data, harmless, problems


def _trained(labels: ReplayLabels, data: JudgeInputs, problems, batches: int = 24):
    head = JudgeHead({"tokens": 8}, ("tokens",), hidden=0)
    train = torch.cat(problems[:24])
    head.fit_scaling(data.select(train))
    held = torch.cat(problems[24:])
    settings = ReplaySettings(mismatches_per_episode=4, max_forks=2, batches=batches, seed=3)
    return train_replay(head, data, labels, problems[:24], held, settings, RewardWeights())


def test_the_runs_settings_learn_a_signal_the_outcomes_carry_and_not_one_they_do_not():
    data, harmless, problems = _synthetic()
    trace = _trained(ReplayLabels.against_target(harmless), data, problems)
    assert len(trace.held_auc) == 24 and len(trace.held_logits[-1]) == 6 * 20
    assert trace.held_auc[-1] > 0.8  # the feature's own AUC is about 0.92
    assert all(0 <= p <= 1 for p in trace.accept_prob) and all(0 <= f <= 1 for f in trace.flat_groups)
    shuffled = harmless[torch.randperm(len(harmless), generator=torch.Generator().manual_seed(5))]
    control = _trained(ReplayLabels.against_target(shuffled), data, problems)
    held = torch.cat(problems[24:])
    assert abs(roc_auc(control.held_logits[-1], harmless[held]) - 0.5) < 0.15


def test_centred_as_drawn_the_inputs_average_zero_over_problems_not_rows():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(60, 1, 8, generator=g)
    tokens[:10] += 3.0  # one short problem far from the others
    data = JudgeInputs(torch.ones(60, 1, dtype=torch.bool), tokens, None)
    problems = [torch.arange(0, 10), torch.arange(10, 60)]
    head = JudgeHead({"tokens": 8}, ("tokens",), hidden=0)
    head.fit_scaling(data)
    standardised = lambda m: ((head.features(data.select(m))[:, 0] - head.mean) / head.std).mean(0)  # noqa: E731
    assert standardised(problems[0]).mean() > 0.5  # a batch drawing problems alike sees a shifted mean
    center_as_drawn(head, data, problems)
    drawn = torch.stack([standardised(m) for m in problems]).mean(0)
    assert torch.allclose(drawn, torch.zeros(8), atol=1e-5)
