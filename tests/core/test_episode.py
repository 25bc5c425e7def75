"""The walk of one episode over hand-written paths: which mismatches it meets, what it emits, and
how many target calls it makes."""

from __future__ import annotations

from spd_lightning.core.episode import Ask, Extend, Fork, TargetPath, run_alone, walk

EOS = 0


def paths(table: dict[tuple[int, ...], list[int]], draft_of):
    """fork(Fork) -> the path from a response prefix: table[prefix] continues it; proposals from draft_of."""

    def fork(request: Fork):
        tokens = list(request.response) + table[request.response]
        return TargetPath(tokens, [draft_of(tokens, p) for p in range(len(tokens))])

    return fork


def test_matching_draft_keeps_k_then_takes_the_targets_free_token():
    tokens = [1, 2, 3, 4, 5, 6, 7, EOS]
    episode = run_alone(walk(TargetPath(tokens, list(tokens)), 3, {EOS}, 50), lambda a: 1 / 0, lambda f: 1 / 0)
    assert episode.response == tokens
    assert episode.target_calls == 2  # blocks of K + 1 = 4 tokens
    assert episode.accepted_draft_tokens == 6  # EOS came as the second block's free token
    assert episode.decisions == [] and episode.stopped_at_eos


def test_a_rejected_mismatch_emits_the_targets_token_and_ends_the_block():
    tokens = [1, 2, 3, 4, 5, EOS]
    proposals = [1, 9, 3, 4, 5, EOS]  # the draft says 9 where the target says 2
    asked = []
    episode = run_alone(walk(TargetPath(tokens, proposals), 4, {EOS}, 50), lambda a: asked.append(a) or False, None)
    assert asked == [Ask((1,), 9, 2)]
    assert episode.response == tokens
    assert episode.target_calls == 2  # [1, 2] then [3, 4, 5, EOS]
    assert [(d.position, d.accepted) for d in episode.decisions] == [(1, False)]


def test_an_accepted_mismatch_forks_to_the_targets_path_from_the_new_prefix():
    start = TargetPath([1, 2, 3, 4, EOS], [1, 9, 3, 4, EOS])
    after = {(1, 9): [7, 7, EOS]}  # the target continues the hybrid prefix differently
    fork = paths(after, lambda tokens, p: tokens[p])  # the draft agrees with the new path
    episode = run_alone(walk(start, 4, {EOS}, 50), lambda a: True, fork)
    assert episode.response == [1, 9, 7, 7, EOS]
    assert episode.target_calls == 1  # K = 4 kept, EOS as the free token
    assert episode.accepted_mismatches == 1 and episode.accepted_draft_tokens == 4


def test_the_budget_cuts_a_block_and_the_call_still_counts():
    tokens = list(range(1, 11))
    episode = run_alone(walk(TargetPath(tokens, list(tokens)), 4, {EOS}, 7), None, None)
    assert episode.response == tokens[:7]
    assert episode.target_calls == 2 and not episode.stopped_at_eos


def test_a_kept_draft_eos_ends_the_episode():
    start = TargetPath([1, 2, 3], [1, EOS, 3])
    episode = run_alone(walk(start, 4, {EOS}, 50), lambda a: True, paths({(1, EOS): []}, lambda t, p: t[p]))
    assert episode.response == [1, EOS] and episode.stopped_at_eos and episode.target_calls == 1


def test_past_max_forks_mismatches_are_rejected_without_a_decision():
    start = TargetPath([1, 2, 3, 4, 5, 6, EOS], [1, 9, 3, 9, 5, 6, EOS])
    same = {(1, 9): [3, 4, 5, 6, EOS]}
    episode = run_alone(walk(start, 8, {EOS}, 50, max_forks=1), lambda a: True, paths(same, lambda t, p: start[1][p]))
    assert episode.response == [1, 9, 3, 4, 5, 6, EOS]  # the second mismatch (9 for 4) was rejected
    assert episode.accepted_mismatches == 1 and len(episode.decisions) == 1 and episode.forced_rejects == 1


def test_with_decide_at_only_that_positions_mismatch_is_asked():
    start = TargetPath([1, 2, 3, 4, 5, 6, EOS], [1, 9, 3, 9, 5, 6, EOS])
    asked = []
    decide = lambda ask: asked.append(len(ask.response)) or True  # noqa: E731
    forks = paths({(1, 2, 3, 9): [5, 6, EOS]}, lambda t, p: start[1][p] if p < 4 else t[p])
    episode = run_alone(walk(start, 8, {EOS}, 50, decide_at=3), decide, forks)
    assert asked == [3] and episode.forced_rejects == 1  # the mismatch at 1 was rejected unasked
    assert episode.response == [1, 2, 3, 9, 5, 6, EOS] and [d.position for d in episode.decisions] == [3]


def test_an_unsure_draft_ends_the_blocks_drafting_after_that_token():
    tokens = [1, 2, 3, 4, 5, 6, 7, EOS]
    unsure = [False, True, False, False, False, False, False, False]  # the draft doubts its 2nd token
    episode = run_alone(walk(TargetPath(tokens, list(tokens), unsure), 4, {EOS}, 50), None, None)
    assert episode.response == tokens
    # [1, 2] drafted, 3 the target's; then 4 5 6 7 drafted and EOS free: 2 calls, 6 draft tokens
    assert episode.target_calls == 2 and episode.accepted_draft_tokens == 6


def test_a_partial_path_is_extended_as_the_walk_reaches_its_end():
    tokens = [1, 2, 3, 4, 5, 6, 7, EOS]
    asked = []

    def extend(request):
        asked.append(request)
        known = len(request.response) + 2  # two more tokens a time
        return TargetPath(tokens[:known], tokens[:known], partial=known < len(tokens))

    episode = run_alone(walk(TargetPath(tokens[:3], tokens[:3], partial=True), 4, {EOS}, 50), None, extend)
    whole = run_alone(walk(TargetPath(tokens, tokens), 4, {EOS}, 50), None, None)
    assert episode == whole
    assert [r.response for r in asked] == [(1, 2, 3), (1, 2, 3, 4, 5), (1, 2, 3, 4, 5, 6, 7)]
    assert all(isinstance(r, Extend) for r in asked)
