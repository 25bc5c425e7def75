"""One causal LM's KV cache over B rows that grow and roll back by different amounts: what a
batched speculative decoding loop needs (every row keeps its own number of draft tokens per block).

Each row's tokens sit in the cache's columns in order, with holes: a feed of rows of different
lengths is left-padded with columns that stay masked, and a rolled-back tail is cut off where
every row drops it (so one row, or rows that agree, stay compact) and masked where only some do.
Masked columns weigh exactly zero in attention, and every token keeps the position it would have
alone (explicit position ids), so a row computes what it would in a batch of one.

Shapes: B rows, n new columns, T columns in the cache, V vocabulary, H hidden size.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


class RowCache:
    """A causal LM's KV cache of B sequences; `feed` appends tokens, `discard` rolls tails back."""

    def __init__(self, model: PreTrainedModel, pad_id: int) -> None:
        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        self.cache = None
        self.mask: torch.Tensor | None = None  # [B, T] 1 where a column holds one of the row's tokens
        self.lengths: torch.Tensor | None = None  # [B] tokens in the cache per row: the next position

    @property
    def rows(self) -> int:
        return 0 if self.lengths is None else len(self.lengths)

    @torch.no_grad()
    def feed(self, tokens: list[list[int]], keep: int, states: bool = False):
        """Appends tokens[b] (at least `keep` of them) to row b, all rows in one forward pass.

        -> (logits [B, keep, V] float32 after each of every row's last `keep` tokens,
            hidden [B, keep, H] float32 at those tokens when `states`, else None)."""
        width = max(map(len, tokens))
        ids = torch.full((len(tokens), width), self.pad_id, dtype=torch.long)
        new_mask = torch.zeros((len(tokens), width), dtype=torch.long)
        for b, row in enumerate(tokens):
            ids[b, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            new_mask[b, width - len(row) :] = 1
        first = self.lengths if self.lengths is not None else torch.zeros(len(tokens), dtype=torch.long)
        # Each row's new tokens continue its own positions; the padding columns before them take
        # the first one (they are masked, any value would do).
        positions = first[:, None] + (new_mask.cumsum(-1) - 1).clamp(min=0)  # [B, n]
        self.mask = new_mask if self.mask is None else torch.cat([self.mask, new_mask], dim=1)
        self.lengths = first + new_mask.sum(-1)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=self.mask.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=keep,
            output_hidden_states=states,
        )
        self.cache = out.past_key_values
        hidden = out.hidden_states[-1][:, -keep:].float() if states else None
        return out.logits[:, -keep:].float(), hidden

    def discard(self, counts: list[int]) -> None:
        """Rolls row b back by its last counts[b] tokens, which must be its last counts[b] columns
        (what the last feeds appended and nothing has masked since)."""
        drop = torch.tensor(counts, dtype=torch.long)
        columns = self.mask.shape[1]
        if (drop > columns).any() or not all(self.mask[b, columns - int(n) :].all() for b, n in enumerate(drop)):
            raise ValueError(f"discard({counts}): a row would lose more than its last fed tokens")
        shared = int(drop.min()) if len(drop) else 0
        if shared:  # a negative count crops that many columns (transformers 4.x and 5.x)
            self.cache.crop(-shared)
            self.mask = self.mask[:, : columns - shared]
            columns -= shared
        for b, n in enumerate((drop - shared).tolist()):
            if n:
                self.mask[b, columns - n :] = 0
        self.lengths = self.lengths - drop

    def keep_rows(self, index: list[int]) -> None:
        """Keeps only the rows at `index`, in that order (finished rows leave the batch)."""
        if self.cache is not None:
            self.cache.batch_select_indices(torch.tensor(index, device=self.device))
        self.mask, self.lengths = self.mask[index], self.lengths[index]
