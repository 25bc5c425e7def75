"""The zero-cost judge: a score head over what speculative decoding computes anyway.

Verifying a block already runs the target over context + draft, and the draft has already
computed its own distributions while proposing. The judge reads, at each draft position i:
- the target's last hidden state at draft token i (it has read draft[i]: Judge Decoding's and
  AutoJudge's input), and optionally the draft's;
- the token features the training-free rules use (rules.py): the target's and the draft's
  log-probabilities of the draft token and of the target's token, both entropies, KL(target ||
  draft) and the draft token's rank under the target.
So at decode time it adds no model pass, only one small matrix product, and with frozen models
its inputs are computed once per record and reused by every method, step and epoch.

Labels for the supervised head follow AutoJudge (Garipov et al., 2025): a mismatch is harmless
when accepting it (and the ones before it) still leads to a correct response.

Shapes: N records, K draft tokens per block, V vocabulary, H hidden size, F token features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

# The token features, in column order of JudgeInputs.tokens.
TOKEN_FEATURES = (
    "target_logp_draft",  # log p_target(draft token)
    "target_logp_top",  # log p_target(target's token), its highest
    "draft_logp_draft",  # log p_draft(draft token)
    "draft_logp_top",  # log p_draft(target's token)
    "target_entropy",  # nats
    "draft_entropy",  # nats
    "kl",  # KL(target || draft), nats
    "log_rank",  # log(1 + tokens the target prefers over the draft token)
)


def judge_token_features(
    target_logits: torch.Tensor, draft_logits: torch.Tensor, draft_ids: torch.Tensor
) -> torch.Tensor:
    """[B, K, F] token features at the K draft positions.

    target_logits, draft_logits: [B, K(+1), V] distributions after context + draft[:i] (a row K
    after the block is ignored); draft_ids: [B, K]. The target's token is its argmax. Both
    vocabularies are cut to the shared part, as rules.token_features does."""
    k = draft_ids.shape[1]
    vocab = min(target_logits.shape[-1], draft_logits.shape[-1])
    log_pt = torch.log_softmax(target_logits[:, :k, :vocab].float(), dim=-1)  # [B, K, V]
    log_pd = torch.log_softmax(draft_logits[:, :k, :vocab].float().to(log_pt.device), dim=-1)  # [B, K, V]
    draft_ids = draft_ids.to(log_pt.device)
    top = log_pt.argmax(-1, keepdim=True)  # [B, K, 1]
    drafted = draft_ids[..., None]  # [B, K, 1]
    pt, pd = log_pt.exp(), log_pd.exp()
    # 0 * log 0 is 0: tokens a model gives probability 0 add nothing.
    t_plogp = torch.where(pt > 0, pt * log_pt, torch.zeros_like(pt))
    d_plogp = torch.where(pd > 0, pd * log_pd, torch.zeros_like(pd))
    t_plogq = torch.where(pt > 0, pt * log_pd, torch.zeros_like(pt))
    rank = (log_pt > log_pt.gather(-1, drafted)).sum(-1)  # [B, K]
    columns = [
        log_pt.gather(-1, drafted).squeeze(-1),
        log_pt.gather(-1, top).squeeze(-1),
        log_pd.gather(-1, drafted).squeeze(-1),
        log_pd.gather(-1, top).squeeze(-1),
        -t_plogp.sum(-1),
        -d_plogp.sum(-1),
        (t_plogp - t_plogq).sum(-1),
        torch.log1p(rank.float()),
    ]
    # A draft token the target gives probability 0 has log p = -inf: clamp to a finite floor.
    return torch.stack(columns, dim=-1).clamp(min=-100.0)  # [B, K, F]


@dataclass
class JudgeInputs:
    """What the judge reads for N records, computed once (frozen models)."""

    mismatch: torch.Tensor  # [N, K] bool
    tokens: torch.Tensor  # [N, K, F] float32, TOKEN_FEATURES
    target_hidden: torch.Tensor  # [N, K, Ht] the target's last hidden state at each draft token
    draft_hidden: torch.Tensor | None = None  # [N, K, Hd] the draft's, when computed

    def __len__(self) -> int:
        return self.mismatch.shape[0]

    def _map(self, fn) -> JudgeInputs:
        """fn applied to every tensor field (absent fields stay None)."""
        return JudgeInputs(*(None if (v := getattr(self, f.name)) is None else fn(v) for f in fields(JudgeInputs)))

    def to(self, device) -> JudgeInputs:
        return self._map(lambda v: v.to(device))

    def select(self, index: torch.Tensor | slice) -> JudgeInputs:
        return self._map(lambda v: v[index])

    @staticmethod
    def cat(parts: list[JudgeInputs]) -> JudgeInputs:
        def join(name: str):
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values)

        return JudgeInputs(*(join(f.name) for f in fields(JudgeInputs)))


# What a head can read: names of JudgeInputs fields.
INPUT_GROUPS = ("tokens", "target_hidden", "draft_hidden")


class JudgeHead(nn.Module):
    """Accept logits [N, K] from JudgeInputs: standardised inputs -> linear (AutoJudge's logistic
    regression) or, with hidden > 0, one GELU layer.

    The inputs are standardised with the mean and std of the training mismatches (buffers, so a
    checkpoint carries them): a real backbone's hidden states reach |x| ~ 60, which makes any
    learning rate that suits the token features too large for them (bench/head_drift.py)."""

    def __init__(
        self,
        sizes: dict[str, int],
        inputs: tuple[str, ...] = ("tokens", "target_hidden"),
        hidden: int = 0,
        init_accept_prob: float = 0.5,
    ) -> None:
        super().__init__()
        unknown = [name for name in inputs if name not in INPUT_GROUPS]
        if unknown or not inputs:
            raise ValueError(f"judge inputs must be a non-empty subset of {INPUT_GROUPS}, got {list(inputs)}")
        self.inputs, self.sizes, self.hidden = tuple(inputs), dict(sizes), hidden
        width = sum(sizes[name] for name in self.inputs)
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        # 1 once fit_scaling has run: a checkpoint's head keeps its training set's scaling.
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        layers: list[nn.Module] = (
            [nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, 1)] if hidden else [nn.Linear(width, 1)]
        )
        self.net = nn.Sequential(*layers)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias, math.log(init_accept_prob / (1 - init_accept_prob)))

    @staticmethod
    def sizes_of(data: JudgeInputs) -> dict[str, int]:
        return {name: getattr(data, name).shape[-1] for name in INPUT_GROUPS if getattr(data, name) is not None}

    def features(self, data: JudgeInputs) -> torch.Tensor:
        """[N, K, D] the chosen inputs side by side, before standardising, on the head's device
        (feature caches keep their rows on the CPU; the head may train on a GPU)."""
        missing = [name for name in self.inputs if getattr(data, name) is None]
        if missing:
            raise ValueError(f"the judge reads {missing}, which these inputs do not hold")
        return torch.cat([getattr(data, name).float() for name in self.inputs], dim=-1).to(self.mean.device)

    def fit_scaling(self, data: JudgeInputs) -> None:
        """Mean and std of every input over the mismatch positions of `data` (the training set)."""
        x = self.features(data)[data.mismatch.to(self.mean.device)]  # [M, D]
        if len(x) < 2:
            return
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp(min=1e-4))
        self.fitted.fill_(True)

    def recenter(self, data: JudgeInputs, weights: torch.Tensor) -> None:
        """The scaling's mean re-fitted as the weighted mean over the mismatch positions of `data`
        (weights: [M], one per mismatch, in the order of data.mismatch's True entries).

        Why: under Adam every weight moves about lr an update, so a push on the accept rate alone
        (the bias's gradient) also moves each weight whose input does not average 0 over the
        mismatches the episodes decide at, and a head then leans with no signal in the outcomes."""
        x = self.features(data)[data.mismatch.to(self.mean.device)].double()  # [M, D]
        w = weights.to(x)[:, None]  # [M, 1]
        if len(x) and float(w.sum()) > 0:
            self.mean.copy_((w * x).sum(0) / w.sum())

    def forward(self, data: JudgeInputs) -> torch.Tensor:
        x = (self.features(data) - self.mean) / self.std  # [N, K, D]
        return self.net(x).squeeze(-1)  # [N, K]


def autojudge_labels(correct: torch.Tensor, mismatch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoJudge's labels from an outcome table.

    correct: [N, K+1] bool, the verdict when the block ends at j (outcomes.OutcomeTable.correct);
    mismatch: [N, K]. Accepting the mismatch at i (with every earlier one, to reach it) ends the
    block at the next mismatch after i, or at K: label[i] = correct[next(i)]. The label is defined
    only where the response was still correct before accepting i (correct[i]): a mismatch cannot
    be blamed for an answer already lost. Returns (labels [N, K] bool, defined [N, K] bool)."""
    n, k = mismatch.shape
    positions = torch.arange(k + 1).expand(n, -1)  # [N, K+1]
    ends = torch.cat([mismatch, torch.ones_like(mismatch[:, :1])], dim=1)  # [N, K+1]
    # next(i): the first block end after i.
    later = ends[:, None, :] & (positions[:, None, :] > torch.arange(k)[None, :, None])  # [N, K, K+1]
    nxt = torch.where(later, positions[:, None, :], k).min(-1).values  # [N, K]
    labels = correct.gather(1, nxt)  # [N, K]
    defined = mismatch & correct[:, :k]
    return labels & defined, defined


def save_judge(head: JudgeHead, path, threshold: float, notes: dict | None = None) -> None:
    """A trained judge and the threshold to run it at, for task=decode (decode.judge_path).
    `notes`: numbers that travel with it (e.g. the KL rule's tau chosen on the same records)."""
    torch.save(
        {
            "sizes": head.sizes,
            "inputs": list(head.inputs),
            "hidden": head.hidden,
            "threshold": threshold,
            "notes": dict(notes or {}),
            "state_dict": head.state_dict(),
        },
        path,
    )


def load_judge(path) -> tuple[JudgeHead, float]:
    """(the judge saved by save_judge, in eval mode; its threshold)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    head = JudgeHead(saved["sizes"], tuple(saved["inputs"]), saved["hidden"])
    head.load_state_dict(saved["state_dict"])
    return head.eval(), float(saved["threshold"])


def judge_notes(path) -> dict:
    """The notes saved with a judge ({} for judges saved without)."""
    return dict(torch.load(path, map_location="cpu", weights_only=True).get("notes", {}))
