"""Does the whole-generation judge's GRPO set-up learn when each decision's outcome is known?

GRPO replayed on the labelled mismatches of the real pair's sweeps (spd_lightning/judge/replay.py):
the run's head (its inputs), learning rate, batch (prompts x episodes), updates a batch, cap on
forks and reward weights, read from the run's logged config. Folds of whole problems: each
fold's mismatches are held out while the others train, and the held-out logits after every batch
join into one cross-validated score per batch, set against a logistic head fitted to the labels
on the same folds (what supervision reaches on these inputs).

    python bench/grpo_replay.py                   # about 3 minutes on 2 cores
    python bench/grpo_replay.py --batches 960 --seeds 3
    python bench/grpo_replay.py --max-forks 1 --seeds 3   # the run's episodes, one accept at most

Three ways to draw an episode: one mismatch (each decision its own reward), 16 mismatches with at
most max_forks kept (the run's training episodes: a response meets about 17, and at p = 0.5 two
accepts take about 4 decisions, as the run logged 3.8-4.7), 16 with no cap (the regime the run's
validation decides in); each rewarded against the dataset's answer (the run's
rollout.reference), against the target's own answer, and, as a control, against labels shuffled
over the mismatches (what the same training makes of no signal: its AUC should stay near 0.5).
No model pass, no target call: the labels and features come from the sweep
(bench/mismatch_ranking.py's sample). Writes grpo_replay.md/.json/.png into --episodes; last
line `<reward>_<episode>_auc_<batches>=.. logistic=.. n=..`.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib
import torch
from omegaconf import OmegaConf

from spd_lightning.core.reward import RewardWeights
from spd_lightning.judge.fit import FitSettings
from spd_lightning.judge.head import JudgeHead, JudgeInputs
from spd_lightning.judge.ranking import auc_interval, problem_folds, roc_auc
from spd_lightning.judge.replay import ReplayLabels, ReplaySettings, center_as_drawn, train_replay
from spd_lightning.reporting.plots import save_signed
from spd_lightning.reporting.tables import FigureTable, write_markdown
from spd_lightning.tasks.generations import load_problems, problem_sets
from spd_lightning.tasks.labelled import Labelled, answers_right, fitted_logistic, load_labelled, store_arguments

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    store_arguments(parser)
    parser.add_argument("--world", choices=["qwen_coder", "toy"], default="qwen_coder", help="whose problem sets")
    gsm8k = ROOT.parent / "shared" / "data" / "gsm8k"
    parser.add_argument("--data", type=Path, default=gsm8k, help="GSM8K jsonl folder (the references)")
    for name in ("train", "choose", "test"):
        parser.add_argument(f"--{name}", type=int, default=None, help="as bench/whole_generations.py was run")
    parser.add_argument("--run", type=Path, default=None, help="the run's hparams.yaml (default: heads/gen_rl/csv/)")
    parser.add_argument("--batches", type=int, default=240, help="batches of episodes per fold (the run had 24)")
    parser.add_argument("--folds", type=int, default=5, help="folds of whole problems")
    parser.add_argument("--seeds", type=int, default=6, help="repeats of every fold with other draws")
    parser.add_argument("--bootstrap", type=int, default=300, help="resamples of problems for each interval")
    parser.add_argument(
        "--center", choices=["rows", "drawn"], default="rows",
        help="the head's input mean: over the training mismatches (the run's) or as episodes draw them",
    )  # fmt: skip
    parser.add_argument("--max-forks", type=int, default=None,
                        help="the run's episodes with this cap on accepts instead of the run's (0: none)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def output_stem(args) -> str:
    """grpo_replay, _centred with --center drawn, _forksN with --max-forks N."""
    stem = "grpo_replay" if args.center == "rows" else "grpo_replay_centred"
    return stem if args.max_forks is None else f"{stem}_forks{args.max_forks}"


def run_settings(path: Path) -> tuple[ReplaySettings, RewardWeights, tuple[str, ...], int]:
    """The run's episode settings, reward weights, head inputs and batches, from its logged config."""
    config = OmegaConf.load(path)
    loss, rollout = config.loss, config.rollout
    settings = ReplaySettings(
        max_forks=int(rollout.get("max_forks") or 0),  # null: no cap
        prompts=int(rollout.batch_size),
        episodes=int(loss.num_episodes),
        ppo_epochs=int(loss.get("ppo_epochs", 1)),
        lr=float(config.optimizer.lr),
    )
    weights = {k: v for k, v in OmegaConf.to_container(config.reward).items() if not k.startswith("_")}
    batches = max(int(config.trainer.max_steps or 0) // settings.ppo_epochs, 1)  # max_steps counts updates
    return settings, RewardWeights(**weights), tuple(config.model.inputs), batches


def episode_kinds(run: ReplaySettings) -> dict[str, ReplaySettings]:
    return {
        "one": replace(run, mismatches_per_episode=1, max_forks=0),
        "run": replace(run, mismatches_per_episode=16),
        "uncapped": replace(run, mismatches_per_episode=16, max_forks=0),
    }


NAMES = {
    "one": "1 mismatch an episode",
    "run": "16 mismatches, at most {forks} kept (the run's episodes)",
    "uncapped": "16 mismatches, no cap",
}
AGAINST = {
    "reference": "the dataset's answer (the run's reward)",
    "target": "the target's own answer",
    "shuffled": "control, labels shuffled over mismatches",
}


CENTRES = {"rows": "over the training mismatches (as the run's head)", "drawn": "as episodes draw the mismatches"}


def references(args, tokenizer) -> dict[tuple[int, ...], str]:
    """Prompt ids -> the dataset's answer, for every problem set of the sweep."""
    toy = args.world == "toy"
    if not toy and not args.data.is_dir():
        raise SystemExit(f"error: {args.data} is not there: pass the GSM8K jsonl folder with --data")
    out = {}
    for spec in problem_sets(toy, args.data, args.train, args.choose, args.test):
        problems = load_problems(spec, tokenizer)
        out.update(zip(problems.prompts, problems.answers))
    return out


@dataclass
class Fold:
    """What every replay of one fold shares: its held-out rows [H], its training problems (each
    [n_i] in response order) and the head's starting state (its input scaling fitted)."""

    held: torch.Tensor
    problems: list[torch.Tensor]
    start: dict[str, torch.Tensor]


def fold_plan(data: Labelled, x: JudgeInputs, folds: torch.Tensor, inputs: tuple[str, ...], center: str) -> list[Fold]:
    """One Fold per fold of whole problems; the head's inputs centred over the training rows, or
    (center="drawn") as episodes draw them."""
    position = torch.tensor([o.at for o in data.outcomes])  # [N]
    plan = []
    for fold in torch.unique(folds).tolist():
        held, train = (folds == fold).nonzero().squeeze(1), (folds != fold).nonzero().squeeze(1)
        head = JudgeHead(JudgeHead.sizes_of(x), inputs, hidden=0)
        head.fit_scaling(x.select(train))
        problems = []
        for g in torch.unique(data.groups[train]).tolist():
            members = train[data.groups[train] == g]
            problems.append(members[torch.argsort(position[members], stable=True)])
        if center == "drawn":
            center_as_drawn(head, x, problems)
        plan.append(Fold(held, problems, copy.deepcopy(head.state_dict())))
    return plan


def replay_folds(x: JudgeInputs, plan: list[Fold], labels: ReplayLabels, settings: ReplaySettings,
                 inputs: tuple[str, ...], weights: RewardWeights) -> dict[str, torch.Tensor]:  # fmt: skip
    """Train one head per fold from its starting state; -> scores [B, N] (held-out logits after
    each batch) and the per-batch logs [B] averaged over folds."""
    scores = torch.full((settings.batches, len(labels.harmless)), float("nan"))
    logs = {"accept_prob": [], "reward_std": [], "flat_groups": []}
    for fold, part in enumerate(plan):
        head = JudgeHead(JudgeHead.sizes_of(x), inputs, hidden=0)
        head.load_state_dict(part.start)
        # A small world may hold no problem with D training mismatches: its longest then serves.
        d = min(settings.mismatches_per_episode, max(len(p) for p in part.problems))
        fold_settings = replace(settings, seed=settings.seed + fold, mismatches_per_episode=d)
        trace = train_replay(head, x, labels, part.problems, part.held, fold_settings, weights)
        scores[:, part.held] = torch.stack(trace.held_logits)
        for name in logs:
            logs[name].append(torch.tensor(getattr(trace, name)))
    return {"scores": scores, **{name: torch.stack(v).mean(0) for name, v in logs.items()}}


def marks(batches: int, run_batches: int) -> list[int]:
    """The batches a table reports: the run's length, then a few up to the end."""
    return sorted({b for b in (run_batches, 4 * run_batches, 10 * run_batches, batches) if 0 < b <= batches})


def auc_curves(result: dict, labels: torch.Tensor) -> torch.Tensor:
    """[S, B] held-out AUC of every seed after every batch (computed once: the table and the plot read it)."""
    return torch.tensor([[roc_auc(s, labels) for s in scores] for scores in result["scores"]])


def summarise(name: tuple[str, str], result: dict, data: Labelled, at: list[int], args) -> dict:
    """AUCs at the marked batches (mean and range over seeds), the interval over problems of the
    first seed's last batch, and the logs averaged over seeds."""
    curves = result["auc"]  # [S, B]
    last = result["scores"][0][at[-1] - 1]
    return {
        "episode": name,
        "auc": {b: float(curves[:, b - 1].mean()) for b in at},
        "auc_seeds": {b: curves[:, b - 1].tolist() for b in at},
        "interval_last": auc_interval(last, data.labels, data.groups, args.bootstrap, args.seed),
        "accept_prob_end": float(torch.stack(result["accept_prob"])[:, -1].mean()),
        "flat_groups": float(torch.stack(result["flat_groups"]).mean()),
    }


def table(rows: list[dict], at: list[int], logistic: tuple[float, tuple[float, float]], forks: int) -> FigureTable:
    head = ["episodes", *(f"AUC after {b} batches" for b in at), f"interval over problems, {at[-1]} (seed 1)",
            "mean accept p, last batch", "groups, no spread"]  # fmt: skip
    t = FigureTable("Held-out ROC-AUC of the GRPO head: the mean over seeds [their range]", head)
    for r in rows:
        seeds = r["auc_seeds"]
        cells = [f"{r['auc'][b]:.3f} [{min(seeds[b]):.3f}-{max(seeds[b]):.3f}]" for b in at]
        against, kind = r["episode"]
        low, high = r["interval_last"]
        name = f"{AGAINST[against]}: {NAMES[kind].format(forks=forks)}"
        t.add(name, *cells, f"{low:.3f}-{high:.3f}", f"{r['accept_prob_end']:.3f}", f"{r['flat_groups']:.0%}")
    auc, (low, high) = logistic
    t.add("logistic head fitted to the labels (supervised)", *[f"{auc:.3f}"] * len(at), f"{low:.3f}-{high:.3f}",
          "-", "-")  # fmt: skip
    return t


def draw(path: Path, results: dict[str, dict], logistic: float, run_batches: int, forks: int) -> None:
    """AUC (mean over seeds, their range shaded), mean accept p and flat groups against batches."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    kinds = list(NAMES)
    for (against, kind), result in results.items():
        label = f"{against}: {NAMES[kind].format(forks=forks)}"
        style = {"color": f"C{kinds.index(kind)}", "linestyle": {"reference": "-", "target": "--"}.get(against, ":")}
        curves = result["auc"]  # [S, B]
        batches = list(range(1, curves.shape[1] + 1))
        axes[0].plot(batches, curves.mean(0).tolist(), label=label, **style)
        if against != "target":
            low, high = curves.min(0).values.tolist(), curves.max(0).values.tolist()
            axes[0].fill_between(batches, low, high, color=style["color"], alpha=0.12)
        axes[1].plot(batches, torch.stack(result["accept_prob"]).mean(0).tolist(), **style)
        axes[2].plot(batches, torch.stack(result["flat_groups"]).mean(0).tolist(), **style)
    axes[0].axhline(logistic, color="black", linestyle="--", linewidth=1, label="logistic fitted to the labels")
    axes[0].axhline(0.5, color="grey", linestyle=":", linewidth=0.8)
    for ax in axes:
        ax.axvline(run_batches, color="grey", linestyle="-.", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("batches of episodes (dash-dot: the run's length)")
    axes[0].set(ylabel="held-out ROC-AUC (shaded: range over seeds)", title="does it order mismatches by harm?")
    axes[1].set(ylabel="mean accept p at the decisions", title="saturation check", ylim=(0, 1))
    axes[2].set(ylabel="share of groups with no reward spread", title="groups that carry no signal", ylim=(0, 1))
    axes[0].legend(fontsize=6.5, loc="lower left")
    save_signed(fig, path)


def main() -> None:
    args = parse_args()
    # Every tensor here is a few hundred rows of 9 weights: one thread is 75x faster than two on
    # a CPU that anything else shares (87 ms an update against 1.2 beside a sweep).
    torch.set_num_threads(1)
    data = load_labelled(args.episodes, args.tokenizer)
    run_path = args.run or args.episodes / "heads" / "gen_rl" / "csv" / "hparams.yaml"
    if not run_path.is_file():
        raise SystemExit(f"error: {run_path} is not there: pass the GRPO run's logged config with --run")
    run, weights, inputs, run_batches = run_settings(run_path)
    run = run if args.max_forks is None else replace(run, max_forks=args.max_forks)
    if "target_hidden" in inputs and bool(data.features.target_hidden.isnan().any()):
        # The sweeps cache the target's hidden state only where a family read it.
        inputs = tuple(name for name in inputs if name != "target_hidden") or ("tokens",)
        print(f"note: the run's head read the target's hidden state, which not every labelled mismatch has: "
              f"the replay's head reads {list(inputs)}")  # fmt: skip
    folds = problem_folds(data.groups, args.folds, args.seed)
    logistic_scores = fitted_logistic(data.features, data.labels, folds, inputs, FitSettings(300, seed=args.seed))
    logistic = roc_auc(logistic_scores, data.labels)
    logistic_interval = auc_interval(logistic_scores, data.labels, data.groups, args.bootstrap, args.seed)
    path_right, hybrid_right, known = answers_right(data, references(args, data.tokenizer))
    if not bool(known.all()):
        raise SystemExit(
            f"error: {int((~known).sum())} mismatches lie on prompts of no problem set given: "
            "pass --world, --train, --choose and --test as the sweep ran"
        )
    shuffled = data.labels[torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(args.seed))]
    outcomes = {"reference": ReplayLabels(data.labels, path_right, hybrid_right),
                "target": ReplayLabels.against_target(data.labels),
                "shuffled": ReplayLabels.against_target(shuffled)}  # fmt: skip
    x = data.features.judge_inputs()
    if "target_hidden" not in inputs:  # 1,536 values a row that a tokens-only head never reads
        x = replace(x, target_hidden=None)
    plan = fold_plan(data, x, folds, inputs, args.center)
    results = {}
    for against, labels in outcomes.items():
        for kind, settings in episode_kinds(replace(run, batches=args.batches)).items():
            seeds = [replay_folds(x, plan, labels, replace(settings, seed=100 * s), inputs, weights)
                     for s in range(args.seeds)]  # fmt: skip
            results[against, kind] = {key: [r[key] for r in seeds] for key in seeds[0]}
            results[against, kind]["auc"] = auc_curves(results[against, kind], data.labels)
    at = marks(args.batches, run_batches)
    rows = [summarise(name, r, data, at, args) for name, r in results.items()]
    sample = (
        f"{len(data.labels)} labelled mismatches on {int(data.groups.max()) + 1} problems "
        f"({data.labels.float().mean():.1%} harmless), {args.folds} folds of whole problems x {args.seeds} seeds; "
        f"the run's settings ({run_path.name} of {run_path.parent.parent.name}): inputs {list(inputs)}, "
        f"lr {run.lr}, {run.prompts} prompts x {run.episodes} episodes a batch, {run.ppo_epochs} updates a batch, "
        f"{run_batches} batches; inputs centred {CENTRES[args.center]}"
    )
    out, stem = args.episodes, output_stem(args)
    write_markdown(out / f"{stem}.md", [table(rows, at, (logistic, logistic_interval), run.max_forks)],
                   (f"plot: {stem}.png, beside this file",), sample)  # fmt: skip
    record = {"sample": sample, "logistic": logistic, "logistic_interval": logistic_interval, "rows": rows}
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    draw(out / f"{stem}.png", results, logistic, run_batches, run.max_forks)
    print((out / f"{stem}.md").read_text())
    ends = sorted({at[0], at[-1]})
    last = " ".join(f"{'_'.join(r['episode'])}_auc_{b}={r['auc'][b]:.3f}" for r in rows for b in ends)
    print(last, f"logistic={logistic:.3f}", f"n={len(data.labels)}")


if __name__ == "__main__":
    main()
