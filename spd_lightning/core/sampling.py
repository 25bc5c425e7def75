"""Accept/reject decisions with speculative semantics.

Shapes: B records, N samples per record, K draft tokens per block.
A decision vector accepts or rejects every draft position; matching positions
(draft == target) are always accepted and carry no decision. Draft tokens are kept
left to right: the first rejected mismatch j ends the block and the target's token is
emitted there. Decisions after j are never executed: no log-probability, no gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def mismatch_mask(draft_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """[B, K] bool: True where the draft token differs from the target's greedy token."""
    return draft_ids != target_ids


def sample_decisions(
    accept_probs: torch.Tensor, mismatch: torch.Tensor, num_samples: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """N Bernoulli decision vectors per record from one set of probabilities.

    accept_probs: [B, K], mismatch: [B, K] -> decisions [B, N, K] bool (True = accept).
    """
    probs = accept_probs.detach().unsqueeze(1).expand(-1, num_samples, -1)  # [B, N, K]
    draws = torch.rand(probs.shape, generator=generator, device=probs.device) < probs  # [B, N, K]
    return draws | ~mismatch.unsqueeze(1)


def threshold_decisions(accept_probs: torch.Tensor, mismatch: torch.Tensor, threshold: float) -> torch.Tensor:
    """The deterministic policy: accept a mismatch when p >= threshold. [B, K] -> [B, K] bool."""
    return (accept_probs >= threshold) | ~mismatch


def changed_at(watched_max: list[float | None], threshold: float) -> int:
    """How many generations a threshold policy would change, given each one's watched_max (the
    highest probability it gave a mismatch that standard SD rejected along that generation; None:
    there was none): those with watched_max >= threshold."""
    scores = torch.tensor([p for p in watched_max if p is not None], dtype=torch.float64)
    return int((scores >= threshold).sum())


def threshold_changing_at_most(watched_max: list[float | None], tolerance: float) -> float:
    """The lowest threshold at which a threshold policy changes at most floor(tolerance * n) of n
    generations (see changed_at). Changed generations bound what the policy can cost: at most
    that share of answers. Above 1.0 no probability passes, and the policy is standard SD."""
    scores = sorted((p for p in watched_max if p is not None), reverse=True)
    allowed = math.floor(tolerance * len(watched_max) + 1e-9)
    if len(scores) <= allowed:
        return 0.0
    return math.nextafter(scores[allowed], math.inf)  # just above the first score that must not pass


def first_reject(decisions: torch.Tensor) -> torch.Tensor:
    """Index of the first rejected position, K when all are accepted. [..., K] bool -> [...] long."""
    k = decisions.shape[-1]
    rejected = ~decisions
    # argmax of a bool tensor finds the first True; rows with none need the K fallback.
    first = rejected.long().argmax(dim=-1)
    return torch.where(rejected.any(dim=-1), first, torch.full_like(first, k))


def executed_masks(accept_len: torch.Tensor, mismatch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which decisions were executed, given j = accept_len.

    accept_len: [B, N], mismatch: [B, K] -> (accepted [B, N, K], rejected [B, N, K]) bool.
    accepted: mismatches before j (each contributes log p). rejected: position j if j < K
    (contributes log(1 - p)); it is always a mismatch, because matches are never rejected.
    """
    k = mismatch.shape[-1]
    pos = torch.arange(k, device=mismatch.device)  # [K]
    j = accept_len.unsqueeze(-1)  # [B, N, 1]
    accepted = (pos < j) & mismatch.unsqueeze(1)  # [B, N, K]
    rejected = pos == j  # [B, N, K]; all False when j == K
    return accepted, rejected


def decision_log_probs(logits: torch.Tensor, accept_len: torch.Tensor, mismatch: torch.Tensor) -> torch.Tensor:
    """Per-position log-probability of each executed decision, 0 elsewhere.

    logits: [B, K] accept logits, accept_len: [B, N] -> [B, N, K].
    Summing over K gives log pi = sum_{i<j, m_i} log p_i + [j<K] log(1 - p_j).
    """
    accepted, rejected = executed_masks(accept_len, mismatch)
    log_accept = F.logsigmoid(logits).unsqueeze(1)  # [B, 1, K]
    log_reject = F.logsigmoid(-logits).unsqueeze(1)  # [B, 1, K]
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    return torch.where(accepted, log_accept, zero) + torch.where(rejected, log_reject, zero)


def sequence_log_prob(logits: torch.Tensor, accept_len: torch.Tensor, mismatch: torch.Tensor) -> torch.Tensor:
    """log pi of each sample's executed decisions. [B, K], [B, N] -> [B, N]."""
    return decision_log_probs(logits, accept_len, mismatch).sum(-1)


def accepted_any_mismatch(accept_len: torch.Tensor, mismatch: torch.Tensor) -> torch.Tensor:
    """[B, N] bool: at least one mismatch was accepted (scenarios A and B)."""
    accepted, _ = executed_masks(accept_len, mismatch)
    return accepted.any(-1)


def hybrid_prefix(context_ids: list[int], draft_ids: list[int], target_ids: list[int], accept_len: int) -> list[int]:
    """context + draft[:j] + ([target[j]] if j < K else []), as SPEC.md defines it."""
    tail = [target_ids[accept_len]] if accept_len < len(draft_ids) else []
    return list(context_ids) + list(draft_ids[:accept_len]) + tail


def all_outcomes(mismatch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every first-reject position a record can reach: j = each mismatch position, or K.

    mismatch: [B, K] -> (accept_len [B, K+1] long, possible [B, K+1] bool). Column j holds j
    where j is reachable (a mismatch, or K) and K elsewhere, so an impossible column never
    asks for a new prefix; `possible` masks those columns out."""
    b, k = mismatch.shape
    j = torch.arange(k + 1, device=mismatch.device).expand(b, -1)  # [B, K+1]
    possible = torch.cat([mismatch, torch.ones_like(mismatch[:, :1])], dim=1)  # [B, K+1]
    return torch.where(possible, j, torch.full_like(j, k)), possible
