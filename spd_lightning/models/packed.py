"""Linear layers with their weights packed once for oneDNN: the CPU path on which a pass over a few
tokens costs about as much as a pass over one, the premise of speculative decoding.

A float32 `nn.Linear` on the CPU multiplies through MKL, which, for a product of a handful of
rows, re-lays-out the whole weight matrix on every call: on a 2-core AMD EPYC (AVX-512, no AMX) a
Qwen2.5-Coder-1.5B pass over 5 new tokens cost 2.2 single-token passes (bench/pass_cost.py).
oneDNN's linear reads a weight laid out for it in advance; the same pass over 5 tokens then cost
1.3-1.7 single-token passes (two runs), and the single-token pass itself 20-30% less.

    pack_linears(model)   # in place, for inference: every nn.Linear of a CPU model
    choice = pack_if_faster(model)   # or: time a probe pass both ways and keep the faster

Whether packing pays turns with the CPU: on a 2-core Intel Xeon with AVX-512 and AMX the packed
single-token pass was slower than MKL's, so the loaders' default (pack_linears=None) measures it
at load instead of assuming it.

Packed layers compute the same products up to float rounding (the accumulation order differs);
they hold no gradient and no state_dict entry, so pack a model only after loading it, to decode.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

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
    return len(_pack(model))


def _pack(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """Packs in place -> (parent, name, the original linear) of every replaced layer."""
    if not can_pack(model):
        return []
    replaced = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:  # subclasses (LoRA, quantised layers) keep their own forward
                setattr(parent, name, PackedLinear(child))
                replaced.append((parent, name, child))
    return replaced


@torch.no_grad()
def pass_seconds(model: nn.Module, context: int, n: int, repeats: int) -> float:
    """Median seconds of a causal LM's pass over n new tokens after a `context`-token prompt held
    in its KV cache (the cache cut back after each pass; one warm-up pass first)."""
    first = next(model.parameters())
    high = min(1000, model.config.vocab_size)  # ids any vocabulary has (the toy world's is small)
    prompt = torch.randint(0, high, (1, context), device=first.device)
    cache = model(input_ids=prompt, use_cache=True).past_key_values
    times = []
    for _ in range(repeats + 1):
        new = torch.randint(0, high, (1, n), device=first.device)
        start = time.perf_counter()
        model(input_ids=new, past_key_values=cache, use_cache=True, logits_to_keep=n)
        times.append(time.perf_counter() - start)
        cache.crop(-n)
    return statistics.median(times[1:])


@dataclass
class PackChoice:
    """What pack_if_faster measured and kept."""

    packed: bool  # the model's linear layers are packed now
    plain_s: float  # probe seconds as loaded: a single-token pass plus a pass over `tokens`
    packed_s: float  # the same, packed (nan where the model cannot be packed)

    def __str__(self) -> str:
        kept = "packed for oneDNN" if self.packed else "as loaded"
        return f"{kept} (probe: {self.plain_s * 1e3:.0f} ms as loaded, {self.packed_s * 1e3:.0f} ms packed)"


def pack_if_faster(model: nn.Module, tokens: int = 5, context: int = 64, repeats: int = 3) -> PackChoice:
    """Times a causal LM's single-token pass plus its pass over `tokens` (a verification block)
    as loaded and packed, and keeps the faster, in place."""
    plain = pass_seconds(model, context, 1, repeats) + pass_seconds(model, context, tokens, repeats)
    replaced = _pack(model)
    if not replaced:
        return PackChoice(False, plain, float("nan"))
    packed = pass_seconds(model, context, 1, repeats) + pass_seconds(model, context, tokens, repeats)
    if packed < plain:
        return PackChoice(True, plain, packed)
    for parent, name, linear in replaced:
        setattr(parent, name, linear)
    return PackChoice(False, plain, packed)
