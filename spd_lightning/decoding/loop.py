"""Whole generations by (lossy) speculative decoding, and what they cost in target calls.

One block, for every unfinished row at once (B rows, K draft tokens):
  1. the draft proposes K greedy tokens (K forward passes of the draft);
  2. ONE target forward pass over context + draft gives the target's greedy token at each of
     the K draft positions and one after the block: target_ids [B, K+1];
  3. a policy decides at the mismatches (draft != target; matches are always kept);
  4. with j the first rejected position, the block emits draft[:j] + [target[j]]: the target's
     correction when j < K, the free token after the whole block when j = K.
Rows stop at EOS (kept as the response's last token) or at max_new_tokens. Each block is one
target call, so greedy decoding by the target alone (K = 0) is one call per token, and standard
speculative decoding (reject every mismatch) emits exactly greedy's tokens in fewer calls.

Two loops give the same tokens. `generate` batches rows and re-runs both models over each
row's whole context every block: plain, and cheap at the toy world's lengths.
`generate_cached` keeps a KV cache per model (row_cache.RowCache; batched rows too), rolled back
to each row's kept tokens after each block, so a block costs the draft K passes over one token
and the target one pass over K+1: what real models need (a 1.5B target reads all its weights for
every pass, and on a memory-bound device a pass over K+1 tokens costs about one over a single
token).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from spd_lightning.core.sampling import first_reject
from spd_lightning.decoding.policies import Block, Decide, Policy, as_policy
from spd_lightning.models.hf import id_set
from spd_lightning.models.lm import greedy_tokens, teacher_forced_logits, teacher_forced_states
from spd_lightning.models.row_cache import RowCache


@dataclass
class Generation:
    """One prompt's response and what producing it cost."""

    response_ids: list[int]  # generated tokens, ending with EOS when the model stopped by itself
    target_calls: int = 0  # target forward passes (one per block)
    accepted_draft_tokens: int = 0  # draft tokens kept, over all blocks
    accepted_mismatches: int = 0  # of those, tokens the target would not have chosen
    stopped_at_eos: bool = False
    # Under policies.watched_sd: the highest probability the watcher gave a mismatch whose
    # correction was emitted (None: none was); the threshold policy at any threshold above it
    # would have written exactly this response.
    watched_max: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.response_ids)


def block_tokens(draft: list[int], target: list[int], accept_len: int) -> list[int]:
    """What a block emits: draft[:j] + [target[j]] (target has K+1 tokens, so j = K gives the
    free token after the whole block)."""
    return list(draft[:accept_len]) + [target[accept_len]]


@dataclass
class BlockOutcome:
    """What one block gives one row."""

    tokens: list[int]  # draft[:j] + [target[j]]
    mismatched: list[bool]  # [j]: which kept draft tokens differ from the target's
    watched: float | None = None  # policies.watched_sd: the watcher's probability at the mismatch j, if j < K


def emit(gen: Generation, outcome: BlockOutcome, eos_ids: int | Collection[int], max_new_tokens: int) -> None:
    """Appends a block's tokens to a response, cut after an EOS (any of `eos_ids`) or at
    max_new_tokens, and counts the call. Draft tokens cut off with the rest count as neither
    accepted nor generated."""
    ends = id_set(eos_ids)
    tokens = outcome.tokens[: max_new_tokens - gen.num_tokens]
    stop = next((i for i, t in enumerate(tokens) if t in ends), None)
    if stop is not None:
        tokens = tokens[: stop + 1]
        gen.stopped_at_eos = True
    gen.response_ids.extend(tokens)
    gen.target_calls += 1
    kept = outcome.mismatched[: len(tokens)]
    gen.accepted_draft_tokens += len(kept)
    gen.accepted_mismatches += sum(kept)
    # The mismatch at j mattered only if its correction (token j) was emitted, not cut off.
    if outcome.watched is not None and len(outcome.tokens) - 1 < len(tokens):
        before = gen.watched_max
        gen.watched_max = outcome.watched if before is None else max(before, outcome.watched)


def decode_step(
    draft: PreTrainedModel | None,
    target: PreTrainedModel,
    contexts: list[list[int]],
    prompt_lens: list[int],
    policy: Policy,
    block_size: int,
    pad_id: int,
) -> list[BlockOutcome]:
    """One block for every row (its prompt + response so far): one target forward pass."""
    drafts = greedy_tokens(draft, contexts, block_size, pad_id) if block_size else [[] for _ in contexts]
    target_hidden = None
    if block_size and policy.needs.target_hidden:
        target_logits, target_hidden = teacher_forced_states(target, contexts, drafts, pad_id)  # [B, K+1, V], [B, K, H]
    else:
        target_logits = teacher_forced_logits(target, contexts, drafts, pad_id)  # [B, K+1, V]
    draft_logits = None
    if block_size and policy.needs.distributions:
        draft_logits = teacher_forced_logits(draft, contexts, drafts, pad_id)  # [B, K+1, V]
    target_ids = target_logits.argmax(-1).cpu()  # [B, K+1]
    draft_ids = torch.tensor(drafts, dtype=torch.long)  # [B, K]
    block = Block(contexts, prompt_lens, draft_ids, target_ids, target_logits, draft_logits, target_hidden)
    return decide_block(block, policy)


def decide_block(block: Block, policy: Policy) -> list[BlockOutcome]:
    """What each row of a block emits under `policy` (K = 0: greedy, the target's token)."""
    mismatch = block.mismatch  # [B, K]
    k = block.draft_ids.shape[1]
    if k:
        accept_len = first_reject(policy(block).bool() | ~mismatch).tolist()  # [B]
    else:  # greedy: nothing to decide, the target's own token is the block
        accept_len = [0] * len(block.contexts)
    watch = policy.watch if k else None
    probs = watch(block).tolist() if watch is not None else [None] * len(accept_len)  # [B, K]
    return [
        BlockOutcome(block_tokens(d, t, j), m[:j], p[j] if p is not None and j < k else None)
        for d, t, j, m, p in zip(
            block.draft_ids.tolist(), block.target_ids.tolist(), accept_len, mismatch.tolist(), probs
        )
    ]


@dataclass(frozen=True)
class LoopSettings:
    """How a decoding loop runs. block_size: K draft tokens per block (0: greedy decoding by the
    target alone, the draft unused); a row stops at one of `eos_ids` (kept as its last token) or
    after max_new_tokens; batch_size rows decode at once; draft_confidence (cached loop only):
    end a block's drafting early, after a step at which the draft gives its own token less than
    this probability in every row (transformers' assisted generation uses 0.4); None: always K."""

    block_size: int
    max_new_tokens: int
    eos_ids: int | Collection[int]
    pad_id: int = 0
    batch_size: int = 1
    draft_confidence: float | None = None


def generate(
    draft: PreTrainedModel | None,
    target: PreTrainedModel,
    prompts: list[list[int]],
    policy: Policy | Decide,
    settings: LoopSettings,
    desc: str | None = None,
) -> list[Generation]:
    """Decodes every prompt, `settings.batch_size` prompts at a time; rows leave the batch as
    they finish. Both models re-read each row's whole context every block. `policy`: a Policy,
    or a plain callable Block -> [B, K] bool (policies.as_policy)."""
    gens, policy = [Generation([]) for _ in prompts], as_policy(policy)
    k, limit = settings.block_size, settings.max_new_tokens
    with tqdm(total=len(prompts), desc=desc, leave=False, disable=desc is None) as bar:
        for start in range(0, len(prompts), settings.batch_size):
            active = list(range(start, min(start + settings.batch_size, len(prompts))))
            while active:
                contexts = [prompts[i] + gens[i].response_ids for i in active]
                lens = [len(prompts[i]) for i in active]
                for i, outcome in zip(active, decode_step(draft, target, contexts, lens, policy, k, settings.pad_id)):
                    emit(gens[i], outcome, settings.eos_ids, limit)
                still = [i for i in active if not _finished(gens[i], limit)]
                bar.update(len(active) - len(still))
                active = still
    return gens


def generate_cached(
    draft: PreTrainedModel | None,
    target: PreTrainedModel,
    prompts: list[list[int]],
    policy: Policy | Decide,
    settings: LoopSettings,
    desc: str | None = None,
    clock: LoopClock | None = None,
) -> list[Generation]:
    """As `generate`, with a KV cache per model (row_cache.RowCache): a block feeds the draft
    its new tokens and K-1 proposals, the target the row's new token and the K proposals, and
    rolls both caches back to the kept tokens. `clock` adds up where the time went."""
    gens, policy = [Generation([]) for _ in prompts], as_policy(policy)
    clock = clock if clock is not None else LoopClock()
    with tqdm(total=len(prompts), desc=desc, leave=False, disable=desc is None) as bar:
        for start in range(0, len(prompts), settings.batch_size):
            rows = list(range(start, min(start + settings.batch_size, len(prompts))))
            loop = _CachedRows(draft, target, policy, settings, clock)
            loop.run([prompts[i] for i in rows], [gens[i] for i in rows], bar)
    return gens


@dataclass
class LoopClock:
    """Seconds spent in each part of the cached loop, and the forward passes made."""

    draft_s: float = 0.0
    target_s: float = 0.0
    policy_s: float = 0.0
    draft_passes: int = 0
    target_passes: int = 0


class _CachedRows:
    """The cached loop over one batch of rows; a row leaves when it finishes."""

    def __init__(self, draft, target, policy: Policy, settings: LoopSettings, clock: LoopClock) -> None:
        block_size, pad_id = settings.block_size, settings.pad_id
        self.k, self.policy, self.clock, self.settings = block_size, policy, clock, settings
        self.drafted = 0  # draft tokens in the current block
        self.target = RowCache(target, pad_id)
        self.draft = RowCache(draft, pad_id) if block_size else None
        self.needs_logits = bool(block_size) and policy.needs.distributions
        self.needs_hidden = bool(block_size) and policy.needs.target_hidden

    def propose(self, new: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Up to K greedy draft tokens per row after its new tokens: (ids [B, k], logits [B, k, V]
        or None). With draft_confidence, drafting stops after the first step at which every row's
        draft gives its own token less than that probability (k < K then)."""
        start, rows, logits = time.perf_counter(), [], []
        step, _ = self.draft.feed(new, 1)  # [B, 1, V]
        for i in range(self.k):
            last = step[:, -1]  # [B, V]
            logits.append(last)
            rows.append(last.argmax(-1).cpu())
            if i == self.k - 1 or self._unsure(last):
                break
            step, _ = self.draft.feed([[t] for t in rows[-1].tolist()], 1)
        self.clock.draft_s += time.perf_counter() - start
        self.clock.draft_passes += len(rows)
        return torch.stack(rows, dim=1), torch.stack(logits, dim=1) if self.needs_logits else None

    def _unsure(self, logits: torch.Tensor) -> bool:
        """logits [B, V]: the draft's top probability is below draft_confidence in every row."""
        confidence = self.settings.draft_confidence
        if confidence is None:
            return False
        return bool((torch.softmax(logits, dim=-1).max(dim=-1).values < confidence).all())

    def block(self, seqs: list[list[int]], prompt_lens: list[int], draft_new, target_new) -> list[BlockOutcome]:
        no_draft = (torch.zeros(len(seqs), 0, dtype=torch.long), None)  # greedy: the target alone
        drafts, draft_logits = self.propose(draft_new) if self.k else no_draft
        k = self.drafted = drafts.shape[1]
        start = time.perf_counter()
        fed = [t + d for t, d in zip(target_new, drafts.tolist())]
        target_logits, hidden = self.target.feed(fed, k + 1, self.needs_hidden)  # [B, K+1, V], [B, K+1, H]
        self.clock.target_s += time.perf_counter() - start
        self.clock.target_passes += 1
        start = time.perf_counter()
        at_drafts = hidden[:, 1:] if hidden is not None else None  # [B, K, H] at the draft tokens
        block = Block(seqs, prompt_lens, drafts, target_logits.argmax(-1).cpu(), target_logits, draft_logits, at_drafts)
        outcomes = decide_block(block, self.policy)
        self.clock.policy_s += time.perf_counter() - start
        return outcomes

    def roll_back(self, outcomes: list[BlockOutcome]) -> tuple[list[list[int]], list[list[int]]]:
        """Cuts both caches back to each row's kept tokens. -> the tokens each model reads next
        (draft, target): the target read all K proposals, the draft the first K-1 of them."""
        kept = [len(o.tokens) - 1 for o in outcomes]  # j per row
        k = self.drafted
        self.target.discard([k - j for j in kept])
        if self.draft is None:
            return [], [o.tokens[-1:] for o in outcomes]
        self.draft.discard([max(k - 1 - j, 0) for j in kept])
        draft_new = [o.tokens[-2:] if j == k else o.tokens[-1:] for o, j in zip(outcomes, kept)]
        return draft_new, [o.tokens[-1:] for o in outcomes]

    def run(self, prompts, gens: list[Generation], bar) -> None:
        eos_ids, max_new_tokens = self.settings.eos_ids, self.settings.max_new_tokens
        active = list(range(len(prompts)))
        draft_new, target_new = [list(p) for p in prompts], [list(p) for p in prompts]
        while active:
            seqs = [prompts[i] + gens[i].response_ids for i in active]
            outcomes = self.block(seqs, [len(prompts[i]) for i in active], draft_new, target_new)
            for i, outcome in zip(active, outcomes):
                emit(gens[i], outcome, eos_ids, max_new_tokens)
            draft_new, target_new = self.roll_back(outcomes)
            still = [b for b, i in enumerate(active) if not _finished(gens[i], max_new_tokens)]
            bar.update(len(active) - len(still))
            if still and len(still) < len(active):  # finished rows leave both caches
                for cache in (self.target, self.draft):
                    if cache is not None:
                        cache.keep_rows(still)
                draft_new = [draft_new[b] for b in still] if self.draft is not None else []
                target_new = [target_new[b] for b in still]
            active = [active[b] for b in still]


def _finished(gen: Generation, max_new_tokens: int) -> bool:
    return gen.stopped_at_eos or gen.num_tokens >= max_new_tokens


def summarize(gens: list[Generation], correct: list[bool], seconds: float) -> dict[str, float]:
    """A policy's figures over all prompts. Generated tokens include the final EOS (producing it
    takes a target call too), so greedy decoding is exactly 1.0 target call per token."""
    tokens = sum(g.num_tokens for g in gens)
    calls = sum(g.target_calls for g in gens)
    return {
        "accuracy": sum(correct) / max(len(correct), 1),
        "target_calls_per_token": calls / max(tokens, 1),
        "accepted_draft_tokens_per_block": sum(g.accepted_draft_tokens for g in gens) / max(calls, 1),
        "accepted_mismatches_per_block": sum(g.accepted_mismatches for g in gens) / max(calls, 1),
        "tokens_per_prompt": tokens / max(len(gens), 1),
        "target_calls": float(calls),
        "stopped_at_eos": sum(g.stopped_at_eos for g in gens) / max(len(gens), 1),
        "wall_s": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
    }


def timed(loop: Callable[..., list[Generation]], *args, **kwargs) -> tuple[list[Generation], float]:
    """loop(*args, **kwargs) (generate or generate_cached) and its wall time in seconds."""
    start = time.perf_counter()
    gens = loop(*args, **kwargs)
    return gens, time.perf_counter() - start
