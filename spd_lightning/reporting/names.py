"""What things are called, in one place: the policies (tables, plots, configs: derived from the
decoding registry) and the keys of the validation metrics that training logs and summary.json,
the sweeps and the tests read."""

from __future__ import annotations

from spd_lightning.decoding.registry import SPECS, VAL_POLICIES, PolicySpec

# Policy name (as in decode.policies, eval's tradeoff.csv) -> its spec: .short (a table row), .label (a legend).
POLICIES: dict[str, PolicySpec] = SPECS
__all__ = ["POLICIES", "VAL_POLICIES", "VAL_METRICS", "PARITY_METRIC", "INITIAL", "val_key"]

VAL_METRICS = ("accuracy", "accept_len", "reward")
# The trained scorer's kept draft tokens per block, 0 below standard SD's accuracy: what sweeps optimise.
PARITY_METRIC = "val/accept_len_at_parity"
# A resumed run's summary keeps the first run's initial figures under this prefix.
INITIAL = "initial/"


def val_key(policy: str, metric: str) -> str:
    """The logged key of a validation metric: val/accuracy for the trained scorer,
    val/standard_sd/accuracy for a baseline."""
    return f"val/{metric}" if policy == "scorer" else f"val/{policy}/{metric}"
