"""The interface every model backend implements: the target, and for task=prepare the draft."""

from __future__ import annotations

from typing import Protocol


class Target(Protocol):
    """Greedy (temperature 0) passes of one causal LM over token ids.

    Every method returns one entry per input row, or None where the backend failed for that
    row (a remote server that kept failing after its retries). In training a None marks the
    samples that used it invalid: they are excluded, never scored 0.
    """

    max_new_tokens: int
    # Requests sent to the backend so far (HTTP requests, or batched model calls in-process).
    num_requests: int

    def check_tokenizer(self, tokenizer, role: str = "target") -> None:
        """Raises SetupError unless the backend uses the same vocabulary as `tokenizer`; the
        message calls the backend `role` ("target", "draft")."""

    def complete(self, prefixes: list[list[int]], max_new_tokens: int | None = None) -> list[list[int] | None]:
        """Each prefix's greedy completion: ending with EOS when the model stopped there, at most
        `max_new_tokens` tokens (None: self.max_new_tokens)."""

    def propose(self, contexts: list[list[int]], k: int) -> list[list[int] | None]:
        """Exactly k greedy tokens after each context, not stopping at EOS (a draft's block)."""

    def argmax_along(self, contexts: list[list[int]], drafts: list[list[int]]) -> list[list[int] | None]:
        """For each pair: K tokens, [i] = the greedy token after context + draft[:i] (K = len(draft)),
        from one teacher-forced pass over context + draft."""

    def close(self) -> None: ...
