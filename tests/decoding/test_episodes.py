"""Episodes on the default world's models: for every policy and K, an episode walked over the
target's paths writes the decoding loop's tokens with the loop's target calls."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from spd_lightning.data.prompts import encode_prompts
from spd_lightning.decoding.episodes import (
    DecisionInputs,
    PathSource,
    PolicyDecider,
    SampledDecider,
    mismatches_along,
    run_episodes,
)
from spd_lightning.decoding.features import FeatureCache, FeatureDecider, judge_score, kl_score
from spd_lightning.decoding.loop import LoopSettings, generate, generate_cached
from spd_lightning.decoding.policies import accept_all, judge_policy, kl_policy, reject_all, scorer_policy
from spd_lightning.judge.head import TOKEN_FEATURES, JudgeHead
from spd_lightning.models.hf import pad_id_of, response_end_ids
from spd_lightning.models.prefix_states import PrefixStates
from spd_lightning.models.scorer import ScoringActor
from spd_lightning.targets.local import LocalTarget, load_causal_lm
from spd_lightning.toy.raw import toy_prompts

MAX_NEW = 24


@pytest.fixture(scope="module")
def world(toy_world, toy_tokenizer):
    draft = load_causal_lm(str(toy_world / "draft"), "float32", "cpu")
    target = load_causal_lm(str(toy_world / "target"), "float32", "cpu")
    prompts = encode_prompts(toy_tokenizer, toy_prompts(40, 1000))
    return draft, target, prompts, response_end_ids(target, toy_tokenizer), pad_id_of(toy_tokenizer)


def _random_judge(target, seed: int = 0) -> JudgeHead:
    torch.manual_seed(seed)
    head = JudgeHead({"tokens": len(TOKEN_FEATURES), "target_hidden": target.config.hidden_size})
    torch.nn.init.normal_(head.net[-1].weight, std=0.5)
    return head.eval()


def _random_scorer(toy_world, seed: int = 0) -> ScoringActor:
    torch.manual_seed(seed)
    scorer = ScoringActor.from_pretrained(str(toy_world / "draft"))
    torch.nn.init.normal_(scorer.head[-1].weight, std=0.5)
    return scorer.eval()


def _policies(world, toy_world):
    draft, target, _, _, pad = world
    return {
        "standard_sd": reject_all,
        "accept_all": accept_all,
        "kl_below": kl_policy(0.5),
        "judge": judge_policy(_random_judge(target), 0.5),
        "scorer": scorer_policy(_random_scorer(toy_world), 0.5, pad),
    }


@pytest.mark.parametrize("k", [2, 4])
def test_every_policys_episode_writes_the_loops_tokens_in_the_loops_calls(world, toy_world, k):
    draft, target, prompts, eos, pad = world
    # chunk=4: proposals are computed a few at a time as the walks read them (PathSource.propose).
    source = PathSource(LocalTarget.from_model(target, MAX_NEW).complete, draft, pad, eos, MAX_NEW, chunk=4)
    inputs = DecisionInputs(draft, target, pad)
    for name, policy in _policies(world, toy_world).items():
        loop = generate(draft, target, prompts, policy, LoopSettings(k, MAX_NEW, eos, pad, 64))
        episodes = run_episodes([tuple(p) for p in prompts], PolicyDecider(policy, inputs), source, k)
        assert [e.response for e in episodes] == [g.response_ids for g in loop], name
        assert [e.target_calls for e in episodes] == [g.target_calls for g in loop], name
        assert [e.accepted_mismatches for e in episodes] == [g.accepted_mismatches for g in loop], name
        if name not in ("standard_sd",):
            assert sum(e.accepted_mismatches for e in episodes) > 0, f"{name} never kept a mismatch: a weak test"


def test_standard_sd_needs_no_completion_and_thresholds_share_completions(world):
    draft, target, prompts, eos, pad = world
    source = PathSource(LocalTarget.from_model(target, MAX_NEW).complete, draft, pad, eos, MAX_NEW)
    tuples = [tuple(p) for p in prompts]
    features, head = FeatureCache(draft, target), _random_judge(target)
    run_episodes(tuples, FeatureDecider(features, judge_score(head), 2.0), source, 4)  # standard SD
    assert source.completions == len(set(tuples))  # the target's own responses, nothing more
    low = run_episodes(tuples, FeatureDecider(features, judge_score(head), 0.3), source, 4)
    after_low, computed = source.completions, len(features)
    again = run_episodes(tuples, FeatureDecider(features, judge_score(head), 0.3), source, 4)
    assert source.completions == after_low and len(features) == computed  # nothing computed twice
    assert [e.response for e in again] == [e.response for e in low]
    judge = run_episodes(tuples, PolicyDecider(judge_policy(head, 0.3), DecisionInputs(draft, target, pad)), source, 4)
    assert [e.response for e in judge] == [e.response for e in low]  # cached features decide as the policy


def test_the_kl_rule_on_cached_features_decides_as_the_policy(world):
    draft, target, prompts, eos, pad = world
    source = PathSource(LocalTarget.from_model(target, MAX_NEW).complete, draft, pad, eos, MAX_NEW)
    tuples = [tuple(p) for p in prompts]
    cached = run_episodes(tuples, FeatureDecider(FeatureCache(draft, target), kl_score(0.9), -0.5), source, 4)
    policy = run_episodes(tuples, PolicyDecider(kl_policy(0.5, 0.9), DecisionInputs(draft, target, pad)), source, 4)
    assert [e.response for e in cached] == [e.response for e in policy]
    assert sum(e.accepted_mismatches for e in cached) > 0


def test_an_early_stop_on_the_drafts_confidence_moves_the_walks_blocks_as_the_cached_loops(world, toy_world):
    draft, target, prompts, eos, pad = world
    confidence = 0.9
    source = PathSource(LocalTarget.from_model(target, MAX_NEW).complete, draft, pad, eos, MAX_NEW,
                        draft_confidence=confidence, chunk=4)  # fmt: skip
    inputs = DecisionInputs(draft, target, pad)
    settings = LoopSettings(4, MAX_NEW, eos, pad, batch_size=1, draft_confidence=confidence)
    calls = {}
    for policy in (reject_all, accept_all, kl_policy(0.5)):
        loop = generate_cached(draft, target, prompts, policy, settings)
        episodes = run_episodes([tuple(p) for p in prompts], PolicyDecider(policy, inputs), source, 4)
        assert [e.response for e in episodes] == [g.response_ids for g in loop], policy.name
        assert [e.target_calls for e in episodes] == [g.target_calls for g in loop], policy.name
        calls[policy.name] = [e.target_calls for e in episodes]
    plain = run_episodes([tuple(p) for p in prompts], PolicyDecider(reject_all, inputs),
                         PathSource(source.complete, draft, pad, eos, MAX_NEW), 4)  # fmt: skip
    assert [e.target_calls for e in plain] != calls["standard_sd"]  # the stop did move block boundaries


def test_cached_features_survive_a_save_and_a_load(world, tmp_path):
    draft, target, prompts, eos, pad = world
    source = PathSource(LocalTarget.from_model(target, MAX_NEW).complete, draft, pad, eos, MAX_NEW)
    cache = FeatureCache(draft, target)
    path = source.paths([tuple(prompts[0])], [()])[0]
    mismatches = mismatches_along([tuple(prompts[0])], [path])
    cache.get([p for p, _ in mismatches], [a for _, a in mismatches])
    assert len(cache) == len(mismatches) > 0
    cache.save(tmp_path / "features.pt")
    loaded = FeatureCache(None, None)  # no model: every row must come from the file
    loaded.load(tmp_path / "features.pt")
    assert len(loaded) == len(cache)
    key = next(iter(cache._rows))
    assert torch.equal(loaded._rows[key].target_hidden, cache._rows[key].target_hidden)


def test_a_cache_without_hidden_states_gives_the_rules_features_and_fills_them_in_for_a_hidden_reader(world, tmp_path):
    draft, target, prompts, eos, pad = world
    source = PathSource(LocalTarget.from_model(target, MAX_NEW).complete, draft, pad, eos, MAX_NEW)
    paths = source.paths([tuple(p) for p in prompts[:4]], [()] * 4)
    met = mismatches_along([tuple(p) for p in prompts[:4]], paths)
    where, asks = [p for p, _ in met], [a for _, a in met]
    full = FeatureCache(draft, target).get(where, asks)
    lean_cache = FeatureCache(draft, target, hidden=False)
    lean = lean_cache.get(where, asks)
    for name in ("tokens", "rank", "target_entropy", "kl", "target_top1"):
        assert torch.equal(getattr(lean, name), getattr(full, name)), name
    assert lean.target_hidden.isnan().all() and not full.target_hidden.isnan().any()
    tokens_only = JudgeHead({"tokens": len(TOKEN_FEATURES)}, ("tokens",))
    assert torch.equal(judge_score(tokens_only)(lean), judge_score(tokens_only)(full))
    with pytest.raises(ValueError, match="hidden=True"):
        judge_score(_random_judge(target))(lean)
    lean_cache.save(tmp_path / "features.pt")  # a file a hidden reader shares later
    filled = FeatureCache(draft, target)
    filled.load(tmp_path / "features.pt")
    assert torch.equal(filled.get(where, asks).target_hidden, full.target_hidden)


def test_the_drafts_proposals_survive_a_save_and_a_load_and_rounds_report_back(world, tmp_path):
    draft, target, prompts, eos, pad = world
    complete = LocalTarget.from_model(target, MAX_NEW).complete
    source = PathSource(complete, draft, pad, eos, MAX_NEW)
    tuples = [tuple(p) for p in prompts[:12]]
    rounds = []
    episodes = run_episodes(tuples, PolicyDecider(accept_all, DecisionInputs(draft, target, pad)), source, 4,
                            on_progress=lambda: rounds.append(1))  # fmt: skip
    assert rounds  # accept-all forks at every mismatch: at least one round of forks
    source.save_proposals(tmp_path / "proposals.pt")
    again = PathSource(source.complete, None, pad, eos, MAX_NEW, store=source.store)  # no draft: all from disk
    again.load_proposals(tmp_path / "proposals.pt")
    replay = run_episodes(tuples, PolicyDecider(accept_all, DecisionInputs(draft, target, pad)), again, 4)
    assert [e.response for e in replay] == [e.response for e in episodes] and again.completions == 0


def test_proposals_are_computed_as_walks_read_them_and_equal_one_pass_over_the_path(world):
    draft, target, prompts, eos, pad = world
    source = PathSource(LocalTarget.from_model(target, MAX_NEW).complete, draft, pad, eos, MAX_NEW, chunk=2)
    tuples = [tuple(p) for p in prompts[:16]]
    run_episodes(tuples, PolicyDecider(accept_all, DecisionInputs(draft, target, pad)), source, 4)
    fresh = PrefixStates(draft)  # one pass over each whole path, nothing reused
    cut_short = 0
    for key, (top, _) in source._proposals.items():
        start = next(len(p) for p in tuples if key[: len(p)] == p)  # where the response begins
        whole = fresh.greedy(key[:-1])[0].tolist()  # [T - 1]: the argmax after key[: i + 1]
        assert top == whole[start - 1 : start - 1 + len(top)]
        cut_short += len(top) < len(key) - start
    assert cut_short > 0  # accept-all leaves paths at their next mismatch: the draft stopped there


def test_forks_completed_in_the_background_give_the_lockstep_episodes_in_another_order(world):
    draft, target, prompts, eos, pad = world
    local = LocalTarget.from_model(target, MAX_NEW).complete
    lock, finished = threading.Lock(), []
    shuffle = random.Random(0)

    def slow_complete(prefixes, budget):  # a server: requests end in another order than sent
        time.sleep(shuffle.random() * 0.02)
        with lock:
            out = local(prefixes, budget)
            finished.append(tuple(map(tuple, prefixes)))
        return out

    tuples = [tuple(p) for p in prompts]
    inputs = DecisionInputs(draft, target, pad)
    for policy in (accept_all, kl_policy(0.5)):
        lockstep = run_episodes(tuples, PolicyDecider(policy, inputs), PathSource(local, draft, pad, eos, MAX_NEW), 4)
        source = PathSource(slow_complete, draft, pad, eos, MAX_NEW, batch_size=4, overlap=3)
        overlapped = run_episodes(tuples, PolicyDecider(policy, inputs), source, 4)
        assert [e.response for e in overlapped] == [e.response for e in lockstep], policy.name
        assert [e.target_calls for e in overlapped] == [e.target_calls for e in lockstep], policy.name
        assert sum(e.accepted_mismatches for e in overlapped) > 0
        keys = [k for batch in finished for k in batch]
        assert len(keys) == len(set(keys)) == source.completions  # no prefix asked twice
        finished.clear()


def test_draws_keyed_by_episode_give_the_lockstep_episodes_when_forks_complete_in_the_background(world):
    draft, target, prompts, eos, pad = world
    local = LocalTarget.from_model(target, MAX_NEW).complete
    shuffle = random.Random(1)

    def slow_complete(prefixes, budget):  # requests end in another order than sent
        time.sleep(shuffle.random() * 0.02)
        return local(prefixes, budget)

    rows = [tuple(p) for p in prompts[:6] for _ in range(3)]  # 3 episodes of each prompt: GRPO's groups
    half = lambda prompts, asks: [0.5] * len(asks)  # noqa: E731
    lockstep = run_episodes(rows, SampledDecider(half, seed=7), PathSource(local, draft, pad, eos, MAX_NEW), 4)
    source = PathSource(slow_complete, draft, pad, eos, MAX_NEW, batch_size=2, overlap=3)
    overlapped = run_episodes(rows, SampledDecider(half, seed=7), source, 4)
    decisions = lambda episodes: [[(d.position, d.accepted) for d in e.decisions] for e in episodes]  # noqa: E731
    assert decisions(overlapped) == decisions(lockstep)
    assert [e.response for e in overlapped] == [e.response for e in lockstep]
    assert len({tuple(e.response) for e in lockstep}) > len(prompts[:6])  # a group's episodes drew apart
    other = run_episodes(rows, SampledDecider(half, seed=8), PathSource(local, draft, pad, eos, MAX_NEW), 4)
    assert decisions(other) != decisions(lockstep)


@pytest.mark.parametrize("k", [2, 4])
def test_forks_completed_a_segment_at_a_time_give_the_same_episodes_for_fewer_target_tokens(world, toy_world, k):
    draft, target, prompts, eos, pad = world
    local = LocalTarget.from_model(target, MAX_NEW).complete
    asked = {"whole": 0, "segments": 0}  # rows x tokens requested: what a target's batch costs
    sizes = set()

    def counted(name):
        def complete(prefixes, budget):
            asked[name] += len(prefixes) * budget
            sizes.update([budget] if name == "segments" else [])
            return local(prefixes, budget)

        return complete

    tuples, inputs = [tuple(p) for p in prompts], DecisionInputs(draft, target, pad)
    whole_source = PathSource(counted("whole"), draft, pad, eos, MAX_NEW)
    segmented = PathSource(counted("segments"), draft, pad, eos, MAX_NEW, segment=2)
    for name in ("accept_all", "kl_below", "judge"):
        decider = PolicyDecider(_policies(world, toy_world)[name], inputs)
        whole = run_episodes(tuples, decider, whole_source, k)
        pieces = run_episodes(tuples, decider, segmented, k)
        assert [e.response for e in pieces] == [e.response for e in whole], name
        assert [e.target_calls for e in pieces] == [e.target_calls for e in whole], name
        assert [e.accepted_mismatches for e in pieces] == [e.accepted_mismatches for e in whole], name
    assert asked["segments"] < asked["whole"]
    assert {2, 4} <= sizes  # forks' first segments, and paths walked past them asked for twice as much
    # A store of segments read by a source that completes to the budget: the same paths, the
    # partial ones finished from where they stop; in the background (overlap) as in lockstep.
    reader = PathSource(local, draft, pad, eos, MAX_NEW, store=segmented.store, overlap=2)
    again = run_episodes(tuples, PolicyDecider(accept_all, inputs), reader, k)
    assert [e.response for e in again] == [
        e.response for e in run_episodes(tuples, PolicyDecider(accept_all, inputs), whole_source, k)
    ]
