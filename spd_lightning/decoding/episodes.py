"""Whole-generation episodes with models: paths, decisions, and many episodes in lockstep.

core/episode.walk says what one episode does over the target's paths; here are its answers:
- `PathSource`: the path from a response prefix (the target's greedy completion, cached by
  prefix, so episodes, policies, thresholds and values of K share completions) and the draft's
  proposal at every position of it (one teacher-forced draft pass per path, run only past the
  part it shares with a path seen before: models/prefix_states.py);
- deciders: a Policy of the registry (`PolicyDecider`: what the decoding loop runs, so an
  episode writes exactly the loop's tokens), a score of cached features against a threshold
  (decoding/features.py: FeatureDecider), or Bernoulli draws for GRPO (`SampledDecider`);
- `run_episodes`: drives every walk at once, answering their mismatches in one batched decision
  and their forks in one batched completion (or, for a server, as each completes: overlap.py).

Shapes: B mismatches decided together, V vocabulary, H hidden size.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from spd_lightning.core.episode import Ask, Episode, Fork, TargetPath, walk
from spd_lightning.decoding.loop import Generation
from spd_lightning.decoding.overlap import ASKS_PER_DECISION, BackgroundForks
from spd_lightning.decoding.policies import Block, Needs, Policy
from spd_lightning.errors import VerificationError
from spd_lightning.models.hf import id_set
from spd_lightning.models.lm import block_states_shared
from spd_lightning.models.prefix_states import PrefixStates
from spd_lightning.verification.hybrid import CompletionCache, stored_pieces

# Paths to complete: (prompt + response prefix, tokens left in the budget).
Rows = list[tuple[tuple[int, ...], int]]
# Target.complete: prefixes and one budget -> each prefix's greedy completion (None: failed).
Complete = Callable[[list[list[int]], int], list[list[int] | None]]


class PathSource:
    """The target's paths and the draft's proposals along them, each computed once.

    complete: Target.complete (in-process or a vLLM server); store: where completions are kept,
    keyed by prompt + response prefix (judge.inputs.DiskCompletions keeps them on disk)."""

    def __init__(self, complete: Complete, draft: PreTrainedModel, pad_id: int, eos_ids: Collection[int],
                 max_new_tokens: int, store: CompletionCache | None = None, batch_size: int = 32,
                 draft_confidence: float | None = None, chunk: int = 32, capacity: int = 160,
                 overlap: int = 0, segment: int | None = None) -> None:  # fmt: skip
        self.complete, self.draft, self.pad_id = complete, draft, pad_id
        # The cached loop's early stop: drafting ends after a token the draft gives less than this.
        self.draft_confidence = draft_confidence
        self.eos, self.max_new_tokens, self.batch_size = id_set(eos_ids), max_new_tokens, batch_size
        self.store = store if store is not None else CompletionCache(10**9)
        self._proposals: dict[tuple[int, ...], tuple[list[int], list[bool]]] = {}  # the first ones of each path
        self.chunk = chunk  # proposals computed at least this many at a time
        # The frozen draft's KV caches along the last `capacity` paths, shared by forks.
        self.draft_states = PrefixStates(draft, capacity)
        self.completions = 0  # computed by the target (not read from the store)
        # Requests of fork completions in flight while episodes decide (overlap.py; for a server
        # on its own hardware, and order-dependent for Bernoulli draws); 0: lockstep rounds.
        self.overlap = overlap
        # A fork's completion is requested `segment` tokens at a time, each next one twice the last
        # (None: to the budget at once). Most forked paths are left at their next accepted
        # mismatch, so whole completions are mostly thrown away; the target's own responses (the
        # roots) are always completed whole.
        self.segment = segment
        self._next_segment: dict[tuple[int, ...], int] = {}  # the key a partial path goes on from -> its size

    def _budget(self, response: tuple[int, ...]) -> int:
        ended = bool(response) and response[-1] in self.eos
        return 0 if ended else max(self.max_new_tokens - len(response), 0)

    def _known(self, prompt: tuple[int, ...], response: tuple[int, ...]) -> tuple[list[int], bool, int]:
        """(the target's continuation of prompt + response as far as the store holds it, whether
        that is all of it, the last stored piece's length). A stored completion that neither ends
        the response nor fills its budget is a segment: the rest is stored under its end's key."""
        pieces = stored_pieces(self.store, prompt + response)
        known = [token for piece in pieces for token in piece]
        written = known or response
        ended = bool(written) and written[-1] in self.eos
        # An empty last piece: the target wrote nothing more, so the path ends there.
        whole = ended or len(response) + len(known) >= self.max_new_tokens or (bool(pieces) and not pieces[-1])
        return known, whole, len(pieces[-1]) if pieces else 0

    def _cut(self, completion: list[int], budget: int) -> list[int]:
        """A completion cut to its budget and after its first end-of-sequence id (the target's own
        list may be shorter than the tokenizer's)."""
        completion = completion[:budget]
        stop = next((i for i, t in enumerate(completion) if t in self.eos), None)
        return completion if stop is None else completion[: stop + 1]

    def missing(self, prompts: list[tuple[int, ...]], responses: list[tuple[int, ...]]) -> Rows:
        """(prompt + response, tokens to request) of every path not stored yet, longest first, each
        once: the budget left, or with `segment` a fork's next segment; a response with no budget
        left gets the empty completion at once."""
        todo: dict[tuple[int, ...], int] = {}
        for prompt, response in zip(prompts, responses):
            key, budget = prompt + response, self._budget(response)
            if budget == 0:
                self.store.put(key, [])
            elif self.store.get(key) is None:
                size = self._next_segment.get(key, self.segment) if response and self.segment else budget
                todo[key] = min(size, budget)
        return sorted(todo.items(), key=lambda kv: -kv[1])

    def request(self, rows: Rows) -> list[list[int] | None]:
        """The target's completions of `rows` (from `missing`), generated to their longest budget;
        no store is touched (a background thread may run it: `overlap`)."""
        return self.complete([list(key) for key, _ in rows], max(b for _, b in rows))

    def keep(self, rows: Rows, outs: list[list[int] | None]) -> None:
        """Stores `request`'s answers, each row cut to its own budget (greedy is causal)."""
        failed = sum(out is None for out in outs)
        if failed:
            raise VerificationError(f"the target failed to complete {failed} of {len(rows)} episode paths")
        items = [(key, self._cut(out, budget)) for (key, budget), out in zip(rows, outs)]
        if hasattr(self.store, "add"):  # a store on disk writes the batch at once
            self.store.add(items)
        else:
            for key, completion in items:
                self.store.put(key, completion)
        for key, _ in rows:  # a stored piece's size is read no more
            self._next_segment.pop(key, None)
        self.completions += len(rows)

    def fill(self, prompts: list[tuple[int, ...]], responses: list[tuple[int, ...]], desc: str | None = None) -> None:
        """Completes every prompt + response not stored yet, in batches of `batch_size`."""
        rows = self.missing(prompts, responses)
        cuts = range(0, len(rows), self.batch_size)
        for start in tqdm(cuts, desc=desc, unit="batch", leave=False, disable=desc is None or len(cuts) < 2):
            batch = rows[start : start + self.batch_size]
            self.keep(batch, self.request(batch))

    def proposals(self, prompt: tuple[int, ...], tokens: list[int]) -> tuple[Proposals, Sequence[bool]]:
        """([p] the draft's greedy token after prompt + tokens[:p], [p] whether it gives that token
        less than draft_confidence (empty without one)), for every p < len(tokens); computed as
        they are read (`Proposals`)."""
        proposals = Proposals(self, prompt, tokens)
        return proposals, (() if self.draft_confidence is None else proposals.unsure)

    def propose(self, key: tuple[int, ...], start: int, upto: int) -> tuple[list[int], list[bool]]:
        """The proposals and unsure flags of the path `key` (prompt + its tokens; the response
        starts at `start`) computed so far, at least its first `upto`: at least `chunk` more at a
        time, doubling with what is done (few passes for a path walked to its end, little run
        past a fork that leaves it)."""
        top, unsure = self._proposals.setdefault(key, ([], []))
        if len(top) < upto:
            end = min(len(key) - start, max(upto, 2 * len(top), self.chunk))
            # The draft runs only past the part this path shares with one it has seen (a fork's parent).
            new, new_p = self.draft_states.greedy(key[: start + end - 1])  # [start + end - 1]
            top.extend(new[start - 1 + len(top) :].tolist())  # new[i]: the argmax after key[: i + 1]
            if self.draft_confidence is not None:
                unsure.extend((new_p[start - 1 + len(unsure) :] < self.draft_confidence).tolist())
        return top, unsure

    def save_proposals(self, path: Path) -> None:
        """Every path's proposals computed so far, to one file (a later run's load skips their draft passes)."""
        if self._proposals:
            tmp = path.with_name(path.name + ".tmp")
            torch.save(self._proposals, tmp)
            tmp.replace(path)

    def load_proposals(self, path: Path) -> None:
        if path.is_file():
            self._proposals.update(torch.load(path, weights_only=False))

    def paths(self, prompts: list[tuple[int, ...]], responses: list[tuple[int, ...]]) -> list[TargetPath]:
        """The path from each response prefix: prefix + the target's completion (as far as it is
        stored: partial where only its first segments are), with the draft's proposals along it
        (computed as a walk reads them)."""
        self.fill(prompts, responses)
        out = []
        for prompt, response in zip(prompts, responses):
            known, whole, last = self._known(prompt, response)
            tokens = list(response) + known
            if not whole:  # a walk that reaches its end asks for the next segment (core/episode.Extend)
                self._next_segment[prompt + tuple(tokens)] = max(2 * last, self.segment or 1)
            out.append(TargetPath(tokens, *self.proposals(prompt, tokens), partial=not whole))
        return out


class Proposals(Sequence[int]):
    """One path's draft proposals, computed a chunk at a time as a walk reads them: most forked
    paths are left at their next accepted mismatch, and the draft never runs past it there."""

    def __init__(self, source: PathSource, prompt: tuple[int, ...], tokens: list[int]) -> None:
        self.source, self.start, self.size = source, len(prompt), len(tokens)
        self.key = prompt + tuple(tokens)
        self.top: list[int] = []
        self.flags: list[bool] = []
        self.unsure = _Unsure(self)

    def __len__(self) -> int:
        return self.size

    def _computed(self, p: int) -> tuple[list[int], list[bool]]:
        if not 0 <= p < self.size:
            raise IndexError(f"proposal {p} of a path of {self.size} tokens")
        if p >= len(self.top):
            self.top, self.flags = self.source.propose(self.key, self.start, p + 1)
        return self.top, self.flags

    def __getitem__(self, p: int) -> int:  # type: ignore[override]  # no slices: walks read one at a time
        return self._computed(p)[0][p]


class _Unsure(Sequence[bool]):
    """[p] the draft gives its proposal at p less than the source's draft_confidence."""

    def __init__(self, proposals: Proposals) -> None:
        self.proposals = proposals

    def __len__(self) -> int:
        return len(self.proposals)

    def __getitem__(self, p: int) -> bool:  # type: ignore[override]
        return self.proposals._computed(p)[1][p]


class Decider(Protocol):
    def __call__(self, prompts: list[tuple[int, ...]], asks: list[Ask]) -> list[bool]: ...


class DecisionInputs:
    """What a policy reads at a batch of mismatches: a Block of B rows and one draft token each,
    with the models' distributions and hidden states where the policy's Needs say so (one pass
    of each model, shared over contexts that extend one another)."""

    def __init__(self, draft: PreTrainedModel | None, target: PreTrainedModel | None, pad_id: int) -> None:
        self.draft, self.target, self.pad_id = draft, target, pad_id

    def block(self, prompts: list[tuple[int, ...]], asks: list[Ask], needs: Needs) -> Block:
        contexts = [list(p + a.response) for p, a in zip(prompts, asks)]
        drafts = [[a.draft] for a in asks]
        target_ids = torch.tensor([[a.target, self.pad_id] for a in asks])  # [B, 2]
        target_logits = draft_logits = target_hidden = None
        if needs.distributions or needs.target_hidden:
            target_logits, target_hidden = block_states_shared(self.target, contexts, drafts, self.pad_id)  # [B, 2, V]
            target_ids[:, 1] = target_logits[:, 1].argmax(-1).cpu()
        if needs.distributions:
            draft_logits, _ = block_states_shared(self.draft, contexts, drafts, self.pad_id)  # [B, 2, V]
        prompt_lens = [len(p) for p in prompts]
        hidden = target_hidden if needs.target_hidden else None  # [B, 1, H]
        return Block(contexts, prompt_lens, torch.tensor(drafts), target_ids, target_logits, draft_logits, hidden)


class PolicyDecider:
    """A decoding Policy (decoding/registry.py) deciding at each mismatch, as the loop would."""

    def __init__(self, policy: Policy, inputs: DecisionInputs) -> None:
        self.policy, self.inputs = policy, inputs

    def __call__(self, prompts: list[tuple[int, ...]], asks: list[Ask]) -> list[bool]:
        return self.policy(self.inputs.block(prompts, asks, self.policy.needs))[:, 0].tolist()


class SampledDecider:
    """Bernoulli draws from accept probabilities (GRPO's rollouts): accept with p.

    Without `seed` the draws come from `generator` in call order, so they depend on how
    mismatches are grouped into calls. With it, run_episodes asks `by_episode` and episode e's
    n-th draw is a function of (seed, e, n) alone: episodes decided in any grouping, in lockstep or
    with forks completed in the background (decoding/overlap.py), draw alike."""

    def __init__(self, probabilities: Callable[[list[tuple[int, ...]], list[Ask]], list[float]],
                 generator: torch.Generator | None = None, seed: int | str | None = None) -> None:  # fmt: skip
        self.probabilities, self.generator, self.seed = probabilities, generator, seed
        self.drawn: dict[int, int] = {}  # episode -> draws made

    def __call__(self, prompts: list[tuple[int, ...]], asks: list[Ask]) -> list[bool]:
        p = torch.tensor(self.probabilities(prompts, asks), dtype=torch.float64)  # [B]
        return (torch.rand(p.shape, generator=self.generator, dtype=torch.float64) < p).tolist()

    def by_episode(self, prompts: list[tuple[int, ...]], asks: list[Ask], episodes: list[int]) -> list[bool]:
        """As calling it, each mismatch's draw keyed by its episode's index (episodes [B])."""
        if self.seed is None:
            return self(prompts, asks)
        p = self.probabilities(prompts, asks)
        return [self._uniform(e) < q for e, q in zip(episodes, p)]

    def _uniform(self, episode: int) -> float:
        n = self.drawn.get(episode, 0)
        self.drawn[episode] = n + 1
        return random.Random(f"{self.seed}:{episode}:{n}").random()  # a string seed: the same in every process


@dataclass(frozen=True)
class Limits:
    """What run_episodes' walks may decide (core/episode.walk): accepted mismatches per episode at
    most (None: no cap), and per episode the one response position where it decides (None: it
    decides at every mismatch it meets)."""

    max_forks: int | None = None
    decide_at: Sequence[int | None] | None = None  # [episodes]


def run_episodes(prompts: list[tuple[int, ...]], decide: Decider, source: PathSource, block_size: int,
                 desc: str | None = None, limits: Limits = Limits(),
                 on_progress: Callable[[], None] | None = None) -> list[Episode]:  # fmt: skip
    """One episode per prompt (a prompt may repeat: G episodes of one prompt); limits: where the
    walks may decide (Limits); on_progress: called after each round (a long run saves what it
    computed there). Rounds in lockstep (every decision, then every fork's
    completion), or with source.overlap > 0 forks completed in the background while the main
    thread decides (decoding/overlap.py)."""
    n, limit = len(prompts), source.max_new_tokens
    starts = source.paths(prompts, [()] * n)
    decide_at = limits.decide_at if limits.decide_at is not None else [None] * n
    walkers = [walk(path, block_size, source.eos, limit, limits.max_forks, at) for path, at in zip(starts, decide_at)]
    episodes: list[Episode | None] = [None] * n
    pending: dict[int, Ask | Fork] = {}

    def advance(i: int, answer) -> None:
        try:
            pending[i] = walkers[i].send(answer)
        except StopIteration as stop:
            episodes[i] = stop.value
            pending.pop(i, None)

    background = BackgroundForks(source, source.overlap) if source.overlap > 0 else None
    with tqdm(total=n, desc=desc, leave=False, disable=desc is None) as bar:
        for i in range(n):
            advance(i, None)
        try:
            while pending:
                asks = [(i, r) for i, r in pending.items() if isinstance(r, Ask)]
                if background is not None:  # forks met in a long decision would wait for all of it
                    asks = asks[:ASKS_PER_DECISION]
                if asks:
                    ids = [i for i, _ in asks]
                    verdicts = _decide(decide, [prompts[i] for i in ids], [r for _, r in asks], ids)
                    for (i, _), verdict in zip(asks, verdicts):
                        advance(i, bool(verdict))
                forks = [(i, r) for i, r in pending.items() if isinstance(r, Fork)]
                if background is None and forks:
                    paths = source.paths([prompts[i] for i, _ in forks], [r.response for _, r in forks])
                    for (i, _), path in zip(forks, paths):
                        advance(i, path)
                elif background is not None:
                    background.request([(i, prompts[i], r.response) for i, r in forks if i not in background])
                    idle = not any(isinstance(r, Ask) for r in pending.values())
                    for i, path in background.ready(block=idle and bool(forks)):
                        advance(i, path)
                if on_progress is not None:
                    on_progress()
                bar.update(n - len(pending) - bar.n)
        finally:
            if background is not None:
                background.close()
    return episodes


def mismatches_along(
    prompts: list[tuple[int, ...]], paths, desc: str | None = None
) -> list[tuple[tuple[int, ...], Ask]]:
    """(prompt, Ask) at every position of each path where the draft's proposal differs; desc: a
    progress bar over the paths (reading a path's proposals runs the draft over it)."""
    bar = tqdm(zip(prompts, paths), total=len(prompts), desc=desc, unit="path", leave=False, disable=desc is None)
    return [
        (prompt, Ask(tuple(tokens[:p]), proposals[p], tokens[p]))
        for prompt, (tokens, proposals, *_) in bar
        for p in range(len(tokens))
        if proposals[p] != tokens[p]
    ]


def _decide(decide: Decider, prompts: list[tuple[int, ...]], asks: list[Ask], episodes: list[int]) -> list[bool]:
    """A decider that keys its draws by episode (SampledDecider with a seed) is told which."""
    by_episode = getattr(decide, "by_episode", None)
    return by_episode(prompts, asks, episodes) if by_episode is not None else decide(prompts, asks)


def as_generation(episode: Episode) -> Generation:
    """The decoding loop's record of a generation (loop.summarize reads it)."""
    kept = episode.accepted_mismatches
    return Generation(episode.response, episode.target_calls, episode.accepted_draft_tokens, kept,
                      episode.stopped_at_eos)  # fmt: skip
