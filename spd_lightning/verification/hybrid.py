"""Verification: complete every distinct hybrid prefix with the target, check the answers.

Many of the N samples of a record share the same first-reject position j, so a record
needs at most (#mismatches + 1) completions; identical prefixes across records, steps and
epochs are answered from a bounded cache, since greedy completion is deterministic.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from spd_lightning.core.sampling import hybrid_prefix
from spd_lightning.data.answers import AnswerCheck
from spd_lightning.data.records import Record
from spd_lightning.errors import VerificationError
from spd_lightning.models.hf import tokenizer_eos_ids
from spd_lightning.targets.base import Target


class CompletionCache:
    """Least-recently-used map from prefix ids to completion ids, at most `max_entries` long."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._data: OrderedDict[tuple[int, ...], list[int]] = OrderedDict()

    def get(self, prefix: tuple[int, ...]) -> list[int] | None:
        if prefix in self._data:
            self._data.move_to_end(prefix)
            return self._data[prefix]
        return None

    def put(self, prefix: tuple[int, ...], completion: list[int]) -> None:
        self._data[prefix] = completion
        self._data.move_to_end(prefix)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


def stored_pieces(store, key: tuple[int, ...]) -> list[list[int]]:
    """The target's completion of `key` as `store` (anything with .get) holds it, piece by piece: a
    completion requested a segment at a time (decoding/episodes.PathSource's `segment`) goes on
    under its end's key; an empty piece ends it. []: nothing stored for `key`."""
    pieces: list[list[int]] = []
    piece = store.get(key)
    while piece is not None:
        pieces.append(piece)
        if not piece:
            break
        key = key + tuple(piece)
        piece = store.get(key)
    return pieces


@dataclass
class Verification:
    correct: torch.Tensor  # [B, N] bool
    valid: torch.Tensor  # [B, N] bool, False where the target failed for that prefix
    texts: dict[tuple[int, int], str]  # (record index, j) -> response text, for sample tables
    stats: dict[str, float] = field(default_factory=dict)


class HybridVerifier:
    """Builds hybrid prefixes, completes the distinct ones, decodes responses and checks them."""

    def __init__(
        self,
        target: Target,
        tokenizer,
        answer_check: AnswerCheck,
        cache_size: int = 100_000,
        max_invalid_fraction: float = 0.5,
    ):
        self.target, self.tokenizer, self.answer_check = target, tokenizer, answer_check
        self.cache = CompletionCache(cache_size)
        self.max_invalid_fraction = max_invalid_fraction
        # Every id that ends a response (an instruct model may list several).
        self.eos = tokenizer_eos_ids(tokenizer)

    def response_text(self, record: Record, prefix: list[int], completion: list[int]) -> str:
        """Everything after the prompt, cut at the first EOS: generation ends there."""
        ids = prefix[record.prompt_len :] + completion
        end = next((i for i, t in enumerate(ids) if t in self.eos), len(ids))
        return self.tokenizer.decode(ids[:end], skip_special_tokens=True)

    def _completions(self, prefixes: dict[tuple[int, ...], bool]) -> tuple[dict, dict[str, float]]:
        """Completion of every distinct prefix (mapped to "its response already ended"):
        finished ones need none, cached ones none either."""
        done: dict[tuple[int, ...], list[int] | None] = {}
        to_send: list[tuple[int, ...]] = []
        hits = 0
        for key, finished in prefixes.items():
            if finished:
                done[key] = []  # the response already ended inside the block
            elif (cached := self.cache.get(key)) is not None:
                done[key], hits = cached, hits + 1
            else:
                to_send.append(key)
        start, requests_before = time.perf_counter(), self.target.num_requests
        results = self.target.complete([list(k) for k in to_send]) if to_send else []
        for key, completion in zip(to_send, results):
            done[key] = completion
            if completion is not None:
                self.cache.put(key, completion)
        stats = {
            "unique_prefixes": len(prefixes),
            "cache_hits": hits,
            "completions": len(to_send),
            "requests": self.target.num_requests - requests_before,
            "latency_s": time.perf_counter() - start,
        }
        return done, stats

    def check_invalid(self, invalid: int, total: int) -> None:
        """Raises VerificationError when more than max_invalid_fraction of the samples are invalid."""
        if invalid > self.max_invalid_fraction * total:
            raise VerificationError(
                f"{invalid} of {total} samples could not be verified (the target failed after its retries), "
                f"more than verify.max_invalid_fraction={self.max_invalid_fraction}. "
                "Check the target server's log and health."
            )

    def verify(self, records: list[Record], accept_len: torch.Tensor, check_invalid: bool = True) -> Verification:
        """accept_len: [B, N] first-reject positions j -> correctness of every sample.

        check_invalid=False leaves the invalid-share check to the caller: under DDP the counts
        of all ranks must be summed first, or one rank stops while the others wait for it."""
        j_rows = accept_len.tolist()
        prefix_of = {
            (b, j): tuple(hybrid_prefix(r.context_ids, r.draft_ids, r.target_ids, j))
            for b, (r, row) in enumerate(zip(records, j_rows))
            for j in set(row)
        }
        finished: dict[tuple[int, ...], bool] = {}
        for (b, _), p in prefix_of.items():
            # Records may share a prefix with another prompt_len: complete it unless all are done.
            finished[p] = finished.get(p, True) and not self.eos.isdisjoint(p[records[b].prompt_len :])
        completions, stats = self._completions(finished)
        verdict: dict[tuple[int, int], bool | None] = {}
        texts: dict[tuple[int, int], str] = {}
        for (b, j), prefix in prefix_of.items():
            completion = completions[prefix]
            if completion is None:
                verdict[(b, j)] = None
                continue
            texts[(b, j)] = self.response_text(records[b], list(prefix), completion)
            verdict[(b, j)] = self.answer_check(texts[(b, j)], records[b].reference)
        correct = torch.tensor([[bool(verdict[(b, j)]) for j in row] for b, row in enumerate(j_rows)])
        valid = torch.tensor([[verdict[(b, j)] is not None for j in row] for b, row in enumerate(j_rows)])
        stats["invalid"] = int((~valid).sum())
        if check_invalid:
            self.check_invalid(stats["invalid"], valid.numel())
        return Verification(correct.to(accept_len.device), valid.to(accept_len.device), texts, stats)
