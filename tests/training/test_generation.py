"""GRPO on whole generations (rollout=generation): the loss reaches every decision of every
episode, and on the default world the scorer learns to beat standard SD at its accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spd_lightning.core.generation_grpo import GenerationGRPOLoss, decision_chance, generation_rewards, speed_term
from spd_lightning.core.reward import RewardWeights
from spd_lightning.reporting.names import val_key
from spd_lightning.tasks.train import train


def test_every_decision_of_every_episode_gets_a_gradient_of_its_advantages_sign():
    loss = GenerationGRPOLoss(num_episodes=2)
    logits = torch.zeros(5, requires_grad=True)  # [D]
    accepted = torch.tensor([True, False, True, True, False])  # [D]
    episode = torch.tensor([0, 0, 1, 2, 3])  # decisions of episodes 0 (two), 1, 2, 3
    advantages = torch.tensor([[1.0, -1.0], [0.5, -0.5]])  # [P, G]: episodes 0, 1 | 2, 3
    loss(logits, logits.detach(), accepted, episode, advantages).loss.backward()
    grad = logits.grad
    assert (grad != 0).all()  # a generation goes on after a rejection: every decision counts
    # Gradient descent raises the logit of an accept with a positive advantage, lowers a reject's.
    assert grad[0] < 0 and grad[1] > 0  # episode 0, advantage +1: keep what it did
    assert grad[2] > 0  # episode 1, advantage -1, accepted: less likely now
    assert grad[4] < 0  # episode 3, advantage -0.5, rejected: accepting becomes likelier


def test_the_generation_reward_pays_speed_only_when_the_answer_holds():
    weights = RewardWeights(weight_a=1.0, weight_b=-1.0, weight_c=0.5, weight_d=0.0, token_bonus=0.5)
    calls, tokens = torch.tensor([4, 8, 4]), torch.tensor([16, 16, 16])
    speed = speed_term("calls_saved", calls, tokens, torch.tensor([0.5, 0.5, 0.5]), torch.zeros(3), torch.ones(3))
    assert torch.allclose(speed, torch.tensor([0.5, 0.0, 0.5]))  # 0.25 calls/token against SD's 0.5
    rewards = generation_rewards(torch.tensor([True, False, True]), torch.tensor([True, True, False]), speed, weights)
    assert torch.allclose(rewards, torch.tensor([1.25, 0.5, -1.0]))


def test_a_capped_episode_decides_at_a_responses_first_mismatches_most_often():
    order = torch.arange(6)
    # Cap 2, p = 0.5: decide at the n-th mismatch while fewer than 2 of the n before were accepted.
    expected = torch.tensor([1.0, 1.0, 0.75, 0.5, 5 / 16, 6 / 32], dtype=torch.float64)
    assert torch.allclose(decision_chance(order, 2, 0.5), expected)
    assert torch.allclose(decision_chance(order, 1, 0.2), 0.8 ** order.double())  # the first accept ends them
    assert (decision_chance(order, None, 0.5) == 1).all()  # no cap: every mismatch met is decided


def test_the_judges_inputs_are_centred_where_capped_episodes_decide(toy_world: Path, tmp_path: Path, compose_train):
    from spd_lightning.decoding.episodes import mismatches_along
    from spd_lightning.tasks.train import build_components

    means = {}
    for center in ("drawn", "all"):
        overrides = [f"toy.out={toy_world}", "rollout=generation", "model=judge", "~logger",
                     "rollout.max_forks=1", f"rollout.center={center}"]  # fmt: skip
        datamodule, module = build_components(compose_train(overrides, tmp_path / center))
        module._trainer = type("FitStub", (), {"datamodule": datamodule})()
        module._fit_judge_scaling()
        means[center] = module.scorer.head.mean.clone()
        prompts = [p for p, _ in datamodule.train_records]
        met = mismatches_along(prompts, module.source.paths(prompts, [()] * len(prompts)))
        inputs = module.features.get([p for p, _ in met], [a for _, a in met]).judge_inputs()
        x = module.scorer.head.features(inputs)[:, 0]  # [M, D]
    assert torch.allclose(means["all"], x.mean(0).float(), atol=1e-5)
    assert not torch.allclose(means["drawn"], means["all"], atol=1e-3)  # the first mismatches weigh more


def test_with_one_decision_the_episodes_of_a_prompt_decide_at_one_shared_mismatch(
    toy_world: Path, tmp_path: Path, compose_train, monkeypatch
):
    from spd_lightning.training import generation

    calls = []
    run = generation.run_episodes
    monkeypatch.setattr(generation, "run_episodes",
                        lambda prompts, decide, source, k, limits: calls.append((prompts, limits, run(
                            prompts, decide, source, k, limits=limits))) or calls[-1][2])  # fmt: skip
    overrides = [f"toy.out={toy_world}", "rollout=generation", "~logger", "rollout.decisions=one",
                 "trainer.max_steps=2", "trainer.val_check_interval=2", "validate_before_fit=false"]  # fmt: skip
    train(compose_train(overrides, tmp_path))
    trained = [(prompts, limits, episodes) for prompts, limits, episodes in calls if limits.decide_at is not None]
    assert len(trained) == 2  # the two training steps; validation decides everywhere
    for prompts, limits, episodes in trained:
        for prompt, at, episode in zip(prompts, limits.decide_at, episodes):
            assert [d.position for d in episode.decisions] in ([], [at])
            assert {a for p, a in zip(prompts, limits.decide_at) if p == prompt} == {at}  # one per prompt
        assert sum(len(e.decisions) for e in episodes) > 0


@pytest.mark.parametrize("key", ["reference", "center", "decisions"])
def test_an_unknown_rollout_choice_is_named_with_the_choices(key: str, toy_world: Path, tmp_path: Path, compose_train):
    from spd_lightning.tasks.train import build_components

    cfg = compose_train([f"toy.out={toy_world}", "rollout=generation", "~logger", f"rollout.{key}=middle"], tmp_path)
    with pytest.raises(ValueError, match=rf"rollout.{key}='middle': choose among \["):
        build_components(cfg)


@pytest.mark.parametrize("model", ["toy", "judge"])
def test_whole_generation_grpo_beats_standard_sd_at_its_accuracy_on_the_default_world(
    model: str, toy_world: Path, tmp_path: Path, compose_train
):
    overrides = [f"toy.out={toy_world}", "rollout=generation", f"model={model}", "~logger",
                 "trainer.max_steps=60", "trainer.val_check_interval=30"]  # fmt: skip
    cfg = compose_train(overrides, tmp_path)
    train(cfg)
    s = json.loads((tmp_path / "summary.json").read_text())
    sd, ours = val_key("standard_sd", "accept_len"), val_key("scorer", "accept_len")
    # Before training every mismatch is kept (p = 0.5 at threshold 0.5): accept-all's accuracy.
    assert s["initial/" + val_key("scorer", "accuracy")] < 0.5
    assert s[val_key("scorer", "accuracy")] >= s[val_key("standard_sd", "accuracy")] - 0.02
    assert s[ours] > 2 * s[sd]
    assert s[val_key("scorer", "target_calls_per_token")] < s[val_key("standard_sd", "target_calls_per_token")]


def test_the_judges_features_kept_on_disk_spare_a_second_run_every_model_pass(
    toy_world: Path, tmp_path: Path, compose_train, monkeypatch
):
    from spd_lightning.decoding import features as features_module

    missing = []
    compute = features_module.FeatureCache._compute
    monkeypatch.setattr(
        features_module.FeatureCache, "_compute",
        lambda self, keys: missing.append(sum(k not in self._rows for k in set(keys))) or compute(self, keys),
    )  # fmt: skip
    store = tmp_path / "features.pt"
    for run in ("first", "again"):
        overrides = [f"toy.out={toy_world}", "rollout=generation", "model=judge", "~logger", "trainer.max_steps=2",
                     "trainer.val_check_interval=2", f"rollout.features={store}"]  # fmt: skip
        train(compose_train(overrides, tmp_path / run))
        if run == "first":
            assert store.is_file() and sum(missing) > 0
            missing.clear()
    assert sum(missing) == 0  # the same seed meets the same mismatches: every row came from the file


@pytest.mark.slow
def test_episodes_complete_their_forks_over_a_vllm_server(toy_world: Path, tmp_path: Path, compose_train, fake_vllm):
    overrides = [f"toy.out={toy_world}", "rollout=generation", "~logger", "target=vllm",
                 f"target.url={fake_vllm.url}", "target.model=toy-target", "trainer.max_steps=3",
                 "trainer.val_check_interval=3", "validate_before_fit=false",
                 f"rollout.completions={tmp_path / 'completions.jsonl'}", "rollout.val_accept_all=false"]  # fmt: skip
    train(compose_train(overrides, tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["train/steps"] == 3
    # rollout.val_accept_all=false: the costly accept-all validation is skipped, the others run.
    assert val_key("scorer", "accuracy") in summary and val_key("accept_all", "accuracy") not in summary
    assert len(fake_vllm.prompts) > 8  # the target's responses and the forks, as token ids
    stored = (tmp_path / "completions.jsonl").read_text().splitlines()
    assert len(stored) >= len(fake_vllm.prompts) - 1  # every completion kept on disk for the next run


def test_a_resumed_run_reads_the_judges_scaling_and_completions_count_from_its_checkpoint(
    toy_world: Path, tmp_path: Path, compose_train, monkeypatch
):
    from spd_lightning.judge.head import JudgeHead

    fits = []
    fit_scaling = JudgeHead.fit_scaling
    monkeypatch.setattr(JudgeHead, "fit_scaling", lambda self, data: fits.append(1) or fit_scaling(self, data))
    common = [f"toy.out={toy_world}", "rollout=generation", "model=judge", "~logger", "trainer.val_check_interval=2"]
    train(compose_train([*common, "trainer.max_steps=2"], tmp_path))
    assert len(fits) == 1
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    train(compose_train([*common, "trainer.max_steps=3", f"ckpt_path={ckpt}"], tmp_path / "resumed"))
    assert len(fits) == 1  # the draft's passes over the training prompts are not redone
    totals = [torch.load(d / "checkpoints" / "last.ckpt", weights_only=False)["verify_totals"]["completions"]
              for d in (tmp_path, tmp_path / "resumed")]  # fmt: skip
    assert totals[1] > totals[0] > 0  # the count of target completions goes on from the checkpoint's


def test_each_step_logs_standard_sds_accuracy_on_its_prompts_and_the_curves_draw_the_gap(
    toy_world: Path, tmp_path: Path, compose_train
):
    from PIL import Image

    from spd_lightning.reporting.plots import read_metrics

    overrides = [f"toy.out={toy_world}", "rollout=generation", "logger=csv", "trainer.max_steps=2",
                 "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "rollout.reference=target"]  # fmt: skip
    train(compose_train(overrides, tmp_path))
    series = read_metrics(tmp_path / "csv" / "metrics.csv")
    # Against the target's own answers standard SD is right wherever the target wrote a number.
    assert [step for step, _ in series["train/sd_accuracy"]] == [0, 1]
    assert all(value > 0.8 for _, value in series["train/sd_accuracy"])
    assert Image.open(tmp_path / "training_curves.png").size[0] == 2600  # six panels: the gap is the sixth


def test_ppo_epochs_updates_the_judge_several_times_on_one_batch_of_episodes(
    toy_world: Path, tmp_path: Path, compose_train
):
    from spd_lightning.reporting.plots import read_metrics

    overrides = [f"toy.out={toy_world}", "rollout=generation", "model=judge", "logger=csv", "loss.ppo_epochs=3",
                 "trainer.max_steps=6", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
                 "optimizer.lr=0.5"]  # fmt: skip
    train(compose_train(overrides, tmp_path))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 6  # max_steps counts updates: two batches of three
    series = read_metrics(tmp_path / "csv" / "metrics.csv")
    assert len(series["train/reward"]) == 2
    # At this lr the later updates leave the clip range: the ratio is taken against the draws' logits.
    assert max(value for _, value in series["train/clip_fraction"]) > 0
