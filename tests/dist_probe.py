"""A test-only callback that records, on every rank of a distributed run, what that rank did.

tests/training/test_distributed.py adds it to `python run.py` with
`+callbacks.probe._target_=dist_probe.ShardProbe +callbacks.probe.out=DIR` and PYTHONPATH=tests,
so the ranks Lightning starts by re-running run.py load it too. Each rank writes DIR/rank<N>.json:

- `shard`: the indices (into the datamodule's `num_train` train records) its sampler gave this rank;
- `verified`: per training step, the indices of the records this rank handed to the verifier
  (null if they were not the next batch of its shard), and the verifier's own stats for them
  (before any reduction across ranks);
- `param_sum`: the sum of all scorer parameters after training (equal on every rank when the
  gradients were averaged);
- `dtensor` / `local_numel` / `numel`: whether the scorer's (and the reference scorer's)
  parameters are DTensors, and how many of their elements this rank holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from torch.distributed.tensor import DTensor


class ShardProbe(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.verified: list[dict] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        train_records = trainer.datamodule.train_records
        # This rank's share of the epoch: the indices its (distributed) sampler yields, in order.
        self.shard = list(trainer.train_dataloader.sampler)
        verifier = pl_module.verifier
        verify = verifier.verify

        def recording_verify(records, accept_len, **kwargs):
            result = verify(records, accept_len, **kwargs)
            if not trainer.training:  # validation inside fit: not a training step
                return result
            # The batch reaches the module as a copy: identify its records by their place in the shard.
            start = len(self.verified) * len(records)
            expected = self.shard[start : start + len(records)]
            same = len(expected) == len(records) and all(train_records[i] == r for i, r in zip(expected, records))
            correct = (result.correct & result.valid).float().sum() / result.valid.sum().clamp(min=1)
            self.verified.append(
                {"records": expected if same else None, "stats": result.stats, "accuracy": float(correct)}
            )
            return result

        verifier.verify = recording_verify
        self._restore = lambda: setattr(verifier, "verify", verify)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()
        scorers = [s for s in (pl_module.scorer, pl_module.ref_scorer) if s is not None]
        params = [p for s in scorers for p in s.parameters()]
        local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
        # full_tensor() gathers a sharded parameter: a collective every rank takes part in.
        full = [p.full_tensor() if isinstance(p, DTensor) else p for p in pl_module.scorer.parameters()]
        report = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "num_train": len(trainer.datamodule.train_records),
            "shard": self.shard,
            "verified": self.verified,
            "param_sum": float(sum(p.detach().double().sum() for p in full)),
            "dtensor": [isinstance(p, DTensor) for p in params],
            "local_numel": sum(t.numel() for t in local),
            "numel": sum(p.numel() for p in params),
            "ref_scorer": pl_module.ref_scorer is not None,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))
