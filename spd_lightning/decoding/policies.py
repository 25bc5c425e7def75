"""What decides at a block's mismatches: the Block a policy reads, the policies, and the one
registry of their names (task=decode's decode.policies, the generation API's policy=).

A policy maps a Block of B rows and K draft tokens to [B, K] bool, True = keep the draft token.
Only mismatches (draft token != the target's greedy token) are read; the loops keep matching
tokens whatever a policy says. A policy that reads both models' distributions sets
`needs_logits`, one that reads the target's hidden states `needs_hidden`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from spd_lightning.core.rules import kl_decisions, token_features
from spd_lightning.core.sampling import threshold_decisions
from spd_lightning.data.records import Record, collate_records
from spd_lightning.errors import SetupError
from spd_lightning.judge.head import JudgeHead, JudgeInputs, judge_token_features
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
    draft_logits: torch.Tensor | None = None  # [B, K(+1), V] the draft's, for policies that ask (needs_logits)
    target_hidden: torch.Tensor | None = (
        None  # [B, K, H] the target's last hidden states at the draft tokens (needs_hidden)
    )

    @property
    def mismatch(self) -> torch.Tensor:
        """[B, K] bool: the draft token differs from the target's."""
        k = self.draft_ids.shape[1]
        return self.draft_ids != self.target_ids[:, :k]


# A policy: Block -> [B, K] bool, True = keep the draft token. Only mismatches are read;
# the loop keeps matching tokens whatever it says.
Policy = Callable[[Block], torch.Tensor]


def reject_all(block: Block) -> torch.Tensor:
    """Standard speculative decoding: every mismatch ends the block (lossless)."""
    return torch.zeros_like(block.draft_ids, dtype=torch.bool)


def accept_all(block: Block) -> torch.Tensor:
    """The lossy extreme: the target never overrules the draft inside a block."""
    return torch.ones_like(block.draft_ids, dtype=torch.bool)


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
        drafts, targets = block.draft_ids.tolist(), block.target_ids[:, :k].tolist()
        records = [
            Record(ctx, plen, d, t, "") for ctx, plen, d, t in zip(block.contexts, block.prompt_lens, drafts, targets)
        ]
        batch = collate_records(records, pad_id)
        logits = scorer(
            batch.input_ids.to(device),
            batch.attention_mask.to(device),
            batch.context_len.to(device),
            batch.target_ids.to(device),
        )  # [B, K]
        return threshold_decisions(torch.sigmoid(logits).cpu(), block.mismatch, threshold)

    return decide


def kl_policy(tau: float, confidence: float | None = 0.9) -> Policy:
    """The training-free KL rule (rules.kl_decisions): keep a mismatch when KL(target || draft)
    <= tau at its position, except where the target's top-1 probability exceeds `confidence`.
    It reads both models' distributions (the cached loop keeps the draft's from its proposals; the
    uncached loop makes one more draft pass per block); no extra target call."""

    def decide(block: Block) -> torch.Tensor:
        features = token_features(block.target_logits, block.draft_logits, block.draft_ids)
        return kl_decisions(features.kl.cpu(), block.mismatch, tau, features.target_top1.cpu(), confidence)

    decide.needs_logits = True  # type: ignore[attr-defined]
    return decide


def judge_probabilities(head: JudgeHead) -> Callable[[Block], torch.Tensor]:
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

    probabilities.needs_logits = True  # type: ignore[attr-defined]
    probabilities.needs_hidden = True  # type: ignore[attr-defined]
    return probabilities


def judge_policy(head: JudgeHead, threshold: float) -> Policy:
    """The zero-cost judge (judge.py): keep a mismatch when its accept probability is >= threshold."""
    probabilities = judge_probabilities(head)

    def decide(block: Block) -> torch.Tensor:
        return threshold_decisions(probabilities(block), block.mismatch, threshold)

    decide.needs_logits = decide.needs_hidden = True  # type: ignore[attr-defined]
    return decide


def watched_sd(probabilities: Callable[[Block], torch.Tensor]) -> Policy:
    """Standard speculative decoding with a threshold policy watching (e.g. judge_probabilities):
    it decides as reject_all, and the loops record in Generation.watched_max the highest
    probability the watcher gave a mismatch that ended a block. Until the first mismatch it would
    keep, the threshold policy emits standard SD's tokens, so at any threshold above a row's
    watched_max it writes that row's response exactly: one standard SD run gives, for every
    threshold at once, which generations the policy would leave unchanged."""

    def decide(block: Block) -> torch.Tensor:
        return reject_all(block)

    decide.watch = probabilities  # type: ignore[attr-defined]
    for need in ("needs_logits", "needs_hidden"):  # the loop computes what the watcher reads
        setattr(decide, need, getattr(probabilities, need, False))
    return decide


# The policies a decoding loop runs by name (task=decode's decode.policies, the generation API), in
# table order; names.POLICIES says what each is called.
DECODE_POLICIES = ("greedy", "standard_sd", "scorer", "kl_below", "judge", "accept_all")


@dataclass
class PolicySettings:
    """What the named policies need beyond their name."""

    kl_threshold: float | None = None  # kl_below: keep a mismatch when KL(target || draft) <= this (nats)
    kl_confidence: float | None = 0.9  # kl_below: strict where the target's top-1 probability exceeds this
    judge: JudgeHead | None = None  # judge: the head (judge.load_judge)
    judge_threshold: float | None = None  # judge: keep a mismatch when its probability is >= this


def named_policy(name: str, settings: PolicySettings) -> tuple[Policy, bool]:
    """(the policy called `name`, whether it drafts: greedy does not). `scorer` needs a training
    checkpoint and is task=decode's (decode.py)."""
    if name in ("greedy", "standard_sd"):
        return reject_all, name != "greedy"
    if name == "accept_all":
        return accept_all, True
    if name == "kl_below":
        if settings.kl_threshold is None:
            raise SetupError("policy kl_below needs kl_threshold=TAU (nats; task=eval or bench/judges.py tune it)")
        return kl_policy(settings.kl_threshold, settings.kl_confidence), True
    if name == "judge":
        if settings.judge is None or settings.judge_threshold is None:
            raise SetupError("policy judge needs a judge head and its threshold (judge_path=... from bench/judges.py)")
        return judge_policy(settings.judge, settings.judge_threshold), True
    raise SetupError(f"policy {name!r}: choose among {[n for n in DECODE_POLICIES if n != 'scorer']} or pass a Policy")
