"""Every policy's trade-off on whole generations: threshold sweeps, the threshold chosen on one
problem set, and the figures on another, with intervals and a paired test against standard SD.

A policy family is a score of a mismatch's cached features (decoding/features.py) kept at
score >= threshold; standard SD keeps nothing, accept-all everything. Thresholds are quantiles
of the family's scores at the mismatches of the target's own responses to the choosing set, so a
sweep spans what the data shows. Shapes: N problems of a set.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spd_lightning.core.rules import quantile_thresholds
from spd_lightning.core.stats import mcnemar_exact, wilson_interval
from spd_lightning.data.answers import extract_final_number, gsm8k_final_number
from spd_lightning.data.resumable import write_atomically
from spd_lightning.decoding.episodes import mismatches_along, run_episodes
from spd_lightning.decoding.features import (
    FeatureCache,
    FeatureDecider,
    FeatureScore,
    entropy_score,
    judge_score,
    kl_score,
    topk_score,
)
from spd_lightning.decoding.progress import Progress
from spd_lightning.judge.head import JudgeHead

log = logging.getLogger(__name__)

ACCEPT_ALL, STANDARD_SD = math.inf, -math.inf  # score thresholds no score passes / every score passes


@dataclass(frozen=True)
class Family:
    name: str  # as in the bench's last line: sd, kl, gen_rl, ...
    label: str  # a table row, a plot legend
    score: FeatureScore | None  # None: a fixed rule (standard SD, accept-all)
    thresholds: tuple[float, ...] = ()  # fixed grid (top-k), tightest first; empty: quantiles of the scores
    head: bool = False  # a trained head (its name may join the bench's last line), not a rule or bound


def families(heads: dict[str, JudgeHead], kl_confidence: float = 0.9) -> list[Family]:
    """The rules, then the trained heads (name -> head: supervised, block_rl, gen_rl)."""
    labels = {
        "supervised": "AutoJudge",
        "block_rl": "GRPO block",
        "gen_rl": "GRPO gen.",
        "gen_rl_one": "GRPO gen., one",
    }
    out = [
        Family("sd", "std. SD", None, (STANDARD_SD,)),
        Family("kl", "KL rule", kl_score(kl_confidence)),
        Family("entropy", "entropy", entropy_score),
        Family("topk", "top-k", topk_score, tuple(-(k - 1.0) for k in (2, 3, 5, 10))),
    ]
    out += [Family(name, labels.get(name, name), judge_score(head), head=True) for name, head in heads.items()]
    return out + [Family("accept_all", "accept all", None, (ACCEPT_ALL,))]


@dataclass
class Point:
    """One policy at one threshold on one problem set."""

    family: str
    threshold: float
    correct: list[bool]  # the reference answer kept, per problem
    agree: list[bool]  # the target's own final answer kept, per problem
    tokens: int
    calls: int
    kept: int  # accepted mismatches
    met: int  # mismatches decided
    completions: int = 0  # target completions this point added to the store

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / max(len(self.correct), 1)

    @property
    def agreement(self) -> float:
        return sum(self.agree) / max(len(self.agree), 1)

    @property
    def tokens_per_call(self) -> float:
        return self.tokens / max(self.calls, 1)

    @property
    def calls_per_token(self) -> float:
        return self.calls / max(self.tokens, 1)

    def as_row(self) -> dict:
        lo, hi = wilson_interval(sum(self.correct), len(self.correct))
        return {"family": self.family, "threshold": self.threshold, "n": len(self.correct),
                "accuracy": self.accuracy, "accuracy_lo": lo, "accuracy_hi": hi, "agreement": self.agreement,
                "tokens_per_call": self.tokens_per_call, "calls_per_token": self.calls_per_token,
                "accepted_mismatches": self.kept, "mismatches": self.met, "completions": self.completions}  # fmt: skip


@dataclass
class SetRun:
    """What a sweep needs of one problem set: prompts, answers, the target's own answers."""

    prompts: list[tuple[int, ...]]
    answers: list[str]
    own: list[str | None] = field(default_factory=list)


def own_answers(world, run: SetRun) -> None:
    """The final answer of the target's own response to every prompt (None: it wrote none)."""
    paths = world.source.paths(run.prompts, [()] * len(run.prompts))
    run.own = [extract_final_number(world.decode(path.tokens)) for path in paths]


def decide_fixed(keep: bool):
    return lambda prompts, asks: [keep] * len(asks)


def evaluate_point(world, run: SetRun, family: Family, threshold: float, k: int, cache: FeatureCache,
                   progress: Progress | None = None) -> Point:  # fmt: skip
    """The family's episodes at one threshold on a set (completions shared through the store)."""
    if family.score is None:
        decide = decide_fixed(threshold == ACCEPT_ALL)
    else:
        decide = FeatureDecider(cache, family.score, threshold)
    before = world.source.completions
    desc = f"{family.name} t={threshold:.4g} K={k}"
    episodes = run_episodes(run.prompts, decide, world.source, k, desc, on_progress=progress)
    texts = [world.decode(e.response) for e in episodes]
    correct = [gsm8k_final_number(t, a) for t, a in zip(texts, run.answers)]
    agree = [own is not None and gsm8k_final_number(t, own) for t, own in zip(texts, run.own)]
    return Point(
        family.name, threshold, correct, agree, sum(e.num_tokens for e in episodes),
        sum(e.target_calls for e in episodes), sum(e.accepted_mismatches for e in episodes),
        sum(len(e.decisions) for e in episodes), world.source.completions - before,
    )  # fmt: skip


def thresholds_for(world, run: SetRun, family: Family, cache: FeatureCache, points: int) -> list[float]:
    """The family's first `points` fixed thresholds (top-k: the tightest k first), or `points`
    quantiles of its scores at the mismatches of the target's own responses to the set (finite
    scores only: a masked -inf is never a threshold)."""
    if family.thresholds:
        return list(family.thresholds[:points])
    met = mismatches_along(run.prompts, world.source.paths(run.prompts, [()] * len(run.prompts)))
    if not met:
        return []
    scores = family.score(cache.get([p for p, _ in met], [a for _, a in met]))
    finite = scores[torch.isfinite(scores)]
    return quantile_thresholds(finite[:, None], torch.ones(len(finite), 1, dtype=torch.bool), points)


def kept_grid(world, run: SetRun, family: Family, k: int, progress: Progress, points: int) -> list[float]:
    """thresholds_for, computed once and kept in the sweep's folder (K{k}_grid{points}_{family}.json).
    Its quantiles come from in-process passes whose bfloat16 rounding differs between CPUs: a
    sweep resumed on another machine must meet the thresholds its points on disk were measured at,
    or it measures the family again (hours on a real pair). A family measured before grids were
    kept takes the thresholds of its choosing points where they number `points`."""
    if family.thresholds:
        return list(family.thresholds[:points])
    path = progress.folder / f"K{k}_grid{points}_{family.name}.json"
    if path.is_file():
        return [float(t) for t in json.loads(path.read_text())]
    grid = [p.threshold for p in _points_on_disk(progress.folder / f"K{k}_choose_{family.name}.json")]
    if len(grid) != points:
        grid = thresholds_for(world, run, family, progress.cache, points)
        progress.save()
    write_atomically(path, json.dumps(grid))  # a stop mid-write must not leave a grid a resume cannot read
    return grid


def grid_on_disk(family: Family, k: int, progress: Progress, points: int) -> list[float]:
    """The thresholds a report reads, computing none: the family's fixed ones, its kept grid, or
    those of its choosing points on disk (empty: never swept at this K)."""
    if family.thresholds:
        return list(family.thresholds[:points])
    path = progress.folder / f"K{k}_grid{points}_{family.name}.json"
    if path.is_file():
        return [float(t) for t in json.loads(path.read_text())]
    return [p.threshold for p in _points_on_disk(progress.folder / f"K{k}_choose_{family.name}.json")]


def choose(points: list[Point], sd: Point, tolerance: float) -> Point:
    """The most tokens per target call among the points whose accuracy is at most `tolerance`
    below standard SD's (ties: the more accurate); standard SD itself when none is."""
    allowed = [p for p in points if p.accuracy >= sd.accuracy - tolerance - 1e-12]
    return max(allowed, key=lambda p: (p.tokens_per_call, p.accuracy), default=sd)


def paired(point: Point, sd: Point) -> tuple[int, int, float]:
    """(answers gained, answers lost, exact McNemar p) against standard SD on the same problems."""
    gained = sum(c and not s for c, s in zip(point.correct, sd.correct))
    lost = sum(s and not c for c, s in zip(point.correct, sd.correct))
    return gained, lost, mcnemar_exact(gained, lost)


def _points_on_disk(path: Path) -> list[Point]:
    return [Point(**row) for row in json.loads(path.read_text())] if path.is_file() else []


def stored(world, run: SetRun, name: str, family: Family, thresholds: list[float], k: int,
           progress: Progress) -> list[Point]:  # fmt: skip
    """measure's points that are on disk, the others left out (a report of what was measured)."""
    done = {p.threshold: p for p in _points_on_disk(progress.folder / f"K{k}_{name}_{family.name}.json")}
    return [done[t] for t in thresholds if t in done]


def measure(world, run: SetRun, name: str, family: Family, thresholds: list[float], k: int,
            progress: Progress) -> list[Point]:  # fmt: skip
    """The family's points at `thresholds` on the set `name`: read from its JSON in the sweep's
    folder where measured before, else measured and written there at once (other thresholds'
    points stay), so a stopped sweep keeps each point it finished."""
    path = progress.folder / f"K{k}_{name}_{family.name}.json"
    done = {p.threshold: p for p in _points_on_disk(path)}
    for t in thresholds:
        if t not in done:
            done[t] = evaluate_point(world, run, family, t, k, progress.cache, progress)
            progress.save()
            log.info("%s", _point_line(name, done[t]))
            write_atomically(path, json.dumps([vars(p) for p in done.values()]))
    return [done[t] for t in thresholds]


def sweep_family(world, runs: dict[str, SetRun], family: Family, k: int, progress: Progress,
                 settings: SweepSettings, sd_choose: Point | None) -> dict[str, list[Point]] | None:  # fmt: skip
    """The family's grid (from the choosing set's scores) on the choosing set, then on the test set
    the whole grid (settings.test_points="all") or only the threshold chosen on the choosing set
    ("chosen": what a user deploys, at a fraction of the cost on a real pair). Points are kept in
    the sweep's folder (progress.folder), one JSON per family, set and K. settings.on_disk: only
    the points measured before (None: the family was never swept at this K)."""
    if settings.on_disk:
        grid, read = grid_on_disk(family, k, progress, settings.points), stored
    else:
        grid, read = kept_grid(world, runs["choose"], family, k, progress, settings.points), measure
    on_choose = read(world, runs["choose"], "choose", family, grid, k, progress)
    if settings.on_disk and not on_choose:
        return None  # never swept at this K
    on_test = grid
    if settings.test_points == "chosen" and sd_choose is not None:
        pick = choose(on_choose, sd_choose, settings.tolerance)
        on_test = [pick.threshold] if pick.family == family.name else []
    tested = read(world, runs["test"], "test", family, on_test, k, progress)
    return {"choose": on_choose, "test": tested}


def _point_line(name: str, point: Point) -> str:
    return (f"{point.family} t={point.threshold:.6g} on {name}: accuracy {point.accuracy:.3f} "
            f"({sum(point.correct)}/{len(point.correct)}), {point.tokens_per_call:.3f} tokens per target call, "
            f"{point.kept}/{point.met} mismatches kept, {point.completions} new completions")  # fmt: skip


@dataclass(frozen=True)
class SweepSettings:
    points: int = 8  # thresholds per swept family (a fixed grid: its first `points`, tightest first)
    tolerance: float = 0.01  # accuracy below standard SD's allowed to a chosen threshold
    test_points: str = "all"  # all: the grid on the test set too; chosen: its chosen threshold only
    names: tuple[str, ...] | None = None  # only these families (standard SD always)
    on_disk: bool = False  # report the points measured before, measure none


def with_chosen(by_family: dict, tolerance: float) -> dict:
    """Each family's "chosen": its test point at the threshold chosen on the choosing set, standard
    SD's where none passes, None where the chosen one was not measured on the test set."""
    sd_choose, sd_test = by_family["sd"]["choose"][0], by_family["sd"]["test"][0]
    for sets in by_family.values():
        pick = choose(sets["choose"], sd_choose, tolerance)
        fallback = sd_test if pick is sd_choose else None
        sets["chosen"] = next((p for p in sets["test"] if p.threshold == pick.threshold), fallback)
    return by_family


def stage_sweep(world, heads: dict[str, JudgeHead], ks: list[int], settings: SweepSettings) -> dict:
    """For every K and family: the sweep on the choosing set, the threshold chosen there, and the
    test set's points (settings.test_points). -> {K: {family: {"choose": [Point], "test":
    [Point], "chosen": Point}}}; "chosen" is standard SD's test point where no threshold passes."""
    if settings.test_points not in ("all", "chosen"):
        raise ValueError(f"test_points={settings.test_points!r}: choose all or chosen")
    folder = world.out / "sweep"
    folder.mkdir(parents=True, exist_ok=True)
    names = settings.names
    # The rules and a tokens-only judge skip the target's pass over each draft token.
    hidden = any("target_hidden" in h.inputs for name, h in heads.items() if names is None or name in names)
    features = FeatureCache(world.draft, world.target, draft_states=world.source.draft_states, hidden=hidden)
    progress = Progress(features, world.source, folder)
    progress.load()
    features.on_progress = progress  # a long first `get` (a family's thresholds) saves as it goes
    runs = {}
    for name in ("choose", "test"):
        runs[name] = SetRun(world.sets[name].prompts, world.sets[name].answers)
        own_answers(world, runs[name])
    results: dict = {}
    for k in ks:
        chosen = [f for f in families(heads) if names is None or f.name in names or f.name == "sd"]
        by_family: dict = {}
        try:
            for f in chosen:  # standard SD first: the others' thresholds are chosen against it
                sd_choose = by_family["sd"]["choose"][0] if "sd" in by_family else None
                swept = sweep_family(world, runs, f, k, progress, settings, sd_choose)
                if swept is not None:
                    by_family[f.name] = swept
        finally:  # a stopped sweep (SIGTERM, Ctrl-C, an error) keeps every model pass it made
            if not settings.on_disk:  # a report writes nothing: a sweep may be saving beside it
                progress.save()
        if "sd" not in by_family or not by_family["sd"]["test"]:
            raise SystemExit(f"error: standard SD at K = {k} is not on disk: run the sweep without --on-disk first")
        results[k] = with_chosen(by_family, settings.tolerance)
    return results
