"""What things are called, in one place: the policies (tables, plots, configs) and the keys of
the validation metrics that training logs and summary.json, the sweeps and the tests read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PolicyName:
    short: str  # a table row
    label: str  # a plot legend: what the policy accepts


# Policy name (as in decode.policies, eval's tradeoff.csv, bench/judges.py) -> what it is called.
POLICIES = {
    "greedy": PolicyName("greedy target", "greedy decoding by the target alone"),
    "scorer": PolicyName("SPD scorer", "SPD scorer: accept p >= t"),
    "standard_sd": PolicyName("standard SD", "standard SD (reject mismatches)"),
    "accept_all": PolicyName("accept all", "accept all"),
    "topk": PolicyName("top-k", "draft token in target top-k"),
    "kl_below": PolicyName("KL rule", "KL(target||draft) <= tau"),
    "entropy_above": PolicyName("entropy rule", "target entropy >= tau"),
    "judge": PolicyName("zero-cost judge", "zero-cost judge: accept p >= t"),
    # bench/judges.py's trained judges
    "judge_sup": PolicyName(*["zero-cost judge, supervised (AutoJudge labels)"] * 2),
    "judge_grpo": PolicyName(*["zero-cost judge, GRPO"] * 2),
    "judge_exact": PolicyName(*["zero-cost judge, exact expected reward"] * 2),
    "scorer_grpo": PolicyName(*["ScoringActor head (draft states), GRPO"] * 2),
}

# The policies every validation epoch scores, in the column order handed to the verifier.
VAL_POLICIES = ("scorer", "standard_sd", "accept_all")
VAL_METRICS = ("accuracy", "accept_len", "reward")
# The trained scorer's kept draft tokens per block, 0 below standard SD's accuracy: what sweeps optimise.
PARITY_METRIC = "val/accept_len_at_parity"
# A resumed run's summary keeps the first run's initial figures under this prefix.
INITIAL = "initial/"


def val_key(policy: str, metric: str) -> str:
    """The logged key of a validation metric: val/accuracy for the trained scorer,
    val/standard_sd/accuracy for a baseline."""
    return f"val/{metric}" if policy == "scorer" else f"val/{policy}/{metric}"
