"""Turn the toy task into SPD records with a real draft and a real target model.

For every prompt: the target's greedy response; a block start at every response
position; the draft's K greedy tokens there; the target's greedy token after each
draft prefix (one teacher-forced pass). Records without a mismatch carry no decision
and are dropped.
"""

from __future__ import annotations

import random

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from spd_lightning.toy.task import make_example


def _right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ids [B, L], attention mask [B, L] and lengths [B]."""
    lengths = torch.tensor([len(r) for r in rows])
    width = int(lengths.max())
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return ids, mask.long(), lengths


@torch.no_grad()
def greedy_tokens(model: PreTrainedModel, contexts: list[list[int]], n: int, pad_id: int) -> list[list[int]]:
    """The model's n greedy tokens after each context, not stopping at EOS (a draft proposes K)."""
    rows = [list(c) for c in contexts]
    for _ in range(n):
        ids, mask, lengths = _right_pad(rows, pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits  # [B, L, V]
        nxt = logits[torch.arange(len(rows)), lengths - 1].argmax(-1)  # [B]
        for row, tok in zip(rows, nxt.tolist()):
            row.append(tok)
    return [row[len(c) :] for row, c in zip(rows, contexts)]


@torch.no_grad()
def teacher_forced_argmax(
    model: PreTrainedModel, contexts: list[list[int]], drafts: list[list[int]], pad_id: int
) -> list[list[int]]:
    """target_ids[i] = argmax after context + draft[:i], for every i, in one forward pass."""
    ids, mask, lengths = _right_pad([c + d for c, d in zip(contexts, drafts)], pad_id)
    logits = model(input_ids=ids, attention_mask=mask).logits  # [B, L, V]
    k = len(drafts[0])
    starts = torch.tensor([len(c) - 1 for c in contexts])  # position predicting draft[0]
    pos = starts[:, None] + torch.arange(k)[None, :]  # [B, K]
    return logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1])).argmax(-1).tolist()


@torch.no_grad()
def target_responses(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """The target's greedy response to each prompt, cut before EOS."""
    out = []
    for row in greedy_tokens(model, prompts, max_new_tokens, tokenizer.pad_token_id):
        eos = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
        out.append(row[:eos])
    return out


def build_records(
    draft: PreTrainedModel,
    target: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    num_prompts: int,
    block_size: int,
    seed: int,
    batch_size: int = 64,
) -> list[dict]:
    rng = random.Random(seed)
    examples = [make_example(rng) for _ in range(num_prompts)]
    pad = tokenizer.pad_token_id
    records: list[dict] = []
    for start in tqdm(range(0, num_prompts, batch_size), desc="toy records", leave=False):
        chunk = examples[start : start + batch_size]
        prompts = [tokenizer(ex.prompt).input_ids for ex in chunk]
        responses = target_responses(target, tokenizer, prompts, max_new_tokens=12)
        blocks = [(p, r[:s], ex.answer) for p, r, ex in zip(prompts, responses, chunk) for s in range(len(r))]
        contexts = [p + r for p, r, _ in blocks]
        drafts = greedy_tokens(draft, contexts, block_size, pad)
        targets = teacher_forced_argmax(target, contexts, drafts, pad)
        for (p, _, answer), ctx, d, t in zip(blocks, contexts, drafts, targets):
            if d != t:
                records.append(
                    {"context_ids": ctx, "prompt_len": len(p), "draft_ids": d, "target_ids": t, "reference": answer}
                )
    return records
