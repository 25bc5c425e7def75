"""Linear layers with their weights packed once for oneDNN: the CPU path on which a pass over a few
tokens costs about as much as a pass over one, the premise of speculative decoding.

A float32 `nn.Linear` on the CPU multiplies through MKL, which, for a product of a handful of
rows, re-lays-out the whole weight matrix on every call: on a 2-core AMD EPYC (AVX-512, no AMX) a
Qwen2.5-Coder-1.5B pass over 5 new tokens cost 2.2 single-token passes (bench/pass_cost.py).
oneDNN's linear reads a weight laid out for it in advance; the same pass over 5 tokens then cost
1.3-1.7 single-token passes (two runs), and the single-token pass itself 20-30% less.

    pack_linears(model)   # in place, for inference: every nn.Linear of a CPU model
    choice = pack_if_faster(model)   # or: time a probe pass both ways and keep the faster

Whether packing pays turns with the CPU and the width: on a 2-core Intel Xeon with AVX-512 and AMX
(torch 2.13.0) the 1.5B target's single-token pass took 248 ms as loaded and 332 ms packed, while
its pass over 5 tokens took 586 ms as loaded and 490 ms packed. So the loaders' default
(pack_linears=None) measures both at load, per width, and keeps for each width the faster: on that
Xeon single-token products as loaded and larger ones packed (the weights held twice).

Packed layers compute the same products up to float rounding (the accumulation order differs);
they hold no gradient and no state_dict entry, so pack a model only after loading it, to decode.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class PackedLinear(nn.Module):
    """An inference-only nn.Linear whose weight lives in oneDNN's own layout; with plain_rows > 0
    it also keeps the layer's own weight for products of at most plain_rows rows."""

    def __init__(self, linear: nn.Linear, plain_rows: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("weight", weight.to_mkldnn(), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().to_mkldnn()
        self.register_buffer("bias", bias, persistent=False)
        self.dtype = weight.dtype
        self.plain_rows = 0
        self.keep_plain(linear, plain_rows)

    def keep_plain(self, linear: nn.Linear, plain_rows: int) -> None:
        """Products of at most plain_rows rows go through `linear`'s own weight (MKL): on a Xeon
        with AMX that single-token product is faster than oneDNN's, while oneDNN's wins for the
        few-token products of a verification pass. Costs the weight's memory a second time."""
        self.plain_rows = plain_rows
        keep = plain_rows > 0
        self.register_buffer("plain_weight", linear.weight.detach() if keep else None, persistent=False)
        plain_bias = linear.bias.detach() if keep and linear.bias is not None else None
        self.register_buffer("plain_bias", plain_bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in_features] -> [..., out_features]; oneDNN takes 2-D inputs, so the leading
        dimensions are flattened and restored."""
        rows = x.reshape(-1, self.in_features).to(self.dtype).contiguous()  # [R, in]
        if rows.shape[0] <= self.plain_rows:
            out = F.linear(rows, self.plain_weight, self.plain_bias)  # [R, out]
        else:
            out = torch._C._nn.mkldnn_linear(rows.to_mkldnn(), self.weight, self.bias).to_dense()  # [R, out]
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        plain = f", products of <= {self.plain_rows} rows as loaded" if self.plain_rows else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, packed for oneDNN{plain}"


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


def pass_seconds(model: nn.Module, context: int, n: int, repeats: int) -> float:
    """Median seconds of a causal LM's pass over n new tokens after a `context`-token prompt held
    in its KV cache (the cache cut back after each pass; one warm-up pass first)."""
    (times,) = pass_times(model, context, n, repeats, [lambda: None])
    return statistics.median(times)


@torch.no_grad()
def pass_times(model: nn.Module, context: int, n: int, repeats: int, ways: list) -> list[list[float]]:
    """Seconds of `repeats` passes over n new tokens after a `context`-token prompt held in the KV
    cache, for each of `ways` (callables that set the model up one way) in turn, pass by pass, so
    that a machine's drift hits every way alike; one warm-up round first, left out. -> [way][repeat]."""
    device = next(model.parameters()).device
    high = min(1000, model.config.vocab_size)  # ids any vocabulary has (the toy world's is small)
    cache = model(input_ids=torch.randint(0, high, (1, context), device=device), use_cache=True).past_key_values
    times: list[list[float]] = [[] for _ in ways]
    for _ in range(repeats + 1):
        for way, seconds in zip(ways, times):
            way()
            new = torch.randint(0, high, (1, n), device=device)
            start = time.perf_counter()
            model(input_ids=new, past_key_values=cache, use_cache=True, logits_to_keep=n)
            seconds.append(time.perf_counter() - start)
            cache.crop(-n)
    return [seconds[1:] for seconds in times]


@dataclass
class PackChoice:
    """What pack_if_faster measured and kept."""

    plain_rows: int  # products of at most this many rows use the layers as loaded (0: none)
    widths: tuple[int, ...]  # the probe's pass widths (new tokens)
    plain_s: tuple[float, ...]  # probe seconds per width as loaded (nan where nothing could be packed)
    packed_s: tuple[float, ...]  # the same, packed

    @property
    def packed(self) -> bool:
        """Some products now go through oneDNN's packed weights."""
        return self.plain_rows < self.widths[-1]

    def __str__(self) -> str:
        if not self.packed:
            kept = "as loaded"
        elif self.plain_rows:
            kept = f"as loaded up to {self.plain_rows} rows, packed for oneDNN above"
        else:
            kept = "packed for oneDNN"
        probe = ", ".join(
            f"{w} tok {a * 1e3:.0f}/{b * 1e3:.0f}" for w, a, b in zip(self.widths, self.plain_s, self.packed_s)
        )
        return f"{kept} (probe ms as loaded/packed: {probe})"


def pack_if_faster(model: nn.Module, tokens: int = 5, context: int = 64, repeats: int = 4) -> PackChoice:
    """Times a causal LM's passes over 1, 2 and `tokens` new tokens (a verification block) as
    loaded and packed, in place: packed where oneDNN wins at every width, as loaded where it wins
    at none, and both where the layers as loaded win up to some width (products of at most that
    many rows then go through them, larger ones through the packed copy). The two ways are timed
    in turn, pass by pass, and the fastest of `repeats` kept: a shared 2-core VM's speed drifted by
    tens of percent within minutes, which timing one way after the other mistook for a kernel's
    cost."""
    widths = tuple(sorted({1, 2, tokens}))
    replaced = _pack(model)
    if not replaced:  # nothing to choose between: no probe
        nothing = tuple(float("nan") for _ in widths)
        return PackChoice(widths[-1], widths, nothing, nothing)
    layers = [getattr(parent, name) for parent, name, _ in replaced]
    for layer, (_, _, linear) in zip(layers, replaced):
        layer.keep_plain(linear, EVERY_ROW)
    plain, packed = zip(*(alternating_seconds(model, layers, context, n, repeats) for n in widths))
    plain_rows = 0
    for width, plain_s, packed_s in zip(widths, plain, packed):
        if plain_s > packed_s:
            break
        plain_rows = width
    choice = PackChoice(plain_rows, widths, plain, packed)
    for layer, (parent, name, linear) in zip(layers, replaced):
        if not choice.packed:
            setattr(parent, name, linear)
        else:
            layer.keep_plain(linear, plain_rows)  # 0 lets the plain weight go
    return choice


EVERY_ROW = 2**62  # a PackedLinear's plain_rows that sends every product through the plain weight


def alternating_seconds(model: nn.Module, layers: list[PackedLinear], context: int, n: int, repeats: int):
    """(as loaded, packed): the fastest of `repeats` passes over n new tokens each way, `layers`
    switched between their plain and packed weights pass by pass (pass_times)."""

    def route(rows: int):
        def set_rows() -> None:
            for layer in layers:
                layer.plain_rows = rows

        return set_rows

    plain, packed = pass_times(model, context, n, repeats, [route(EVERY_ROW), route(0)])
    return min(plain), min(packed)
