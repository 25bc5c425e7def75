"""The labelled mismatches of a whole-generation sweep, read from disk: every mismatch some swept
policy accepted, with both branches in the completion store (judge/ranking.py), its features
from the sweep's cache and whether accepting it left the final answer as it was.

    labelled = load_labelled(episodes, tokenizer_dir)   # bench/whole_generations.py's output
    fitted_logistic(...)                                 # a logistic head's held-out logits per fold
    answers_right(labelled, references)                  # each branch's answer against the dataset's

Shapes: N labelled mismatches.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from spd_lightning.data.answers import gsm8k_final_number
from spd_lightning.decoding.features import MismatchFeatures
from spd_lightning.judge.fit import FitSettings, fit_supervised
from spd_lightning.judge.head import JudgeHead
from spd_lightning.judge.inputs import DiskCompletions
from spd_lightning.judge.ranking import Outcome, accepted_outcomes, cross_validated, harmless
from spd_lightning.models.hf import load_tokenizer, tokenizer_eos_ids
from spd_lightning.models.pairs import pair_dir
from spd_lightning.tasks.generations import ROOT

# The real pair's stages (bench/whole_generations.py --world qwen_coder --dtype bfloat16).
EPISODES = ROOT / "data" / "episodes_qwen_coder_bfloat16"


def store_arguments(parser: argparse.ArgumentParser) -> None:
    """--episodes (the sweep's output folder) and --tokenizer, for a bench that reads them."""
    parser.add_argument("--episodes", type=Path, default=EPISODES, help="completions.jsonl, sweep/, heads/")
    parser.add_argument("--tokenizer", type=Path, default=pair_dir("qwen_coder", ROOT) / "target")


@dataclass
class Labelled:
    outcomes: list[Outcome]  # [N]
    labels: torch.Tensor  # [N] bool: harmless
    features: MismatchFeatures  # [N] rows
    groups: torch.Tensor  # [N] long: the problem each mismatch belongs to (0..)
    met: int  # mismatches the sweeps met (the feature cache's keys)
    tokenizer: object


def load_labelled(episodes: Path, tokenizer_dir: Path, max_new_tokens: int = 384) -> Labelled:
    """Read completions.jsonl and sweep/features.pt under `episodes` (max_new_tokens: the sweeps'
    response budget); SystemExit with what to run when either is missing or holds no accepted
    mismatch."""
    store_path, features_path = episodes / "completions.jsonl", episodes / "sweep" / "features.pt"
    for path in (store_path, features_path, tokenizer_dir):
        if not path.exists():
            raise SystemExit(f"error: {path} is not there: run bench/whole_generations.py --world qwen_coder first")
    saved = torch.load(features_path, weights_only=False)
    tokenizer = load_tokenizer(str(tokenizer_dir), local_files_only=True)
    ends = tokenizer_eos_ids(tokenizer)

    def whole(prompt: tuple[int, ...], ids: tuple[int, ...]) -> bool:  # ended, or at the sweeps' budget
        return ids[-1] in ends or len(ids) - len(prompt) >= max_new_tokens

    outcomes = accepted_outcomes(DiskCompletions(store_path), saved["keys"], whole)
    if not outcomes:
        raise SystemExit(f"error: no mismatch in {features_path} was accepted by a swept policy: sweep one first")
    labels = harmless(outcomes, lambda a, b: gsm8k_final_number(tokenizer.decode(a), tokenizer.decode(b)))
    features = MismatchFeatures(**saved["rows"]).select(torch.tensor([o.row for o in outcomes]))
    problems = {p: i for i, p in enumerate(dict.fromkeys(o.problem for o in outcomes))}
    groups = torch.tensor([problems[o.problem] for o in outcomes])
    return Labelled(outcomes, labels, features, groups, len(saved["keys"]), tokenizer)


def fitted_logistic(features: MismatchFeatures, labels: torch.Tensor, folds: torch.Tensor, inputs: tuple[str, ...],
                    settings: FitSettings) -> torch.Tensor:  # fmt: skip
    """[N] held-out accept logits of logistic heads on `inputs` (AutoJudge's head) fitted to the
    labels [N] bool, one per fold [N] of whole problems."""
    data = features.judge_inputs()

    def fit_and_score(train: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
        part = data.select(train)
        head = JudgeHead(JudgeHead.sizes_of(data), inputs, hidden=0)
        head.fit_scaling(part)
        defined = torch.ones(len(train), 1, dtype=torch.bool)
        logits = lambda index: head(part.select(index))  # noqa: E731
        fit_supervised(logits, head.parameters(), labels[train, None], defined, settings)
        with torch.no_grad():
            return head(data.select(held))[:, 0]

    return cross_validated(fit_and_score, folds, len(labels))


def answers_right(labelled: Labelled, references: dict[tuple[int, ...], str]) -> tuple[torch.Tensor, ...]:
    """Against the dataset's answers (references: prompt ids -> answer): ([N] the path's answer is
    right, [N] the hybrid's is, [N] the prompt has a reference)."""
    decode, out = labelled.tokenizer.decode, []
    for o in labelled.outcomes:
        reference, cut = references.get(o.problem), len(o.problem)
        if reference is None:
            out.append((False, False, False))
            continue
        out.append((gsm8k_final_number(decode(o.path[cut:]), reference),
                    gsm8k_final_number(decode(o.hybrid[cut:]), reference), True))  # fmt: skip
    return tuple(torch.tensor(column, dtype=torch.bool) for column in zip(*out))
