"""task=judge: train the zero-cost judge on stored outcomes, and compare it with the training-free
rules on held-out records. The judges it saves are what task=decode (decode.judge_path) and the
generation API (judge_path=) load.

    python run.py task=judge                       # the embedded default world: about 2 minutes
    python run.py task=judge pair=qwen_coder 'judge.train=[data/gsm8k_qwen/records.jsonl]' \
        judge.train_records=150 'judge.heldout=[data/gsm8k_qwen_test/records.jsonl]' \
        judge.max_response=320 judge.scorer_lr=3e-4 judge.cache_dir=outputs/judges/qwen_coder

The stages (judge/stages.py) are kept in judge.cache_dir (default: the run directory), so a rerun
with the same cache_dir resumes. The judges train through one loop (judge/fit.py) on the train
split's outcome table: supervised on AutoJudge's labels, GRPO, and the exact expected reward;
today's ScoringActor head (GRPO, on the draft's states) beside them. Every policy is scored on the
held-out table at all its thresholds, and each judge is saved at its longest blocks at parity with
standard SD (accuracy at most judge.tolerance below it; with judge.labels=target, agreement with
the target's own answer). Writes judge_sup.pt, judge_grpo.pt, judge_exact.pt, judges.json,
judges.md, tradeoff.csv, judges.png and judges_agreement.png; the last line is
`rl_accept_len=.. rl_accuracy=.. sup_accept_len=.. sup_accuracy=.. kl_accept_len=.. kl_accuracy=..
sd_accept_len=.. sd_accuracy=..` (one line).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from spd_lightning.core.reward import RewardWeights
from spd_lightning.core.stats import wilson_interval
from spd_lightning.decoding.registry import EVAL_FAMILIES, SPECS
from spd_lightning.decoding.setup import PairSettings, load_pair
from spd_lightning.judge.compare import JUDGES, CompareSettings, compare, parity_by_agreement, train_judges
from spd_lightning.judge.fit import FitSettings
from spd_lightning.judge.head import save_judge
from spd_lightning.judge.stages import build_splits, split_records
from spd_lightning.models.scorer import ScoringActor
from spd_lightning.reporting.plots import plot_tradeoff
from spd_lightning.reporting.tables import FigureTable, print_tables, write_markdown
from spd_lightning.tasks.builders import ensure_toy_world, in_toy_world, pair_path
from spd_lightning.verification.outcomes import best_at_parity

log = logging.getLogger(__name__)

# The rules task=eval sweeps that need no trained scorer, then the judges trained here.
RULES = tuple(p for p in EVAL_FAMILIES if not SPECS[p].needs.scorer)
SHORT = {**{p: SPECS[p].short for p in RULES}, **{name: short for name, (short, _) in JUDGES.items()}}
LABELS = {**{p: SPECS[p].label for p in EVAL_FAMILIES}, **{name: label for name, (_, label) in JUDGES.items()}}


@dataclass
class JudgeConfig:
    # records.jsonl files the judges train on (task=prepare writes them; the default: the toy world's).
    train: list[str] = field(default_factory=list)
    # Keep the records of the first whole prompts that hold at least this many; null: every one.
    train_records: Optional[int] = None  # noqa: UP045 (OmegaConf reads typing.Optional, not X | None)
    # records.jsonl files of held-out prompts; []: judge.heldout_share of train's prompts.
    heldout: list[str] = field(default_factory=list)
    # Without judge.heldout: the share of train's prompts held out (split by prompt, seeded by `seed`).
    heldout_share: float = 0.1
    # The target's response budget in tokens (prepare.max_new_tokens of the records).
    max_response: int = 16
    # Where the stages are kept (inputs, completions): a rerun with the same directory resumes;
    # null: the run directory.
    cache_dir: Optional[str] = None  # noqa: UP045
    # Both models' dtype, as the records were prepared: float32 or bfloat16.
    dtype: str = "float32"
    # Rows per model pass.
    batch: int = 32
    # The verdicts the judges train on: target (the target's own answer: AutoJudge's) or reference.
    labels: str = "target"
    # What the zero-cost judge reads: tokens (the token features), target_hidden, draft_hidden.
    inputs: list[str] = field(default_factory=lambda: ["tokens", "target_hidden"])
    # The judge's hidden layer width; 0: linear (a logistic regression, as AutoJudge's).
    hidden: int = 0
    # Optimiser steps, learning rate and AdamW weight decay of every zero-cost judge.
    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-2
    # The learning rate of today's ScoringActor head (unstandardised inputs: bench/head_drift.py).
    scorer_lr: float = 3e-3
    # "At parity": accuracy (or agreement) at most this far below standard SD's.
    tolerance: float = 0.01


def judge_table(rows: list[dict], parity: dict, n: int, tolerance: float, measure: str) -> FigureTable:
    """Each rule and judge at its longest blocks at parity in `measure`."""
    title = f"Held-out: {n} records; each policy at its longest blocks with {measure} >= standard SD's - {tolerance}"
    table = FigureTable(title, ["policy", "param", "acc.", "95% CI", "agree", "kept/blk", "vs SD"])
    for policy in (*RULES, *JUDGES):
        row = parity.get(policy) if policy != "accept_all" else next(r for r in rows if r["policy"] == policy)
        if row is None:
            table.add(SHORT[policy], "none", "-", "-", "-", "-", "-")
            continue
        low, high = wilson_interval(round(row["accuracy"] * n), n)
        param = "" if row["parameter"] is None else f"{row['parameter']:.3g}"
        ratio = "-" if row["accept_len_ratio"] is None else f"{row['accept_len_ratio']:.2f}x"
        table.add(SHORT[policy], param, f"{row['accuracy']:.3f}", f"{low:.3f}-{high:.3f}",
                  f"{row['agreement']:.3f}", f"{row['accept_len']:.3f}", ratio)  # fmt: skip
    return table


def save_judges(out: Path, heads: dict, parity: dict, measure: str) -> list[Path]:
    """Each judge at its threshold at parity in `measure` (for decode.judge_path and the
    generation API), with the KL rule's tau at parity on the same records in its notes."""
    kl = parity.get("kl_below")
    notes = {"parity_measure": measure, **({"kl_threshold": kl["parameter"]} if kl else {})}
    paths = []
    for name, head in heads.items():
        paths.append(out / f"{name}.pt")
        save_judge(head, paths[-1], parity.get(name, {"parameter": 1.0})["parameter"], notes)
    return paths


def write_outputs(out: Path, rows: list[dict], summary: dict, title: str) -> None:
    """tradeoff.csv (every policy point), judges.json and judges.png (every curve)."""
    with (out / "tradeoff.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "judges.json").write_text(json.dumps(summary, indent=2) + "\n")
    png = plot_tradeoff(rows, LABELS, None, out / "judges.png", title)
    fidelity = plot_tradeoff(rows, LABELS, None, out / "judges_agreement.png", title, "agreement")
    print(f"all {len(rows)} policy points: {out / 'tradeoff.csv'}; curves: {png}, {fidelity}")


def last_line(parity: dict) -> str:
    pick = {"rl": "judge_grpo", "sup": "judge_sup", "kl": "kl_below", "sd": "standard_sd"}
    last = []
    for short, policy in pick.items():
        row = parity.get(policy, {"accept_len": float("nan"), "accuracy": float("nan")})
        last.append(f"{short}_accept_len={row['accept_len']:.3f} {short}_accuracy={row['accuracy']:.3f}")
    return " ".join(last)


def report(settings: JudgeConfig, rows: list[dict], splits: dict, out: Path, name: str) -> tuple[dict, dict]:
    """Prints and writes the two tables at parity (in agreement, then in accuracy), tradeoff.csv,
    judges.json and the plots. -> ({policy: its row at parity in accuracy}, the same in agreement)."""
    parity, agreement = best_at_parity(rows, settings.tolerance), parity_by_agreement(rows, settings.tolerance)
    n, trained = int(splits["heldout"].table.verified.sum()), len(splits["train"].mismatch)
    tables = [
        judge_table(rows, agreement, n, settings.tolerance, "agreement with the target"),
        judge_table(rows, parity, n, settings.tolerance, "accuracy"),
    ]
    legend = ("acc.: accuracy; agree: share keeping the target's own answer; kept/blk: draft tokens kept per "
              "block; none: no point of the family at parity")  # fmt: skip
    sample = f"{n} held-out records; judges trained on {trained}"
    markdown = write_markdown(out / "judges.md", tables, (legend,), sample)
    print_tables(*tables, notes=(legend, f"tables: {markdown}"))
    title = f"{name}: {n} held-out records, judges trained on {trained}"
    write_outputs(out, rows, {"heldout_records": n, "parity": parity, "settings": asdict(settings)}, title)
    return parity, agreement


def train_and_compare(settings: JudgeConfig, pair: PairSettings, out: Path, name: str, seed: int = 0) -> dict:
    """The whole task on `pair` (its models), writing to `out`; `name` heads the plots.
    -> {policy: its row at parity with standard SD in accuracy}."""
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(settings.cache_dir) if settings.cache_dir else out
    cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    train, heldout = split_records(
        settings.train, settings.heldout, settings.train_records, settings.heldout_share, seed
    )
    print(f"records: {len(train)} train, {len(heldout)} held-out; response budget {settings.max_response} tokens",
          flush=True)  # fmt: skip
    models = load_pair(pair)
    splits = build_splits(models, {"train": train, "heldout": heldout}, cache, settings.max_response, settings.batch)
    fit = FitSettings(steps=settings.steps, lr=settings.lr, weight_decay=settings.weight_decay, seed=seed)
    compare_settings = CompareSettings(
        settings.labels, tuple(settings.inputs), settings.hidden, fit, settings.scorer_lr, tolerance=settings.tolerance
    )
    scorer = ScoringActor(models[0].get_decoder())
    judges, heads = train_judges(splits["train"], compare_settings, RewardWeights(), scorer)
    rows = compare(splits["heldout"], judges, compare_settings)
    parity, agreement = report(settings, rows, splits, out, name)
    # Judges trained on agreement with the target run at their point at parity in agreement.
    measure = "agreement" if settings.labels == "target" else "accuracy"
    saved = save_judges(out, heads, agreement if measure == "agreement" else parity, measure)
    print(f"judges for decode.judge_path / judge_path=: {', '.join(str(p) for p in saved)}")
    print(last_line(parity), flush=True)
    return parity


def judge(cfg: DictConfig) -> float | None:
    """run.py's task=judge."""
    ensure_toy_world(cfg)
    settings = JudgeConfig(**OmegaConf.to_container(cfg.judge, resolve=True))
    source = PairSettings(
        pair_path(cfg, "draft"), pair_path(cfg, "target"), settings.dtype, "cpu", False,
        draft_key="pair.draft", target_key="pair.target", section="judge",
    )  # fmt: skip
    name = "toy" if in_toy_world(cfg, "pair.target") else Path(source.target).parent.name
    parity = train_and_compare(settings, source, Path(cfg.paths.output_dir), name, cfg.seed)
    policy, _, metric = str(cfg.optimized_metric).partition("/")
    return parity.get(policy, {}).get(metric)
