"""The interface every target backend implements."""

from __future__ import annotations

from typing import Protocol


class Target(Protocol):
    """Completes token-id prefixes greedily (temperature 0).

    `complete` returns, for each prefix, the completion's token ids (ending with EOS when
    the model stopped there, at most `max_new_tokens` of them), or None where the backend
    failed for that prefix (a remote server that kept failing after its retries). A None
    marks the samples that used it invalid: they are excluded, never scored 0.
    """

    max_new_tokens: int
    # Requests sent to the backend so far (HTTP requests, or generate() calls in-process).
    num_requests: int

    def check_tokenizer(self, tokenizer) -> None:
        """Raises SetupError unless the backend uses the same vocabulary as `tokenizer`."""

    def complete(self, prefixes: list[list[int]]) -> list[list[int] | None]: ...

    def close(self) -> None: ...
