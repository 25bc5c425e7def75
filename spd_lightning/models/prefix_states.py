"""A frozen causal LM's hidden states over token sequences that extend one another, each prefix
computed once.

Whole-generation episodes fork: a new path shares its prompt and its response up to the fork
with the path it came from, and the mismatches of one path have contexts that are prefixes of
it. `PrefixStates` keeps the KV cache, final hidden states and greedy tokens of the last
`capacity` sequences the model ran over; a new sequence runs only past its longest common
prefix with one of them (one copy of that cache, cropped; none when the kept sequence is all
prefix: it grows in place), and a prefix of a kept sequence costs nothing. The weights must
stay frozen while an instance lives.

Memory: a kept sequence of T tokens holds its KV cache (layers x 2 x kv heads x head size x T
values) and T x H hidden values in the model's dtype; about 19 MB for a 600-token path of a 1.5B
Qwen2.5 target in bfloat16, 8 MB for its 0.5B draft.

Shapes: T tokens of a sequence, n rows, H hidden size, V vocabulary.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share (slices compared in C, by bisection)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n - 1  # a[:lo] == b[:lo] holds, a[:hi + 1] != b[:hi + 1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass
class _Entry:
    ids: tuple[int, ...]
    cache: object  # the model's KV cache over ids, batch 1
    hidden: torch.Tensor  # [T, H] final hidden states, the model's dtype
    top: torch.Tensor | None = None  # [t] argmax after ids[: i + 1], for the first t <= T positions
    top_p: torch.Tensor | None = None  # [t] the probability the model gives that argmax


class PrefixStates:
    """Hidden states, KV caches and greedy tokens of one frozen model, reused along prefixes."""

    def __init__(self, model: PreTrainedModel, capacity: int = 160, vocab_chunk: int = 256) -> None:
        self.model, self.capacity, self.vocab_chunk = model, capacity, vocab_chunk
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self.computed = self.reused = 0  # tokens run through the model / read from a kept prefix

    def _longest(self, ids: tuple[int, ...]) -> tuple[_Entry | None, int]:
        best, shared = None, 0
        for entry in reversed(self._entries.values()):  # the most recent first: forks follow their parents
            n = common_prefix(entry.ids, ids)
            if n > shared:
                best, shared = entry, n
                if n == len(ids):
                    break
        return best, shared

    def _keep(self, entry: _Entry) -> _Entry:
        self._entries[entry.ids] = entry
        self._entries.move_to_end(entry.ids)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return entry

    @torch.no_grad()
    def _entry(self, ids: Sequence[int]) -> tuple[_Entry, int]:
        """(an entry whose ids start with `ids`, how many of them came from an earlier entry)."""
        ids = tuple(ids)
        if not ids:
            raise ValueError("PrefixStates needs at least one token")
        parent, shared = self._longest(ids)
        if parent is not None and shared == len(ids):
            self._entries.move_to_end(parent.ids)
            self.reused += shared
            return parent, shared
        past = None
        if parent is not None and shared == len(parent.ids):
            # A path read a chunk at a time: its entry grows in place (no copy); it leaves the
            # dict first, so a pass that fails leaves no half-extended cache behind.
            past = self._entries.pop(parent.ids).cache
        elif parent is not None and shared:
            past = copy.deepcopy(parent.cache)
            past.crop(-(len(parent.ids) - shared))  # a negative count drops that many columns
        device = next(self.model.parameters()).device
        new = torch.tensor([ids[shared:]], device=device)  # [1, T - shared]
        positions = torch.arange(shared, len(ids), device=device)[None]  # [1, T - shared]
        out = self.model.get_decoder()(input_ids=new, position_ids=positions, past_key_values=past, use_cache=True)
        hidden = out.last_hidden_state[0]  # [T - shared, H]
        if parent is not None and shared:
            hidden = torch.cat([parent.hidden[:shared], hidden])  # [T, H]
        self.computed += len(ids) - shared
        self.reused += shared
        entry = _Entry(ids, out.past_key_values, hidden)
        if parent is not None and parent.top is not None:
            keep = min(shared, len(parent.top))  # the argmax after ids[: i + 1] needs only those tokens
            entry.top, entry.top_p = parent.top[:keep], parent.top_p[:keep]
        return self._keep(entry), shared

    def hidden(self, ids: Sequence[int]) -> torch.Tensor:
        """[T, H] the final hidden state after each prefix ids[: i + 1] (the model's dtype)."""
        entry, _ = self._entry(ids)
        return entry.hidden[: len(ids)]

    def cache(self, ids: Sequence[int]):
        """A private copy of the model's KV cache over exactly `ids` (batch 1), free to extend."""
        entry, _ = self._entry(ids)
        past = copy.deepcopy(entry.cache)
        if len(entry.ids) > len(ids):
            past.crop(-(len(entry.ids) - len(ids)))
        return past

    @torch.no_grad()
    def greedy(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """([T] the argmax after each prefix ids[: i + 1], [T] its probability), computing the
        output layer only where no kept prefix has."""
        entry, _ = self._entry(ids)
        done = 0 if entry.top is None else len(entry.top)
        if done < len(ids):
            tops, probs = [] if entry.top is None else [entry.top], [] if entry.top_p is None else [entry.top_p]
            head = self.model.get_output_embeddings()
            for start in range(done, len(ids), self.vocab_chunk):
                logits = head(entry.hidden[start : min(start + self.vocab_chunk, len(ids))]).float()  # [n, V]
                p, top = torch.softmax(logits, dim=-1).max(-1)
                tops.append(top.cpu())
                probs.append(p.cpu())
            entry.top, entry.top_p = torch.cat(tops), torch.cat(probs)
        return entry.top[: len(ids)], entry.top_p[: len(ids)]


@torch.no_grad()
def branch_hidden(model: PreTrainedModel, trunk_cache, lengths: list[int], tokens: list[int]) -> torch.Tensor:
    """[n, H] the final hidden state at tokens[b] fed right after the trunk's first lengths[b]
    tokens, all n branches in one pass off the trunk's cache (batch 1, consumed): each branch
    sees only its own prefix (an attention mask with a hole) at the position it would have alone."""
    device = next(model.parameters()).device
    width = trunk_cache.get_seq_length()
    n = len(tokens)
    trunk_cache.batch_select_indices(torch.zeros(n, dtype=torch.long, device=device))
    length = torch.tensor(lengths, device=device)  # [n]
    columns = torch.arange(width + 1, device=device)[None]  # [1, T + 1]
    mask = ((columns < length[:, None]) | (columns == width)).long()  # [n, T + 1]
    out = model.get_decoder()(
        input_ids=torch.tensor(tokens, device=device)[:, None],
        attention_mask=mask,
        position_ids=length[:, None],
        past_key_values=trunk_cache,
        use_cache=True,
    )
    return out.last_hidden_state[:, 0]
