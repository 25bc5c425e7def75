"""The judge comparison on stored outcome tables: the training-free rules, the zero-cost judge
trained three ways (supervised on AutoJudge's labels, GRPO, the exact expected reward) and
today's ScoringActor head, all scored on the same held-out records and verdicts.

No model pass and no target call happens here: every input was computed once (judge_data.py).
Shapes: N records, K draft tokens per block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from spd_lightning.core.exact import ExactLoss
from spd_lightning.core.grpo import GRPOLoss
from spd_lightning.core.reward import RewardWeights
from spd_lightning.core.rules import TokenFeatures, quantile_thresholds
from spd_lightning.core.sampling import threshold_decisions
from spd_lightning.judge.fit import FitSettings, fit_rl, fit_supervised
from spd_lightning.judge.head import JudgeHead, JudgeInputs, autojudge_labels
from spd_lightning.models.scorer import ScoringActor
from spd_lightning.verification.outcomes import (
    OutcomeTable,
    PolicyPoint,
    RuleSweep,
    best_at_parity,
    policy_points,
    score_policy,
    tradeoff_rows,
)

# The trained judges, in table order: name -> (a table row, a plot legend).
JUDGES = {
    "judge_sup": ("judge, supervised", "zero-cost judge, supervised (AutoJudge labels)"),
    "judge_grpo": ("judge, GRPO", "zero-cost judge, GRPO"),
    "judge_exact": ("judge, exact", "zero-cost judge, exact expected reward"),
    "scorer_grpo": ("scorer head, GRPO", "ScoringActor head (draft states), GRPO"),
}


@dataclass
class Split:
    """One set of records, everything the comparison reads about it."""

    inputs: JudgeInputs
    rules: TokenFeatures  # [N, K] what the training-free rules read
    table: OutcomeTable  # verdicts against the records' reference answers
    self_table: OutcomeTable  # verdicts against the target's own final answer
    target_ids: torch.Tensor  # [N, K] the target's token at each draft position

    @property
    def mismatch(self) -> torch.Tensor:
        return self.inputs.mismatch


@dataclass
class CompareSettings:
    # Which verdicts train the judges: "target" (the target's own answer: AutoJudge) or "reference".
    labels: str = "target"
    inputs: tuple[str, ...] = ("tokens", "target_hidden")  # what the zero-cost judge reads
    hidden: int = 0  # 0: a linear head (logistic regression)
    fit: FitSettings | None = None
    scorer_lr: float = 3e-4  # today's ScoringActor head, unstandardised inputs (bench/head_drift.py)
    num_samples: int = 8
    tolerance: float = 0.01  # "at parity": accuracy at most this far below standard SD's
    # As task=eval's defaults: thresholds per judge and per rule (quantiles at the held-out
    # mismatches), the top-k values, and the KL rule's confidence mask.
    sweep: int = 49
    topk: tuple[int, ...] = (2, 3, 5, 10)
    kl_confidence: float | None = 0.9


Scorer = Callable[[Split], torch.Tensor]  # a split -> accept probabilities [N, K]


def _zero_cost(train: Split, settings: CompareSettings) -> JudgeHead:
    head = JudgeHead(JudgeHead.sizes_of(train.inputs), settings.inputs, settings.hidden)
    head.fit_scaling(train.inputs)
    return head


def train_judges(
    train: Split, settings: CompareSettings, reward: RewardWeights, scorer: ScoringActor | None
) -> tuple[dict[str, Scorer], dict[str, JudgeHead]]:
    """Every judge trained on `train`'s table: (name -> its accept probabilities on a split,
    name -> the trained zero-cost heads, for task=decode). `scorer`: an untrained ScoringActor on
    the draft's backbone (None: left out); its head trains in place, its backbone stays frozen."""
    fit = settings.fit or FitSettings()
    table = train.self_table if settings.labels == "target" else train.table
    judges: dict[str, Scorer] = {}
    heads: dict[str, JudgeHead] = {}
    labels, defined = autojudge_labels(table.correct & table.verified[:, None], train.mismatch)
    objectives = {
        "judge_sup": None,
        "judge_grpo": GRPOLoss(num_samples=settings.num_samples),
        "judge_exact": ExactLoss(),
    }
    for name, loss in objectives.items():
        head = _zero_cost(train, settings)
        logits = lambda index, head=head: head(train.inputs.select(index))  # noqa: E731
        if loss is None:
            fit_supervised(logits, head.parameters(), labels, defined, fit)
        else:
            fit_rl(logits, head.parameters(), table, loss, reward, fit)
        judges[name] = lambda split, head=head: torch.sigmoid(head(split.inputs)).detach()
        heads[name] = head.eval()
    if scorer is not None and train.inputs.draft_hidden is not None:
        actor = scorer  # a fresh ScoringActor: only its head trains, on the stored draft states

        def actor_logits(split: Split, index) -> torch.Tensor:
            return actor.score(split.inputs.draft_hidden[index], split.target_ids[index])

        fit_rl(
            lambda i: actor_logits(train, i),
            actor.head.parameters(),
            table,
            GRPOLoss(num_samples=settings.num_samples),
            reward,
            replace(fit, lr=settings.scorer_lr),
        )
        judges["scorer_grpo"] = lambda split: torch.sigmoid(actor_logits(split, slice(None))).detach()
    return judges, heads


def judge_points(name: str, probs: torch.Tensor, mismatch: torch.Tensor, sweep: int) -> list[PolicyPoint]:
    """A judge at every threshold of its sweep (quantiles of its probabilities at mismatches, and 0.5)."""
    thresholds = sorted({0.5, *quantile_thresholds(probs, mismatch, sweep)})
    return [PolicyPoint(name, t, threshold_decisions(probs, mismatch, t)) for t in thresholds]


def compare(heldout: Split, judges: dict[str, Scorer], settings: CompareSettings) -> list[dict]:
    """Tradeoff rows (outcomes.tradeoff_rows) of every rule and judge on the held-out split, each
    with `agreement`: the share of records whose response keeps the target's own answer."""
    mismatch = heldout.mismatch
    rules = RuleSweep([], list(settings.topk), kl_confidence=settings.kl_confidence, auto_thresholds=settings.sweep)
    points = policy_points(mismatch, torch.zeros(mismatch.shape), heldout.rules, rules)
    for name, judge in judges.items():
        points += judge_points(name, judge(heldout), mismatch, settings.sweep)
    rows = tradeoff_rows(heldout.table, points)
    for row, point in zip(rows, points):
        row["agreement"] = score_policy(heldout.self_table, point.decisions)["accuracy"]
    return rows


def parity_by_agreement(rows: list[dict], tolerance: float) -> dict[str, dict]:
    """As outcomes.best_at_parity, with fidelity instead of accuracy: each family's longest blocks
    whose share of responses keeping the target's own answer is at most `tolerance` below standard
    SD's (1.0 by construction). Where the target is often wrong, a changed answer rarely moves
    accuracy, and this is the measure that sees it."""
    sd = next(r for r in rows if r["policy"] == "standard_sd")["agreement"]
    return best_at_parity([{**r, "accuracy_drop": sd - r["agreement"]} for r in rows], tolerance)
