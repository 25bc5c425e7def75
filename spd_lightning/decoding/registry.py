"""The one registry of policies: each is one PolicySpec (its name, what tables and plots call it,
what it needs, where it runs, how it is built). Every list of policy names in the project is
derived from REGISTRY: task=decode's decode.policies and the generation API's policy=
(DECODE_POLICIES), task=eval's families (EVAL_FAMILIES), what every validation epoch scores
(VAL_POLICIES), the lossless ones (LOSSLESS).

Adding a policy: a decision in policies.py (or anywhere: a function Block -> [B, K] bool) and one
PolicySpec here; CONTRIBUTING.md shows a worked example.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from spd_lightning.decoding.policies import (
    DISTRIBUTIONS,
    JUDGE_NEEDS,
    SCORER_NEEDS,
    Needs,
    Policy,
    PolicySettings,
    accept_all,
    greedy,
    judge_policy,
    judge_probabilities,
    kl_policy,
    reject_all,
    scorer_policy,
    watched_sd,
)
from spd_lightning.errors import SetupError
from spd_lightning.judge.zero_cost import ZeroCostJudge


@dataclass(frozen=True)
class PolicySpec:
    name: str  # as in decode.policies, tradeoff.csv, decode.json's keys
    short: str  # a table row
    label: str  # a plot legend: what the policy accepts
    needs: Needs
    build: Callable[[PolicySettings], Policy] | None = None  # None: scored on task=eval's outcome tables only
    lossless: bool = False  # writes the target's greedy tokens exactly
    evaluated: bool = False  # a family task=eval sweeps on outcome tables
    swept: bool = False  # task=eval sweeps a parameter of it (threshold, k, tau); else one point
    validated: bool = False  # scored at every validation epoch of training


def _standard_sd(settings: PolicySettings) -> Policy:
    if settings.watch_with_judge and settings.judge is not None:
        return watched_sd(judge_probabilities(settings.judge))
    return reject_all


def _kl(settings: PolicySettings) -> Policy:
    if settings.kl_threshold is None:
        raise SetupError("policy kl_below needs kl_threshold=TAU (nats; task=eval's tradeoff.csv lists each tau)")
    return kl_policy(settings.kl_threshold, settings.kl_confidence)


def _judge(settings: PolicySettings) -> Policy:
    if settings.judge is None or settings.judge_threshold is None:
        raise SetupError("policy judge needs a judge head and its threshold (judge_path=... from task=judge)")
    return judge_policy(settings.judge, settings.judge_threshold)


def _scorer(settings: PolicySettings) -> Policy:
    scorer, threshold = settings.scorer, settings.scorer_threshold
    if scorer is None:
        raise SetupError("policy scorer needs a trained scorer: task=decode ckpt_path=... (a training checkpoint)")
    if isinstance(scorer, ZeroCostJudge):  # model=judge: its head reads what the block computed
        return judge_policy(scorer.head.eval(), threshold, name="scorer")
    return scorer_policy(scorer, threshold, settings.pad_id)


# In table order.
REGISTRY = (
    PolicySpec("greedy", "greedy target", "greedy decoding by the target alone", greedy.needs,
               lambda _: greedy, lossless=True),
    PolicySpec("scorer", "SPD scorer", "SPD scorer: accept p >= t", SCORER_NEEDS, _scorer,
               evaluated=True, swept=True, validated=True),
    PolicySpec("standard_sd", "standard SD", "standard SD (reject mismatches)", reject_all.needs, _standard_sd,
               lossless=True, evaluated=True, validated=True),
    PolicySpec("accept_all", "accept all", "accept all", accept_all.needs, lambda _: accept_all,
               evaluated=True, validated=True),
    PolicySpec("topk", "top-k", "draft token in target top-k", DISTRIBUTIONS,
               evaluated=True, swept=True),
    PolicySpec("kl_below", "KL rule", "KL(target||draft) <= tau", DISTRIBUTIONS,
               _kl, evaluated=True, swept=True),
    PolicySpec("entropy_above", "entropy rule", "target entropy >= tau", DISTRIBUTIONS,
               evaluated=True, swept=True),
    PolicySpec("judge", "zero-cost judge", "zero-cost judge: accept p >= t", JUDGE_NEEDS, _judge),
)  # fmt: skip
SPECS = {spec.name: spec for spec in REGISTRY}

# The policies a decoding loop runs by name (task=decode, the generation API, bench/decode_speed.py).
DECODE_POLICIES = tuple(s.name for s in REGISTRY if s.build is not None)
# The families task=eval (and task=judge) sweep on outcome tables.
EVAL_FAMILIES = tuple(s.name for s in REGISTRY if s.evaluated)
# The policies every validation epoch scores, in the column order handed to the verifier.
VAL_POLICIES = tuple(s.name for s in REGISTRY if s.validated)
LOSSLESS = tuple(s.name for s in REGISTRY if s.lossless)


def build_policy(name: str, settings: PolicySettings) -> Policy:
    """The decoding policy called `name`, built from `settings` (a SetupError says what is missing)."""
    spec = SPECS.get(name)
    if spec is None or spec.build is None:
        raise SetupError(f"policy {name!r}: choose among {list(DECODE_POLICIES)} or pass a Policy")
    return spec.build(settings)


def check_policy_names(names: list[str], key: str) -> None:
    """A SetupError naming `key` when `names` is empty or holds a name no decoding policy has."""
    unknown = sorted(set(names) - set(DECODE_POLICIES))
    if unknown or not names:
        raise SetupError(f"{key} {list(names)}: choose among {list(DECODE_POLICIES)}")
