"""How well a score orders mismatches by what accepting one does to the final answer, read from
what whole-generation episodes stored: no model pass.

A stored completion keyed by context + draft token is a mismatch some policy accepted; the path
it was met on is its context's deepest stored prefix, whose completion runs through the context
and on past it (the target's own token there, then the rest). The mismatch is harmless when the
hybrid's final answer equals its path's: AutoJudge's label, taken along the path the policy
walked. ROC-AUC is how often a score rates a harmless mismatch above an important one, which is
the order a threshold rule keeps them in; 0.5 is a coin.

Shapes: N labelled mismatches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from spd_lightning.verification.hybrid import stored_pieces

# store: anything with .get(prefix) -> the target's completion or None (a CompletionCache).


def stored_completion(store, key: tuple[int, ...]) -> tuple[int, ...] | None:
    """The target's completion of `key` as far as the store holds it: a completion requested a
    segment at a time (decoding/episodes.PathSource's `segment`) goes on under its end's key."""
    pieces = stored_pieces(store, key)
    return tuple(token for piece in pieces for token in piece) if pieces else None


def stored_path(store, context: tuple[int, ...]) -> tuple[int, ...] | None:
    """The path through `context`: its deepest stored prefix followed by that prefix's completion,
    when the completion reaches past the context (None: no stored path passes through it)."""
    for cut in range(len(context), 0, -1):
        completion = stored_completion(store, context[:cut])
        if completion is not None and len(completion) > len(context) - cut:
            return context[:cut] + completion
    return None


def stored_root(store, context: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shortest stored prefix of `context`: the prompt, for a store that holds every prompt's
    own response (a mismatch's problem, for grouping)."""
    return next((context[:cut] for cut in range(1, len(context) + 1) if store.get(context[:cut]) is not None), None)


@dataclass
class Outcome:
    """One accepted mismatch whose both branches are stored."""

    row: int  # its row among the keys it came from (the feature cache's)
    problem: tuple[int, ...]  # its prompt
    at: int  # the mismatch's index in path and hybrid (its context's length)
    path: tuple[int, ...]  # context + the target's token + the rest of the target's path
    hybrid: tuple[int, ...]  # context + the draft's token + the target's completion of that


Whole = Callable[[tuple[int, ...], tuple[int, ...]], bool]  # (prompt, ids) -> a whole response


def accepted_outcomes(store, keys: Sequence[tuple[Sequence[int], int]], whole: Whole | None = None) -> list[Outcome]:
    """An Outcome for every (context, draft token) key that some episode accepted (the store holds
    the hybrid's completion) and whose path is stored. whole(prompt, ids): the ids are a whole
    response (ended, or at the budget); an outcome whose path or hybrid is known only in part (a
    fork completed a segment at a time and left before its end) has no final answer and is left
    out. None: every stored completion is whole (a store written without segments)."""
    out = []
    for row, (context, draft) in enumerate(keys):
        context = tuple(context)
        completion = stored_completion(store, context + (draft,))
        if completion is None:
            continue
        path, problem = stored_path(store, context), stored_root(store, context)
        if path is None or problem is None or path[len(context)] == draft:
            continue
        hybrid = context + (draft,) + completion
        if whole is None or (whole(problem, path) and whole(problem, hybrid)):
            out.append(Outcome(row, problem, len(context), path, hybrid))
    return out


def agreed_after(outcome: Outcome, proposals: Sequence[int], window: int) -> int | None:
    """How many draft tokens right after the mismatch the target would accept in the same block,
    at most `window` (FLy's sign that the two sequences meet again): the draft's greedy tokens along
    the hybrid (proposals[p]: its token after the prompt and p response tokens, as PathSource keeps
    them) against the target's tokens there. None: the proposals do not reach the first of them."""
    start = len(outcome.problem)
    for j in range(1, window + 1):
        p, token = outcome.at + j - start, outcome.at + j
        if p >= len(proposals) or token >= len(outcome.hybrid):
            return None if j == 1 else j - 1
        if proposals[p] != outcome.hybrid[token]:
            return j - 1
    return window


def harmless(outcomes: list[Outcome], same_answer: Callable[[tuple[int, ...], tuple[int, ...]], bool]) -> torch.Tensor:
    """[N] bool: accepting the mismatch left its path's final answer as it was.
    same_answer(hybrid response, path response): both without the prompt."""
    cut = [len(o.problem) for o in outcomes]
    return torch.tensor([same_answer(o.hybrid[c:], o.path[c:]) for o, c in zip(outcomes, cut)], dtype=torch.bool)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """[N] float64 1-based ranks of x [N], ties sharing their mean rank (-inf and +inf allowed)."""
    values, inverse, counts = torch.unique(x.double(), return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # [U] the last rank of each distinct value
    return (ends - (counts.double() - 1) / 2)[inverse]


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """P(a positive's score > a negative's) + half the ties (Mann-Whitney). scores [N], labels [N] bool."""
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = average_ranks(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def auc_interval(scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, reps: int = 500,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:  # fmt: skip
    """A bootstrap interval for roc_auc that resamples whole problems (groups [N] int: a problem's
    mismatches share its path, so they are not independent)."""
    generator = torch.Generator().manual_seed(seed)
    members = [torch.nonzero(groups == g).squeeze(1) for g in torch.unique(groups)]
    if not members:
        return float("nan"), float("nan")
    values = []
    for _ in range(reps):
        picks = torch.randint(len(members), (len(members),), generator=generator)
        index = torch.cat([members[i] for i in picks.tolist()])
        value = roc_auc(scores[index], labels[index])
        if value == value:  # a draw with one class only has no AUC
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    tail = (1 - level) / 2
    bounds = torch.tensor([tail, 1 - tail], dtype=torch.float64)
    low, high = torch.quantile(torch.tensor(values, dtype=torch.float64), bounds)
    return float(low), float(high)


def roc_curve(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([M] false-positive rate, [M] true-positive rate) as the threshold falls through every
    distinct score, from (0, 0) to (1, 1); positives: the harmless mismatches a rule keeps."""
    order = torch.argsort(scores.double(), descending=True, stable=True)
    s, y = scores.double()[order], labels[order]
    last = torch.ones(len(s), dtype=torch.bool)  # the last row of each run of equal scores
    last[:-1] = s[1:] != s[:-1]
    tp, fp = y.double().cumsum(0)[last], (~y).double().cumsum(0)[last]
    zero = torch.zeros(1, dtype=torch.float64)
    return torch.cat([zero, fp / max(fp[-1].item(), 1)]), torch.cat([zero, tp / max(tp[-1].item(), 1)])


def problem_folds(groups: torch.Tensor, folds: int, seed: int = 0) -> torch.Tensor:
    """[N] fold of each mismatch, whole problems to one fold (a held-out fold's problems are unseen)."""
    distinct = torch.unique(groups)
    order = distinct[torch.randperm(len(distinct), generator=torch.Generator().manual_seed(seed))]
    fold_of = {int(g): i % folds for i, g in enumerate(order.tolist())}
    return torch.tensor([fold_of[int(g)] for g in groups.tolist()])


def cross_validated(fit_and_score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], folds: torch.Tensor,
                    n: int) -> torch.Tensor:  # fmt: skip
    """[N] every mismatch's score from a model fitted without its fold:
    fit_and_score(train index [T], held-out index [H]) -> [H] scores."""
    out = torch.full((n,), float("nan"), dtype=torch.float64)
    for fold in torch.unique(folds).tolist():
        held = torch.nonzero(folds == fold).squeeze(1)
        train = torch.nonzero(folds != fold).squeeze(1)
        out[held] = fit_and_score(train, held).double()
    return out
