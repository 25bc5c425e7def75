"""Evaluation as table lookups: verify every reachable outcome of each record once, then score
any number of policies without another target call.

A record with m mismatches can end its block at m + 1 places (at each mismatch, or at K), whatever
policy runs it (sampling.all_outcomes). Verifying those once gives correct[n, j] for every
reachable j; a policy is then its decisions [N, K] -> first rejected position j [N] -> correct[n, j].
The trained scorer at every threshold, standard SD, accept-all and the training-free rules of
rules.py all read the same table, so they are compared on exactly the same records and verdicts.

Shapes: N records, K draft tokens per block.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from spd_lightning.core.rules import TokenFeatures, entropy_decisions, kl_decisions, quantile_thresholds, topk_decisions
from spd_lightning.core.sampling import all_outcomes, first_reject, threshold_decisions
from spd_lightning.data.records import Record
from spd_lightning.verification.hybrid import HybridVerifier

METRICS = ("accuracy", "accept_len", "accepted_mismatches")


@dataclass
class OutcomeTable:
    """The verdict of every reachable block end of N records."""

    mismatch: torch.Tensor  # [N, K] bool
    correct: torch.Tensor  # [N, K+1] bool: the response is right when the block ends at j (reachable j)
    verified: torch.Tensor  # [N] bool: every reachable outcome of the record could be verified

    @staticmethod
    def cat(parts: list[OutcomeTable]) -> OutcomeTable:
        return OutcomeTable(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(OutcomeTable)))


def verify_outcomes(
    verifier: HybridVerifier, records: list[Record], mismatch: torch.Tensor
) -> tuple[OutcomeTable, dict[str, float]]:
    """One verify call for every reachable outcome of a batch of records. mismatch: [B, K].

    A record any of whose outcomes failed verification (the target gave up after its retries) is
    marked unverified and left out of every policy's metrics, so all policies see the same
    records; more failures than verify.max_invalid_fraction of the outcomes stop the run."""
    mismatch = mismatch.cpu()
    accept_len, possible = all_outcomes(mismatch)  # [B, K+1]
    result = verifier.verify(records, accept_len, check_invalid=False)
    failed = ~result.valid.cpu() & possible  # [B, K+1]
    verifier.check_invalid(int(failed.sum()), int(possible.sum()))
    return OutcomeTable(mismatch, result.correct.cpu(), ~failed.any(-1)), result.stats


@dataclass
class PolicyPoint:
    policy: str  # a name of decoding.registry's REGISTRY
    parameter: float | None  # threshold, k or tau; None for the single-point baselines
    decisions: torch.Tensor  # [N, K] bool, True = accept


def score_policy(table: OutcomeTable, decisions: torch.Tensor) -> dict[str, float]:
    """Metrics of one policy over the verified records: accuracy (share answered correctly),
    accept_len (draft tokens kept per block, 0..K) and accepted_mismatches (per block)."""
    keep = table.verified
    j = first_reject(decisions.cpu()[keep])  # [M]
    correct = table.correct[keep].gather(1, j[:, None]).squeeze(1)  # [M]
    k = table.mismatch.shape[1]
    before_j = torch.arange(k)[None, :] < j[:, None]  # [M, K]
    accepted = (table.mismatch[keep] & before_j).sum(-1)  # [M]
    m = max(int(keep.sum()), 1)
    return {
        "accuracy": float(correct.sum()) / m,
        "accept_len": float(j.sum()) / m,
        "accepted_mismatches": float(accepted.sum()) / m,
    }


@dataclass
class RuleSweep:
    """The parameters each policy family is evaluated at. KL and entropy thresholds left None are
    `auto_thresholds` quantiles of the values observed at mismatch positions."""

    thresholds: list[float]  # the scorer's accept-probability thresholds
    topk: list[int]
    kl_thresholds: list[float] | None = None
    entropy_thresholds: list[float] | None = None
    kl_confidence: float | None = None
    auto_thresholds: int = 9


def policy_points(
    mismatch: torch.Tensor, accept_probs: torch.Tensor, features: TokenFeatures, sweep: RuleSweep
) -> list[PolicyPoint]:
    """Every policy and parameter to evaluate, as decisions over the same records.

    mismatch, accept_probs (the scorer's): [N, K]."""
    kl_thresholds, entropy_thresholds = sweep.kl_thresholds, sweep.entropy_thresholds
    if kl_thresholds is None:
        kl_thresholds = quantile_thresholds(features.kl, mismatch, sweep.auto_thresholds)
    if entropy_thresholds is None:
        entropy_thresholds = quantile_thresholds(features.target_entropy, mismatch, sweep.auto_thresholds)
    thresholds, topk, kl_confidence = sweep.thresholds, sweep.topk, sweep.kl_confidence
    points = [
        PolicyPoint("standard_sd", None, ~mismatch),
        PolicyPoint("accept_all", None, torch.ones_like(mismatch)),
    ]
    points += [PolicyPoint("scorer", t, threshold_decisions(accept_probs, mismatch, t)) for t in sorted(thresholds)]
    points += [PolicyPoint("topk", k, topk_decisions(features.rank, mismatch, k)) for k in sorted(topk)]
    points += [
        PolicyPoint("kl_below", tau, kl_decisions(features.kl, mismatch, tau, features.target_top1, kl_confidence))
        for tau in sorted(kl_thresholds)
    ]
    points += [
        PolicyPoint("entropy_above", tau, entropy_decisions(features.target_entropy, mismatch, tau))
        for tau in sorted(entropy_thresholds)
    ]
    return points


def tradeoff_rows(table: OutcomeTable, points: list[PolicyPoint]) -> list[dict]:
    """One row per policy point: its metrics, plus accuracy_drop (standard SD's accuracy minus
    this one's) and accept_len_ratio (this accept_len over standard SD's; None when SD's is 0)."""
    rows = [{"policy": p.policy, "parameter": p.parameter, **score_policy(table, p.decisions)} for p in points]
    sd = next(r for r in rows if r["policy"] == "standard_sd")
    for row in rows:
        row["accuracy_drop"] = sd["accuracy"] - row["accuracy"]
        row["accept_len_ratio"] = row["accept_len"] / sd["accept_len"] if sd["accept_len"] > 0 else None
    return rows


def best_at_parity(rows: list[dict], tolerance: float) -> dict[str, dict]:
    """For each policy family, its point with the longest accepted blocks whose accuracy is at most
    `tolerance` below standard SD's (families with no such point are left out)."""
    best: dict[str, dict] = {}
    for row in rows:
        if row["accuracy_drop"] <= tolerance + 1e-12:
            current = best.get(row["policy"])
            if current is None or row["accept_len"] > current["accept_len"]:
                best[row["policy"]] = row
    return best
