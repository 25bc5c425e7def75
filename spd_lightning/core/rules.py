"""Training-free accept rules for lossy speculative decoding: features of the draft and target
models' next-token distributions at each draft position, and the decisions they imply.

Shapes: B records, K draft tokens per block, V vocabulary. Position i is where draft_ids[i] was
proposed, after context + draft[:i]. Every rule decides only at mismatch positions (draft token
!= target's greedy token); matching positions are always accepted, as in sampling.py.

The rules, as the literature describes them:
- top-k: accept a mismatching draft token when it is among the target's k most likely tokens.
- KL (arXiv 2601.04766, "Revisiting Judge Decoding from First Principles via Training-Free
  Distributional Divergence"): accept when the divergence between the two models' distributions is
  small (the draft's deviation is a harmless rewording, not a factual error). We use
  KL(target || draft) = sum_v p_t(v) log(p_t(v) / p_d(v)): it is weighted by the target, the model
  whose answer must survive. The paper adds a confidence mask: where the target's top-1 probability
  exceeds 0.9 it verifies strictly; `confidence` does the same here (None: no mask).
- entropy (FLy, arXiv 2511.22972, "Training-Free Loosely Speculative Decoding"): its entropy gate
  loosens verification where the target's distribution leaves several plausible continuations and
  keeps exact match where it is nearly deterministic. So the rule accepts a mismatch when the target's
  entropy is AT LEAST tau (the target is unsure), not under it. FLy's second tier, a deferred window
  that watches whether the target corrects itself over the next tokens, needs extra target calls
  and is not part of this rule.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class TokenFeatures:
    """What the rules read at each draft position, all [B, K]."""

    rank: torch.Tensor  # long: tokens the target prefers over the draft token (0: the target's argmax)
    target_entropy: torch.Tensor  # nats
    kl: torch.Tensor  # KL(target || draft), nats
    target_top1: torch.Tensor  # the target's highest probability

    def cpu(self) -> TokenFeatures:
        return TokenFeatures(*(getattr(self, f.name).cpu() for f in fields(TokenFeatures)))

    @staticmethod
    def cat(parts: list[TokenFeatures]) -> TokenFeatures:
        """The features of several batches, concatenated over records."""
        return TokenFeatures(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(TokenFeatures)))


def token_features(target_logits: torch.Tensor, draft_logits: torch.Tensor, draft_ids: torch.Tensor) -> TokenFeatures:
    """Features at the K draft positions from teacher-forced logits.

    target_logits, draft_logits: [B, K(+1), V] (lm.teacher_forced_logits; a row K after the block
    is ignored), draft_ids: [B, K]. The two models may pad their vocabularies to different sizes;
    both are cut to the shared part (the tokenizer's ids) and renormalised."""
    k = draft_ids.shape[1]
    vocab = min(target_logits.shape[-1], draft_logits.shape[-1])
    log_pt = torch.log_softmax(target_logits[:, :k, :vocab].float(), dim=-1)  # [B, K, V]
    log_pd = torch.log_softmax(draft_logits[:, :k, :vocab].float(), dim=-1).to(log_pt.device)  # [B, K, V]
    draft_ids = draft_ids.to(log_pt.device)
    draft_score = log_pt.gather(-1, draft_ids[..., None])  # [B, K, 1]
    pt = log_pt.exp()
    # xlogy-style: tokens the target gives probability 0 contribute 0, not 0 * -inf.
    plogp = torch.where(pt > 0, pt * log_pt, torch.zeros_like(pt))
    return TokenFeatures(
        rank=(log_pt > draft_score).sum(-1),
        target_entropy=-plogp.sum(-1),
        kl=(plogp - torch.where(pt > 0, pt * log_pd, torch.zeros_like(pt))).sum(-1),
        target_top1=pt.max(-1).values,
    )


def accept_where(accept: torch.Tensor, mismatch: torch.Tensor) -> torch.Tensor:
    """Decisions [B, K] bool: a mismatch is accepted where `accept` holds, a match always."""
    return accept.to(mismatch.device) | ~mismatch


def topk_decisions(rank: torch.Tensor, mismatch: torch.Tensor, k: int) -> torch.Tensor:
    """Accept a mismatching draft token when it is in the target's top-k (k=1 is standard SD)."""
    return accept_where(rank < k, mismatch)


def kl_decisions(
    kl: torch.Tensor,
    mismatch: torch.Tensor,
    tau: float,
    target_top1: torch.Tensor | None = None,
    confidence: float | None = None,
) -> torch.Tensor:
    """Accept a mismatch when KL(target || draft) <= tau, except where the target's top-1
    probability exceeds `confidence` (it is sure of its own token: verify strictly)."""
    accept = kl <= tau
    if confidence is not None:
        accept = accept & (target_top1 <= confidence)
    return accept_where(accept, mismatch)


def entropy_decisions(entropy: torch.Tensor, mismatch: torch.Tensor, tau: float) -> torch.Tensor:
    """Accept a mismatch when the target's entropy is >= tau: it sees several plausible tokens."""
    return accept_where(entropy >= tau, mismatch)


def quantile_thresholds(values: torch.Tensor, mismatch: torch.Tensor, num: int) -> list[float]:
    """`num` thresholds at evenly spaced quantiles (1/(num+1) .. num/(num+1)) of `values` at
    mismatch positions, so that a sweep spans the range the data actually shows. [B, K] -> list."""
    observed = values[mismatch].double()
    if observed.numel() == 0 or num <= 0:
        return []
    levels = torch.arange(1, num + 1, dtype=torch.float64) / (num + 1)
    return sorted({float(q) for q in torch.quantile(observed.cpu(), levels)})
