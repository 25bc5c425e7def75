"""The short table printed at the end of a run."""

from __future__ import annotations

from pathlib import Path

from spd_lightning.reporting.names import INITIAL, PARITY_METRIC, POLICIES, VAL_METRICS, VAL_POLICIES, val_key
from spd_lightning.reporting.tables import FigureTable, print_tables, write_markdown

CALLS = "target_calls_per_token"


def accept_len_at_parity(summary: dict[str, float], tolerance: float) -> float:
    """The trained scorer's draft tokens kept per block, or 0 when its accuracy falls more than
    `tolerance` below standard speculative decoding's. Unlike val/reward it does not depend on
    the reward weights, so sweeps over those weights can rank trials by it. NaN where nothing
    was validated (trainer.limit_val_batches=0)."""
    if val_key("scorer", "accuracy") not in summary or val_key("standard_sd", "accuracy") not in summary:
        return float("nan")
    if summary[val_key("scorer", "accuracy")] < summary[val_key("standard_sd", "accuracy")] - tolerance:
        return 0.0
    return summary[val_key("scorer", "accept_len")]


def print_summary(summary: dict[str, float], path: Path) -> None:
    """The validation table, printed and written to summary.md beside summary.json (for docs/)."""
    # rollout=generation validates whole generations: their target calls per token too.
    metrics = list(VAL_METRICS) + ([CALLS] if val_key("scorer", CALLS) in summary else [])
    headers = [m if m != CALLS else "calls/token" for m in metrics]
    table = FigureTable("Validation: accuracy vs draft tokens accepted per block", ["policy", *headers])
    for p in VAL_POLICIES:
        row = [summary.get(val_key(p, m)) for m in metrics]
        name = POLICIES[p].label if p != "scorer" else f"{POLICIES[p].short} (trained)"
        table.add(name, *(f"{v:.3f}" if v is not None else "-" for v in row))
    if INITIAL + val_key("scorer", "accuracy") in summary:
        row = [summary.get(INITIAL + val_key("scorer", m)) for m in metrics]
        table.add(f"{POLICIES['scorer'].short} (before training)", *(f"{v:.3f}" for v in row))
    notes = []
    sd, ours = summary.get(val_key("standard_sd", "accept_len")), summary.get(val_key("scorer", "accept_len"))
    if sd and ours is not None:
        notes.append(f"accepted draft tokens per block: {ours / sd:.2f}x standard SD")
    if not any(key.startswith("val/") and key != PARITY_METRIC for key in summary):
        notes.append("no validation ran (trainer.limit_val_batches=0): the rows are empty")
    write_markdown(path.with_suffix(".md"), [table], tuple(notes))
    print_tables(table, notes=(*notes, f"summary: {path}"))
