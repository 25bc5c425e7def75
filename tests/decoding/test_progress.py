"""Progress: a stage stopped mid-way keeps, on disk, the feature passes and draft proposals it made."""

from __future__ import annotations

import pytest
import torch

from spd_lightning.data.prompts import encode_prompts
from spd_lightning.decoding.episodes import PathSource, mismatches_along, run_episodes
from spd_lightning.decoding.features import FeatureCache
from spd_lightning.decoding.progress import Progress
from spd_lightning.models.hf import pad_id_of, response_end_ids
from spd_lightning.targets.local import LocalTarget, load_causal_lm
from spd_lightning.toy.raw import toy_prompts

MAX_NEW = 24


@pytest.fixture(scope="module")
def world(toy_world, toy_tokenizer):
    draft = load_causal_lm(str(toy_world / "draft"), "float32", "cpu")
    target = load_causal_lm(str(toy_world / "target"), "float32", "cpu")
    prompts = [tuple(p) for p in encode_prompts(toy_tokenizer, toy_prompts(8, 1000))]
    eos, pad = response_end_ids(target, toy_tokenizer), pad_id_of(toy_tokenizer)
    complete = LocalTarget.from_model(target, MAX_NEW).complete
    return draft, target, prompts, PathSource(complete, draft, pad, eos, MAX_NEW)


def _fresh_source(world) -> PathSource:
    draft, target, _, source = world
    return PathSource(source.complete, draft, source.pad_id, source.eos, MAX_NEW)


def test_a_cache_stopped_mid_way_keeps_in_its_progress_file_the_paths_it_finished(world, tmp_path):
    draft, target, prompts, _ = world
    source = _fresh_source(world)
    met = mismatches_along(prompts[:4], source.paths(prompts[:4], [()] * 4))
    cache = FeatureCache(draft, target)
    cache.on_progress = Progress(cache, source, tmp_path, every_s=0.0)  # saves after every path
    passes, hidden = [], cache._hidden

    def stop_at_the_third_path(trunk_ids, chunk):
        if trunk_ids not in passes:
            passes.append(trunk_ids)
        if len(passes) == 3:
            raise KeyboardInterrupt  # a stage stopped by its user
        return hidden(trunk_ids, chunk)

    cache._hidden = stop_at_the_third_path
    with pytest.raises(KeyboardInterrupt):
        cache.get([p for p, _ in met], [a for _, a in met])
    kept = FeatureCache(None, None)  # no model: the rows come from the file
    kept.load(tmp_path / "features.pt")
    assert 0 < len(kept) < len(met)
    assert all(torch.equal(kept._rows[k].tokens, cache._rows[k].tokens) for k in kept._rows)


def test_episodes_save_the_drafts_proposals_only_when_the_timer_says(world, tmp_path):
    draft, target, prompts, _ = world
    source = _fresh_source(world)
    slow = Progress(FeatureCache(draft, target), source, tmp_path / "slow", every_s=3600.0)
    run_episodes(prompts[:2], lambda ps, asks: [False] * len(asks), source, 4, on_progress=slow)
    assert not (tmp_path / "slow" / "proposals.pt").exists()  # not an hour yet
    (tmp_path / "fast").mkdir()
    fast = Progress(FeatureCache(draft, target), source, tmp_path / "fast", every_s=0.0)
    run_episodes(prompts[2:4], lambda ps, asks: [True] * len(asks), source, 4, on_progress=fast)
    replay = _fresh_source(world)
    Progress(FeatureCache(None, None), replay, tmp_path / "fast").load()
    assert replay._proposals == source._proposals and len(source._proposals) > 2  # forks' paths too
