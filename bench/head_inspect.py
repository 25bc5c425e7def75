"""What a trained zero-cost judge keeps: its accept probability over the mismatches it was trained
on, by what is at stake (a number or wording), beside the KL rule's choices on the same mismatches.

    python bench/head_inspect.py            # the real pair's whole-generation GRPO judge
    python bench/head_inspect.py --ckpt A.ckpt --ckpt B.ckpt --threshold 0.5

The head starts at accept probability 0.5 on every mismatch (zero weights): whatever spread it
shows after training, and whatever way it leans between numbers and wording, it learned from
GRPO's rewards. No model pass: the mismatches' features are the ones training cached
(`rollout.features`), the target's token at each comes from the completion store. Writes
head_inspect.md and head_inspect.png beside the first checkpoint's run folder; last line
`<name>: digits=<mean p> words=<mean p> spread=<std p> ...`.
"""

from __future__ import annotations

import argparse
import datetime
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import torch
from omegaconf import OmegaConf

from spd_lightning.core.grpo import clipped_surrogate
from spd_lightning.data.answers import token_holds_digit
from spd_lightning.decoding.features import MismatchFeatures, judge_score, kl_score
from spd_lightning.judge.inputs import DiskCompletions
from spd_lightning.judge.ranking import stored_path
from spd_lightning.models.hf import load_tokenizer
from spd_lightning.models.pairs import pair_dir
from spd_lightning.reporting.plots import sign_figure
from spd_lightning.reporting.tables import command_line, machine
from spd_lightning.tasks.generations import head_from_checkpoint

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EPISODES = ROOT / "data" / "episodes_qwen_coder_bfloat16"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, action="append", help="run.py model=judge checkpoints (repeatable)")
    parser.add_argument("--features", type=Path, default=EPISODES / "heads" / "features.pt")
    parser.add_argument("--store", type=Path, default=EPISODES / "completions.jsonl")
    parser.add_argument("--tokenizer", type=Path, default=pair_dir("qwen_coder", ROOT) / "target")
    parser.add_argument("--kl", type=float, default=0.447, help="the KL rule's threshold (nats) to set beside")
    parser.add_argument("--threshold", type=float, default=0.5, help="the head keeps a mismatch at p >= this")
    parser.add_argument("--noise-heads", type=int, default=200, help="heads trained on noise, for the chance gap")
    parser.add_argument("--lr", type=float, default=None, help="the head's learning rate (default: its run's)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts a step (default: its run's)")
    return parser.parse_args()


def target_tokens(keys: list, store: DiskCompletions) -> list[int | None]:
    """The target's greedy token after each key's context, read from the stored path through it."""
    paths = [stored_path(store, tuple(context)) for context, _ in keys]
    return [None if path is None else path[len(context)] for path, (context, _) in zip(paths, keys)]


def classes(keys: list, store: DiskCompletions, tokenizer) -> torch.Tensor:
    """[N] bool: the draft's or the target's token holds a digit (a number is at stake)."""
    targets = target_tokens(keys, store)
    return torch.tensor(
        [token_holds_digit(tokenizer, d) or token_holds_digit(tokenizer, t) for (_, d), t in zip(keys, targets)]
    )


def summary(name: str, p: torch.Tensor, digits: torch.Tensor, threshold: float) -> dict:
    """p: [N] accept probabilities; digits: [N] bool."""
    kept = p >= threshold
    return {
        "name": name, "mean": p.mean().item(), "std": p.std().item(),
        "digits": p[digits].mean().item(), "words": p[~digits].mean().item(),
        "kept_digits": kept[digits].float().mean().item(), "kept_words": kept[~digits].float().mean().item(),
    }  # fmt: skip


@dataclass
class RunSettings:
    """How the inspected head was trained: what the noise heads repeat."""

    steps: int  # optimiser updates
    lr: float
    prompts: int  # a batch's prompts
    episodes: int  # a prompt's episodes (GRPO's group)
    ppo_epochs: int = 1  # updates per batch, each clipped against the draws' logits
    clip: tuple[float, float] = (0.2, 0.2)  # low, high


def run_settings(ckpt: Path, args) -> RunSettings:
    """The run's optimiser steps, learning rate and step size, from its logged config
    (csv/hparams.yaml beside checkpoints/); --lr and --prompts override."""
    config = OmegaConf.load(ckpt.parent.parent / "csv" / "hparams.yaml")
    step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    lr = args.lr if args.lr is not None else float(config.optimizer.lr)
    prompts = args.prompts if args.prompts is not None else int(config.rollout.batch_size)
    loss = config.loss
    return RunSettings(
        step,
        lr,
        prompts,
        int(loss.num_episodes),
        int(loss.get("ppo_epochs", 1)),
        (float(loss.clip_low), float(loss.clip_high)),
    )


def noise_gaps(x: torch.Tensor, digits: torch.Tensor, run: RunSettings, trials: int) -> torch.Tensor:
    """[trials] mean p on wording minus on numbers, for linear heads trained as GRPO trains one
    (zero start, AdamW at the run's lr, its batches of prompts x episodes, 4 decisions each drawn
    from the head, ppo_epochs clipped updates a batch) on pure-noise advantages (N(0, 1),
    normalised per prompt): the gap chance alone gives. x: [N, D] standardised inputs."""
    gaps, episodes = [], run.prompts * run.episodes
    for seed in range(trials):
        g = torch.Generator().manual_seed(seed)
        head = torch.nn.Linear(x.shape[1], 1)
        torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
        opt = torch.optim.AdamW(head.parameters(), lr=run.lr, weight_decay=0.0)
        for _ in range(max(run.steps // run.ppo_epochs, 1)):
            rows = torch.randint(len(x), (episodes, 4), generator=g)  # [E, decisions]
            with torch.no_grad():
                old = head(x[rows]).squeeze(-1)  # [E, 4]
            accepted = torch.rand(old.shape, generator=g) < torch.sigmoid(old)
            adv = torch.randn(run.prompts, run.episodes, generator=g)  # [P, G]
            adv = ((adv - adv.mean(1, keepdim=True)) / adv.std(1, keepdim=True)).reshape(episodes, 1)  # [E, 1]
            for _ in range(run.ppo_epochs):
                logits = head(x[rows]).squeeze(-1)  # [E, 4]
                surrogate, _ = clipped_surrogate(logits, old, accepted, adv.expand_as(logits), *run.clip)
                opt.zero_grad()
                (-surrogate.mean()).backward()
                opt.step()
        with torch.no_grad():
            p = torch.sigmoid(head(x).squeeze(-1))  # [N]
        gaps.append(p[~digits].mean() - p[digits].mean())
    return torch.stack(gaps)


def table(rows: list[dict], n: int, n_digits: int) -> str:
    head = (
        f"| policy | mean p | std p | p, a number at stake ({n_digits}) | p, wording ({n - n_digits}) "
        "| kept: numbers | kept: wording |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    cell = lambda v: "-" if math.isnan(v) else f"{v:.3f}"  # noqa: E731
    return head + "".join(
        f"| {r['name']} | {cell(r['mean'])} | {cell(r['std'])} | {cell(r['digits'])} | {cell(r['words'])} "
        f"| {r['kept_digits']:.1%} | {r['kept_words']:.1%} |\n"
        for r in rows
    )


def chance_line(rows: list[dict], gaps: torch.Tensor, run: RunSettings) -> str:
    """How the trained heads' gap (wording - numbers) compares with heads trained on noise."""
    lo, hi = torch.quantile(gaps, torch.tensor([0.025, 0.975])).tolist()
    gap = {r["name"]: r["words"] - r["digits"] for r in rows[:-1]}
    trained = "; ".join(f"{n}: {g:+.3f}, reached by {(gaps >= g).float().mean():.1%} of the noise heads"
                        for n, g in gap.items())  # fmt: skip
    return (
        f"Gap (mean p on wording - on numbers), trained: {trained}. {len(gaps)} linear heads trained the same way "
        f"({run.steps} AdamW steps at lr {run.lr}, {run.ppo_epochs} a batch of {run.prompts} prompts x "
        f"{run.episodes} episodes x 4 decisions) on pure-noise advantages: "
        f"95% of their gaps within [{lo:+.3f}, {hi:+.3f}], largest {gaps.max():+.3f}."
    )


def draw(path: Path, probs: dict[str, torch.Tensor], kl: torch.Tensor, digits: torch.Tensor) -> None:
    """Left: accept probability by class, per head; right: against KL(target || draft)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bins = torch.linspace(0, 1, 41).tolist()
    for i, (name, p) in enumerate(probs.items()):
        number, wording = f"C{2 * i}", f"C{2 * i + 1}"  # one colour per class in both panels
        step = {"bins": bins, "density": True, "histtype": "step"}
        left.hist(p[digits].tolist(), **step, color=number, label=f"{name}: a number at stake")
        left.hist(p[~digits].tolist(), **step, color=wording, linestyle="--", label=f"{name}: wording")
        right.scatter(
            kl[~digits].tolist(), p[~digits].tolist(), s=4, alpha=0.4, color=wording, label=f"{name}: wording"
        )
        right.scatter(kl[digits].tolist(), p[digits].tolist(), s=4, alpha=0.4, color=number, label=f"{name}: a number")
    left.set(xlabel="the head's accept probability", ylabel="density (each class: area 1)", title="what it keeps")
    right.set(xscale="symlog", xlabel="KL(target || draft), nats", ylabel="accept probability")
    left.legend(fontsize=7)
    right.legend(fontsize=7, markerscale=3)
    sign_figure(fig)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    ckpts = args.ckpt or [EPISODES / "heads" / "gen_rl" / "checkpoints" / "last.ckpt"]
    for path in [*ckpts, args.features, args.store]:
        if not path.is_file():
            raise SystemExit(f"error: {path} is not a file: train the head first (bench/whole_generations.py)")
    saved = torch.load(args.features, weights_only=False)
    keys, features = saved["keys"], MismatchFeatures(**saved["rows"])
    digits = classes(keys, DiskCompletions(args.store), load_tokenizer(str(args.tokenizer), local_files_only=True))
    probs = {}
    for ckpt in ckpts:
        step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
        head = head_from_checkpoint(ckpt)
        probs[f"{ckpt.parent.parent.name} step {step}"] = judge_score(head)(features).float()
    # The noise heads repeat the last checkpoint's training: its inputs, scaling, steps and settings.
    run = run_settings(ckpts[-1], args)
    with torch.no_grad():
        x = (head.features(features.judge_inputs())[:, 0] - head.mean) / head.std  # [N, D]
    gaps = noise_gaps(x, digits, run, args.noise_heads)
    kl_keeps = (kl_score()(features) >= -args.kl).float()  # 0/1: the rule's decisions as probabilities
    rows = [summary(name, p, digits, args.threshold) for name, p in probs.items()]
    rows.append(summary(f"KL rule, tau={args.kl}", kl_keeps, digits, 0.5) | {"mean": math.nan, "std": math.nan})
    out = ckpts[0].parent.parent
    draw(out / "head_inspect.png", probs, features.kl.float(), digits)
    text = (
        f"Command: `{command_line()}`<br>\nMachine: {machine()}<br>\nDate: {datetime.date.today()}<br>\n"
        f"Sample: the {len(keys)} mismatches training "
        f"cached, {int(digits.sum())} with a digit in the draft's or the target's token; "
        f"kept: p >= {args.threshold}\n\n"
        f"{table(rows, len(keys), int(digits.sum()))}\n{chance_line(rows, gaps, run)}\n\n"
        "plot: head_inspect.png, beside this file\n"
    )
    (out / "head_inspect.md").write_text(text)
    print(text)
    print(" ".join(f"{r['name'].replace(' ', '_')}: digits={r['digits']:.3f} words={r['words']:.3f} "
                   f"spread={r['std']:.3f}" for r in rows[:-1]))  # fmt: skip


if __name__ == "__main__":
    main()
