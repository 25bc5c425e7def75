"""Training curves from the CSV logger's metrics.csv, as one PNG a person can glance at.

python -m spd_lightning.reporting.plots RUN_DIR   # redraws RUN_DIR/training_curves.png (a killed run's too)
"""

from __future__ import annotations

import argparse
import csv
import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a training node
import matplotlib.pyplot as plt  # noqa: E402

from spd_lightning.reporting.names import POLICIES, VAL_POLICIES, val_key  # noqa: E402
from spd_lightning.reporting.tables import provenance  # noqa: E402


def set_aside(metrics_csv: Path) -> Path | None:
    """Renames a run's metrics.csv to the next free metrics.N.csv beside it (a run resumed in the
    same folder would have the CSV logger delete it); None when there is none."""
    if not metrics_csv.is_file():
        return None
    n = len(_kept(metrics_csv))
    return metrics_csv.rename(metrics_csv.with_name(f"metrics.{n}.csv"))


def _kept(metrics_csv: Path) -> list[Path]:
    """The metrics.N.csv beside metrics_csv, oldest first."""
    kept = [p for p in metrics_csv.parent.glob("metrics.*.csv") if p.suffixes[0][1:].isdigit()]
    return sorted(kept, key=lambda p: int(p.suffixes[0][1:]))


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv -> {metric: [(step, value), ...]}, skipping empty cells; the metrics.N.csv that
    resumed runs set aside beside it come first, each later file replacing the steps from its
    first one on (a resumed run repeats what followed its checkpoint)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for file in [*_kept(path), path]:
        with file.open() as f:
            rows = [(int(row["step"]), row) for row in csv.DictReader(f)]
        if not rows:
            continue
        first = min(step for step, _ in rows)
        series = {key: [(s, v) for s, v in points if s < first] for key, points in series.items()}
        for step, row in rows:
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(key, []).append((step, float(value)))
    return series


# Policies often tie at validation (the scorer answers as standard SD): larger hollow markers
# around the scorer's filled one keep every policy's point visible.
VAL_MARKERS = {
    "scorer": {"marker": "o", "markersize": 6},
    "standard_sd": {"marker": "s", "markersize": 11, "fillstyle": "none"},
    "accept_all": {"marker": "D", "markersize": 15, "fillstyle": "none"},
}


def _plot(ax, points: list[tuple[int, float]], label: str, **kwargs) -> None:
    if points:
        steps, values = zip(*points)
        ax.plot(steps, values, label=label, **kwargs)


def plot_training_curves(metrics_csv: Path, out_png: Path) -> Path:
    series = read_metrics(metrics_csv)
    paired = "train/sd_accuracy" in series  # rollout=generation: standard SD on each step's prompts
    fig, axes = plt.subplots(1, 6 if paired else 5, figsize=(26 if paired else 22, 4))
    _plot(axes[0], series.get("train/reward", []), "train reward")
    _plot(axes[0], series.get(val_key("scorer", "reward"), []), "val reward (scorer)", marker="o")
    axes[0].set_title("reward")
    for s in "ABCD":
        _plot(axes[1], series.get(f"train/scenario_{s}", []), s)
    axes[1].set_title("scenario shares (A acc+right, B acc+wrong, C rej+right, D rej+wrong)", fontsize=8)
    for policy in VAL_POLICIES:
        name, style = POLICIES[policy].short, VAL_MARKERS.get(policy, {"marker": "o"})
        _plot(axes[2], series.get(val_key(policy, "accept_len"), []), name, **style)
        _plot(axes[3], series.get(val_key(policy, "accuracy"), []), name, **style)
    axes[2].set_title("val: draft tokens accepted per block")
    axes[3].set_title("val: accuracy")
    # Saturation shows here first: accept probabilities pinned at 0 or 1, no spread within groups.
    _plot(axes[4], series.get("train/accept_prob", []), "mean accept probability")
    _plot(axes[4], series.get("train/reward_std_in_group", []), "reward std within a group")
    axes[4].set_title("train: is the policy still exploring?")
    if paired:
        _plot_accuracy_gap(axes[5], series["train/accuracy"], series["train/sd_accuracy"])
    for i, ax in enumerate(axes):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:  # stopped before its first validation (trainer.val_check_interval), or validation off
            empty = "no validation logged\n(off, or not reached yet)" if i in (2, 3) else "nothing logged yet"
            ax.text(0.5, 0.5, empty, ha="center", va="center", color="gray", transform=ax.transAxes)
    sign_figure(fig)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def _plot_accuracy_gap(ax, policy: list[tuple[int, float]], sd: list[tuple[int, float]], window: int = 10) -> None:
    """Per step, the policy's episodes' accuracy minus standard SD's on the same prompts, and its
    running mean: learning shows as the mean rising toward 0 (or above) with mismatches kept."""
    sd_at = dict(sd)
    gap = [(step, value - sd_at[step]) for step, value in policy if step in sd_at]
    _plot(ax, gap, "per step", alpha=0.4)
    mean = [(gap[i][0], sum(g for _, g in gap[max(0, i - window + 1) : i + 1]) / min(i + 1, window))
            for i in range(len(gap))]  # fmt: skip
    _plot(ax, mean, f"mean of the last {window} steps")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_title("train: accuracy minus standard SD's\non the same prompts", fontsize=10)  # one line overran the panel


# task=eval: one curve per policy family; the single-point baselines as large markers.
TRADEOFF_STYLE = {
    "scorer": {"color": "tab:red", "marker": "o"},
    "topk": {"color": "tab:blue", "marker": "s"},
    "kl_below": {"color": "tab:green", "marker": "^"},
    "entropy_above": {"color": "tab:purple", "marker": "v"},
    "standard_sd": {"color": "black", "marker": "D"},
    "accept_all": {"color": "tab:gray", "marker": "X"},
    # the judges task=judge trains
    "judge_sup": {"color": "tab:orange", "marker": "P"},
    "judge_grpo": {"color": "tab:red", "marker": "o"},
    "judge_exact": {"color": "tab:brown", "marker": "d"},
    "scorer_grpo": {"color": "tab:pink", "marker": "h"},
}


def plot_tradeoff(
    rows: list[dict],
    labels: dict[str, str],
    highlight: dict | None,
    out_png: Path,
    title: str | None = None,
    measure: str = "accuracy",
) -> Path:
    """`measure` (accuracy, or another field of the rows) against draft tokens accepted per block.
    rows: tradeoff rows (policy, parameter, accept_len, accuracy); labels: policy -> legend text;
    highlight: the row to mark (the scorer at its configured threshold). Parameters are left to
    tradeoff.csv: a trained scorer's quantile thresholds crowd near 0 and 1, and their labels
    would cover the curves."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for policy, label in labels.items():
        points = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["accept_len"])
        if not points:
            continue
        style = TRADEOFF_STYLE.get(policy, {"marker": "o"})
        x, y = [r["accept_len"] for r in points], [r[measure] for r in points]
        if len(points) == 1:
            ax.scatter(x, y, s=90, label=label, zorder=3, **style)
        else:
            ax.plot(x, y, label=label, alpha=0.85, **style)
    if highlight is not None:
        ax.scatter(
            [highlight["accept_len"]],
            [highlight["accuracy"]],
            s=320,
            marker="*",
            color="gold",
            edgecolor="black",
            zorder=4,
            label=f"SPD scorer at t={highlight['parameter']:g} (configured)",
        )
    ax.set_xlabel("draft tokens accepted per block")
    ax.set_ylabel(measure.replace("_", " "))
    return _save(fig, ax, title or "Accuracy vs accepted draft tokens, per policy", "lower left", out_png)


def plot_speed(rows: list[dict], out_png: Path, title: str) -> Path:
    """Wall-clock tokens per second (x) against accuracy (y) per decoding method, with the
    accuracy's 95% Wilson interval as a vertical bar. rows: name, tokens_per_s, accuracy,
    ci_low, ci_high; names starting with "HF" are transformers' own generate()."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for row in rows:
        ours = not row["name"].startswith("HF")
        err = [[row["accuracy"] - row["ci_low"]], [row["ci_high"] - row["accuracy"]]]
        ax.errorbar(
            [row["tokens_per_s"]],
            [row["accuracy"]],
            yerr=err,
            fmt="o" if ours else "s",
            markersize=9,
            capsize=4,
            label=row["name"],
        )
    ax.set_xlabel("generated tokens per second (wall clock, batch size 1)")
    ax.set_ylabel("accuracy (95% Wilson interval)")
    ax.set_xlim(left=0)
    ax.set_ylim(-0.02, 1.02)
    return _save(fig, ax, title, "best", out_png)


def plot_batch_speed(series: dict[str, dict[int, float]], limits: dict[str, float], out_png: Path, title: str) -> Path:
    """Aggregate tokens per second (y, log) against batch size (x, log) per method. series:
    name -> {batch size: tokens/s}; limits: label -> tokens/s, drawn as horizontal lines (the
    memory-bandwidth bound on single-stream greedy decoding)."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    # More than 10 methods would repeat the default cycle's colours: one colour per method.
    colours = plt.get_cmap("tab10" if len(series) <= 10 else "tab20").colors
    for index, (name, points) in enumerate(series.items()):
        sizes = sorted(b for b, v in points.items() if math.isfinite(v))
        if sizes:
            style = "s--" if name.startswith(("HF", "vLLM")) else "o-"
            ax.plot(sizes, [points[b] for b in sizes], style, label=name, color=colours[index % len(colours)])
    for (label, value), colour in zip(limits.items(), ("gray", "black")):
        ax.axhline(value, color=colour, linestyle=":", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    sizes = sorted({b for points in series.values() for b in points})
    if sizes:  # room on the right for the legend
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_xlim(sizes[0] / 1.3, sizes[-1] * 12)
    ax.set_xlabel("batch size (prompts decoded together)")
    ax.set_ylabel("generated tokens per second, all rows together")
    return _save(fig, ax, title, "lower right", out_png)


def plot_judge_watch(watched: list[float | None], marks: dict[str, float], out_png: Path) -> Path:
    """The share of generations a threshold policy would change (y) at each threshold (x, as
    -log10(1 - threshold): thresholds near 1 spread out), from one standard SD run it watched.
    watched: each generation's highest probability at a mismatch standard SD rejected (None: none);
    marks: label -> threshold, drawn as vertical lines."""
    n = max(len(watched), 1)
    scores = sorted(p for p in watched if p is not None)

    def x_of(t: float) -> float:
        return -math.log10(max(1.0 - t, 1e-16))  # float64 tells no thresholds closer to 1 apart

    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [x_of(s) for s in scores]
    # A threshold just above the i-th lowest score (of m) passes the m - i - 1 above it.
    ys = [(len(scores) - i - 1) / n for i in range(len(scores))]
    end = max([*xs, *(x_of(t) for t in marks.values()), 4.0]) + 0.5
    ax.step([0.0, *xs, end], [len(scores) / n, *ys, 0.0], where="post", label="generations changed")
    for (label, t), colour in zip(marks.items(), ("tab:red", "tab:green", "tab:purple")):
        ax.axvline(x_of(t), color=colour, linestyle="--", label=f"{label}: p >= {t:.12g}")
    ax.set_xlabel("threshold, as -log10(1 - p): 2 = 0.99, 4 = 0.9999")
    ax.set_ylabel(f"share of the {len(watched)} generations changed")
    ax.set_ylim(-0.02, 1.02)
    return _save(fig, ax, "Which generations a judge threshold changes (watching standard SD)", "upper right", out_png)


def _save(fig, ax, title: str, legend_at: str, out_png: Path) -> Path:
    """One-axes figures end alike: title, grid, legend, written to out_png and closed."""
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc=legend_at)
    sign_figure(fig)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def sign_figure(fig) -> None:
    """Lays the figure out above a grey footer naming the command, the machine and the date,
    wrapped to the figure's width (a long command line stays on the page)."""
    width_in, height_in = fig.get_size_inches()
    lines = textwrap.wrap(provenance(), width=max(40, int(width_in * 19)))  # 6 pt: about 19 characters an inch
    fig.tight_layout(rect=(0, (0.1 * len(lines) + 0.06) / height_in, 1, 1))
    fig.text(0.005, 0.005, "\n".join(lines), fontsize=6, color="gray", ha="left", va="bottom")


def save_signed(fig, path: Path, dpi: int = 110) -> Path:
    """The figure laid out above its provenance footer (sign_figure), written to `path` and closed."""
    sign_figure(fig)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def draw_run_curves(run_dir: Path) -> Path | None:
    """RUN_DIR/training_curves.png from RUN_DIR/csv/metrics.csv (with the metrics.N.csv of the
    runs it resumed); None where the run logged nothing yet."""
    metrics_csv = run_dir / "csv" / "metrics.csv"
    return plot_training_curves(metrics_csv, run_dir / "training_curves.png") if metrics_csv.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description="Draws RUN_DIR/training_curves.png from RUN_DIR/csv/metrics.csv.")
    parser.add_argument("run_dir", type=Path, help="a run.py output folder (hydra.run.dir)")
    run_dir = parser.parse_args().run_dir
    drawn = draw_run_curves(run_dir)
    if drawn is None:
        metrics_csv = run_dir / "csv" / "metrics.csv"
        raise SystemExit(f"error: {metrics_csv} is not a file: run.py writes it with logger=csv (the default)")
    print(drawn)


if __name__ == "__main__":
    main()
