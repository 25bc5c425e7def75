"""`rollout=generation`: GRPO on whole generations, the unit users deploy.

A training step takes P prompts and runs G episodes of each (decoding/episodes.py): at every
mismatch an episode meets, the scorer's accept probability is drawn as a Bernoulli; an accepted
mismatch forks to the target's completion of the new prefix. Each episode is scored by the four
scenarios lifted to the generation (accepted any mismatch, final answer kept) plus a speed term,
advantages are normalised over the G episodes of a prompt, and every decision of every episode
enters the loss (core/generation_grpo.py). Validation decodes held-out prompts whole under the
scorer at its threshold, standard SD and accept-all, and logs what the per-block rollout logs
(val/accuracy, val/accept_len: draft tokens kept per target call), plus target calls per token.

The per-block rollout (training/module.py) stays the default; both train the same scorers
(ScoringActor, model=judge) and save the same checkpoints, which task=decode reads alike.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from spd_lightning.core.episode import Ask, Episode
from spd_lightning.core.generation_grpo import (
    GenerationGRPOLoss,
    decision_chance,
    generation_rewards,
    order_among,
    speed_term,
)
from spd_lightning.core.grpo import GRPOStats
from spd_lightning.core.reward import RewardWeights
from spd_lightning.data.answers import extract_final_number
from spd_lightning.decoding.episodes import (
    DecisionInputs,
    Limits,
    PathSource,
    SampledDecider,
    mismatches_along,
    run_episodes,
)
from spd_lightning.decoding.features import FeatureCache
from spd_lightning.decoding.policies import Needs, scorer_logits
from spd_lightning.judge.inputs import DiskCompletions
from spd_lightning.judge.zero_cost import ZeroCostJudge
from spd_lightning.models.hf import pad_id_of
from spd_lightning.models.scorer import ScoringActor
from spd_lightning.reporting.names import VAL_POLICIES, val_key
from spd_lightning.targets.local import load_causal_lm
from spd_lightning.training.module import SPDModule
from spd_lightning.verification.hybrid import HybridVerifier

REFERENCES = ("reference", "target")
# The judge head's input mean: over every mismatch of the training responses (all), or weighted by
# the chance that a capped episode decides there (drawn; the same as all without a cap).
CENTERS = ("drawn", "all")
# Where a training episode decides: at every mismatch it meets (up to max_forks accepts), or the G
# episodes of a prompt at one mismatch of standard SD's path drawn per prompt and step (each
# decision then gets its own reward, as a label does).
DECISIONS = ("every", "one")


@dataclass
class RolloutConfig:
    """The `rollout` section (conf/rollout/): what one GRPO sample is. The keys past `kind` are
    read by rollout=generation only."""

    kind: str = "block"  # block (a prepared record's block) or generation (a whole episode)
    block_size: int = 4
    max_new_tokens: int = 24
    reference: str = "reference"
    speed: str = "calls_saved"
    max_forks: Optional[int] = None  # noqa: UP045 (OmegaConf reads typing.Optional)
    completions: Optional[str] = None  # noqa: UP045
    val_fraction: float = 0.2
    batch_size: int = 8
    val_batch_size: int = 64
    val_accept_all: bool = True
    cached_paths: int = 160
    features: Optional[str] = None  # noqa: UP045
    overlap: int = 0
    segment: Optional[int] = None  # noqa: UP045
    center: str = "drawn"
    decisions: str = "every"


class GenerationModule(SPDModule):
    def __init__(
        self,
        scorer: ScoringActor,
        verifier: HybridVerifier,
        reward: RewardWeights,
        loss: GenerationGRPOLoss,
        optimizer: partial,
        draft_path: str,
        block_size: int = 4,
        max_new_tokens: int = 24,
        reference: str = "reference",
        speed: str = "calls_saved",
        max_forks: int | None = None,
        completions_path: str | None = None,
        val_accept_all: bool = True,
        cached_paths: int = 160,
        features_path: str | None = None,
        overlap: int = 0,
        segment: int | None = None,
        center: str = "drawn",
        decisions: str = "every",
        draft_dtype: str = "float32",
        threshold: float = 0.5,
        backbone_lr_scale: float = 0.1,
        grad_clip: float = 1.0,
    ) -> None:
        _check_choices(reference=reference, center=center, decisions=decisions)
        super().__init__(scorer, verifier, reward, loss, optimizer, threshold, backbone_lr_scale, grad_clip)
        self.save_hyperparameters(ignore=["scorer", "verifier", "reward", "loss", "optimizer"], logger=False)
        self.pad_id = pad_id_of(verifier.tokenizer)
        # The draft's proposals along every path come from the draft as a causal LM (the scorer's
        # backbone has no LM head); frozen, outside the module tree, so no checkpoint holds it.
        if isinstance(scorer, ZeroCostJudge):  # it holds the draft already
            self._draft = [scorer.models.draft]
        else:
            self._draft = [load_causal_lm(draft_path, draft_dtype, "cpu", "draft model", "pair.draft").eval()]
        # Completions kept on disk (rollout.completions) outlive the run: a rerun, task=decode's
        # bench and other runs on the same prompts read them instead of generating again.
        store = DiskCompletions(completions_path) if completions_path else None
        # overlap > 0: an episode's fork is completed while the others decide, the server batching
        # the requests in flight; the draws are keyed by episode, so the episodes are lockstep's.
        self.source = PathSource(
            verifier.target.complete, self._draft[0], self.pad_id, verifier.eos, max_new_tokens, store,
            capacity=cached_paths, overlap=overlap, segment=segment,
        )  # fmt: skip
        self.inputs = DecisionInputs(None, None, self.pad_id)
        # The zero-cost judge reads features of the frozen models, computed once per mismatch
        # (a path's all at once); its head alone is trained.
        self.features = None
        # model=judge: its features kept on disk (rollout.features) are read at the start and
        # written as they grow, so a resumed run (or another on the same prompts) skips their passes.
        self.features_path = Path(features_path) if features_path else None
        self._features_saved = time.monotonic()
        if isinstance(scorer, ZeroCostJudge):
            self.features = FeatureCache(
                scorer.models.draft, scorer.models.target, draft_states=self.source.draft_states,
                capacity=cached_paths, hidden="target_hidden" in scorer.head.inputs,
            )  # fmt: skip
            if self.features_path is not None:
                self.features.load(self.features_path)

    def setup(self, stage: str) -> None:
        """Nothing to precompute per record: the judge's features come with the mismatches met."""

    # The judge's input scaling is fitted after a checkpoint is restored (setup runs before that):
    # a resumed run reads the scaling from its checkpoint instead of redoing the draft's passes.
    def on_train_start(self) -> None:
        self._fit_judge_scaling()

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._fit_judge_scaling()

    def on_test_start(self) -> None:
        self._fit_judge_scaling()

    def _fit_judge_scaling(self) -> None:
        """model=judge: the head's input scaling, from the mismatches of the target's own
        responses to the training prompts (before any validation fixes it)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.features is None or datamodule is None or self.scorer.head.fitted:
            return
        prompts = [p for p, _ in datamodule.train_records]
        met = mismatches_along(prompts, self.source.paths(prompts, [()] * len(prompts)), "judge scaling: draft")
        if met:
            inputs = self.features.get([p for p, _ in met], [a for _, a in met]).judge_inputs()
            self.scorer.head.fit_scaling(inputs)
            capped = self.hparams.max_forks is not None and self.hparams.decisions == "every"
            if self.hparams.center == "drawn" and capped:
                self._center_as_drawn(inputs, [p for p, _ in met])
            self._save_features(every_s=0.0)

    def _center_as_drawn(self, inputs, prompts: list[tuple[int, ...]]) -> None:
        """Re-centres the head's inputs on the mismatches weighted by the chance that an episode
        of the untrained head decides there (decision_chance): with a cap on forks, episodes
        decide at the first few mismatches of a response far more often than at the rest."""
        with torch.no_grad():
            accept_prob = float(torch.sigmoid(self.scorer.head(inputs)).mean())
        self.scorer.head.recenter(inputs, decision_chance(order_among(prompts), self.hparams.max_forks, accept_prob))

    # The completions count is the source's; the checkpoint carries it so a resumed run's goes on.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.verify_totals["completions"] = self.source.completions
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.source.completions = self.verify_totals["completions"]

    def on_train_batch_end(self, *args) -> None:
        self._save_features(every_s=300.0)

    def on_fit_end(self) -> None:
        self._save_features(every_s=0.0)

    def _save_features(self, every_s: float) -> None:
        """rollout.features: the judge's feature cache to disk, at most every `every_s` seconds."""
        if self.features is None or self.features_path is None or time.monotonic() - self._features_saved < every_s:
            return
        if self.trainer.is_global_zero:  # one writer; the frozen models give every rank the same rows
            self.features_path.parent.mkdir(parents=True, exist_ok=True)
            self.features.save(self.features_path)
        self._features_saved = time.monotonic()

    def _logits(self, prompts: list[tuple[int, ...]], asks: list[Ask], scorer=None) -> torch.Tensor:
        """[D] accept logits at the mismatches (with gradients when enabled)."""
        scorer = scorer or self.scorer
        if self.features is not None:
            return scorer.head(self.features.get(prompts, asks).judge_inputs())[:, 0]
        block = self.inputs.block(prompts, asks, Needs())
        return scorer_logits(scorer, block, self.pad_id)[:, 0]

    @torch.no_grad()
    def _probabilities(self, prompts: list[tuple[int, ...]], asks: list[Ask]) -> list[float]:
        return torch.sigmoid(self._logits(prompts, asks)).tolist()

    def _episodes(self, prompts: list[tuple[int, ...]], decide, limits: Limits | None = None) -> list[Episode]:
        return run_episodes(prompts, decide, self.source, self.hparams.block_size, limits=limits or Limits())

    def _decision_positions(self, sd: list[Episode], seed: str, group: int) -> list[int | None] | None:
        """rollout.decisions=one: [P * G] the response position where each episode decides, one
        mismatch of its prompt's standard-SD path (sd: [P]) drawn per prompt and step and shared by
        the prompt's G episodes (-1: the path met none); every: None (each decides everywhere)."""
        if self.hparams.decisions == "every":
            return None
        drawn = []
        for i, episode in enumerate(sd):
            positions = [d.position for d in episode.decisions]
            drawn += [random.Random(f"{seed}:{i}").choice(positions) if positions else -1] * group
        return drawn

    def _references(self, answers: list[str], sd: list[Episode]) -> list[str]:
        """What each prompt's episodes must keep: the dataset's answer, or the target's own final
        answer (its greedy response: the prompt's standard-SD episode in `sd`)."""
        if self.hparams.reference == "reference":
            return list(answers)
        return [extract_final_number(self._text(e.response)) or "" for e in sd]

    def _text(self, ids: list[int]) -> str:
        end = next((i for i, t in enumerate(ids) if t in self.verifier.eos), len(ids))
        return self.verifier.tokenizer.decode(ids[:end], skip_special_tokens=True)

    def _correct(self, episodes: list[Episode], references: list[str]) -> torch.Tensor:
        check = self.verifier.answer_check
        return torch.tensor([bool(r) and check(self._text(e.response), r) for e, r in zip(episodes, references)])

    def _speed(self, episodes: list[Episode], sd: list[Episode], group: int) -> torch.Tensor:
        """[E] the speed term of each episode against standard SD on its prompt."""
        sd_cpt = torch.tensor([e.target_calls / max(e.num_tokens, 1) for e in sd]).repeat_interleave(group)
        calls = torch.tensor([e.target_calls for e in episodes])
        tokens = torch.tensor([e.num_tokens for e in episodes])
        kept = torch.tensor([e.accepted_mismatches for e in episodes])
        met = torch.tensor([len(e.decisions) + e.forced_rejects for e in episodes])
        return speed_term(self.hparams.speed, calls, tokens, sd_cpt, kept, met)

    def training_step(self, batch: list[tuple[tuple[int, ...], str]], batch_idx: int) -> torch.Tensor:
        prompts, answers = [p for p, _ in batch], [a for _, a in batch]
        group = self.loss_fn.num_episodes
        rows = [p for p in prompts for _ in range(group)]  # [E]
        # Keyed by episode: the same draws whatever order the forks complete in (rollout.overlap);
        # keyed by step and rank too, so a resumed run does not draw its first step's again.
        seed = f"{torch.initial_seed()}:{self.global_step}:{self.global_rank}"
        decide = SampledDecider(self._probabilities, seed=seed)
        sd = self._episodes(prompts, _reject_all)
        limits = Limits(self.hparams.max_forks, self._decision_positions(sd, seed, group))
        episodes = self._episodes(rows, decide, limits)
        references = [r for r in self._references(answers, sd) for _ in range(group)]
        correct = self._correct(episodes, references).view(len(prompts), group)  # [P, G]
        accepted = torch.tensor([e.accepted_mismatches > 0 for e in episodes]).view_as(correct)  # [P, G]
        speed = self._speed(episodes, sd, group).view_as(correct)  # [P, G]
        rewards = generation_rewards(accepted, correct, speed, self.reward)  # [P, G]
        advantages, zero_variance = self.loss_fn.advantages(rewards, torch.ones_like(correct))  # [P, G], [P]
        d_prompts, d_asks, d_accepted, d_episode = _decisions(rows, episodes)
        stats, probs = None, torch.zeros(0)
        if d_asks:
            stats, probs = self._update_decisions(d_prompts, d_asks, d_accepted, d_episode, advantages)
        self._log_generation_train(episodes, rewards, correct, accepted, zero_variance, probs, stats)
        # Standard SD on the same prompts: a step's accuracy swings with its prompts, the gap does not.
        sd_correct = self._correct(sd, references[::group]).float().mean()
        self.log("train/sd_accuracy", sd_correct, batch_size=len(prompts), sync_dist=True)
        return stats.loss.detach() if stats is not None else torch.zeros(())

    def _update_decisions(self, prompts, asks, accepted, episode, advantages) -> tuple[GRPOStats, torch.Tensor]:
        """loss.ppo_epochs updates on one batch of D decisions -> (the last update's stats, [D]
        accept probabilities the decisions were drawn with)."""
        ref = None
        if self.ref_scorer is not None:
            with torch.no_grad():
                ref = self._logits(prompts, asks, self.ref_scorer)  # [D]
        # The episodes' tensors are built on the CPU; the scorer (and its logits) may be on a GPU.
        accepted, episode, advantages = accepted.to(self.device), episode.to(self.device), advantages.to(self.device)
        opt, old = self.optimizers(), None
        for _ in range(self.loss_fn.ppo_epochs):
            logits = self._logits(prompts, asks)  # [D]
            # The draws' logits: no update came between the draws and the first pass.
            old = logits.detach() if old is None else old
            stats = self.loss_fn(logits, old, accepted, episode, advantages, ref)
            self._optimizer_step(opt, stats.loss)
        return stats, torch.sigmoid(old)

    def _log_generation_train(self, episodes, rewards, correct, accepted, zero_variance, probs, stats) -> None:
        tokens = sum(e.num_tokens for e in episodes)
        metrics = {
            "train/reward": rewards.mean(),
            # How far apart a prompt's G episodes are: 0 everywhere is a saturated policy.
            "train/reward_std_in_group": rewards.std(dim=1).mean() if rewards.shape[1] > 1 else torch.zeros(()),
            "train/accuracy": correct.float().mean(),
            "train/accept_prob": probs.mean() if probs.numel() else torch.tensor(float("nan")),
            "train/decisions_per_episode": torch.tensor(sum(len(e.decisions) for e in episodes) / len(episodes)),
            "train/accepted_mismatches_per_episode": torch.tensor(
                sum(e.accepted_mismatches for e in episodes) / len(episodes)
            ),
            "train/target_calls_per_token": torch.tensor(sum(e.target_calls for e in episodes) / max(tokens, 1)),
            "train/scenario_A": (accepted & correct).float().mean(),
            "train/scenario_B": (accepted & ~correct).float().mean(),
            "train/scenario_C": (~accepted & correct).float().mean(),
            "train/scenario_D": (~accepted & ~correct).float().mean(),
        }
        if stats is not None:
            # clip_fraction: of the last of loss.ppo_epochs updates (0 with one update a batch).
            metrics.update({"train/loss": stats.loss.detach(), "train/kl": stats.kl.detach(),
                            "train/entropy": stats.entropy.detach(),
                            "train/clip_fraction": stats.clip_fraction})  # fmt: skip
        size = rewards.numel()
        self.log_dict(metrics, batch_size=size, sync_dist=True)
        self.log("train/zero_variance_groups", zero_variance.float().sum(), batch_size=size, sync_dist=True,
                 reduce_fx="sum")  # fmt: skip
        self.log_dict({"verify/total_completions": float(self.source.completions)}, batch_size=size)
        self.log("reward", metrics["train/reward"], prog_bar=True, logger=False, batch_size=size, sync_dist=True)

    def validation_step(self, batch: list[tuple[tuple[int, ...], str]], batch_idx: int) -> None:
        """Whole generations of the held-out prompts under the scorer at its threshold, standard
        SD and accept-all (unless rollout.val_accept_all=false): accuracy, draft tokens kept per
        target call, target calls per token."""
        prompts, answers = [p for p, _ in batch], [a for _, a in batch]
        threshold = self.hparams.threshold
        deciders = {
            "scorer": lambda ps, asks: [p >= threshold for p in self._probabilities(ps, asks)],
            "standard_sd": _reject_all,
            "accept_all": lambda ps, asks: [True] * len(asks),
        }
        sd = self._episodes(prompts, _reject_all)
        references = self._references(answers, sd)
        for name in VAL_POLICIES:
            if name == "accept_all" and not self.hparams.val_accept_all:
                continue
            episodes = sd if name == "standard_sd" else self._episodes(prompts, deciders[name])
            correct = self._correct(episodes, references)
            accepted = torch.tensor([e.accepted_mismatches > 0 for e in episodes])
            rewards = generation_rewards(accepted, correct, self._speed(episodes, sd, 1), self.reward)
            calls = sum(e.target_calls for e in episodes)
            tokens = sum(e.num_tokens for e in episodes)
            metrics = {
                val_key(name, "accuracy"): correct.float().mean(),
                val_key(name, "reward"): rewards.mean(),
                val_key(name, "accept_len"): torch.tensor(
                    sum(e.accepted_draft_tokens for e in episodes) / max(calls, 1)
                ),
                val_key(name, "target_calls_per_token"): torch.tensor(calls / max(tokens, 1)),
            }
            self.log_dict(metrics, batch_size=len(batch), sync_dist=True, prog_bar=name == "scorer")


def _check_choices(**chosen: str) -> None:
    choices = {"reference": REFERENCES, "center": CENTERS, "decisions": DECISIONS}
    for key, value in chosen.items():
        if value not in choices[key]:
            raise ValueError(f"rollout.{key}={value!r}: choose among {list(choices[key])}")


def _reject_all(prompts, asks: list[Ask]) -> list[bool]:
    return [False] * len(asks)


def _decisions(rows: list[tuple[int, ...]], episodes: list[Episode]):
    """Every decision of every episode, flat: (prompts [D], Asks [D], accepted [D] bool, episode [D] long)."""
    prompts, asks, accepted, index = [], [], [], []
    for e, (prompt, episode) in enumerate(zip(rows, episodes)):
        for d in episode.decisions:
            prompts.append(prompt)
            asks.append(Ask(tuple(episode.response[: d.position]), d.draft, d.target))
            accepted.append(d.accepted)
            index.append(e)
    return prompts, asks, torch.tensor(accepted, dtype=torch.bool), torch.tensor(index, dtype=torch.long)
