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
`generate_cached` decodes one row at a time with a KV cache per model, rolled back to the kept
tokens after each block, so a block costs the target one pass over K+1 new tokens: what real
models need (a 1.5B target on a CPU reads all its weights for every pass, whatever its length).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from spd_lightning.data import Record, collate_records
from spd_lightning.hf import id_set
from spd_lightning.judge import JudgeHead, JudgeInputs, judge_token_features
from spd_lightning.lm import CachedLM, PrefixCache, greedy_tokens, teacher_forced_logits, teacher_forced_states
from spd_lightning.rules import kl_decisions, token_features
from spd_lightning.sampling import first_reject, threshold_decisions
from spd_lightning.scorer import ScoringActor


@dataclass
class Block:
    """One speculative block of the B unfinished rows."""

    contexts: list[list[int]]  # prompt + response so far, per row
    prompt_lens: list[int]  # where each row's response starts
    draft_ids: torch.Tensor  # [B, K] the draft's proposals (CPU)
    target_ids: torch.Tensor  # [B, K+1] the target's greedy token at each draft position, then after the block
    target_logits: torch.Tensor | None = None  # [B, K+1, V] the target's distributions there
    draft_logits: torch.Tensor | None = None  # [B, K+1, V] the draft's, for policies that ask (needs_logits)
    target_hidden: torch.Tensor | None = (
        None  # [B, K, H] the target's last hidden states at the draft tokens (needs_hidden)
    )

    @property
    def mismatch(self) -> torch.Tensor:
        """[B, K] bool: the draft token differs from the target's."""
        k = self.draft_ids.shape[1]
        return self.draft_ids != self.target_ids[:, :k]


# A policy: Block -> [B, K] bool, True = keep the draft token. Only mismatches are read;
# the loop keeps matching tokens whatever it says.
Policy = Callable[[Block], torch.Tensor]


def reject_all(block: Block) -> torch.Tensor:
    """Standard speculative decoding: every mismatch ends the block (lossless)."""
    return torch.zeros_like(block.draft_ids, dtype=torch.bool)


def accept_all(block: Block) -> torch.Tensor:
    """The lossy extreme: the target never overrules the draft inside a block."""
    return torch.ones_like(block.draft_ids, dtype=torch.bool)


def scorer_policy(scorer: ScoringActor, threshold: float, pad_id: int) -> Policy:
    """The trained judge: keep a mismatch when its accept probability is >= threshold, the
    probability computed as training's validation computes it (context + draft, with the
    target's tokens as the alternatives). A block of one row (the KV-cached loop) re-reads only
    what its backbone has not read yet (lm.PrefixCache)."""
    device = next(scorer.parameters()).device
    prefix_cache = PrefixCache(scorer.backbone)

    @torch.no_grad()
    def decide(block: Block) -> torch.Tensor:
        k = block.draft_ids.shape[1]
        if len(block.contexts) == 1:
            ids = block.contexts[0] + block.draft_ids[0].tolist()
            at_draft = prefix_cache.read(ids, k).last_hidden_state[:, -k:]  # [1, K, H]
            logits = scorer.score(at_draft, block.target_ids[:, :k].to(device))  # [1, K]
            return threshold_decisions(torch.sigmoid(logits).cpu(), block.mismatch, threshold)
        drafts, targets = block.draft_ids.tolist(), block.target_ids[:, :k].tolist()
        records = [
            Record(ctx, plen, d, t, "") for ctx, plen, d, t in zip(block.contexts, block.prompt_lens, drafts, targets)
        ]
        batch = collate_records(records, pad_id)
        logits = scorer(
            batch.input_ids.to(device),
            batch.attention_mask.to(device),
            batch.context_len.to(device),
            batch.target_ids.to(device),
        )  # [B, K]
        return threshold_decisions(torch.sigmoid(logits).cpu(), block.mismatch, threshold)

    return decide


def kl_policy(tau: float, confidence: float | None = 0.9) -> Policy:
    """The training-free KL rule (rules.kl_decisions): keep a mismatch when KL(target || draft)
    <= tau at its position, except where the target's top-1 probability exceeds `confidence`.
    It reads both models' distributions: one more draft pass per block, no extra target call."""

    def decide(block: Block) -> torch.Tensor:
        features = token_features(block.target_logits, block.draft_logits, block.draft_ids)
        return kl_decisions(features.kl.cpu(), block.mismatch, tau, features.target_top1.cpu(), confidence)

    decide.needs_logits = True  # type: ignore[attr-defined]
    return decide


def judge_policy(head: JudgeHead, threshold: float) -> Policy:
    """The zero-cost judge (judge.py): keep a mismatch when its accept probability is >= threshold.
    It reads the target's hidden states at the draft tokens and both models' distributions, which
    the block's verification pass and the draft's proposals computed anyway: no extra model pass."""
    if "draft_hidden" in head.inputs:
        raise ValueError(
            "a judge that reads the draft's hidden states needs another draft pass; decode takes judges without"
        )

    @torch.no_grad()
    def decide(block: Block) -> torch.Tensor:
        tokens = judge_token_features(block.target_logits, block.draft_logits, block.draft_ids)  # [B, K, F]
        data = JudgeInputs(block.mismatch, tokens.cpu(), block.target_hidden.cpu())
        return threshold_decisions(torch.sigmoid(head(data)), block.mismatch, threshold)

    decide.needs_logits = True  # type: ignore[attr-defined]
    decide.needs_hidden = True  # type: ignore[attr-defined]
    return decide


@dataclass
class Generation:
    """One prompt's response and what producing it cost."""

    response_ids: list[int]  # generated tokens, ending with EOS when the model stopped by itself
    target_calls: int = 0  # target forward passes (one per block)
    accepted_draft_tokens: int = 0  # draft tokens kept, over all blocks
    accepted_mismatches: int = 0  # of those, tokens the target would not have chosen
    stopped_at_eos: bool = False

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
    if block_size and getattr(policy, "needs_hidden", False):
        target_logits, target_hidden = teacher_forced_states(target, contexts, drafts, pad_id)  # [B, K+1, V], [B, K, H]
    else:
        target_logits = teacher_forced_logits(target, contexts, drafts, pad_id)  # [B, K+1, V]
    draft_logits = None
    if block_size and getattr(policy, "needs_logits", False):
        draft_logits = teacher_forced_logits(draft, contexts, drafts, pad_id)  # [B, K+1, V]
    target_ids = target_logits.argmax(-1).cpu()  # [B, K+1]
    draft_ids = torch.tensor(drafts, dtype=torch.long)  # [B, K]
    block = Block(contexts, prompt_lens, draft_ids, target_ids, target_logits, draft_logits, target_hidden)
    return decide_block(block, policy)


def decide_block(block: Block, policy: Policy) -> list[BlockOutcome]:
    """What each row of a block emits under `policy` (K = 0: greedy, the target's token)."""
    mismatch = block.mismatch  # [B, K]
    if block.draft_ids.shape[1]:
        accept_len = first_reject(policy(block).bool() | ~mismatch).tolist()  # [B]
    else:  # greedy: nothing to decide, the target's own token is the block
        accept_len = [0] * len(block.contexts)
    return [
        BlockOutcome(block_tokens(d, t, j), m[:j])
        for d, t, j, m in zip(block.draft_ids.tolist(), block.target_ids.tolist(), accept_len, mismatch.tolist())
    ]


def generate(
    draft: PreTrainedModel | None,
    target: PreTrainedModel,
    prompts: list[list[int]],
    policy: Policy,
    block_size: int,
    max_new_tokens: int,
    eos_ids: int | Collection[int],
    pad_id: int,
    batch_size: int = 64,
    desc: str | None = None,
) -> list[Generation]:
    """Decodes every prompt, `batch_size` prompts at a time; rows leave the batch as they finish.
    block_size=0 is plain greedy decoding by the target (the draft is not used)."""
    gens = [Generation([]) for _ in prompts]
    with tqdm(total=len(prompts), desc=desc, leave=False, disable=desc is None) as bar:
        for start in range(0, len(prompts), batch_size):
            active = list(range(start, min(start + batch_size, len(prompts))))
            while active:
                contexts = [prompts[i] + gens[i].response_ids for i in active]
                lens = [len(prompts[i]) for i in active]
                for i, outcome in zip(active, decode_step(draft, target, contexts, lens, policy, block_size, pad_id)):
                    emit(gens[i], outcome, eos_ids, max_new_tokens)
                still = [i for i in active if not gens[i].stopped_at_eos and gens[i].num_tokens < max_new_tokens]
                bar.update(len(active) - len(still))
                active = still
    return gens


def generate_cached(
    draft: PreTrainedModel | None,
    target: PreTrainedModel,
    prompts: list[list[int]],
    policy: Policy,
    block_size: int,
    max_new_tokens: int,
    eos_ids: int | Collection[int],
    desc: str | None = None,
) -> list[Generation]:
    """As `generate`, one prompt at a time with a KV cache per model (batch size 1)."""
    bar = tqdm(prompts, desc=desc, leave=False, disable=desc is None)
    return [_generate_one(draft, target, p, policy, block_size, max_new_tokens, eos_ids) for p in bar]


@torch.no_grad()
def _generate_one(draft, target, prompt, policy, block_size, max_new_tokens, eos_ids) -> Generation:
    gen = Generation([])
    target_lm = CachedLM(target)
    draft_lm = CachedLM(draft) if block_size else None
    needs_logits = bool(block_size) and getattr(policy, "needs_logits", False)
    needs_hidden = bool(block_size) and getattr(policy, "needs_hidden", False)
    target_hidden = None
    while not gen.stopped_at_eos and gen.num_tokens < max_new_tokens:
        seq = prompt + gen.response_ids
        drafts, draft_logits = draft_lm.propose(seq, block_size, needs_logits) if draft_lm else ([], None)
        if needs_hidden:
            target_logits, hidden = target_lm.feed_states(seq + drafts, block_size + 1)  # [K+1, V], [K+1, H]
            target_hidden = hidden[1:][None]  # [1, K, H] at the draft tokens
        else:
            target_logits = target_lm.feed(seq + drafts, block_size + 1)  # [K+1, V]
        block = Block(
            [seq],
            [len(prompt)],
            torch.tensor([drafts], dtype=torch.long).reshape(1, block_size),
            target_logits.argmax(-1).cpu()[None],
            target_logits[None] if needs_logits else None,
            draft_logits[None] if needs_logits else None,
            target_hidden,
        )
        emit(gen, decide_block(block, policy)[0], eos_ids, max_new_tokens)
    return gen


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
    }


def timed(loop: Callable[..., list[Generation]], *args, **kwargs) -> tuple[list[Generation], float]:
    """loop(*args, **kwargs) (generate or generate_cached) and its wall time in seconds."""
    start = time.perf_counter()
    gens = loop(*args, **kwargs)
    return gens, time.perf_counter() - start
