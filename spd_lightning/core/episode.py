"""Whole generations under a policy's decisions, walked over the target's paths (no models here).

With a greedy draft, the draft's proposal at a response position depends only on the response
written so far. So one teacher-forced draft pass over a path (the target's greedy response from
some prefix) gives the draft's proposal at every position of it, and walking K-token blocks over
the path says which mismatches speculative decoding meets there and how many target calls it
makes: a block is one call; inside it a matching draft token is kept, a mismatch is decided;
after K kept draft tokens the next position takes the target's own token with no decision.

An accepted mismatch swaps the draft token into the response, and from there the target's
greedy continuation of the new prefix is the path: the walk asks for it (one target completion)
and goes on over the new path. A rejected mismatch emits the target's token (the path's own)
and ends the block. So a policy that rejects everything walks one path, the target's own
response, with no completion at all.

A path may be known only part of the way (`TargetPath.partial`: its completion was requested a
segment at a time, since most forked paths are left at their next accepted mismatch); a walk
that reaches its end asks for more (`Extend`), and is answered as a fork is.

`walk` is a generator, so that a driver can run many episodes in lockstep and answer their
requests in batches (decoding/episodes.py): it yields `Ask` (decide at a mismatch; send back a
bool) and `Fork` (the path after an accepted mismatch, or an `Extend`; send back the TargetPath),
and returns the Episode.
"""

from __future__ import annotations

from collections.abc import Collection, Generator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


class TargetPath(NamedTuple):
    """The whole response from some prefix on: the prefix + the target's greedy continuation, at
    most the budget long, ending with an end-of-sequence id unless the budget cut it."""

    tokens: list[int]
    proposals: list[int]  # [p]: the draft's greedy token after tokens[:p], for every p
    # [p]: the draft gives its proposal at p less than the loop's draft_confidence, so drafting
    # stops after p (empty: drafting never stops early).
    unsure: Sequence[bool] = ()
    # The target's continuation goes on past tokens[-1]: only its first segments are known yet.
    partial: bool = False


@dataclass(frozen=True)
class Ask:
    """A mismatch met: the response so far, the draft's token and the target's there."""

    response: tuple[int, ...]
    draft: int
    target: int


@dataclass(frozen=True)
class Fork:
    """An accepted mismatch: the response up to and including the draft's token."""

    response: tuple[int, ...]


@dataclass(frozen=True)
class Extend(Fork):
    """A partial path walked to its end: the same path, continued past Fork.response."""


@dataclass(frozen=True)
class Decision:
    position: int  # where in the response the draft token was proposed
    draft: int
    target: int
    accepted: bool


@dataclass
class Episode:
    """One generation and what it cost."""

    response: list[int] = field(default_factory=list)
    target_calls: int = 0  # one per block
    accepted_draft_tokens: int = 0  # draft tokens kept, matching or not
    decisions: list[Decision] = field(default_factory=list)  # every mismatch met, in order
    stopped_at_eos: bool = False
    forced_rejects: int = 0  # mismatches rejected past walk's max_forks, with no decision asked

    @property
    def accepted_mismatches(self) -> int:
        return sum(d.accepted for d in self.decisions)

    @property
    def num_tokens(self) -> int:
        return len(self.response)


Walk = Generator["Ask | Fork", "bool | TargetPath", Episode]


def walk(path: TargetPath, block_size: int, eos_ids: Collection[int], max_new_tokens: int,
         max_forks: int | None = None, decide_at: int | None = None) -> Walk:  # fmt: skip
    """One episode over `path` (the target's own response and the draft's proposals along it).

    Yields Ask at every mismatch met (send: True keeps the draft token) and Fork after every
    accepted one (send: the new path, which starts with Fork.response). Returns the Episode; it
    ends at an end-of-sequence id (kept) or after max_new_tokens tokens. max_forks caps the
    accepted mismatches (each costs a target completion): past it, every mismatch is rejected
    without asking, counted in Episode.forced_rejects, not in its decisions. decide_at: the one
    response position where a mismatch is asked; every other is rejected the same way (the
    episode then follows the target's path up to it). Where the path marks
    the draft unsure, the block's drafting stops after that token, as the cached loop's does. A
    partial path is extended (yields Extend; send: the longer path) as the walk reaches its end."""
    tokens, proposals, unsure, partial = path
    episode, pos = Episode(), 0
    while pos < max_new_tokens:
        episode.target_calls += 1
        drafts = block_size  # draft tokens in this block
        for i in range(block_size + 1):
            if pos >= max_new_tokens:
                return episode
            while partial and pos >= len(tokens):
                tokens, proposals, unsure, partial = yield Extend(tuple(tokens))
            token, drafted = tokens[pos], i < drafts
            if drafted and proposals[pos] != token:
                draft = proposals[pos]
                capped = max_forks is not None and episode.accepted_mismatches >= max_forks
                if capped or (decide_at is not None and pos != decide_at):
                    accept = False
                    episode.forced_rejects += 1
                else:
                    accept = bool((yield Ask(tuple(tokens[:pos]), draft, token)))
                    episode.decisions.append(Decision(pos, draft, token, accept))
                if accept:
                    tokens, proposals, unsure, partial = yield Fork((*tokens[:pos], draft))
                    token = draft
                else:
                    drafted = False  # the target's correction ends the block
            episode.response.append(token)
            episode.accepted_draft_tokens += drafted
            if i < drafts and unsure and unsure[pos]:
                drafts = i + 1  # the draft stopped here: the next token is the target's
            pos += 1
            if token in eos_ids:
                episode.stopped_at_eos = True
                return episode
            if not drafted:  # a correction, or the target's free token after K kept ones
                break
    return episode


def run_alone(walker: Walk, decide, fork) -> Episode:
    """Drives one walk to its end: decide(Ask) -> bool, fork(Fork) -> Path (tests, examples)."""
    try:
        request = next(walker)
        while True:
            request = walker.send(decide(request) if isinstance(request, Ask) else fork(request))
    except StopIteration as stop:
        return stop.value
