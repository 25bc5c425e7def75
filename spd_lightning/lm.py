"""Greedy passes of transformers causal LMs over token ids: what building records, evaluating
training-free rules and lossy decoding all need from a draft or a target model in-process.

Shapes: B rows, L padded length, K draft tokens, V vocabulary. No KV cache: these models are
run over short contexts in batches, and one padded forward per step keeps the code plain.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ids [B, L], attention mask [B, L] and lengths [B]."""
    lengths = torch.tensor([len(r) for r in rows])
    width = int(lengths.max())
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return ids, mask.long(), lengths


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def greedy_tokens(model: PreTrainedModel, contexts: list[list[int]], n: int, pad_id: int) -> list[list[int]]:
    """The model's n greedy tokens after each context, not stopping at EOS (a draft proposes K)."""
    rows = [list(c) for c in contexts]
    device = _device(model)
    for _ in range(n):
        ids, mask, lengths = right_pad(rows, pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [B, L, V]
        nxt = logits[torch.arange(len(rows), device=device), (lengths - 1).to(device)].argmax(-1)  # [B]
        for row, tok in zip(rows, nxt.tolist()):
            row.append(tok)
    return [row[len(c) :] for row, c in zip(rows, contexts)]


@torch.no_grad()
def teacher_forced_logits(
    model: PreTrainedModel, contexts: list[list[int]], drafts: list[list[int]], pad_id: int
) -> torch.Tensor:
    """[B, K+1, V] float32 logits after context + draft[:i], for i = 0..K, in one forward pass.

    Row i < K is the model's distribution where draft[i] was proposed; row K is the one after
    the whole block (the token speculative decoding gets for free when every draft token stays).
    All drafts must have the same length K."""
    ids, mask, _ = right_pad([c + d for c, d in zip(contexts, drafts)], pad_id)
    device = _device(model)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # [B, L, V]
    k = len(drafts[0])
    starts = torch.tensor([len(c) - 1 for c in contexts], device=device)  # position predicting draft[0]
    pos = starts[:, None] + torch.arange(k + 1, device=device)[None, :]  # [B, K+1]
    return logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1])).float()  # [B, K+1, V]


def teacher_forced_argmax(
    model: PreTrainedModel, contexts: list[list[int]], drafts: list[list[int]], pad_id: int
) -> list[list[int]]:
    """target_ids[i] = argmax after context + draft[:i], for i < K, in one forward pass."""
    return teacher_forced_logits(model, contexts, drafts, pad_id)[:, :-1].argmax(-1).tolist()


def greedy_responses(model: PreTrainedModel, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int):
    """The model's greedy response to each prompt, cut before EOS. -> list[list[int]]"""
    out = []
    for row in greedy_tokens(model, prompts, max_new_tokens, pad_id):
        out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out
