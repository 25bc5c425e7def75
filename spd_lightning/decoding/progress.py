"""Saving a long stage's model passes as it goes: hours of them on a real pair (a sweep's
episodes, the mining's walks, the feature passes over thousands of mismatches) are lost when a
session ends unless something writes them to disk while they run.

One timer for all of them: `Progress` is handed to `run_episodes(on_progress=...)` (called after
each round of decisions) and set as `FeatureCache.on_progress` (called after each path's feature
passes); it saves the cache's features and the draft's proposals at most every `every_s` seconds.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from spd_lightning.decoding.episodes import PathSource
from spd_lightning.decoding.features import FeatureCache

log = logging.getLogger(__name__)


class Progress:
    """Saves `cache` to folder/features.pt and `source`'s draft proposals to folder/proposals.pt
    when called, at most every `every_s` seconds; `load` reads both back on a rerun."""

    def __init__(self, cache: FeatureCache, source: PathSource, folder: Path, every_s: float = 300.0) -> None:
        self.cache, self.source, self.folder, self.every_s = cache, source, Path(folder), every_s
        self.last = time.monotonic()

    def load(self) -> None:
        self.cache.load(self.folder / "features.pt")
        self.source.load_proposals(self.folder / "proposals.pt")

    def save(self) -> None:
        self.cache.save(self.folder / "features.pt")
        self.source.save_proposals(self.folder / "proposals.pt")
        self.last = time.monotonic()
        runs = {"draft": self.cache.draft_states, "target": self.cache.target_states}
        shares = ", ".join(f"{name} {s.computed:,} run / {s.reused:,} reused" for name, s in runs.items())
        log.info("saved %d mismatches' features; tokens since start: %s", len(self.cache), shares)

    def __call__(self) -> None:
        if time.monotonic() - self.last >= self.every_s:
            self.save()
