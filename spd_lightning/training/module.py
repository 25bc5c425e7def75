"""The LightningModule: one GRPO step is score, roll out, verify, reward, update.

The math lives in core/ (the loss makes the rollouts, core/rollout.py scores them); this file
only composes it with the verifier, the optimiser and the loggers.
"""

from __future__ import annotations

import copy
from functools import partial

import lightning as L
import torch

from spd_lightning.core.exact import ExactLoss
from spd_lightning.core.grpo import GRPOLoss, GRPOStats
from spd_lightning.core.reward import RewardWeights, compute_reward_tensor
from spd_lightning.core.rollout import Rollouts, score
from spd_lightning.core.sampling import accepted_any_mismatch, first_reject, mismatch_mask, threshold_decisions
from spd_lightning.data.records import RecordBatch
from spd_lightning.models.scorer import ScoringActor
from spd_lightning.reporting.names import VAL_POLICIES, val_key
from spd_lightning.verification.hybrid import HybridVerifier, Verification


class SPDModule(L.LightningModule):
    def __init__(
        self,
        scorer: ScoringActor,
        verifier: HybridVerifier,
        reward: RewardWeights,
        loss: GRPOLoss | ExactLoss,
        optimizer: partial,
        threshold: float = 0.5,
        backbone_lr_scale: float = 0.1,
        grad_clip: float = 1.0,
    ) -> None:
        super().__init__()
        # The resolved Hydra config is what loggers record (train.py); checkpoints keep only plain
        # values here, so they load with torch's weights_only default (no optimizer partial).
        self.save_hyperparameters(ignore=["scorer", "verifier", "reward", "loss", "optimizer"], logger=False)
        self.optimizer_factory = optimizer
        # Several PPO epochs reuse one (costly) verification, so the optimiser is stepped by hand.
        self.automatic_optimization = False
        self.scorer, self.verifier, self.reward, self.loss_fn = scorer, verifier, reward, loss
        self.scorer.train()  # from_pretrained returns eval mode
        if backbone_lr_scale <= 0:  # before any strategy wraps it: DDP must not expect its gradients
            self.scorer.backbone.requires_grad_(False)
        # Target completions and requests of all training steps so far, summed over the ranks.
        self.verify_totals = {"completions": 0, "requests": 0}
        self.ref_scorer = None
        if loss.kl_coef > 0:
            self.ref_scorer = copy.deepcopy(scorer).eval().requires_grad_(False)

    def setup(self, stage: str) -> None:
        """model=judge: the frozen models' inputs of every training record, computed once before
        the first step (and before any validation, which must not fix the input scaling)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if hasattr(self.scorer, "precompute") and datamodule is not None and datamodule.train_records:
            self.scorer.precompute(datamodule.train_records)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["verify_totals"] = dict(self.verify_totals)  # a resumed run's cost axis goes on

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.verify_totals.update(checkpoint.get("verify_totals", {}))

    def on_fit_start(self) -> None:
        self._place_target()

    def on_validation_start(self) -> None:
        self._place_target()

    def _place_target(self) -> None:
        """An in-process target with device=auto runs where this rank's scorer runs."""
        target = self.verifier.target
        if getattr(target, "follows_module", False) and target.device != str(self.device):
            target.to(self.device)

    def verified(self, batch: RecordBatch, accept_len: torch.Tensor) -> Verification:
        """Verifies this rank's samples; the invalid share is checked over all ranks at once, so
        that every rank stops together instead of one waiting for the others forever."""
        result = self.verifier.verify(batch.records, accept_len, check_invalid=False)
        stats = result.stats
        counts = [stats["invalid"], accept_len.numel(), stats["completions"], stats["requests"]]
        counts = torch.tensor(counts, device=self.device, dtype=torch.float64)
        invalid, total, completions, requests = self.trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        self.verifier.check_invalid(int(invalid), int(total))
        if self.training:
            self.verify_totals["completions"] += int(completions)
            self.verify_totals["requests"] += int(requests)
        return result

    def accept_logits(self, batch: RecordBatch, scorer: ScoringActor | None = None) -> torch.Tensor:
        """[B, K] accept logits for a batch."""
        scorer = scorer or self.scorer
        return scorer(batch.input_ids, batch.attention_mask, batch.context_len, batch.target_ids)

    def training_step(self, batch: RecordBatch, batch_idx: int) -> torch.Tensor:
        mismatch = mismatch_mask(batch.draft_ids, batch.target_ids)  # [B, K]
        logits = self.accept_logits(batch)  # [B, K]
        # The loss makes its rollouts: GRPO samples N decision vectors, loss=exact takes every outcome.
        rollouts = self.loss_fn.rollouts(logits, mismatch)  # accept_len [B, N]
        result = self.verified(batch, rollouts.accept_len)
        rollouts = score(rollouts, result.correct, result.valid, self.loss_fn, self.reward)
        ref_logits = None
        if self.ref_scorer is not None:
            with torch.no_grad():
                ref_logits = self.accept_logits(batch, self.ref_scorer)
        stats = self._update(batch, logits, rollouts, ref_logits)
        self._log_train(rollouts, stats, result.stats)
        return stats.loss.detach()

    def _update(self, batch: RecordBatch, logits: torch.Tensor, rollouts: Rollouts, ref_logits) -> GRPOStats:
        opt = self.optimizers()
        for epoch in range(self.loss_fn.ppo_epochs):
            if epoch > 0:
                logits = self.accept_logits(batch)
            stats = self.loss_fn(logits, rollouts, ref_logits)
            self._optimizer_step(opt, stats.loss)
        return stats

    def _optimizer_step(self, opt, loss: torch.Tensor) -> None:
        """One update of the scorer on `loss` (manual optimisation: one trainer step)."""
        opt.zero_grad()
        self.manual_backward(loss)
        self._clip_gradients(opt)
        opt.step()

    def _clip_gradients(self, opt) -> None:
        if self.hparams.grad_clip <= 0:
            return
        wrapped = self.trainer.strategy.model
        if hasattr(wrapped, "clip_grad_norm_"):  # FSDP (v1): only it knows the norm over all shards
            wrapped.clip_grad_norm_(self.hparams.grad_clip)
        else:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")

    def _log_train(self, rollouts: Rollouts, stats: GRPOStats, verify_stats: dict[str, float]) -> None:
        """Train metrics are expectations under the policy: sample means for GRPO (weights 1/N),
        exact P(j)-weighted sums over the outcomes for loss=exact."""
        expected, correct, accepted = rollouts.expected, rollouts.correct, rollouts.accepted
        probs = torch.sigmoid(rollouts.old_logits)[rollouts.mismatch]
        metrics = {
            "train/loss": stats.loss.detach(),
            "train/policy_loss": stats.policy_loss.detach(),
            "train/kl": stats.kl.detach(),
            "train/entropy": stats.entropy.detach(),
            "train/clip_fraction": stats.clip_fraction,
            "train/reward": expected(rollouts.rewards),
            "train/accuracy": expected(correct),
            "train/accept_len": expected(rollouts.accept_len),
            "train/accept_prob": probs.mean() if probs.numel() else torch.tensor(0.0),
            "train/scenario_A": expected(accepted & correct),
            "train/scenario_B": expected(accepted & ~correct),
            "train/scenario_C": expected(~accepted & correct),
            "train/scenario_D": expected(~accepted & ~correct),
            "verify/latency_s": float(verify_stats["latency_s"]),
        }
        # Counts of one step: under DDP/FSDP the total over all processes (each has its own records).
        totals = {
            "train/zero_variance_groups": rollouts.zero_variance.float().sum(),
            **{f"verify/{name}": float(v) for name, v in verify_stats.items() if name != "latency_s"},
        }
        size = len(rollouts.accept_len)
        # sync_dist: averaged (totals: summed) over the processes; a no-op in a single process.
        self.log_dict(metrics, batch_size=size, sync_dist=True)
        self.log_dict(totals, batch_size=size, sync_dist=True, reduce_fx="sum")
        # Running totals over all ranks (summed in verified()): the cost axis of learning curves.
        self.log_dict({f"verify/total_{name}": float(v) for name, v in self.verify_totals.items()}, batch_size=size)
        for name in ("reward", "accept_len"):
            self.log(name, metrics[f"train/{name}"], prog_bar=True, logger=False, batch_size=size, sync_dist=True)

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
        result = self.verified(batch, accept_len)
        accepted = accepted_any_mismatch(accept_len, mismatch)  # [B, 3]
        rewards = compute_reward_tensor(accepted, result.correct, accept_len, k, self.reward)  # [B, 3]
        for col, name in enumerate(VAL_POLICIES):
            valid = result.valid[:, col]
            n = valid.sum().clamp(min=1)
            metrics = {
                val_key(name, "accuracy"): (result.correct[:, col] & valid).sum() / n,
                val_key(name, "accept_len"): (accept_len[:, col].float() * valid).sum() / n,
                val_key(name, "reward"): (rewards[:, col] * valid).sum() / n,
            }
            self.log_dict(metrics, batch_size=len(batch), sync_dist=True, prog_bar=name == "scorer")
        return {
            "accept_probs": probs.detach(),  # [B, K]
            "mismatch": mismatch,  # [B, K]
            "accept_len": accept_len,  # [B, 3], columns in VAL_POLICIES order
            "correct": result.correct,  # [B, 3]
            "rewards": rewards,  # [B, 3]
            "texts": result.texts,  # (record index, j) -> response text
        }

    def configure_model(self) -> None:
        """FSDP2 (trainer=fsdp2): ModelParallelStrategy sets `device_mesh` and calls this hook before
        every fit/validate, so it must be idempotent; other strategies leave the model as it is.
        Each transformer block of the backbone becomes its own FSDP unit, then each scorer as a
        whole: the embedding stays in the scorer's unit, which is gathered for its whole forward
        (the embedding is used twice there: input tokens and the target's alternatives)."""
        if self.device_mesh is None:
            return
        try:
            from torch.distributed.fsdp import FSDPModule, fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import FSDPModule, fully_shard

        mesh = self.device_mesh["data_parallel"]
        for scorer in (self.scorer, self.ref_scorer):
            if scorer is None or isinstance(scorer, FSDPModule):
                continue
            # transformers names the block classes that must not be split (the decoder layers).
            blocks = set(getattr(scorer.backbone, "_no_split_modules", None) or ())
            for module in scorer.backbone.modules():
                if type(module).__name__ in blocks:
                    fully_shard(module, mesh=mesh)
            fully_shard(scorer, mesh=mesh)

    def configure_optimizers(self):
        head = list(self.scorer.head.parameters())
        backbone = [p for p in self.scorer.backbone.parameters() if p.requires_grad]
        groups = [{"params": head}]
        if backbone:
            lr = self.optimizer_factory.keywords["lr"] * self.hparams.backbone_lr_scale
            groups.append({"params": backbone, "lr": lr})
        return self.optimizer_factory(params=groups)
