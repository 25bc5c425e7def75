"""What decides at a block's mismatches: the Block a policy reads and the policies themselves.

A policy maps a Block of B rows and K draft tokens to [B, K] bool, True = keep the draft token.
Only mismatches (draft token != the target's greedy token) are read; the loops keep matching
tokens whatever a policy says. Each policy says what it reads beyond the token ids in typed
fields (Needs), so a loop computes only that. The registry of named policies is registry.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from spd_lightning.core.rules import kl_decisions, token_features
from spd_lightning.core.sampling import threshold_decisions
from spd_lightning.data.records import Record, collate_records
from spd_lightning.judge.head import JudgeHead, JudgeInputs, judge_token_features
from spd_lightning.judge.zero_cost import ZeroCostJudge
from spd_lightning.models.lm import PrefixCache
from spd_lightning.models.scorer import ScoringActor


@dataclass
class Block:
    """One speculative block of the B unfinished rows."""

    contexts: list[list[int]]  # prompt + response so far, per row
    prompt_lens: list[int]  # where each row's response starts
    draft_ids: torch.Tensor  # [B, K] the draft's proposals (CPU)
    target_ids: torch.Tensor  # [B, K+1] the target's greedy token at each draft position, then after the block
    target_logits: torch.Tensor | None = None  # [B, K+1, V] the target's distributions there
    draft_logits: torch.Tensor | None = None  # [B, K(+1), V] the draft's (Needs.distributions)
    target_hidden: torch.Tensor | None = None  # [B, K, H] the target's last hidden states (Needs.target_hidden)

    @property
    def mismatch(self) -> torch.Tensor:
        """[B, K] bool: the draft token differs from the target's."""
        k = self.draft_ids.shape[1]
        return self.draft_ids != self.target_ids[:, :k]


@dataclass(frozen=True)
class Needs:
    """What a policy reads beyond the block's token ids, and what must exist before it can run."""

    drafts: bool = True  # False: the target decodes alone (greedy), no block to decide
    distributions: bool = False  # both models' distributions at the draft positions (Block.draft_logits)
    target_hidden: bool = False  # the target's last hidden states at the draft tokens (Block.target_hidden)
    scorer: bool = False  # a trained scorer (task=decode's ckpt_path)
    judge: bool = False  # a saved judge head (judge_path)

    def union(self, other: Needs) -> Needs:
        """What a policy and its watcher read together."""
        return Needs(**{f: getattr(self, f) or getattr(other, f) for f in self.__dataclass_fields__})


Decide = Callable[[Block], torch.Tensor]  # Block -> [B, K] (bool decisions or float probabilities)


@dataclass(frozen=True)
class Policy:
    """One decision rule. `watch` (optional): a threshold rule's probabilities, recorded at the
    mismatches this policy rejects (Generation.watched_max) without changing what it decides."""

    name: str
    decide: Decide
    needs: Needs = field(default_factory=Needs)
    watch: Decide | None = None

    def __call__(self, block: Block) -> torch.Tensor:
        return self.decide(block)


def as_policy(policy: Policy | Decide) -> Policy:
    """A Policy as it is; a plain callable Block -> [B, K] bool as a Policy that reads token ids only."""
    return policy if isinstance(policy, Policy) else Policy(getattr(policy, "__name__", "custom"), policy)


def _keep_none(block: Block) -> torch.Tensor:
    return torch.zeros_like(block.draft_ids, dtype=torch.bool)


def _keep_every(block: Block) -> torch.Tensor:
    return torch.ones_like(block.draft_ids, dtype=torch.bool)


# Standard speculative decoding: every mismatch ends the block (lossless).
reject_all = Policy("standard_sd", _keep_none)
# The lossy extreme: the target never overrules the draft inside a block.
accept_all = Policy("accept_all", _keep_every)
# The target alone: no draft, one target call per token.
greedy = Policy("greedy", _keep_none, Needs(drafts=False))


# What a policy reads, shared by the policies and their registry entries.
SCORER_NEEDS = Needs(scorer=True)  # the ScoringActor runs its own backbone over context + draft
DISTRIBUTIONS = Needs(distributions=True)  # the training-free rules: both models' distributions


def scorer_policy(scorer: ScoringActor, threshold: float, pad_id: int) -> Policy:
    """The trained judge: keep a mismatch when its accept probability is >= threshold, the
    probability computed as training's validation computes it (context + draft, with the
    target's tokens as the alternatives). A block of one row (the KV-cached loop) re-reads only
    what its backbone has not read yet (lm.PrefixCache)."""
    device = next(scorer.parameters()).device
    prefix_cache = PrefixCache(scorer.backbone)

    @torch.no_grad()
    def decide(block: Block) -> torch.Tensor:
        k = block.draft_ids.shape[1]
        if len(block.contexts) == 1:
            ids = block.contexts[0] + block.draft_ids[0].tolist()
            at_draft = prefix_cache.read(ids, k).last_hidden_state[:, -k:]  # [1, K, H]
            logits = scorer.score(at_draft, block.target_ids[:, :k].to(device))  # [1, K]
            return threshold_decisions(torch.sigmoid(logits).cpu(), block.mismatch, threshold)
        logits = scorer_logits(scorer, block, pad_id)  # [B, K]
        return threshold_decisions(torch.sigmoid(logits).cpu(), block.mismatch, threshold)

    return Policy("scorer", decide, SCORER_NEEDS)


def scorer_logits(scorer: ScoringActor | ZeroCostJudge, block: Block, pad_id: int) -> torch.Tensor:
    """[B, K] accept logits of a trained scorer for the rows of a block, computed as training
    computes them (one padded batch of context + draft, the target's tokens as alternatives);
    with gradients when the caller allows them."""
    device = next(scorer.parameters()).device
    k = block.draft_ids.shape[1]
    drafts, targets = block.draft_ids.tolist(), block.target_ids[:, :k].tolist()
    records = [
        Record(ctx, plen, d, t, "") for ctx, plen, d, t in zip(block.contexts, block.prompt_lens, drafts, targets)
    ]
    batch = collate_records(records, pad_id)
    return scorer(
        batch.input_ids.to(device),
        batch.attention_mask.to(device),
        batch.context_len.to(device),
        batch.target_ids.to(device),
    )  # [B, K]


def kl_policy(tau: float, confidence: float | None = 0.9) -> Policy:
    """The training-free KL rule (rules.kl_decisions): keep a mismatch when KL(target || draft)
    <= tau at its position, except where the target's top-1 probability exceeds `confidence`.
    It reads both models' distributions (the cached loop keeps the draft's from its proposals; the
    uncached loop makes one more draft pass per block); no extra target call."""

    def decide(block: Block) -> torch.Tensor:
        features = token_features(block.target_logits, block.draft_logits, block.draft_ids)
        return kl_decisions(features.kl.cpu(), block.mismatch, tau, features.target_top1.cpu(), confidence)

    return Policy("kl_below", decide, DISTRIBUTIONS)


# What the zero-cost judge reads: computed by the block's verification pass and the draft's proposals.
JUDGE_NEEDS = Needs(distributions=True, target_hidden=True, judge=True)


def judge_probabilities(head: JudgeHead) -> Decide:
    """The zero-cost judge's accept probability at every draft position: Block -> [B, K] float64 (CPU).
    It reads the target's hidden states at the draft tokens and both models' distributions, which
    the block's verification pass and the draft's proposals computed anyway: no extra model pass."""
    if "draft_hidden" in head.inputs:
        raise ValueError(
            "a judge that reads the draft's hidden states needs another draft pass; decode takes judges without"
        )

    @torch.no_grad()
    def probabilities(block: Block) -> torch.Tensor:
        tokens = judge_token_features(block.target_logits, block.draft_logits, block.draft_ids)  # [B, K, F]
        data = JudgeInputs(block.mismatch, tokens.cpu(), block.target_hidden.cpu())
        # float64: in float32 every logit above about 17 rounds to p = 1, and such a confident head
        # could not be told apart from certainty by any threshold.
        return torch.sigmoid(head(data).double())  # [B, K]

    return probabilities


def judge_policy(head: JudgeHead, threshold: float, name: str = "judge") -> Policy:
    """The zero-cost judge (judge/head.py): keep a mismatch when its accept probability is >= threshold."""
    probabilities = judge_probabilities(head)

    def decide(block: Block) -> torch.Tensor:
        return threshold_decisions(probabilities(block), block.mismatch, threshold)

    return Policy(name, decide, JUDGE_NEEDS)


def watched_sd(probabilities: Decide, needs: Needs = JUDGE_NEEDS) -> Policy:
    """Standard speculative decoding with a threshold policy watching (e.g. judge_probabilities,
    which reads `needs`): it decides as reject_all, and the loops record in Generation.watched_max
    the highest probability the watcher gave a mismatch that ended a block. Until the first
    mismatch it would keep, the threshold policy emits standard SD's tokens, so at any threshold
    above a row's watched_max it writes that row's response exactly: one standard SD run gives,
    for every threshold at once, which generations the policy would leave unchanged."""
    return Policy("standard_sd", _keep_none, reject_all.needs.union(needs), watch=probabilities)


@dataclass
class PolicySettings:
    """What the named policies need beyond their name."""

    kl_threshold: float | None = None  # kl_below: keep a mismatch when KL(target || draft) <= this (nats)
    kl_confidence: float | None = 0.9  # kl_below: strict where the target's top-1 probability exceeds this
    judge: JudgeHead | None = None  # judge: the head (judge.head.load_judge)
    judge_threshold: float | None = None  # judge: keep a mismatch when its probability is >= this
    # standard_sd with the judge watching (policies.watched_sd): which generations any threshold changes.
    watch_with_judge: bool = False
    scorer: ScoringActor | ZeroCostJudge | None = None  # scorer: a trained one (task=decode's ckpt_path)
    scorer_threshold: float = 0.5  # scorer: keep a mismatch when its probability is >= this
    pad_id: int = 0  # scorer: the filler of padded rows
