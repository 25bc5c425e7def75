"""`model=judge`: the zero-cost judge as the scorer that training, task=eval and task=decode use,
beside today's ScoringActor (which runs a backbone of its own).

Its inputs come from the frozen draft and target (judge.py): at decode time the verification pass
and the draft's proposals compute them anyway; in training they are computed once per record,
cached, and reused by every step and epoch (`precompute` fills the cache for the whole training
set before the first step, which also fixes the head's input scaling). Only the head trains, so
a checkpoint holds the head alone, and the two models stay out of the module tree (no copies in
the reference scorer, no gradients, nothing in state_dict).

Shapes: B records, L padded length, K draft tokens per block.
"""

from __future__ import annotations

import torch
from torch import nn

from spd_lightning.data.records import Record
from spd_lightning.judge.head import TOKEN_FEATURES, JudgeHead, JudgeInputs
from spd_lightning.judge.inputs import block_inputs
from spd_lightning.targets.local import load_causal_lm


class FrozenModels:
    """The draft and target, shared (not copied) by deepcopy: the reference scorer of loss.kl_coef
    reads the same frozen models."""

    def __init__(self, target: nn.Module, draft: nn.Module) -> None:
        self.target, self.draft = target.requires_grad_(False), draft.requires_grad_(False)

    def __deepcopy__(self, memo) -> FrozenModels:
        return self


class ZeroCostJudge(nn.Module):
    """Accept logits [B, K] from the frozen target's hidden states at the draft tokens and the
    token features of both models' distributions, through a JudgeHead."""

    def __init__(
        self, models: FrozenModels, inputs: tuple[str, ...], hidden: int, init_accept_prob: float, pad_id: int
    ):
        super().__init__()
        self.models, self.pad_id = models, pad_id
        sizes = {"tokens": len(TOKEN_FEATURES), "target_hidden": models.target.config.hidden_size}
        self.head = JudgeHead(sizes, inputs, hidden, init_accept_prob)
        self._cache: dict[tuple[int, ...], JudgeInputs] = {}

    @classmethod
    def from_paths(
        cls,
        path: str,
        target_path: str,
        inputs: list[str] | None = None,
        hidden: int = 0,
        init_accept_prob: float = 0.5,
        dtype: str = "float32",
        device: str = "cpu",
        pad_id: int = 0,
        local_files_only: bool = True,
    ) -> ZeroCostJudge:
        """`path` is the draft (model.path, as for ScoringActor), `target_path` the target."""
        offline = "model.local_files_only" if local_files_only else None
        target = load_causal_lm(target_path, dtype, device, "target model", "model.target_path", offline)
        draft = load_causal_lm(path, dtype, device, "draft model", "model.path", offline)
        return cls(
            FrozenModels(target, draft), tuple(inputs or ("tokens", "target_hidden")), hidden, init_accept_prob, pad_id
        )

    @property
    def backbone(self) -> nn.Module:
        """The model whose vocabulary the scorer reads (hf.check_shared_vocabulary): the target."""
        return self.models.target

    def _key(self, record: Record) -> tuple[int, ...]:
        return (*record.context_ids, -1, *record.draft_ids)

    def precompute(self, records: list[Record], batch_size: int = 32) -> None:
        """Computes and caches the inputs of `records`; the first call also fits the head's input
        scaling to their mismatches (call it with the training records)."""
        todo = [r for r in records if self._key(r) not in self._cache]
        if todo:
            inputs, _ = block_inputs(
                self.models.target, self.models.draft, todo, self.pad_id, batch_size, draft_hidden=False
            )
            for n, record in enumerate(todo):
                self._cache[self._key(record)] = inputs.select(slice(n, n + 1))
        if not self.head.fitted:
            self.head.fit_scaling(JudgeInputs.cat([self._cache[self._key(r)] for r in records]))

    def forward(self, input_ids, attention_mask, context_len, target_ids) -> torch.Tensor:
        """As ScoringActor.forward: rows of context + draft [B, L], right-padded -> logits [B, K]."""
        k = target_ids.shape[1]
        records = []
        for row, c, t in zip(input_ids.tolist(), context_len.tolist(), target_ids.tolist()):
            records.append(Record(row[:c], c, row[c : c + k], t, ""))
        self.precompute(records)
        data = JudgeInputs.cat([self._cache[self._key(r)] for r in records])
        return self.head(data.to(self.head.mean.device))
