"""GRPO replayed on labelled mismatches: does the whole-generation judge's loss, head and
learning rate learn to order mismatches by harm when every decision's outcome is known?

Whole-generation training on the real pair costs minutes of target completions per batch, and
its 24 batches did not show learning (docs/whole_generations.md). Here the completions are the
store's: every mismatch some swept policy accepted carries its label (judge/ranking.harmless:
accepting it left the path's final answer as it was), so an episode needs no target call.

An episode is D mismatches of one problem, in the order they sit in its responses; the head
draws accept or reject at each (Bernoulli, p = sigmoid(logit)) until max_forks accepts (0: no
cap), as training does. Its outcome: accepted = any accepted; speed = accepted / D; correct =
the path's answer is right when no accepted mismatch was harmful, else the first harmful one's
hybrid answer is (against the target's own answer: right when none was harmful; against the
dataset's reference, as the run's rollout.reference, both answers are checked). The reward is the
run's (core/generation_grpo.generation_rewards), G episodes over the same D mismatches form a
group, and the loss is GenerationGRPOLoss with the run's ppo_epochs. What this leaves out: in a
real episode an accepted mismatch changes which mismatches come next, and two harmful changes
may cancel; here labels combine as if independent.

Shapes: N labelled mismatches, P groups (prompts) a batch, G episodes a group, D mismatches an
episode, X executed decisions of a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from spd_lightning.core.generation_grpo import GenerationGRPOLoss, generation_rewards
from spd_lightning.core.reward import RewardWeights
from spd_lightning.judge.head import JudgeHead, JudgeInputs
from spd_lightning.judge.ranking import roc_auc


@dataclass
class ReplaySettings:
    mismatches_per_episode: int = 1  # D
    max_forks: int = 0  # decisions stop after this many accepts (0: no cap)
    prompts: int = 8  # P groups a batch
    episodes: int = 4  # G episodes a group
    ppo_epochs: int = 8  # updates a batch (GRPO's mu)
    batches: int = 24
    lr: float = 1e-2
    seed: int = 0


@dataclass
class ReplayLabels:
    """What accepting each of N mismatches does."""

    harmless: torch.Tensor  # [N] bool: the final answer stayed the path's
    path_right: torch.Tensor  # [N] bool: the path's answer is right
    hybrid_right: torch.Tensor  # [N] bool: the hybrid's answer is right

    @staticmethod
    def against_target(harmless: torch.Tensor) -> ReplayLabels:
        """The target's own answer as the reference: the path is right, the hybrid when harmless."""
        return ReplayLabels(harmless, torch.ones_like(harmless), harmless)

    def __getitem__(self, index) -> ReplayLabels:
        return ReplayLabels(self.harmless[index], self.path_right[index], self.hybrid_right[index])


@dataclass
class ReplayTrace:
    """One value per batch: what training logs, and the held-out ranking."""

    accept_prob: list[float] = field(default_factory=list)  # mean p at the batch's decisions
    reward: list[float] = field(default_factory=list)  # mean episode reward
    reward_std: list[float] = field(default_factory=list)  # mean reward std within a group
    flat_groups: list[float] = field(default_factory=list)  # share of groups with no reward spread
    held_auc: list[float] = field(default_factory=list)  # AUC of the held-out logits
    held_logits: list[torch.Tensor] = field(default_factory=list)  # [H] at every batch's end


def draw_groups(problems: list[torch.Tensor], settings: ReplaySettings, generator: torch.Generator) -> torch.Tensor:
    """[P, D] mismatch indices: D of one problem each, in response order (problems: [n_i] indices
    in response order, each with at least D)."""
    d = settings.mismatches_per_episode
    picks = torch.randint(len(problems), (settings.prompts,), generator=generator).tolist()
    rows = []
    for p in picks:
        members = problems[p]
        chosen = torch.randperm(len(members), generator=generator)[:d].sort().values  # [D]
        rows.append(members[chosen])
    return torch.stack(rows)


def play(logits: torch.Tensor, labels: ReplayLabels, settings: ReplaySettings, generator: torch.Generator):
    """G episodes over each group's mismatches. logits: [P, D], labels of [P, D] -> (accept
    [P, G, D] bool, executed [P, G, D] bool, accepted_any [P, G], correct [P, G], speed [P, G])."""
    p, d, g = logits.shape[0], logits.shape[1], settings.episodes
    draws = torch.rand(p, g, d, generator=generator) < torch.sigmoid(logits)[:, None, :]  # [P, G, D]
    executed = torch.ones_like(draws)
    if settings.max_forks > 0:
        before = draws.long().cumsum(-1) - draws.long()  # [P, G, D] accepts before each decision
        executed = before < settings.max_forks
    accept = draws & executed
    harmful = accept & ~labels.harmless[:, None, :]  # [P, G, D]
    first = harmful.long().argmax(-1, keepdim=True)  # [P, G, 1] the first harmful one (0: none)
    hybrid_right = labels.hybrid_right[:, None, :].expand(-1, g, -1).gather(-1, first).squeeze(-1)  # [P, G]
    correct = torch.where(harmful.any(-1), hybrid_right, labels.path_right[:, :1].expand(-1, g))
    kept = accept.sum(-1)  # [P, G]
    return accept, executed, kept > 0, correct, kept.float() / d


def train_replay(
    head: JudgeHead,
    data: JudgeInputs,
    labels: ReplayLabels,
    problems: list[torch.Tensor],
    held: torch.Tensor,
    settings: ReplaySettings,
    weights: RewardWeights,
) -> ReplayTrace:
    """Train `head` (its scaling already fitted) by GRPO on episodes drawn from `problems` (lists
    of training mismatch indices); after each batch, score the held-out mismatches held [H]."""
    generator = torch.Generator().manual_seed(settings.seed)
    loss = GenerationGRPOLoss(num_episodes=settings.episodes, ppo_epochs=settings.ppo_epochs)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.lr, weight_decay=0.0)
    usable = [m for m in problems if len(m) >= settings.mismatches_per_episode]
    if not usable:
        raise ValueError(f"no problem holds {settings.mismatches_per_episode} training mismatches")
    trace = ReplayTrace()
    for _ in range(settings.batches):
        rows = draw_groups(usable, settings, generator)  # [P, D]
        with torch.no_grad():
            old = head(data.select(rows.reshape(-1)))[:, 0].reshape(rows.shape)  # [P, D]
        accept, executed, accepted_any, correct, speed = play(old, labels[rows], settings, generator)
        rewards = generation_rewards(accepted_any, correct, speed, weights)  # [P, G]
        advantages, flat = loss.advantages(rewards, torch.ones_like(rewards, dtype=torch.bool))
        where = executed.nonzero()  # [X, 3] (group, episode, mismatch)
        episode = where[:, 0] * settings.episodes + where[:, 1]  # [X]
        taken = accept[where[:, 0], where[:, 1], where[:, 2]]  # [X]
        for _ in range(settings.ppo_epochs):
            logits = head(data.select(rows.reshape(-1)))[:, 0].reshape(rows.shape)  # [P, D]
            picked = logits[where[:, 0], where[:, 2]]  # [X]
            stats = loss(picked, old[where[:, 0], where[:, 2]], taken, episode, advantages)
            optimizer.zero_grad()
            stats.loss.backward()
            optimizer.step()
        with torch.no_grad():
            scores = head(data.select(held))[:, 0]  # [H]
        _log(trace, scores, labels.harmless[held], old[where[:, 0], where[:, 2]], rewards, flat)
    return trace


def _log(trace: ReplayTrace, scores, labels, decided, rewards, flat) -> None:
    """scores, labels: [H] held-out logits and labels; decided [X] the logits the batch drew
    with; rewards [P, G]; flat [P] bool."""
    trace.accept_prob.append(float(torch.sigmoid(decided).mean()))
    trace.reward.append(float(rewards.mean()))
    trace.reward_std.append(float(rewards.std(-1).mean()))
    trace.flat_groups.append(float(flat.float().mean()))
    trace.held_auc.append(roc_auc(scores, labels))
    trace.held_logits.append(scores.clone())


def center_as_drawn(head: JudgeHead, data: JudgeInputs, problems: list[torch.Tensor]) -> None:
    """Re-centre the head's fitted scaling on the mean input of the mismatches episodes draw (each
    problem alike, each of its mismatches alike), so that the inputs' mean over a batch is about 0.

    Why: with Adam every weight moves about lr an update, so a push on the accept rate alone (the
    bias's gradient) also moves each weight whose input has a non-zero mean over the batches, by as
    much as the bias: a head then leans with no signal in the outcomes."""
    means = torch.stack([head.features(data.select(m))[:, 0].mean(0) for m in problems])  # [problems, F]
    head.mean.copy_(means.mean(0))
