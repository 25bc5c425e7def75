"""The LightningModule: one GRPO step is score, sample, verify, reward, update.

The math lives in sampling.py, reward.py and grpo.py; this file only composes it.
"""

from __future__ import annotations

import copy
from functools import partial

import lightning as L
import torch

from spd_lightning.data import RecordBatch
from spd_lightning.grpo import GRPOLoss
from spd_lightning.reward import RewardWeights, compute_reward_tensor, scenario_counts
from spd_lightning.rollout import HybridVerifier
from spd_lightning.sampling import (
    accepted_any_mismatch,
    first_reject,
    mismatch_mask,
    sample_decisions,
    threshold_decisions,
)
from spd_lightning.scorer import ScoringActor

# Validation policies, in the column order handed to the verifier. "" is the trained scorer.
VAL_POLICIES = ("", "standard_sd/", "accept_all/")


class SPDModule(L.LightningModule):
    def __init__(
        self,
        scorer: ScoringActor,
        verifier: HybridVerifier,
        reward: RewardWeights,
        loss: GRPOLoss,
        optimizer: partial,
        threshold: float = 0.5,
        backbone_lr_scale: float = 0.1,
        grad_clip: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["scorer", "verifier", "reward", "loss"])
        # Several PPO epochs reuse one (costly) verification, so the optimiser is stepped by hand.
        self.automatic_optimization = False
        self.scorer, self.verifier, self.reward, self.loss_fn = scorer, verifier, reward, loss
        self.scorer.train()  # from_pretrained returns eval mode
        self.ref_scorer = None
        if loss.kl_coef > 0:
            self.ref_scorer = copy.deepcopy(scorer).eval().requires_grad_(False)

    def accept_logits(self, batch: RecordBatch, scorer: ScoringActor | None = None) -> torch.Tensor:
        """[B, K] accept logits for a batch."""
        scorer = scorer or self.scorer
        return scorer(batch.input_ids, batch.attention_mask, batch.context_len, batch.target_ids)

    def training_step(self, batch: RecordBatch, batch_idx: int) -> torch.Tensor:
        k = batch.draft_ids.shape[1]
        mismatch = mismatch_mask(batch.draft_ids, batch.target_ids)  # [B, K]
        logits = self.accept_logits(batch)  # [B, K]
        decisions = sample_decisions(torch.sigmoid(logits.detach()), mismatch, self.loss_fn.num_samples)
        accept_len = first_reject(decisions)  # [B, N]
        result = self.verifier.verify(batch.records, accept_len)
        accepted = accepted_any_mismatch(accept_len, mismatch)  # [B, N]
        rewards = compute_reward_tensor(accepted, result.correct, accept_len, k, self.reward)  # [B, N]
        advantages, zero_var = self.loss_fn.advantages(rewards, result.valid)
        ref_logits = None
        if self.ref_scorer is not None:
            with torch.no_grad():
                ref_logits = self.accept_logits(batch, self.ref_scorer)
        stats = self._update(batch, logits, accept_len, mismatch, advantages, result.valid, ref_logits)
        self._log_train(logits, mismatch, accept_len, accepted, result, rewards, zero_var, stats, k)
        return stats.loss.detach()

    def _update(self, batch, logits, accept_len, mismatch, advantages, valid, ref_logits):
        opt = self.optimizers()
        old_logits = logits.detach()
        for epoch in range(self.loss_fn.ppo_epochs):
            if epoch > 0:
                logits = self.accept_logits(batch)
            stats = self.loss_fn(logits, old_logits, accept_len, mismatch, advantages, valid, ref_logits)
            opt.zero_grad()
            self.manual_backward(stats.loss)
            self.clip_gradients(opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
            opt.step()
        return stats

    def _log_train(self, logits, mismatch, accept_len, accepted, result, rewards, zero_var, stats, k) -> None:
        valid = result.valid
        n_valid = valid.sum().clamp(min=1)
        counts = scenario_counts(accepted, result.correct, valid)
        probs = torch.sigmoid(logits.detach())[mismatch]
        metrics = {
            "train/loss": stats.loss.detach(),
            "train/policy_loss": stats.policy_loss.detach(),
            "train/kl": stats.kl.detach(),
            "train/entropy": stats.entropy.detach(),
            "train/clip_fraction": stats.clip_fraction,
            "train/reward": (rewards * valid).sum() / n_valid,
            "train/accuracy": (result.correct & valid).sum() / n_valid,
            "train/accept_len": (accept_len.float() * valid).sum() / n_valid,
            "train/accept_prob": probs.mean() if probs.numel() else torch.tensor(0.0),
            "train/zero_variance_groups": zero_var.float().sum(),
            **{f"train/scenario_{s}": v / n_valid for s, v in counts.items()},
            **{f"verify/{name}": float(v) for name, v in result.stats.items()},
        }
        self.log_dict(metrics, batch_size=len(accept_len))
        self.log("reward", metrics["train/reward"], prog_bar=True, logger=False, batch_size=len(accept_len))
        self.log("accept_len", metrics["train/accept_len"], prog_bar=True, logger=False, batch_size=len(accept_len))

    def validation_step(self, batch: RecordBatch, batch_idx: int) -> dict:
        """Logs the three policies' metrics; returns what callbacks need for dashboards
        (accept probabilities, decisions, responses and verdicts of this batch)."""
        k = batch.draft_ids.shape[1]
        mismatch = mismatch_mask(batch.draft_ids, batch.target_ids)  # [B, K]
        probs = torch.sigmoid(self.accept_logits(batch))  # [B, K]
        decisions = torch.stack(
            [
                threshold_decisions(probs, mismatch, self.hparams.threshold),  # the trained scorer
                ~mismatch,  # standard speculative decoding: reject every mismatch
                torch.ones_like(mismatch),  # accept everything the draft proposed
            ],
            dim=1,
        )  # [B, 3, K]
        accept_len = first_reject(decisions)  # [B, 3]
        # The three policies are three "samples" of each record, so shared prefixes are verified once.
        result = self.verifier.verify(batch.records, accept_len)
        accepted = accepted_any_mismatch(accept_len, mismatch)  # [B, 3]
        rewards = compute_reward_tensor(accepted, result.correct, accept_len, k, self.reward)  # [B, 3]
        for col, name in enumerate(VAL_POLICIES):
            valid = result.valid[:, col]
            n = valid.sum().clamp(min=1)
            metrics = {
                f"val/{name}accuracy": (result.correct[:, col] & valid).sum() / n,
                f"val/{name}accept_len": (accept_len[:, col].float() * valid).sum() / n,
                f"val/{name}reward": (rewards[:, col] * valid).sum() / n,
            }
            self.log_dict(metrics, batch_size=len(batch), sync_dist=True, prog_bar=name == "")
        return {
            "accept_probs": probs.detach(),  # [B, K]
            "mismatch": mismatch,  # [B, K]
            "accept_len": accept_len,  # [B, 3], columns in VAL_POLICIES order
            "correct": result.correct,  # [B, 3]
            "rewards": rewards,  # [B, 3]
            "texts": result.texts,  # (record index, j) -> response text
        }

    def configure_optimizers(self):
        head = list(self.scorer.head.parameters())
        backbone = [p for p in self.scorer.backbone.parameters() if p.requires_grad]
        groups = [{"params": head}]
        if self.hparams.backbone_lr_scale > 0 and backbone:
            lr = self.hparams.optimizer.keywords["lr"] * self.hparams.backbone_lr_scale
            groups.append({"params": backbone, "lr": lr})
        else:
            self.scorer.backbone.requires_grad_(False)
        return self.hparams.optimizer(params=groups)
