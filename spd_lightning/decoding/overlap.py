"""Fork completions requested in background threads while the main thread decides.

In lockstep (run_episodes without overlap) a round first decides every mismatch that episodes
stand at, with the in-process models, and then waits for every fork's completion: the vLLM
server idles while the models run, the models idle while the server runs, and each round waits
for its longest completion. Here a fork's completion is requested as soon as its episode forks,
and an episode goes on as soon as its own completion is back; the server batches requests that
arrive while others run. The store is written from the main thread only.

Thresholds and fixed policies give the same episodes either way (an episode depends only on its
own path and decisions); so do GRPO's Bernoulli draws when they are keyed by episode
(episodes.SampledDecider with a seed, as rollout=generation draws them).
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

Key = tuple[int, ...]  # prompt + response prefix

# Mismatches decided in one call while forks complete in the background: a decision runs the
# models over each asking path (about a second a path for the real pair), and the forks it meets
# are sent only after it, so a long one leaves the server idle. Small calls lose little:
# decoding/features.py runs the models one path at a time anyway.
ASKS_PER_DECISION = 8


class BackgroundForks:
    """Forks waiting for their path: `request` them, read back those `ready`.

    source: decoding.episodes.PathSource (its `missing`, `request`, `keep`, `paths`); workers:
    requests in flight at most (each of at most `source.batch_size` prefixes)."""

    def __init__(self, source, workers: int) -> None:
        self.source = source
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="forks")
        self.flight: dict[Future, list[tuple[Key, int]]] = {}
        self.flying: set[Key] = set()  # prefixes some request in flight completes
        self.waiting: dict[int, tuple[Key, Key]] = {}  # episode -> (prompt, response) of its fork

    def __contains__(self, episode: int) -> bool:
        return episode in self.waiting

    def request(self, forks: list[tuple[int, Key, Key]]) -> None:
        """(episode, prompt, response) of new forks; a prefix stored or in flight is not asked again."""
        for i, prompt, response in forks:
            self.waiting[i] = (prompt, response)
        rows = self.source.missing([p for _, p, _ in forks], [r for *_, r in forks])
        rows = [row for row in rows if row[0] not in self.flying]
        size = self.source.batch_size
        for start in range(0, len(rows), size):
            batch = rows[start : start + size]
            self.flight[self.pool.submit(self.source.request, batch)] = batch
            self.flying.update(key for key, _ in batch)

    def ready(self, block: bool) -> list[tuple[int, object]]:
        """(episode, its TargetPath) for every fork whose completion is stored; block: wait for at
        least one request to finish first when none is ready (the main thread has nothing else)."""
        self._finish()
        done = self._done()
        if block and not done:
            if not self.flight:
                raise RuntimeError("forks wait for completions that no request computes")  # a bug, not bad input
            wait(self.flight, return_when=FIRST_COMPLETED)
            self._finish()
            done = self._done()
        paths = self.source.paths([self.waiting[i][0] for i in done], [self.waiting[i][1] for i in done])
        for i in done:
            del self.waiting[i]
        return list(zip(done, paths))

    def _done(self) -> list[int]:
        store = self.source.store
        return [i for i, (prompt, response) in self.waiting.items() if store.get(prompt + response) is not None]

    def _finish(self) -> None:
        for future in [f for f in self.flight if f.done()]:
            batch = self.flight.pop(future)
            self.flying.difference_update(key for key, _ in batch)
            self.source.keep(batch, future.result())  # a failed request raises here, in the main thread

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
