"""The short table printed at the end of a run."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

POLICY_NAMES = {
    "": "SPD scorer (trained)",
    "standard_sd/": "standard SD (reject mismatches)",
    "accept_all/": "accept all",
}


def accept_len_at_parity(summary: dict[str, float], tolerance: float) -> float:
    """The trained scorer's draft tokens kept per block, or 0 when its accuracy falls more than
    `tolerance` below standard speculative decoding's. Unlike val/reward it does not depend on
    the reward weights, so sweeps over those weights can rank trials by it."""
    if summary["val/accuracy"] < summary["val/standard_sd/accuracy"] - tolerance:
        return 0.0
    return summary["val/accept_len"]


def print_summary(summary: dict[str, float], policies: list[str], path: Path) -> None:
    table = Table(title="Validation: accuracy vs draft tokens accepted per block")
    for col in ("policy", "accuracy", "accept_len", "reward"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for p in policies:
        row = [summary.get(f"val/{p}{m}") for m in ("accuracy", "accept_len", "reward")]
        table.add_row(POLICY_NAMES.get(p, p), *(f"{v:.3f}" if v is not None else "-" for v in row))
    if "initial/val/accuracy" in summary:
        row = [summary.get(f"initial/val/{m}") for m in ("accuracy", "accept_len", "reward")]
        table.add_row("SPD scorer (before training)", *(f"{v:.3f}" for v in row))
    console = Console()
    console.print(table)
    sd, ours = summary.get("val/standard_sd/accept_len"), summary.get("val/accept_len")
    if sd and ours is not None:
        console.print(f"accepted draft tokens per block: {ours / sd:.2f}x standard SD")
    console.print(f"summary: {path}", soft_wrap=True)
