"""Held-out ROC-AUC of a GRPO run's zero-cost judge at each of its checkpoints, beside what the run
logged (mean accept probability, reward spread within a group): does it learn to order
mismatches by harm as it trains, and does it stay clear of saturation?

    python bench/checkpoint_auc.py --run data/episodes_qwen_coder_bfloat16/heads/gen_rl_f1

The held-out set is bench/mismatch_ranking.py's: every mismatch a whole-generation sweep accepted
on the choosing and test problems (none of them a training problem), labelled harmless when
accepting it left the path's final answer as it was. A logistic head fitted to those labels
(5 folds of whole problems) is the ceiling to read the run against; 0.5 is a coin. A run keeps
its checkpoints with callbacks.model_checkpoint.save_top_k=-1 (every_n_train_steps apart).
Writes held_out_auc.md/.json/.png into the run folder; last line
`auc_first=.. auc_last=.. auc_max=.. logistic=.. batches=.. n=..`.

Shapes: N labelled mismatches, C checkpoints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import torch
from omegaconf import OmegaConf

from spd_lightning.judge.fit import FitSettings
from spd_lightning.judge.ranking import auc_interval, problem_folds, roc_auc
from spd_lightning.reporting.plots import read_metrics, save_signed
from spd_lightning.reporting.tables import FigureTable, write_markdown
from spd_lightning.tasks.generations import head_from_checkpoint
from spd_lightning.tasks.labelled import fitted_logistic, load_labelled, store_arguments

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# What the run logs per step that says whether it saturates (training/generation.py).
CURVES = {"train/accept_prob": "mean accept p of its decisions", "train/reward_std_in_group": "reward std in a group"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a run.py model=judge output folder (hydra.run.dir)")
    store_arguments(parser)
    parser.add_argument("--bootstrap", type=int, default=300, help="resamples of problems for each interval")
    parser.add_argument(
        "--replay",
        type=Path,
        default=None,
        help="bench/grpo_replay.py's json, drawn beside the run (default: --episodes/grpo_replay.json)",
    )
    parser.add_argument("--shape", default="one", choices=["one", "run", "uncapped"],
                        help="the replay's episode shape that is the run's (one: rollout.decisions=one)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(global step, file) of every checkpoint in run/checkpoints, by step; last.ckpt where no
    other holds its step."""
    found: dict[int, Path] = {}
    for path in sorted((run / "checkpoints").glob("*.ckpt"), key=lambda p: p.name == "last.ckpt"):
        step = int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])
        found.setdefault(step, path)
    if not found:
        raise SystemExit(f"error: no checkpoint in {run / 'checkpoints'}: train first (run.py model=judge)")
    return sorted(found.items())


def run_config(run: Path):
    """The run's composed config (its CSV logger's hparams.yaml); an empty one where there is none."""
    hparams = run / "csv" / "hparams.yaml"
    return OmegaConf.load(hparams) if hparams.is_file() else OmegaConf.create({})


def as_built(config) -> dict:
    """Batch 0: the judge's head is built with a zero last layer (judge/head.JudgeHead), so it
    rates every mismatch alike, p = model.init_accept_prob: an AUC of 0.5 by construction."""
    p = float(OmegaConf.select(config, "model.init_accept_prob", default=0.5))
    return {"step": 0, "batch": 0, "auc": 0.5, "mean_p": p, "checkpoint": "as built (one score for all)"}


def held_out(run: Path, data, args) -> list[dict]:
    """Per checkpoint: its batch, AUC on the labelled mismatches and mean accept p over them."""
    config = run_config(run)
    per_batch = int(OmegaConf.select(config, "loss.ppo_epochs", default=1))  # updates per batch
    x, rows = data.features.judge_inputs(), [as_built(config)]
    for step, path in checkpoints(run):
        with torch.no_grad():
            logits = head_from_checkpoint(path)(x)[:, 0].double()  # [N]
        rows.append({"step": step, "batch": step / per_batch, "auc": roc_auc(logits, data.labels),
                     "mean_p": float(torch.sigmoid(logits).mean()), "checkpoint": path.name})  # fmt: skip
    # The last checkpoint's logits are still at hand: its interval needs no second pass.
    rows[-1]["interval"] = auc_interval(logits, data.labels, data.groups, args.bootstrap, args.seed)
    return rows


def table(rows: list[dict], logistic: float, logistic_interval: tuple[float, float]) -> FigureTable:
    t = FigureTable(
        "Held-out ROC-AUC of the run's judge (a harmless mismatch rated above an important one; 0.5: a coin)",
        ["checkpoint", "batch", "AUC", "mean accept p on them"],
    )
    for r in rows:
        t.add(r["checkpoint"], f"{r['batch']:.0f}", f"{r['auc']:.3f}", f"{r['mean_p']:.3f}")
    low, high = rows[-1]["interval"]
    t.add("the last, 95% interval over problems", "", f"{low:.3f}-{high:.3f}", "")
    t.add("logistic head fitted to the labels (5 folds)", "", f"{logistic:.3f} ({logistic_interval[0]:.3f}-"
          f"{logistic_interval[1]:.3f})", "")  # fmt: skip
    return t


def replay_rows(path: Path, shape: str) -> dict[str, dict]:
    """The replay's rows of one episode shape (bench/grpo_replay.py's json): reward -> row; {}
    where there is no replay."""
    if not path.is_file():
        return {}
    return {r["episode"][0]: r for r in json.loads(path.read_text())["rows"] if r["episode"][1] == shape}


# The replay's rows drawn beside the run: its outcomes known, and its chance level.
REPLAY_ROWS = {"reference": ("replay: outcomes known", "tab:green"), "shuffled": ("replay: labels shuffled", "gray")}


def draw_replay(ax, replay: dict[str, dict]) -> None:
    """The replay's AUC at its marks (mean over seeds, bars: their range)."""
    for reward, (name, color) in REPLAY_ROWS.items():
        if reward not in replay:
            continue
        seeds = replay[reward]["auc_seeds"]
        marks = sorted(int(b) for b in seeds)
        mean = [sum(seeds[str(b)]) / len(seeds[str(b)]) for b in marks]
        low = [m - min(seeds[str(b)]) for m, b in zip(mean, marks)]
        high = [max(seeds[str(b)]) - m for m, b in zip(mean, marks)]
        ax.errorbar(marks, mean, yerr=[low, high], fmt="s", color=color, capsize=3, ms=4, label=name)


def draw(path: Path, rows: list[dict], curves: dict, logistic: float, replay: dict[str, dict]) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].plot([r["batch"] for r in rows], [r["auc"] for r in rows], "o-", ms=3, label="the run's judge")
    draw_replay(axes[0], replay)
    axes[0].axhline(logistic, color="green", ls="--", lw=1, label="logistic fitted to the labels")
    axes[0].axhline(0.5, color="gray", ls=":", lw=1, label="a coin")
    axes[0].set(title="held-out ROC-AUC", xlabel="batch of episodes", ylabel="AUC")
    axes[0].legend(fontsize=8)
    for ax, (key, name) in zip(axes[1:], CURVES.items()):
        points = curves.get(key, [])
        ax.plot([s for s, _ in points], [v for _, v in points], ".", ms=3)  # Lightning logs a row per batch
        ax.set(title=name, xlabel="batch of episodes")
    axes[1].set_ylim(0, 1)
    save_signed(fig, path)


def main() -> None:
    args = parse_args()
    data = load_labelled(args.episodes, args.tokenizer)
    rows = held_out(args.run, data, args)
    folds = problem_folds(data.groups, 5, args.seed)
    fitted = fitted_logistic(data.features, data.labels, folds, ("tokens",), FitSettings(300, seed=args.seed))
    logistic = roc_auc(fitted, data.labels)
    logistic_interval = auc_interval(fitted, data.labels, data.groups, args.bootstrap, args.seed)
    metrics = args.run / "csv" / "metrics.csv"
    curves = read_metrics(metrics) if metrics.is_file() else {}
    sample = (f"{len(data.labels)} labelled mismatches on {int(data.groups.max()) + 1} held-out problems "
              f"({data.labels.float().mean():.1%} harmless); {len(rows) - 1} checkpoints of {args.run.name} "
              "and the head as built")  # fmt: skip
    write_markdown(args.run / "held_out_auc.md", [table(rows, logistic, logistic_interval)],
                   ("plot: held_out_auc.png, beside this file",), sample)  # fmt: skip
    record = {"sample": sample, "rows": rows, "logistic": logistic, "logistic_interval": logistic_interval}
    (args.run / "held_out_auc.json").write_text(json.dumps(record, indent=1))
    replay = replay_rows(args.replay or args.episodes / "grpo_replay.json", args.shape)
    draw(args.run / "held_out_auc.png", rows, curves, logistic, replay)
    print((args.run / "held_out_auc.md").read_text())
    aucs = [r["auc"] for r in rows[1:]]  # the checkpoints
    print(f"auc_first={aucs[0]:.3f} auc_last={aucs[-1]:.3f} auc_max={max(aucs):.3f} logistic={logistic:.3f} "
          f"batches={rows[-1]['batch']:.0f} n={len(data.labels)}")  # fmt: skip


if __name__ == "__main__":
    main()
