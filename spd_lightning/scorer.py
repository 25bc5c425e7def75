"""The SPD scorer: a causal-LM backbone and a score head that outputs an accept logit per draft position."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel

from spd_lightning.hf import load_pretrained


class ScoringActor(nn.Module):
    """One forward pass over context + draft gives an accept logit for every draft position.

    The logit of draft position i reads the backbone's hidden state at the draft token
    (which has seen the context, draft[:i] and draft[i] itself) together with the input
    embedding of target_ids[i], the alternative the target would emit instead.
    """

    def __init__(self, backbone: PreTrainedModel, init_accept_prob: float = 0.5, head_hidden: int | None = None):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        head_hidden = head_hidden or hidden
        self.head = nn.Sequential(nn.Linear(2 * hidden, head_hidden), nn.GELU(), nn.Linear(head_hidden, 1))
        # Start every mismatch at the same accept probability: zero output weights, prior in the bias.
        nn.init.zeros_(self.head[-1].weight)
        nn.init.constant_(self.head[-1].bias, math.log(init_accept_prob / (1 - init_accept_prob)))

    @classmethod
    def from_pretrained(
        cls, path: str, init_accept_prob: float = 0.5, head_hidden: int | None = None, **backbone_kwargs
    ) -> ScoringActor:
        backbone = load_pretrained(AutoModel, path, "scorer backbone", "model.scorer.path", **backbone_kwargs)
        return cls(backbone, init_accept_prob=init_accept_prob, head_hidden=head_hidden)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, L] context + draft, right-padded
        attention_mask: torch.Tensor,  # [B, L]
        context_len: torch.Tensor,  # [B] length of the context part of each row
        target_ids: torch.Tensor,  # [B, K]
    ) -> torch.Tensor:
        """Returns accept logits [B, K]."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, H]
        k = target_ids.shape[1]
        pos = context_len[:, None] + torch.arange(k, device=input_ids.device)[None, :]  # [B, K]
        at_draft = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, K, H]
        alternative = self.backbone.get_input_embeddings()(target_ids)  # [B, K, H]
        features = torch.cat([at_draft, alternative.to(at_draft.dtype)], dim=-1)  # [B, K, 2H]
        return self.head(features).squeeze(-1).float()  # [B, K]
