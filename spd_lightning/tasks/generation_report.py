"""The whole-generation comparison as a user reads it: one table per K (each policy at the
threshold chosen on the choosing set, measured on the test set), the curves, and one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from spd_lightning.core.stats import wilson_interval  # noqa: E402
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
        point: Point | None = by_family[family.name]["chosen"]
        if family.name == "accept_all":  # one point, whatever it costs
            if not by_family[family.name]["test"]:  # test_points=chosen: measured on the choosing set only
                continue
            point = by_family[family.name]["test"][0]
        if point is None:  # a report of what is on disk: chosen, not yet run on the test set
            table.add(family.label, "test point not measured", *["-"] * 6)
            continue
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
    """Accuracy against tokens per target call: per K, the choosing set (every threshold swept)
    beside the test set (what was measured there), the chosen thresholds starred in both."""
    ks = sorted(results)
    fig, axes = plt.subplots(len(ks), 2, figsize=(11, 4.6 * len(ks)), squeeze=False)
    for row, k in zip(axes, ks):
        for ax, name in zip(row, ("choose", "test")):
            _panel(ax, results[k], families, name)
            size = len(next(iter(results[k].values()))[name][0].correct)
            ax.set_title(f"K = {k}, {'choosing' if name == 'choose' else 'test'} set ({size} problems)")
            ax.set_xlabel(f"tokens per target call ({name} set)")
            ax.set_ylabel(f"accuracy ({name} set)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
    fig.suptitle("stars: the threshold chosen on the choosing set (most tokens per call within the accuracy "
                 "budget); bars: 95% Wilson intervals", fontsize=9)  # fmt: skip
    sign_figure(fig)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def _panel(ax, by_family: dict, families: list[Family], name: str) -> None:
    # A family's colour is its place among all families, not among those drawn here, so that it
    # stays the same from panel to panel and from K to K when some were not swept.
    for index, family in enumerate(families):
        points = sorted(by_family.get(family.name, {}).get(name, []), key=lambda p: p.tokens_per_call)
        if not points:
            continue
        x, y = [p.tokens_per_call for p in points], [p.accuracy for p in points]
        line = ax.plot(x, y, marker="o", ms=4, label=family.label, alpha=0.85, color=f"C{index % 10}")[0]
        intervals = [wilson_interval(sum(p.correct), len(p.correct)) for p in points]  # 95%: the y scale is honest
        below, above = [a - lo for a, (lo, _) in zip(y, intervals)], [hi - a for a, (_, hi) in zip(y, intervals)]
        ax.errorbar(x, y, yerr=[below, above], fmt="none", ecolor=line.get_color(), alpha=0.35, capsize=3)
        chosen = by_family[family.name]["chosen"]
        if chosen is not None and chosen.family == family.name:
            # the chosen threshold's point on this set
            mine = [p for p in points if p.threshold == chosen.threshold]
            ax.scatter([p.tokens_per_call for p in mine], [p.accuracy for p in mine], s=110, marker="*",
                       color=line.get_color(), edgecolor="black", zorder=4)  # fmt: skip


def last_line(results: dict, families: list[Family]) -> str:
    """The bench's last line at the largest K (nan for a family that did not run); heads swept
    by name (the bench's --head) follow the fixed figures with their tokens per call and accuracy."""
    k = max(results)
    named = [f.name for f in families if f.head and f.name not in LINE_NAMES and f.name in results[k]]
    figures = []
    for name, short in [*LINE_NAMES.items(), *((n, n) for n in named)]:
        chosen = results[k][name]["chosen"] if name in results[k] else None
        figures.append(f"{short}_tpc={chosen.tokens_per_call if chosen else float('nan'):.3f}")
        if name in ("gen_rl", "sd", *named):
            figures.append(f"{short}_accuracy={chosen.accuracy if chosen else float('nan'):.3f}")
    n = len(results[k]["sd"]["test"][0].correct)
    return " ".join(figures) + f" n={n}"


def report(results: dict, families: list[Family], out: Path, tolerance: float, sample: str,
           stem: str = "generations") -> str:  # fmt: skip
    """Prints and writes (<stem>.json, <stem>.md, <stem>.png); returns the last line."""
    tables = [table_for(k, results[k], families, tolerance) for k in sorted(results)]
    rows = {str(k): {f: {s: [p.as_row() for p in (v if isinstance(v, list) else [v]) if p is not None]
                         for s, v in sets.items()} for f, sets in by.items()} for k, by in results.items()}  # fmt: skip
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    png = plot_curves(results, families, out / f"{stem}.png")
    notes = (
        "Policies: standard SD (lossless); the KL rule (KL(target||draft) <= tau, strict where the target's "
        "top-1 > 0.9); the target's entropy >= t; the draft token in the target's top-k; three zero-cost judge "
        "heads: a logistic regression on AutoJudge's labels mined along whole generations, GRPO on single "
        "blocks, GRPO on whole generations (GRPO gen., one: a run of one decision a group, the bench's --head); "
        "accept-all. "
        f"Thresholds: the most tokens per target call with accuracy at most {100 * tolerance:g} point(s) below "
        "standard SD's on the choosing set ('none passes': no threshold did; the row is standard SD's). "
        "tok/call: generated tokens per target call; x SD: against standard SD's; +/- (p): test answers right "
        "here and wrong under standard SD, and the reverse (exact McNemar p); agree: the target's own final "
        "answer kept.",
        f"curves: {png.name}, beside this table's file",
    )
    write_markdown(out / f"{stem}.md", tables, notes, sample)
    print_tables(*tables, notes=(*notes, f"written to {out}"))
    line = last_line(results, families)
    print(line)
    return line
