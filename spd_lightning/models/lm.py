"""Greedy passes of transformers causal LMs over token ids: what building records, evaluating
training-free rules and lossy decoding all need from a draft or a target model in-process.

Shapes: B rows, L padded length, K draft tokens, V vocabulary, H hidden size, T a trunk's
length. Every pass is sized for real models (a 1.5B target on a CPU generates about one token
per second): generation keeps a KV cache, rows of different lengths share a batch (left
padding with explicit position ids), each row stops at its own end of sequence and leaves the
batch, and logits are computed only at the positions that are read, so memory grows with
B x L x H, never with L x V. Blocks that share a prefix (every block of one response) share one
pass over it: see `trunk_groups`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from spd_lightning.models.hf import id_set


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [B, L], attention mask [B, L] and position ids [B, L]: each row ends at column L-1 and
    its first real token has position 0, so a padded row computes what it would alone."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[b, width - len(row) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


def logits_at(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits [..., V] from final hidden states [..., H], only where they are read."""
    return model.get_output_embeddings()(hidden).float()


@torch.no_grad()
def greedy_generate(
    model: PreTrainedModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    pad_id: int,
    eos_ids: Iterable[int] = (),
    desc: str | None = None,
) -> list[list[int]]:
    """Greedy continuation of every prompt with a KV cache: at most `max_new_tokens` tokens, each
    row ending with (and keeping) its first token in `eos_ids`; no eos_ids: exactly max_new_tokens.
    A finished row leaves the batch, so long and short responses cost what they need. `desc`: show
    a progress bar of the generation steps under that name."""
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens <= 0 or not prompts:
        return out
    device = _device(model)
    ids, mask, positions = (t.to(device) for t in left_pad(prompts, pad_id))
    step = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, nxt = step.past_key_values, step.logits[:, -1].argmax(-1)  # nxt: [B]
    rows = torch.arange(len(prompts))  # the prompt each batch row belongs to
    last = positions[:, -1]  # [B]
    eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
    for n in tqdm(range(max_new_tokens), desc=desc, unit="tok", leave=False, disable=desc is None):
        for r, token in zip(rows.tolist(), nxt.tolist()):
            out[r].append(token)
        running = ~torch.isin(nxt, eos)  # [B]
        if n == max_new_tokens - 1 or not running.any():
            break
        if not running.all():
            keep = running.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            nxt, mask, last, rows = nxt[keep], mask[keep], last[keep], rows[keep.cpu()]
        mask = torch.cat([mask, mask.new_ones(len(nxt), 1)], dim=1)
        last = last + 1
        step = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None], past_key_values=cache)
        nxt = step.logits[:, -1].argmax(-1)
    return out


def greedy_tokens(model: PreTrainedModel, contexts: list[list[int]], n: int, pad_id: int) -> list[list[int]]:
    """The model's n greedy tokens after each context, not stopping at EOS (a draft proposes K)."""
    return greedy_generate(model, contexts, n, pad_id)


def greedy_responses(
    model: PreTrainedModel, prompts: list[list[int]], max_new_tokens: int, eos_ids: int | Iterable[int], pad_id: int
) -> list[list[int]]:
    """The model's greedy response to each prompt, cut before its end of sequence."""
    eos = id_set(eos_ids)
    rows = greedy_generate(model, prompts, max_new_tokens, pad_id, eos)
    return [row[:-1] if row and row[-1] in eos else row for row in rows]


@torch.no_grad()
def teacher_forced_logits(
    model: PreTrainedModel, contexts: list[list[int]], drafts: list[list[int]], pad_id: int
) -> torch.Tensor:
    """[B, K+1, V] float32 logits after context + draft[:i], for i = 0..K, in one forward pass.

    Row i < K is the model's distribution where draft[i] was proposed; row K is the one after
    the whole block (the token speculative decoding gets for free when every draft token stays).
    All drafts must have the same length K; left padding puts those K+1 positions last in every
    row, so only they reach the output layer."""
    k = len(drafts[0])
    device = _device(model)
    ids, mask, positions = (t.to(device) for t in left_pad([c + d for c, d in zip(contexts, drafts)], pad_id))
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=k + 1, use_cache=False)
    return out.logits.float()


@torch.no_grad()
def teacher_forced_states(
    model: PreTrainedModel, contexts: list[list[int]], drafts: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """As teacher_forced_logits ([B, K+1, V]), and the last hidden states [B, K, H] at the K
    draft tokens, from the same pass (what the zero-cost judge reads)."""
    k = len(drafts[0])
    device = _device(model)
    ids, mask, positions = (t.to(device) for t in left_pad([c + d for c, d in zip(contexts, drafts)], pad_id))
    out = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    hidden = out.last_hidden_state[:, -(k + 1) :]  # [B, K+1, H]: the context's last token, then the draft's
    return logits_at(model, hidden), hidden[:, 1:].float()


@dataclass
class Trunk:
    """Contexts that are all prefixes of one token sequence (the blocks of one response)."""

    ids: list[int]
    members: list[int] = field(default_factory=list)  # indices into the caller's contexts


def trunk_groups(contexts: list[list[int]]) -> list[Trunk]:
    """Consecutive contexts of which each is a prefix of the longest: one pass over that trunk
    serves them all. Contexts that share nothing form a trunk each."""
    groups: list[Trunk] = []
    for i, ctx in enumerate(contexts):
        trunk = groups[-1] if groups else None
        short, long = (ctx, trunk.ids) if trunk and len(ctx) <= len(trunk.ids) else (trunk.ids if trunk else [], ctx)
        if trunk is not None and long[: len(short)] == short:
            trunk.ids = list(long)
            trunk.members.append(i)
        else:
            groups.append(Trunk(list(ctx), [i]))
    return groups


class _Branches:
    """Runs the contexts of a batch of trunks as branches off one KV cache of the trunks.

    The trunks are prefilled once, left-padded ([G, T]); the cache is then copied once per
    context ([B, T]) and every branch attends to its own trunk up to its context's length only
    (an attention mask with a hole from there to T), at the positions it would have alone."""

    def __init__(self, model: PreTrainedModel, contexts: list[list[int]], groups: list[Trunk], pad_id: int) -> None:
        device = _device(model)
        ids, mask, positions = (t.to(device) for t in left_pad([g.ids for g in groups], pad_id))
        self.model = model
        owner = torch.tensor([g for g, trunk in enumerate(groups) for _ in trunk.members], device=device)  # [B]
        lengths = torch.tensor([len(contexts[i]) for trunk in groups for i in trunk.members], device=device)
        self.order = [i for trunk in groups for i in trunk.members]  # batch row -> caller's context
        width = ids.shape[1]
        offset = width - torch.tensor([len(g.ids) for g in groups], device=device)[owner]  # [B] trunk start column
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        last = hidden.last_hidden_state[owner, offset + lengths - 1]  # [B, H]: after each context
        self.first_logits = logits_at(model, last)  # [B, V]
        self.cache = hidden.past_key_values
        self.cache.batch_select_indices(owner)
        cols = torch.arange(width, device=device)[None, :]
        self.mask = ((cols >= offset[:, None]) & (cols < (offset + lengths)[:, None])).long()  # [B, T]
        self.next_position = lengths  # [B]

    def _feed(self, module: torch.nn.Module, tokens: torch.Tensor):
        n = tokens.shape[1]
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), n)], dim=1)
        positions = self.next_position[:, None] + torch.arange(n, device=tokens.device)[None, :]
        self.next_position = self.next_position + n
        return module(input_ids=tokens, attention_mask=self.mask, position_ids=positions, past_key_values=self.cache)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feeds tokens [B, n] after each branch; returns their logits [B, n, V]."""
        return self._feed(self.model, tokens).logits.float()

    def step_hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feeds tokens [B, n] after each branch; returns their last hidden states [B, n, H]."""
        return self._feed(self.model.get_decoder(), tokens).last_hidden_state

    def in_caller_order(self, rows: list[list[int]]) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in rows]
        for b, i in enumerate(self.order):
            out[i] = rows[b]
        return out


@torch.no_grad()
def propose_shared(model: PreTrainedModel, contexts: list[list[int]], k: int, pad_id: int) -> list[list[int]]:
    """As `greedy_tokens` (k tokens, not stopping at EOS), with one pass per shared trunk."""
    branches = _Branches(model, contexts, trunk_groups(contexts), pad_id)
    tokens = branches.first_logits.argmax(-1)[:, None]  # [B, 1]
    for _ in range(k - 1):
        tokens = torch.cat([tokens, branches.step(tokens[:, -1:])[:, -1].argmax(-1)[:, None]], dim=1)
    return branches.in_caller_order(tokens.tolist())


@torch.no_grad()
def argmax_shared(
    model: PreTrainedModel, contexts: list[list[int]], drafts: list[list[int]], pad_id: int
) -> list[list[int]]:
    """target_ids[i] = argmax after context + draft[:i], i < K, with one pass per shared trunk."""
    groups = trunk_groups(contexts)
    branches = _Branches(model, contexts, groups, pad_id)
    first = branches.first_logits.argmax(-1)[:, None]  # [B, 1]: after the context alone
    ordered = torch.tensor([drafts[i] for i in branches.order], device=first.device)  # [B, K]
    rest = branches.step(ordered[:, :-1]).argmax(-1) if ordered.shape[1] > 1 else first[:, :0]  # [B, K-1]
    return branches.in_caller_order(torch.cat([first, rest], dim=1).tolist())


@torch.no_grad()
def block_states_shared(
    model: PreTrainedModel, contexts: list[list[int]], drafts: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """What one verification pass over context + draft computes, with one pass per shared trunk:
    (logits [B, K+1, V] float32 after context + draft[:i], i = 0..K, as teacher_forced_logits;
    hidden [B, K, H], the last hidden state at each draft token), in the caller's order."""
    branches = _Branches(model, contexts, trunk_groups(contexts), pad_id)
    ordered = torch.tensor([drafts[i] for i in branches.order], device=branches.first_logits.device)  # [B, K]
    hidden = branches.step_hidden(ordered)  # [B, K, H]
    logits = torch.cat([branches.first_logits[:, None], logits_at(model, hidden)], dim=1)  # [B, K+1, V]
    back = torch.empty(len(branches.order), dtype=torch.long)
    back[torch.tensor(branches.order)] = torch.arange(len(branches.order))
    back = back.to(logits.device)
    return logits[back], hidden[back].float()


def teacher_forced_argmax(
    model: PreTrainedModel, contexts: list[list[int]], drafts: list[list[int]], pad_id: int
) -> list[list[int]]:
    """target_ids[i] = argmax after context + draft[:i], for i < K, in one forward pass."""
    return teacher_forced_logits(model, contexts, drafts, pad_id)[:, :-1].argmax(-1).tolist()


class PrefixCache:
    """A model's KV cache of the last sequence it read (batch size 1). The next sequence usually
    shares a prefix with it (the same response a block later, with a new draft): the cache is cut
    back to that prefix and only the rest is read, so nobody has to say what was kept."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.ids, self.cache = model, [], None

    def read(self, ids: list[int], n: int, **kwargs):
        """The model's output for the tokens of ids past the shared prefix, which always include
        the last n (their outputs are what the caller reads). `kwargs` go to the model."""
        limit, common = min(len(self.ids), len(ids) - n), 0
        while common < limit and self.ids[common] == ids[common]:
            common += 1
        if common == 0:
            self.cache = None
        elif common < len(self.ids):  # a negative count removes that many tokens (transformers 4.x and 5.x)
            self.cache.crop(common - len(self.ids))
        new = torch.tensor([ids[common:]], dtype=torch.long, device=_device(self.model))  # [1, m]
        out = self.model(input_ids=new, past_key_values=self.cache, use_cache=True, **kwargs)
        self.cache, self.ids = out.past_key_values, list(ids)
        return out
