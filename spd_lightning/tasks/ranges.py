"""The valid range of every numeric knob, checked once the config is composed (run.py).

The schemas check types; a value of the right type can still be meaningless (a NaN reward
weight, a probability of 2, a batch of 0) and would run silently or fail deep inside torch.
Each entry: config key -> what it may hold. Lists are checked element by element; keys absent
from a task's config are skipped. Lightning checks the `trainer.*` keys itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from spd_lightning.errors import SetupError


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class Range:
    """What a knob may hold: `test` on the value (each element of a list), `allowed` in words."""

    test: Callable[[Any], bool]
    allowed: str
    optional: bool = False  # null is allowed too

    def or_null(self) -> Range:
        return Range(self.test, f"{self.allowed}, or null", optional=True)


FINITE = Range(_number, "a finite number")
POSITIVE = Range(lambda x: _number(x) and x > 0, "a finite number > 0")
NON_NEGATIVE = Range(lambda x: _number(x) and x >= 0, "a finite number >= 0")
PROBABILITY = Range(lambda x: _number(x) and 0 <= x <= 1, "a number in [0, 1]")
OPEN_PROBABILITY = Range(lambda x: _number(x) and 0 < x < 1, "a number in (0, 1), exclusive")
FRACTION_BELOW_ONE = Range(lambda x: _number(x) and 0 <= x < 1, "a number in [0, 1)")
COUNT = Range(lambda x: _integer(x) and x >= 1, "an integer >= 1")
COUNT_OR_ZERO = Range(lambda x: _integer(x) and x >= 0, "an integer >= 0")
GROUP = Range(lambda x: _integer(x) and x >= 2, "an integer >= 2 (GRPO compares samples within a group)")

RANGES: dict[str, Range] = {
    # training
    "parity_tolerance": PROBABILITY,
    "module.threshold": PROBABILITY,
    "module.backbone_lr_scale": NON_NEGATIVE,
    "module.grad_clip": POSITIVE,
    "optimizer.lr": POSITIVE,
    "optimizer.weight_decay": NON_NEGATIVE,
    "verify.cache_size": COUNT_OR_ZERO,
    "verify.max_invalid_fraction": PROBABILITY,
    "reward.weight_a": FINITE,
    "reward.weight_b": FINITE,
    "reward.weight_c": FINITE,
    "reward.weight_d": FINITE,
    "reward.token_bonus": FINITE,
    "loss.num_samples": GROUP,
    "loss.num_episodes": GROUP,
    "rollout.block_size": COUNT,
    "rollout.max_new_tokens": COUNT,
    "rollout.max_forks": COUNT_OR_ZERO.or_null(),
    "rollout.val_fraction": PROBABILITY,
    "rollout.batch_size": COUNT,
    "rollout.val_batch_size": COUNT,
    "rollout.cached_paths": COUNT,
    "rollout.overlap": COUNT_OR_ZERO,
    "rollout.segment": COUNT.or_null(),
    "loss.ppo_epochs": COUNT,
    "loss.clip_low": NON_NEGATIVE,
    "loss.clip_high": NON_NEGATIVE,
    "loss.kl_coef": NON_NEGATIVE,
    "loss.entropy_coef": FINITE,
    "model.init_accept_prob": OPEN_PROBABILITY,
    "model.head_hidden": COUNT.or_null(),
    "model.hidden": COUNT_OR_ZERO,  # model=judge
    "model.pad_id": COUNT_OR_ZERO,
    "model.lora.r": COUNT_OR_ZERO,
    "model.lora.alpha": POSITIVE,
    "model.lora.dropout": FRACTION_BELOW_ONE,
    # data
    "data.batch_size": COUNT,
    "data.val_batch_size": COUNT,
    "data.val_fraction": FRACTION_BELOW_ONE,
    "data.max_val_records": COUNT.or_null(),
    "data.num_workers": COUNT_OR_ZERO,
    "data.num_prompts": COUNT,
    "data.limit": COUNT.or_null(),
    "data.skip": COUNT_OR_ZERO,
    # target and draft backends
    "target.max_new_tokens": COUNT,
    "target.batch_size": COUNT,
    "target.prompts_per_request": COUNT,
    "target.concurrency": COUNT,
    "target.timeout_s": POSITIVE,
    "target.retries": COUNT_OR_ZERO,
    "target.backoff_s": NON_NEGATIVE,
    "target.startup_timeout_s": NON_NEGATIVE,
    "draft.max_new_tokens": COUNT,
    "draft.batch_size": COUNT,
    "draft.prompts_per_request": COUNT,
    "draft.concurrency": COUNT,
    "draft.timeout_s": POSITIVE,
    "draft.retries": COUNT_OR_ZERO,
    "draft.backoff_s": NON_NEGATIVE,
    "draft.startup_timeout_s": NON_NEGATIVE,
    # task=prepare
    "prepare.block_size": COUNT,
    "prepare.stride": COUNT,
    "prepare.max_new_tokens": COUNT,
    "prepare.prompts_per_chunk": COUNT,
    # task=eval
    "eval.thresholds": PROBABILITY,
    "eval.topk": COUNT,
    "eval.kl_thresholds": NON_NEGATIVE.or_null(),
    "eval.kl_confidence": PROBABILITY.or_null(),
    "eval.entropy_thresholds": NON_NEGATIVE.or_null(),
    "eval.auto_thresholds": COUNT_OR_ZERO,
    "eval.max_records": COUNT.or_null(),
    "eval.batch_size": COUNT,
    # task=decode
    "decode.block_size": COUNT,
    "decode.max_new_tokens": COUNT,
    "decode.batch_size": COUNT,
    "decode.threshold": PROBABILITY.or_null(),
    "decode.kl_threshold": NON_NEGATIVE.or_null(),
    "decode.judge_threshold": PROBABILITY.or_null(),
    "decode.judge_tolerance": PROBABILITY,
    "decode.kl_confidence": PROBABILITY.or_null(),
    # task=judge
    "judge.train_records": COUNT.or_null(),
    "judge.heldout_share": PROBABILITY,
    "judge.max_response": COUNT,
    "judge.batch": COUNT,
    "judge.hidden": COUNT_OR_ZERO,
    "judge.steps": COUNT,
    "judge.lr": POSITIVE,
    "judge.weight_decay": NON_NEGATIVE,
    "judge.scorer_lr": POSITIVE,
    "judge.tolerance": PROBABILITY,
}

_ABSENT = object()


def check_ranges(cfg: DictConfig) -> None:
    """Stops at the first knob outside its range, with one message naming key, value and range."""
    for key, rng in RANGES.items():
        try:
            value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        except OmegaConfBaseException:  # an interpolation into a group this task does not use
            continue
        if value is _ABSENT or (value is None and rng.optional):
            continue
        values = list(value) if isinstance(value, (ListConfig, list)) else [value]
        bad = next((v for v in values if not rng.test(v)), _ABSENT)
        if bad is not _ABSENT or value is None:
            shown = value if bad is _ABSENT or len(values) == 1 else f"{list(values)} (holds {bad!r})"
            raise SetupError(f"{key}={shown} is out of range: it must be {rng.allowed}")
