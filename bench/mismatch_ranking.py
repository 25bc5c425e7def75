"""Which score orders mismatches best by harm, on the real pair's whole generations: the rules,
the trained heads, logistic heads fitted here on held-out problems, and the lookahead (how many
draft tokens right after the mismatch the target would take in the same block: FLy's sign that
the two sequences meet again; spd_lightning/judge/ranking.py).

    python bench/mismatch_ranking.py                 # the real pair's store and sweep caches
    python bench/mismatch_ranking.py --folds 10 --bootstrap 1000

No model pass: the labels come from the completion store (every mismatch some swept policy
accepted, with its path), the scores from the sweep's feature cache and draft proposals
(sweep/features.pt and proposals.pt, not committed: a fresh machine rebuilds them by rerunning
the sweep's commands, which replay every completion from the store). The heads were trained on
other problems, so every mismatch here is held out for them; the logistic heads are fitted per
fold of whole problems. Writes mismatch_ranking.md/.json/.png into --episodes; last line
`<score>=<AUC> ... n=<mismatches>`. The sample is the mismatches a policy accepted, not all
mismatches met: a score's AUC here says how it orders the ones the sweeps looked at.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import torch

from spd_lightning.core.stats import wilson_interval
from spd_lightning.data.answers import token_holds_digit
from spd_lightning.decoding.features import MismatchFeatures, entropy_score, judge_score, kl_score, topk_score
from spd_lightning.judge.fit import FitSettings
from spd_lightning.judge.head import JudgeHead, load_judge
from spd_lightning.judge.ranking import (
    agreed_after,
    auc_interval,
    problem_folds,
    roc_auc,
    roc_curve,
)
from spd_lightning.reporting.plots import save_signed
from spd_lightning.reporting.tables import FigureTable, write_markdown
from spd_lightning.tasks.generations import head_from_checkpoint
from spd_lightning.tasks.labelled import fitted_logistic, load_labelled, store_arguments

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    store_arguments(parser)
    parser.add_argument(
        "--block-rl", type=Path, default=None,
        help="the per-block judge (default: heads/block_rl's run if there, else judges/qwen_coder_grpo.pt)",
    )  # fmt: skip
    parser.add_argument("--k", type=int, default=8, help="the sweep's draft tokens per block (the lookahead's reach)")
    parser.add_argument("--folds", type=int, default=5, help="folds of whole problems for the fitted heads")
    parser.add_argument("--steps", type=int, default=300, help="a fitted head's optimiser steps")
    parser.add_argument("--bootstrap", type=int, default=500, help="resamples of problems for each interval")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def trained_heads(args) -> dict[str, JudgeHead]:
    """The swept heads that are on disk (name -> head)."""
    own_block_rl = args.episodes / "heads" / "block_rl" / "checkpoints" / "last.ckpt"
    paths = {
        "supervised": args.episodes / "heads" / "supervised.pt",
        "block_rl": args.block_rl or _first_file(own_block_rl, ROOT / "judges" / "qwen_coder_grpo.pt"),
        "gen_rl": args.episodes / "heads" / "gen_rl" / "checkpoints" / "last.ckpt",
    }
    heads = {}
    for name, path in paths.items():
        if path.is_file():
            heads[name] = head_from_checkpoint(path) if path.suffix == ".ckpt" else load_judge(path)[0]
    return heads


def _first_file(*paths: Path) -> Path:
    return next((p for p in paths if p.is_file()), paths[-1])


NAMES = {
    "kl": "KL rule (JuDi's mask: none where the target's top-1 > 0.9)",
    "kl_unmasked": "KL alone",
    "entropy": "the target's entropy",
    "topk": "top-k (the draft token's rank)",
    "logp_draft": "log p_target(draft token)",
    "lookahead": "lookahead: draft tokens the target takes right after (FLy's sign)",
    "supervised": "supervised head (AutoJudge labels; tokens + hidden)",
    "block_rl": "per-block GRPO head (tokens + hidden)",
    "gen_rl": "whole-generation GRPO head (tokens)",
    "fit_tokens": "logistic fitted here, held-out folds: tokens",
    "fit_hidden": "logistic fitted here, held-out folds: tokens + hidden",
}


def lookahead(outcomes: list, proposals: dict, window: int) -> torch.Tensor:
    """[N] agreed_after from the sweep's draft proposals along each hybrid (NaN: not computed)."""
    counts = [agreed_after(o, proposals[o.hybrid][0], window) if o.hybrid in proposals else None for o in outcomes]
    return torch.tensor([float("nan") if c is None else float(c) for c in counts], dtype=torch.float64)


def all_scores(features: MismatchFeatures, labels, folds, heads: dict[str, JudgeHead], args) -> dict[str, torch.Tensor]:
    """name -> [N] score (higher: keep first); NaN where the score needs what a row lacks."""
    has_hidden = ~features.target_hidden.isnan().any(1)  # [N]
    scores = {
        "kl": kl_score(0.9)(features),
        "kl_unmasked": kl_score(None)(features),
        "entropy": entropy_score(features),
        "topk": topk_score(features),
        "logp_draft": features.tokens[:, 0].double(),
    }
    for name, head in heads.items():
        kept = has_hidden if "target_hidden" in head.inputs else torch.ones_like(has_hidden)
        scores[name] = _where(kept, judge_score(head), features)
    fit = FitSettings(args.steps, seed=args.seed)
    scores["fit_tokens"] = fitted_logistic(features, labels, folds, ("tokens",), fit)
    if int(has_hidden.sum()) > 2 * args.folds:
        wide, keep = ("tokens", "target_hidden"), has_hidden
        fit_wide = lambda part: fitted_logistic(part, labels[keep], folds[keep], wide, fit)  # noqa: E731
        scores["fit_hidden"] = _where(keep, fit_wide, features)
    return scores


def _where(keep: torch.Tensor, score, features: MismatchFeatures) -> torch.Tensor:
    """[N] float64: score(features of the rows `keep` [N] bool selects), NaN elsewhere."""
    out = torch.full((len(keep),), float("nan"), dtype=torch.float64)
    out[keep] = score(features.select(keep)).double()
    return out


def measure(scores: dict[str, torch.Tensor], labels: torch.Tensor, groups: torch.Tensor, common: torch.Tensor,
            args) -> list[dict]:  # fmt: skip
    """Per score: AUC with its interval on every row it is defined on, and on the common rows
    (common [N] bool: those every score is defined on, the target's hidden state computed)."""
    out = []
    for name, s in scores.items():
        defined = ~s.isnan()
        row = {"score": name, "name": NAMES.get(name, name), "n": int(defined.sum()), "n_common": int(common.sum())}
        for tag, keep in (("", defined), ("_common", common)):
            row[f"auc{tag}"] = roc_auc(s[keep], labels[keep])
            row[f"interval{tag}"] = auc_interval(s[keep], labels[keep], groups[keep], args.bootstrap, args.seed)
        out.append(row)
    return out


def table(rows: list[dict], labels: torch.Tensor, common: torch.Tensor) -> FigureTable:
    n, n_common = len(labels), int(common.sum())
    t = FigureTable(
        "ROC-AUC: a harmless mismatch rated above an important one (0.5: a coin), 95% intervals over problems",
        ["score", f"AUC, rows it reads (of {n})", "interval", f"AUC, common {n_common} rows", "interval"],
    )
    for r in rows:
        t.add(r["name"], f"{r['auc']:.3f} (n={r['n']})", _interval(r["interval"]), f"{r['auc_common']:.3f}",
              _interval(r["interval_common"]))  # fmt: skip
    return t


def where_harm_lies(outcomes: list, labels: torch.Tensor, tokenizer) -> FigureTable:
    """The harmless share by what is at stake and by where in the response the mismatch sits."""
    holds = lambda o: token_holds_digit(tokenizer, o.hybrid[o.at]) or token_holds_digit(tokenizer, o.path[o.at])  # noqa: E731
    digit = torch.tensor([holds(o) for o in outcomes])  # [N] a digit in the draft's or the target's token
    position = torch.tensor([o.at - len(o.problem) for o in outcomes])  # [N] response tokens before it
    bands = [("a number at stake (a digit in either token)", digit), ("wording", ~digit)]
    for low, high in ((0, 50), (50, 100), (100, 200), (200, None)):
        name = f"response tokens {low}-{high - 1} before it" if high else f"response tokens {low}+ before it"
        bands.append((name, (position >= low) & (position < (high or 10**9))))
    t = FigureTable("Accepting a mismatch left the answer as it was", ["mismatches", "n", "harmless", "95% interval"])
    for name, keep in bands:
        n, k = int(keep.sum()), int(labels[keep].sum())
        if n == 0:
            continue
        t.add(name, str(n), f"{k / n:.1%}", _interval(wilson_interval(k, n), "{:.1%}"))
    return t


def _interval(bounds: tuple[float, float], form: str = "{:.3f}") -> str:
    return f"{form.format(bounds[0])}-{form.format(bounds[1])}"


def draw(path: Path, scores: dict[str, torch.Tensor], labels: torch.Tensor, common: torch.Tensor) -> None:
    """Left: ROC curves on the common rows; right: important mismatches among the first kept, less
    what a random order keeps (the base rate times the count)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    y = labels[common]
    for i, (name, s) in enumerate(scores.items()):
        style = {"color": f"C{i % 10}", "linestyle": "-" if i < 10 else "--", "linewidth": 1.2}
        fpr, tpr = roc_curve(s[common], y)
        left.plot(fpr.tolist(), tpr.tolist(), label=f"{NAMES.get(name, name)}: {roc_auc(s[common], y):.3f}", **style)
        order = torch.argsort(s[common], descending=True, stable=True)
        kept = torch.arange(1, len(order) + 1)
        right.plot(kept.tolist(), ((~y[order]).cumsum(0) - kept * (~y).float().mean()).tolist(), **style)
    left.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
    left.set(xlabel="important mismatches kept (fraction)", ylabel="harmless mismatches kept (fraction)",
             title=f"ROC on {int(common.sum())} mismatches")  # fmt: skip
    right.axhline(0, color="grey", linewidth=0.8, linestyle=":")
    right.set(xlabel="mismatches kept, best-rated first", ylabel="important ones among them, minus a coin's",
              title="what a threshold keeps (lower: fewer answers changed)")  # fmt: skip
    left.legend(fontsize=7, loc="lower right")
    save_signed(fig, path)


def main() -> None:
    args = parse_args()
    data = load_labelled(args.episodes, args.tokenizer)
    outcomes, labels, features, groups = data.outcomes, data.labels, data.features, data.groups
    folds = problem_folds(groups, args.folds, args.seed)
    scores = all_scores(features, labels, folds, trained_heads(args), args)
    proposals_path = args.episodes / "sweep" / "proposals.pt"
    if proposals_path.is_file():
        scores["lookahead"] = lookahead(outcomes, torch.load(proposals_path, weights_only=False), args.k - 1)
    scores = {name: s for name, s in scores.items() if bool((~s.isnan()).any())}  # a score no row can have
    common = torch.stack([~s.isnan() for s in scores.values()]).all(0)  # [N]
    results = measure(scores, labels, groups, common, args)
    sample = (
        f"{len(labels)} mismatches accepted by a swept policy on {int(groups.max()) + 1} problems, "
        f"{int(labels.sum())} harmless ({labels.float().mean():.1%}), of {data.met} the sweeps met; "
        f"fitted heads: {args.folds} folds of whole problems, {args.steps} steps"
    )
    tables = [table(results, labels, common), where_harm_lies(outcomes, labels, data.tokenizer)]
    write_markdown(args.episodes / "mismatch_ranking.md", tables,
                   ("plot: mismatch_ranking.png, beside this file",), sample)  # fmt: skip
    (args.episodes / "mismatch_ranking.json").write_text(json.dumps({"sample": sample, "scores": results}, indent=1))
    draw(args.episodes / "mismatch_ranking.png", scores, labels, common)
    print((args.episodes / "mismatch_ranking.md").read_text())
    print(" ".join(f"{r['score']}={r['auc']:.3f}" for r in results), f"n={len(labels)}")


if __name__ == "__main__":
    main()
