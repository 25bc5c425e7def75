"""What the zero-cost judge and the training-free rules read at a mismatch, computed once per
(context, draft token) and shared by every policy, threshold and episode that meets it.

A mismatch is computed when a walk asks about it: the mismatches of one path have contexts
that extend one another, and each model keeps its KV cache along the path
(models/prefix_states.py), so a mismatch costs the model passes over the tokens since the last
one asked plus one target token for the draft's token; mismatches asked together on one path
(G episodes of a prompt) share one pass. A path a fork leaves is never run past the fork.

Shapes: B mismatches, F token features (judge.head.TOKEN_FEATURES), H the target's hidden size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from spd_lightning.core.episode import Ask
from spd_lightning.core.rules import token_features
from spd_lightning.judge.head import JudgeHead, JudgeInputs, judge_token_features
from spd_lightning.models.lm import logits_at, trunk_groups
from spd_lightning.models.prefix_states import PrefixStates, branch_hidden

Key = tuple[tuple[int, ...], int]  # (prompt + response so far, the draft's token)


@dataclass
class MismatchFeatures:
    tokens: torch.Tensor  # [B, F] the judge's token features
    rank: torch.Tensor  # [B] tokens the target prefers over the draft's
    target_entropy: torch.Tensor  # [B] nats
    kl: torch.Tensor  # [B] KL(target || draft), nats
    target_top1: torch.Tensor  # [B] the target's highest probability
    target_hidden: torch.Tensor  # [B, H] the target's last hidden state at the draft token

    @staticmethod
    def stack(rows: list[MismatchFeatures]) -> MismatchFeatures:
        names = MismatchFeatures.__dataclass_fields__
        return MismatchFeatures(**{n: torch.cat([getattr(r, n) for r in rows]) for n in names})

    def select(self, index: torch.Tensor | slice) -> MismatchFeatures:
        """The rows `index` picks (a [B] bool mask, indices or a slice)."""
        names = MismatchFeatures.__dataclass_fields__
        return MismatchFeatures(**{n: getattr(self, n)[index] for n in names})

    def row(self, i: int) -> MismatchFeatures:
        return self.select(slice(i, i + 1))

    def judge_inputs(self) -> JudgeInputs:
        """As JudgeInputs of B blocks of one draft token each ([B, 1, ...])."""
        mismatch = torch.ones(len(self.rank), 1, dtype=torch.bool)
        return JudgeInputs(mismatch, self.tokens[:, None], self.target_hidden[:, None].float())


class FeatureCache:
    """Features of every mismatch asked for, from the frozen draft and target.

    draft_states: the draft's PrefixStates to share (PathSource.draft_states: its proposals pass
    already ran the draft over every path); capacity: paths whose target states are kept;
    batch_size: the branches of one trunk (one draft token each) run through a model together;
    hidden: False where no reader needs the target's hidden state (the rules, a tokens-only judge):
    its target pass over each draft token (a quarter of a real pair's feature time) is skipped and
    the row holds NaN there, filled in when a cache that needs it meets the row (a shared file)."""

    def __init__(self, draft: PreTrainedModel, target: PreTrainedModel, batch_size: int = 16,
                 hidden_dtype: torch.dtype = torch.float32, draft_states: PrefixStates | None = None,
                 capacity: int = 160, hidden: bool = True) -> None:  # fmt: skip
        self.draft, self.target, self.batch_size, self.hidden = draft, target, batch_size, hidden
        self.hidden_dtype = hidden_dtype  # bfloat16 halves what a long sweep keeps in memory
        self.draft_states = draft_states if draft_states is not None else PrefixStates(draft, capacity)
        self.target_states = PrefixStates(target, capacity)
        self._rows: dict[Key, MismatchFeatures] = {}
        # Called after each path's passes (decoding/progress.Progress saves them): one `get` over
        # thousands of mined mismatches runs for hours on a real pair.
        self.on_progress: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._rows)

    @torch.no_grad()
    def _compute(self, keys: list[Key]) -> None:
        """One pass of each model per trunk (contexts that extend one another), past what an
        earlier path shares with it, and one target token per mismatch for the hidden state."""
        keys = sorted(set(k for k in keys if not self._holds(k)))  # branches of one trunk side by side
        trunks = trunk_groups([list(c) for c, _ in keys])
        for trunk in tqdm(trunks, desc="mismatch features", unit="path", leave=False, disable=len(trunks) < 4):
            t_states = self.target_states.hidden(trunk.ids)  # [T, H]
            d_states = self.draft_states.hidden(trunk.ids)  # [T, H]
            for start in range(0, len(trunk.members), self.batch_size):
                chunk = [keys[i] for i in trunk.members[start : start + self.batch_size]]
                ends = torch.tensor([len(c) - 1 for c, _ in chunk])  # [B] each context's last token
                t_logits = logits_at(self.target, t_states[ends])[:, None]  # [B, 1, V]
                d_logits = logits_at(self.draft, d_states[ends])[:, None]  # [B, 1, V]
                draft_ids = torch.tensor([[d] for _, d in chunk])  # [B, 1]
                hidden = self._hidden(trunk.ids, chunk)  # [B, H]
                self._store(chunk, t_logits, d_logits, draft_ids, hidden)
            if self.on_progress is not None:
                self.on_progress()

    def _holds(self, key: Key) -> bool:
        row = self._rows.get(key)
        return row is not None and not (self.hidden and bool(row.target_hidden.isnan().any()))

    def _hidden(self, trunk_ids: list[int], chunk: list[Key]) -> torch.Tensor:
        """[B, H] the target's last hidden state at each mismatch's draft token (NaN: not asked for)."""
        if not self.hidden:
            return torch.full((len(chunk), self.target.config.hidden_size), torch.nan)
        cache = self.target_states.cache(trunk_ids)
        return branch_hidden(self.target, cache, [len(c) for c, _ in chunk], [d for _, d in chunk])

    def _store(self, chunk: list[Key], t_logits: torch.Tensor, d_logits: torch.Tensor, draft_ids: torch.Tensor,
               hidden: torch.Tensor) -> None:  # fmt: skip
        rules = token_features(t_logits, d_logits, draft_ids).cpu()  # [B, 1] each
        tokens = judge_token_features(t_logits, d_logits, draft_ids).cpu()[:, 0]  # [B, F]
        hidden = hidden.cpu().to(self.hidden_dtype)  # [B, H]
        for i, key in enumerate(chunk):
            self._rows[key] = MismatchFeatures(
                tokens[i : i + 1], rules.rank[i, :1], rules.target_entropy[i, :1], rules.kl[i, :1],
                rules.target_top1[i, :1], hidden[i : i + 1],
            )  # fmt: skip

    def save(self, path: Path) -> None:
        """Every row computed so far, to one file (a later run's `load` skips their model passes)."""
        keys = list(self._rows)
        if keys:
            tmp = path.with_name(path.name + ".tmp")
            torch.save({"keys": keys, "rows": vars(MismatchFeatures.stack([self._rows[k] for k in keys]))}, tmp)
            tmp.replace(path)

    def load(self, path: Path) -> None:
        if path.is_file():
            saved = torch.load(path, weights_only=False)
            rows = MismatchFeatures(**saved["rows"])
            for i, key in enumerate(saved["keys"]):
                self._rows[tuple(key[0]), key[1]] = rows.row(i)

    def get(self, prompts: list[tuple[int, ...]], asks: list[Ask]) -> MismatchFeatures:
        keys = [(p + a.response, a.draft) for p, a in zip(prompts, asks)]
        self._compute(keys)
        return MismatchFeatures.stack([self._rows[k] for k in keys])


# MismatchFeatures of B mismatches -> [B] float64 scores; a threshold rule keeps score >= t.
FeatureScore = Callable[[MismatchFeatures], torch.Tensor]


def judge_score(head: JudgeHead) -> FeatureScore:
    """The zero-cost judge's accept probability (float64: a confident head's logits above ~17
    would all round to 1 in float32)."""

    @torch.no_grad()
    def score(f: MismatchFeatures) -> torch.Tensor:
        if "target_hidden" in head.inputs and bool(f.target_hidden.isnan().any()):
            raise ValueError("this judge reads the target's hidden states: give it a FeatureCache(hidden=True)")
        return torch.sigmoid(head(f.judge_inputs())[:, 0].double()).cpu()  # the head may be on a GPU

    return score


def kl_score(confidence: float | None = 0.9) -> FeatureScore:
    """-KL(target || draft) (keep at KL <= tau is score >= -tau); -inf where the target's top-1
    probability exceeds `confidence` (JuDi's mask: verify strictly where the target is sure)."""

    def score(f: MismatchFeatures) -> torch.Tensor:
        s = -f.kl.double()
        return s if confidence is None else torch.where(f.target_top1 > confidence, -torch.inf, s)

    return score


def entropy_score(f: MismatchFeatures) -> torch.Tensor:
    """The target's entropy: keep where it sees several plausible tokens (entropy >= tau)."""
    return f.target_entropy.double()


def topk_score(f: MismatchFeatures) -> torch.Tensor:
    """-rank of the draft's token under the target: top-k keeps score >= -(k - 1)."""
    return -f.rank.double()


class FeatureDecider:
    """A threshold rule on cached features: keep a mismatch where score >= threshold."""

    def __init__(self, cache: FeatureCache, score: FeatureScore, threshold: float) -> None:
        self.cache, self.score, self.threshold = cache, score, threshold

    def __call__(self, prompts: list[tuple[int, ...]], asks: list[Ask]) -> list[bool]:
        return (self.score(self.cache.get(prompts, asks)) >= self.threshold).tolist()
