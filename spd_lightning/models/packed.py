"""Linear layers with their weights packed once for oneDNN: the CPU path on which a pass over a few
tokens costs about as much as a pass over one, the premise of speculative decoding.

A float32 `nn.Linear` on the CPU multiplies through MKL, which, for a product of a handful of
rows, re-lays-out the whole weight matrix on every call: on a 2-core AMD EPYC (AVX-512, no AMX) a
Qwen2.5-Coder-1.5B pass over 5 new tokens cost 2.2 single-token passes (bench/pass_cost.py).
oneDNN's linear reads a weight laid out for it in advance; the same pass over 5 tokens then cost
1.3-1.7 single-token passes (two runs), and the single-token pass itself 20-30% less.

    pack_linears(model)   # in place, for inference: every nn.Linear of a CPU model

Packed layers compute the same products up to float rounding (the accumulation order differs);
they hold no gradient and no state_dict entry, so pack a model only after loading it, to decode.
"""

from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    """An inference-only nn.Linear whose weight lives in oneDNN's own layout."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("weight", weight.to_mkldnn(), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().to_mkldnn()
        self.register_buffer("bias", bias, persistent=False)
        self.dtype = weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features]; oneDNN takes 2-D inputs, so the leading
        dimensions are flattened and restored."""
        rows = x.reshape(-1, self.in_features).to(self.dtype).contiguous()
        out = torch._C._nn.mkldnn_linear(rows.to_mkldnn(), self.weight, self.bias).to_dense()
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for oneDNN"


def can_pack(model: nn.Module) -> bool:
    """oneDNN is a CPU library: True when this torch has it and the model lives on the CPU."""
    first = next(model.parameters(), None)
    on_cpu = first is None or first.device.type == "cpu"
    return on_cpu and torch.backends.mkldnn.is_available()


def pack_linears(model: nn.Module) -> int:
    """Replaces every nn.Linear of a CPU model with a PackedLinear, in place. -> how many were
    replaced (0 on a GPU or without oneDNN, where the model is left as it is)."""
    if not can_pack(model):
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:  # subclasses (LoRA, quantised layers) keep their own forward
                setattr(parent, name, PackedLinear(child))
                replaced += 1
    return replaced
