"""loss=exact against sampled GRPO on the embedded default world: reward against training steps
and against the target completions paid for it.

    python bench/exact_vs_grpo.py                       # 3 seeds x 2 losses x 100 steps, ~7 min on 2 cores
    python bench/exact_vs_grpo.py --seeds 0 --steps 60 --out outputs/bench/exact_vs_grpo

Runs `python run.py` once per loss and seed (validation every --every steps), then reads each
run's csv/metrics.csv. The reward shown is val/reward: the deterministic scorer (threshold 0.5)
on the seed's held-out records (413 for seed 0), the same yardstick for both losses. The cost axis is
verify/total_completions: hybrid prefixes the target had to complete (cache misses), summed
over the steps so far. Writes exact_vs_grpo.png and exact_vs_grpo.json into --out and prints a
table, also written to exact_vs_grpo.md (docs/exact_vs_grpo.md copies it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spd_lightning.reporting.plots import plt, read_metrics, sign_figure  # noqa: E402
from spd_lightning.reporting.tables import FigureTable, print_tables, write_markdown  # noqa: E402

LOSSES = {"grpo": "GRPO, N=8 samples", "exact": "exact expected reward"}


def run(loss: str, seed: int, steps: int, every: int, out: Path) -> Path:
    run_dir = out / f"{loss}_seed{seed}"
    if not (run_dir / "summary.json").is_file():
        cmd = [
            sys.executable, str(ROOT / "run.py"), f"loss={loss}", f"seed={seed}", f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={every}", "trainer.log_every_n_steps=1", f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
        print(f"running loss={loss} seed={seed} ...", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            sys.exit(f"loss={loss} seed={seed} failed:\n{proc.stderr[-3000:]}")
    return run_dir / "csv" / "metrics.csv"


def curves(metrics_csv: Path) -> dict[str, list[tuple[float, float]]]:
    """val/reward against steps and against cumulative target completions, and train/reward."""
    series = read_metrics(metrics_csv)
    total = dict(series["verify/total_completions"])
    val = series["val/reward"]

    def completions_at(step: int) -> float:
        done = [v for s, v in total.items() if s <= step]
        return max(done) if done else 0.0

    # The pre-fit validation is logged at step 0, the others after step s (s+1 steps done).
    by_step = [(0.0 if i == 0 else s + 1.0, r) for i, (s, r) in enumerate(val)]
    by_cost = [(0.0 if i == 0 else completions_at(s), r) for i, (s, r) in enumerate(val)]
    return {"val_by_step": by_step, "val_by_completions": by_cost, "train": series["train/reward"]}


def first_reaching(points: list[tuple[float, float]], level: float) -> float | None:
    return next((x for x, y in points if y >= level), None)


def mean_curve(runs: list[list[tuple[float, float]]]) -> tuple[list[float], list[float]]:
    xs = [sum(p[i][0] for p in runs) / len(runs) for i in range(min(map(len, runs)))]
    ys = [sum(p[i][1] for p in runs) / len(runs) for i in range(len(xs))]
    return xs, ys


def plot(results: dict[str, list[dict]], out_png: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for loss, runs in results.items():
        for key, ax in (("val_by_step", axes[0]), ("val_by_completions", axes[1])):
            for r in runs:
                ax.plot(*zip(*r[key]), alpha=0.25, color="C0" if loss == "grpo" else "C1")
            ax.plot(*mean_curve([r[key] for r in runs]), label=LOSSES[loss], color="C0" if loss == "grpo" else "C1")
        axes[2].plot(*mean_curve([r["train"] for r in runs]), label=LOSSES[loss], alpha=0.8)
    axes[0].set(title="val reward (threshold 0.5) vs training steps", xlabel="step")
    axes[1].set(title="val reward vs target completions paid", xlabel="hybrid prefixes completed (cumulative)")
    axes[2].set(title="train reward: sample mean (GRPO) vs exact expectation", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    sign_figure(fig)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=5, help="validate every this many steps")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "exact_vs_grpo")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {loss: [] for loss in LOSSES}
    for seed in args.seeds:
        for loss in LOSSES:
            results[loss].append(curves(run(loss, seed, args.steps, args.every, args.out)))
    summary = {}
    # "Learned": within 5% of the mean final reward of all runs, one level for both losses.
    all_finals = [r["val_by_step"][-1][1] for runs in results.values() for r in runs]
    level = 0.95 * sum(all_finals) / len(all_finals)
    for loss, runs in results.items():
        finals = [r["val_by_step"][-1][1] for r in runs]
        steps = [first_reaching(r["val_by_step"], level) for r in runs]
        cost = [first_reaching(r["val_by_completions"], level) for r in runs]
        summary[loss] = {
            "final_val_reward": sum(finals) / len(finals),
            "steps_to_95pct": sum(s for s in steps if s is not None) / max(1, sum(s is not None for s in steps)),
            "completions_to_95pct": sum(c for c in cost if c is not None) / max(1, sum(c is not None for c in cost)),
            "completions_per_step": sum(r["val_by_completions"][-1][0] / args.steps for r in runs) / len(runs),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "exact_vs_grpo.png")
    (args.out / "exact_vs_grpo.json").write_text(json.dumps(summary, indent=2))
    columns = ["loss", "final val reward", "steps to 95%", "completions to 95%", "completions/step"]
    table = FigureTable(f"Mean of seeds {', '.join(map(str, args.seeds))}", columns)
    for loss, s in summary.items():
        table.add(loss, f"{s['final_val_reward']:.3f}", f"{s['steps_to_95pct']:.1f}",
                  f"{s['completions_to_95pct']:.0f}", f"{s['completions_per_step']:.1f}")  # fmt: skip
    sample = f"{len(args.seeds)} seeds x {args.steps} steps per loss, validation every {args.every}"
    markdown = write_markdown(args.out / "exact_vs_grpo.md", [table], sample=sample)
    print_tables(table, notes=(f"plot: {args.out / 'exact_vs_grpo.png'}; table: {markdown}",))
    g, e = summary["grpo"], summary["exact"]
    print(
        f"grpo_steps={g['steps_to_95pct']:.1f} exact_steps={e['steps_to_95pct']:.1f} "
        f"grpo_completions={g['completions_to_95pct']:.0f} exact_completions={e['completions_to_95pct']:.0f}"
    )


if __name__ == "__main__":
    main()
