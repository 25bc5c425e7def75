"""The training loaders' shuffle, resumable mid-epoch.

A DataLoader shuffled by a seeded generator starts its first permutation over when a run is
resumed: a run stopped and resumed every few steps (a real-pair step costs minutes) would train
on the first batches of the epoch again and again. Here the items come as one stream of seeded
permutations, (seed, 0), (seed, 1), ..., and each pass of the loader starts the stream after the
batches the trainer has trained (restored from the checkpoint on resume). Where Lightning ends a
pass (its epoch count after a resume differs with where the checkpoint was written) then never
matters: the next pass starts after what was trained, not after what was fetched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Sampler


class StreamShuffle(Sampler[int]):
    """Item indices 0..n-1, permutation after permutation; a pass yields whole steps of the
    stream from step `trained_batches()` on (each rank's batch count is the step count)."""

    def __init__(
        self, n: int, seed: int, batch_size: int, trained_batches: Callable[[], int] = lambda: 0, world_size: int = 1
    ) -> None:
        self.n, self.seed = n, seed
        # Under DDP Lightning deals each pass out to the ranks (DistributedSamplerWrapper, rank r
        # takes items r, r + world, ...): a step trains world_size batches of the stream.
        self.items_per_step = batch_size * world_size
        self.per_pass = (n // self.items_per_step) * self.items_per_step
        self.trained_batches = trained_batches

    def permutation(self, index: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + index)
        return torch.randperm(self.n, generator=gen).tolist()

    def items(self, start: int, count: int) -> list[int]:
        """Stream items start .. start + count - 1."""
        out: list[int] = []
        while len(out) < count:
            index, offset = divmod(start + len(out), self.n)
            out += self.permutation(index)[offset : offset + count - len(out)]
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self.items(self.trained_batches() * self.items_per_step, self.per_pass))

    def __len__(self) -> int:
        return self.per_pass


def resumable_shuffle(n: int, seed: int, batch_size: int, trainer) -> StreamShuffle:
    """The shuffle of a training loader built by `trainer` (None: outside a trainer)."""
    if trainer is None:
        return StreamShuffle(n, seed, batch_size)
    # `processed` also counts a batch whose checkpoint was written in on_train_batch_end, before
    # Lightning moved `completed`.
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return StreamShuffle(n, seed, batch_size, lambda: progress.total.processed, trainer.world_size)
