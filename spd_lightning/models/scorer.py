"""The SPD scorer: a causal-LM backbone and a score head that outputs an accept logit per draft position."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel

from spd_lightning.models.hf import load_pretrained, torch_dtype


@dataclass
class LoraSpec:
    """LoRA adapters on the backbone (peft, Hu et al. 2021): only they and the score head train."""

    # Rank of the low-rank update; 0 is no LoRA (so that `model.lora.r=16` alone turns it on).
    r: int = 0
    # The update is scaled by alpha / r.
    alpha: float = 16.0
    dropout: float = 0.05
    # Module names to adapt (e.g. [q_proj, v_proj]); null: peft's default for the architecture.
    target_modules: list[str] | None = None


def add_lora(backbone: PreTrainedModel, lora: LoraSpec) -> nn.Module:
    """The backbone wrapped by peft: its own weights frozen, LoRA adapters trainable."""
    from peft import LoraConfig, get_peft_model  # imported only when LoRA is asked for

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules)
    return get_peft_model(backbone, config)


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
        cls,
        path: str,
        init_accept_prob: float = 0.5,
        head_hidden: int | None = None,
        dtype: str = "float32",
        lora: LoraSpec | None = None,
        local_files_only: bool = True,
    ) -> ScoringActor:
        """The backbone from `path` (a local directory, or a hub id: from the local cache only
        unless local_files_only is false), optionally with LoRA; the head is new and float32."""
        backbone_dtype = torch_dtype(dtype, "model.dtype")
        offline_key = "model.local_files_only" if local_files_only else None
        backbone = load_pretrained(AutoModel, path, "scorer backbone", "model.path", offline_key, dtype=backbone_dtype)
        if lora is not None and lora.r > 0:
            backbone = add_lora(backbone, lora)
        return cls(backbone, init_accept_prob=init_accept_prob, head_hidden=head_hidden)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, L] context + draft, right-padded
        attention_mask: torch.Tensor,  # [B, L]
        context_len: torch.Tensor,  # [B] length of the context part of each row
        target_ids: torch.Tensor,  # [B, K]
    ) -> torch.Tensor:
        """Returns accept logits [B, K]."""
        return self.score(self.hidden_at_draft(input_ids, attention_mask, context_len, target_ids.shape[1]), target_ids)

    def hidden_at_draft(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_len: torch.Tensor, k: int
    ) -> torch.Tensor:
        """The backbone's last hidden states [B, K, H] at the K draft tokens of each row."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, H]
        pos = context_len[:, None] + torch.arange(k, device=input_ids.device)[None, :]  # [B, K]
        return hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, K, H]

    def head_inputs(self, at_draft: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """What the head reads [B, K, 2H]: the hidden states at the draft tokens [B, K, H] beside
        the input embeddings of the target's tokens there [B, K]."""
        alternative = self.backbone.get_input_embeddings()(target_ids)  # [B, K, H]
        return torch.cat([at_draft, alternative.to(at_draft.dtype)], dim=-1)  # [B, K, 2H]

    def score(self, at_draft: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
        """Accept logits [B, K] from the hidden states at the draft tokens [B, K, H] and the
        target's tokens there [B, K]."""
        features = self.head_inputs(at_draft, target_ids)  # [B, K, 2H]
        # The head keeps its own dtype (float32) under a bfloat16/float16 backbone.
        return self.head(features.to(self.head[0].weight.dtype)).squeeze(-1).float()  # [B, K]
