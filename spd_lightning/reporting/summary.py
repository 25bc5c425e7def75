"""The short table printed at the end of a run."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from spd_lightning.reporting.names import INITIAL, POLICIES, VAL_METRICS, VAL_POLICIES, val_key


def accept_len_at_parity(summary: dict[str, float], tolerance: float) -> float:
    """The trained scorer's draft tokens kept per block, or 0 when its accuracy falls more than
    `tolerance` below standard speculative decoding's. Unlike val/reward it does not depend on
    the reward weights, so sweeps over those weights can rank trials by it."""
    if summary[val_key("scorer", "accuracy")] < summary[val_key("standard_sd", "accuracy")] - tolerance:
        return 0.0
    return summary[val_key("scorer", "accept_len")]


def print_summary(summary: dict[str, float], path: Path) -> None:
    table = Table(title="Validation: accuracy vs draft tokens accepted per block")
    for col in ("policy", "accuracy", "accept_len", "reward"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for p in VAL_POLICIES:
        row = [summary.get(val_key(p, m)) for m in VAL_METRICS]
        name = POLICIES[p].label if p != "scorer" else f"{POLICIES[p].short} (trained)"
        table.add_row(name, *(f"{v:.3f}" if v is not None else "-" for v in row))
    if INITIAL + val_key("scorer", "accuracy") in summary:
        row = [summary.get(INITIAL + val_key("scorer", m)) for m in VAL_METRICS]
        table.add_row(f"{POLICIES['scorer'].short} (before training)", *(f"{v:.3f}" for v in row))
    console = Console()
    console.print(table)
    sd, ours = summary.get(val_key("standard_sd", "accept_len")), summary.get(val_key("scorer", "accept_len"))
    if sd and ours is not None:
        console.print(f"accepted draft tokens per block: {ours / sd:.2f}x standard SD")
    console.print(f"summary: {path}", soft_wrap=True)
