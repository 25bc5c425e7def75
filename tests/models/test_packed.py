"""Linear layers packed for oneDNN (spd_lightning/models/packed.py): the same products as nn.Linear up
to float rounding, at any leading shape, and the same greedy tokens on the toy target."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spd_lightning.models.lm import greedy_responses
from spd_lightning.models.packed import PackedLinear, can_pack, pack_linears
from spd_lightning.targets.local import load_causal_lm
from spd_lightning.toy.raw import toy_prompts


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (5, 48), (2, 7, 48)])
def test_a_packed_linear_computes_what_the_linear_computes(bias, shape):
    torch.manual_seed(0)
    linear = nn.Linear(48, 96, bias=bias)
    packed = PackedLinear(linear)
    x = torch.randn(*shape)  # [..., in]
    with torch.no_grad():
        out = packed(x)  # [..., out]
        assert out.shape == (*shape[:-1], 96)
        assert torch.allclose(out, linear(x), atol=1e-5)
    assert not list(packed.parameters()) and not packed.state_dict()  # inference only, nothing to save


def test_packing_replaces_every_plain_linear_and_keeps_the_toy_targets_greedy_tokens(toy_world, toy_tokenizer):
    target = load_causal_lm(str(toy_world / "target"))
    prompts = [toy_tokenizer(p.text).input_ids for p in toy_prompts(16, seed=11)]
    eos, pad = toy_tokenizer.eos_token_id, toy_tokenizer.pad_token_id
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        before, tokens = target(input_ids=ids).logits, greedy_responses(target, prompts, 24, eos, pad)
    linears = sum(type(m) is nn.Linear for m in target.modules())
    assert linears > 0 and pack_linears(target) == linears
    assert not any(type(m) is nn.Linear for m in target.modules())
    with torch.no_grad():
        assert torch.allclose(target(input_ids=ids).logits, before, atol=1e-4)
    assert greedy_responses(target, prompts, 24, eos, pad) == tokens


def test_a_model_off_the_cpu_is_left_as_it_is():
    with torch.device("meta"):  # stands in for a GPU: oneDNN packs CPU tensors only
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    assert not can_pack(model)
    assert pack_linears(model) == 0 and type(model[0]) is nn.Linear


@pytest.mark.parametrize("rows", [1, 3])
def test_a_packed_linear_keeping_its_plain_weight_computes_the_same_at_every_width(rows):
    torch.manual_seed(0)
    linear = nn.Linear(48, 96)
    packed = PackedLinear(linear, plain_rows=2)
    x = torch.randn(rows, 48)  # [R, in]: 1 row through the plain weight, 3 through oneDNN's
    with torch.no_grad():
        assert torch.allclose(packed(x), linear(x), atol=1e-5)
    assert packed.plain_weight is not None and "<= 2 rows as loaded" in repr(packed)
    assert not list(packed.parameters()) and not packed.state_dict()


def rigged_clock(monkeypatch, seconds: list[float]) -> None:
    """The probe's clock answers `seconds`: the widths 1, 2, 5 as loaded, then packed."""
    import spd_lightning.models.packed as packed

    answers = iter(zip(seconds[:3], seconds[3:]))
    monkeypatch.setattr(packed, "alternating_seconds", lambda *a: next(answers))


@pytest.mark.parametrize(
    "seconds, plain_rows, kept",
    [
        ([1.0, 1.0, 2.0, 2.0, 2.0, 3.0], 5, "as loaded"),  # packed slower everywhere
        ([2.0, 2.0, 3.0, 1.0, 1.0, 2.0], 0, "packed for oneDNN"),  # packed faster everywhere
        ([1.0, 1.2, 2.4, 1.3, 1.4, 1.5], 2, "as loaded up to 2 rows"),  # the Xeon with AMX's shape
    ],
)
def test_pack_if_faster_keeps_for_each_width_the_faster_layers(toy_world, monkeypatch, seconds, plain_rows, kept):
    from spd_lightning.models import packed

    target = load_causal_lm(str(toy_world / "target"))
    linears = sum(type(m) is nn.Linear for m in target.modules())
    rigged_clock(monkeypatch, seconds)
    choice = packed.pack_if_faster(target)
    assert choice.widths == (1, 2, 5) and choice.plain_rows == plain_rows and str(choice).startswith(kept)
    layers = [m for m in target.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == (linears if choice.packed else 0)
    assert all(m.plain_rows == plain_rows and (m.plain_weight is not None) == (plain_rows > 0) for m in layers)


def test_pack_if_faster_keeps_the_greedy_tokens_on_the_real_clock(toy_world, toy_tokenizer):
    from spd_lightning.models import packed

    target = load_causal_lm(str(toy_world / "target"))
    prompts = [toy_tokenizer(p.text).input_ids for p in toy_prompts(8, seed=12)]
    eos, pad = toy_tokenizer.eos_token_id, toy_tokenizer.pad_token_id
    tokens = greedy_responses(target, prompts, 24, eos, pad)
    choice = packed.pack_if_faster(target)  # whichever way it goes, the same greedy tokens
    assert choice.packed == any(isinstance(m, PackedLinear) for m in target.modules())
    assert min(choice.plain_s) > 0 and min(choice.packed_s) > 0 and "ms" in str(choice)
    assert greedy_responses(target, prompts, 24, eos, pad) == tokens
