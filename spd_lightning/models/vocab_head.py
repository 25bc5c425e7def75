"""A draft whose output layer scores only a task's frequent tokens (FR-Spec's idea): cheaper
draft passes, and standard SD stays lossless because the target still verifies every token.

    keep = frequent_tokens(token_rows, 16384, always=eos_ids)
    restrict_output_layer(draft, keep)   # in place, for inference

Qwen2.5-Coder-0.5B's output layer is 151,936 x 896 weights, over a quarter of the model: a
single-token draft pass reads it whole. Restricted to N rows it reads N. The logits keep the
full vocabulary's shape (the loop, the rules and the judge index them by token id); tokens left
out get a large negative logit (not -inf, so the KL rule's log-probabilities stay finite), so
the draft never proposes them and the target's correction supplies them where they are due.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable

import torch
from torch import nn

from spd_lightning.errors import SetupError
from spd_lightning.models.packed import PackedLinear, pack_linears

LEFT_OUT = -1.0e4  # a logit exp() sends to 0 in every float dtype, with finite logs


class RestrictedHead(nn.Module):
    """An output layer over `keep` of the vocabulary; logits of every other token are LEFT_OUT."""

    def __init__(self, head: nn.Linear, keep: torch.Tensor) -> None:
        super().__init__()
        self.vocab_size = head.out_features
        self.register_buffer("keep", keep.to(torch.long), persistent=False)  # [N]
        rows = nn.Linear(head.in_features, len(keep), bias=head.bias is not None)
        with torch.no_grad():
            rows.weight.copy_(head.weight[self.keep])
            if head.bias is not None:
                rows.bias.copy_(head.bias[self.keep])
        self.rows = rows.to(head.weight.dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., H] -> logits [..., V]: the kept tokens' own logits, LEFT_OUT elsewhere."""
        kept = self.rows(hidden)  # [..., N]
        logits = kept.new_full((*kept.shape[:-1], self.vocab_size), LEFT_OUT)  # [..., V]
        logits[..., self.keep] = kept
        return logits

    def extra_repr(self) -> str:
        return f"{len(self.keep)} of {self.vocab_size} tokens"


def frequent_tokens(rows: Iterable[list[int]], n: int, always: Collection[int] = ()) -> torch.Tensor:
    """The n most frequent ids of `rows` (a task's token ids), plus `always` (end-of-sequence ids):
    -> [<= n + len(always)] sorted ids."""
    counts = Counter(t for row in rows for t in row)
    if not counts:
        raise SetupError("no token ids to count: the draft's vocabulary would be empty")
    kept = {t for t, _ in counts.most_common(n)} | set(always)
    return torch.tensor(sorted(kept), dtype=torch.long)


def restrict_output_layer(model, keep: torch.Tensor) -> RestrictedHead:
    """Replaces a transformers causal LM's output layer with a RestrictedHead over `keep`, in place
    (a tied output layer is untied: inference only). A layer packed for oneDNN stays packed, with
    the same rows kept as loaded (models.packed.PackedLinear.plain_rows)."""
    head = model.get_output_embeddings()
    packed = isinstance(head, PackedLinear)
    plain_rows = head.plain_rows if packed else 0
    if packed:  # back to a plain layer to cut its rows, packed again below
        plain = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        plain.weight = nn.Parameter(head.weight.to_dense(), requires_grad=False)
        if head.bias is not None:
            plain.bias = nn.Parameter(head.bias.to_dense(), requires_grad=False)
        head = plain
    if type(head) is not nn.Linear:
        raise SetupError(f"the draft's output layer is a {type(head).__name__}: only an nn.Linear can be restricted")
    if int(keep.max()) >= head.out_features:
        raise SetupError(f"token id {int(keep.max())} is outside the draft's {head.out_features}-token vocabulary")
    restricted = RestrictedHead(head, keep)
    if packed:
        rows = restricted.rows
        pack_linears(restricted)
        if plain_rows:
            restricted.rows.keep_plain(rows, plain_rows)
    model.set_output_embeddings(restricted)
    return restricted
