"""The whole-generation comparison as a user reads it: one table per K (each policy at the
threshold chosen on the choosing set, measured on the test set), the curves, and one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from spd_lightning.reporting.plots import sign_figure  # noqa: E402
from spd_lightning.reporting.tables import FigureTable, print_tables, write_markdown  # noqa: E402
from spd_lightning.tasks.generation_sweep import Family, Point, paired  # noqa: E402

# The bench's last line: short names of the families it reports.
LINE_NAMES = {"gen_rl": "gen_rl", "block_rl": "block_rl", "supervised": "sup", "kl": "kl", "sd": "sd"}


def shown(family: str, threshold: float) -> str:
    """A threshold as its rule reads: KL <= tau, top-k's k, a probability (near 1: 1 - x) or an entropy."""
    if math.isinf(threshold):
        return "-"
    if family == "kl":
        return f"tau={-threshold:.2g}"
    if family == "topk":
        return f"k={1 - threshold:.0f}"
    if 0.99 < threshold < 1:
        return f"1-{1 - threshold:.1g}"
    return f"{threshold:.3g}"


def table_for(k: int, by_family: dict, families: list[Family], tolerance: float) -> FigureTable:
    sd = by_family["sd"]["test"][0]
    table = FigureTable(
        f"K = {k}, {len(sd.correct)} test problems, thresholds chosen on the choosing set",
        ["policy", "thr", "acc %", "95% CI", "agree %", "tok/call", "x SD", "+/- (p)"],
    )
    for family in (f for f in families if f.name in by_family):
        point: Point = by_family[family.name]["chosen"]
        if family.name == "accept_all":  # one point, whatever it costs
            if not by_family[family.name]["test"]:  # test_points=chosen: measured on the choosing set only
                continue
            point = by_family[family.name]["test"][0]
        row = point.as_row()
        gained, lost, p = paired(point, sd)
        fallback = point.family != family.name
        table.add(
            family.label,
            "none passes" if fallback else shown(family.name, point.threshold),
            f"{100 * point.accuracy:.1f}",
            f"{100 * row['accuracy_lo']:.0f}-{100 * row['accuracy_hi']:.0f}",
            f"{100 * point.agreement:.1f}",
            f"{point.tokens_per_call:.2f}",
            f"{point.tokens_per_call / sd.tokens_per_call:.2f}",
            f"+{gained}/-{lost} ({p:.1g})",
        )
    return table


def plot_curves(results: dict, families: list[Family], out_png: Path) -> Path:
    """Accuracy against tokens per target call on the test set, one panel per K."""
    ks = sorted(results)
    fig, axes = plt.subplots(1, len(ks), figsize=(6.5 * len(ks), 5.2), squeeze=False)
    for ax, k in zip(axes[0], ks):
        for family in (f for f in families if f.name in results[k]):
            points = sorted(results[k][family.name]["test"], key=lambda p: p.tokens_per_call)
            choosing = sorted(results[k][family.name]["choose"], key=lambda p: p.tokens_per_call)
            x, y = [p.tokens_per_call for p in points], [p.accuracy for p in points]
            line = ax.plot(x, y, marker="o", ms=3, label=family.label, alpha=0.85)[0]
            if len(points) < len(choosing):  # the test set holds only the chosen threshold: show the grid
                ax.plot([p.tokens_per_call for p in choosing], [p.accuracy for p in choosing], ls=":", marker=".",
                        color=line.get_color(), alpha=0.6)  # fmt: skip
            chosen = results[k][family.name]["chosen"]
            if chosen.family == family.name:
                ax.scatter([chosen.tokens_per_call], [chosen.accuracy], s=90, marker="*", color=line.get_color(),
                           edgecolor="black", zorder=4)  # fmt: skip
        dotted = any(len(v["test"]) < len(v["choose"]) for v in results[k].values())
        grid = "; dotted: the grid on the choosing set" if dotted else ""
        ax.set_title(f"K = {k} (stars: thresholds chosen on the choosing set{grid})")
        ax.set_xlabel("tokens per target call (test set)")
        ax.set_ylabel("accuracy (test set)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    sign_figure(fig)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def last_line(results: dict) -> str:
    """The bench's last line at the largest K (nan for a family that did not run)."""
    k = max(results)
    figures = []
    for name, short in LINE_NAMES.items():
        chosen = results[k][name]["chosen"] if name in results[k] else None
        figures.append(f"{short}_tpc={chosen.tokens_per_call if chosen else float('nan'):.3f}")
        if name in ("gen_rl", "sd"):
            figures.append(f"{short}_accuracy={chosen.accuracy if chosen else float('nan'):.3f}")
    n = len(results[k]["sd"]["test"][0].correct)
    return " ".join(figures) + f" n={n}"


def report(results: dict, families: list[Family], out: Path, tolerance: float, sample: str) -> str:
    """Prints and writes (generations.json, generations.md, generations.png); returns the last line."""
    tables = [table_for(k, results[k], families, tolerance) for k in sorted(results)]
    rows = {str(k): {f: {s: [p.as_row() for p in (v if isinstance(v, list) else [v])] for s, v in sets.items()}
                     for f, sets in by.items()} for k, by in results.items()}  # fmt: skip
    (out / "generations.json").write_text(json.dumps(rows, indent=1))
    png = plot_curves(results, families, out / "generations.png")
    notes = (
        "Policies: standard SD (lossless); the KL rule (KL(target||draft) <= tau, strict where the target's "
        "top-1 > 0.9); the target's entropy >= t; the draft token in the target's top-k; three zero-cost judge "
        "heads: a logistic regression on AutoJudge's labels mined along whole generations, GRPO on single "
        "blocks, GRPO on whole generations; accept-all. "
        f"Thresholds: the most tokens per target call with accuracy at most {100 * tolerance:g} point(s) below "
        "standard SD's on the choosing set ('none passes': no threshold did; the row is standard SD's). "
        "tok/call: generated tokens per target call; x SD: against standard SD's; +/- (p): test answers right "
        "here and wrong under standard SD, and the reverse (exact McNemar p); agree: the target's own final "
        "answer kept.",
        f"curves: {png.name}, beside this table's file",
    )
    write_markdown(out / "generations.md", tables, notes, sample)
    print_tables(*tables, notes=(*notes, f"written to {out}"))
    line = last_line(results)
    print(line)
    return line
