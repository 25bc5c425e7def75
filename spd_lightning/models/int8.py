"""A draft with int8 weights: every linear layer's weight stored as int8 with one float scale per
output row, activations left in the model's dtype (weight-only quantisation).

A single-token decoding pass reads every weight once, so on a CPU its time is the weight bytes
over memory bandwidth: int8 weights are a quarter of float32's. For the draft of speculative
decoding the rounding costs no losslessness: the target still verifies every token, so standard
SD writes the target's greedy tokens whatever the draft proposes; what the rounding may cost is
acceptance (a draft token that differs where the float32 draft's would have matched), which
bench/speed.py measures beside the speed.

    quantize_linears(draft)   # in place, for inference: every nn.Linear (the output layer too)

The product is torch's own CPU kernel for int8 weights (`torch._weight_int8pack_mm`, the one
weight-only int8 decoding in torch's examples uses): a private op, so `int8_kernel_available`
checks it once and the loaders refuse the setting with a clear message where it is missing.
"""

from __future__ import annotations

import torch
from torch import nn

# The kernel's bfloat16 path reads its inputs in blocks: with in_features not a multiple of 16 it
# returned garbage or crashed (torch 2.13.0, AVX-512), so only layers whose width is a multiple of
# this are converted (every linear layer of the Qwen2.5 models is).
WIDTH_MULTIPLE = 32


def int8_kernel_available() -> bool:
    """Whether this torch build multiplies float activations by int8 weights on the CPU."""
    try:
        x, w, scales = torch.ones(1, 32), torch.ones(8, 32, dtype=torch.int8), torch.ones(8)
        return torch._weight_int8pack_mm(x, w, scales).shape == (1, 8)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class Int8Linear(nn.Module):
    """An inference-only nn.Linear whose weight is int8 with a scale per output row (symmetric:
    the row's largest magnitude maps to 127). The product runs in `compute_dtype`: torch's kernel
    is fast with bfloat16 activations and slow with float32 ones (Qwen2.5-Coder-0.5B, one token,
    2-core Xeon with AMX: 84 ms against 378 ms; docs/speed.md), so a float32 model's inputs are
    cast down for the product and its output cast back."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if linear.in_features % WIDTH_MULTIPLE:
            raise ValueError(f"int8 weights need in_features a multiple of {WIDTH_MULTIPLE}, not {linear.in_features}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()  # [N, K]
        scales = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0  # [N]
        quantized = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)  # [N, K]
        self.register_buffer("weight_int8", quantized, persistent=False)
        self.register_buffer("scales", scales.to(compute_dtype), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach()
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features] in x's dtype; the kernel takes 2-D inputs
        in the scales' dtype."""
        flat = x.reshape(-1, self.in_features).to(self.scales.dtype).contiguous()  # [M, K]
        out = torch._weight_int8pack_mm(flat, self.weight_int8, self.scales).to(x.dtype)  # [M, N]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def quantize_linears(model: nn.Module) -> int:
    """Replaces every nn.Linear of `model` whose in_features is a multiple of WIDTH_MULTIPLE (a
    RestrictedHead's rows too) by an Int8Linear, in place; others stay as they are. -> how many
    were replaced."""
    if not int8_kernel_available():
        raise RuntimeError(f"torch {torch.__version__} has no CPU kernel for int8 weights (_weight_int8pack_mm)")
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) is nn.Linear and child.in_features % WIDTH_MULTIPLE == 0]  # fmt: skip
    for parent, name, child in swaps:
        setattr(parent, name, Int8Linear(child))
    return len(swaps)
