"""Int8 weights for the draft: products within the rounding's reach, and standard SD stays lossless."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spd_lightning.models.int8 import Int8Linear, int8_kernel_available, quantize_linears
from spd_lightning.models.vocab_head import RestrictedHead
from spd_lightning.toy.raw import toy_prompts

pytestmark = pytest.mark.skipif(not int8_kernel_available(), reason="this torch has no int8-weight CPU kernel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_int8_linear_is_within_half_a_step_of_each_weight_of_the_float_layer(dtype):
    torch.manual_seed(0)
    linear = nn.Linear(64, 40).to(dtype)
    quantized = Int8Linear(linear)
    x = torch.randn(2, 3, 64, dtype=dtype)  # [B, T, K]
    with torch.no_grad():
        exact, rounded = linear(x).float(), quantized(x).float()  # [B, T, N] each
    assert rounded.shape == exact.shape and quantized.weight_int8.dtype == torch.int8
    # Each weight moves by at most half its row's step (scale / 2): the product by at most
    # sum |x| * scale / 2, plus the dtype's own rounding.
    step = quantized.scales.float()  # [N]
    bound = x.float().abs().sum(-1, keepdim=True) * step / 2 + 0.05 * exact.abs() + 1e-3  # [B, T, N]
    assert ((rounded - exact).abs() <= bound).all()
    assert not torch.equal(rounded, exact)  # it did round


def test_quantize_linears_swaps_every_wide_enough_linear_a_restricted_heads_rows_too():
    head = RestrictedHead(nn.Linear(64, 20), torch.tensor([1, 5, 9]))
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), head)
    assert quantize_linears(model) == 2
    # The kernel misreads widths that are not a multiple of its block: that layer stays float.
    assert type(model[0]) is nn.Linear and isinstance(model[2], Int8Linear) and isinstance(head.rows, Int8Linear)
    assert model(torch.randn(4, 8)).shape == (4, 20)
    with pytest.raises(ValueError, match="multiple of 32, not 8"):
        Int8Linear(nn.Linear(8, 8))


def test_standard_sd_with_an_int8_draft_writes_the_targets_greedy_tokens(sd_with_changed_draft):
    greedy, full, small = sd_with_changed_draft(lambda draft, _: quantize_linears(draft))
    assert [g.response_ids for g in small] == [g.response_ids for g in greedy] == [g.response_ids for g in full]
    # The rounded draft still proposes what the target keeps: acceptance within a few tokens of float32's.
    kept_full = sum(g.accepted_draft_tokens for g in full)
    assert abs(sum(g.accepted_draft_tokens for g in small) - kept_full) <= max(3, kept_full // 10)


def test_the_draft_int8_knob_quantizes_the_loaded_draft_after_restricting_its_head(toy_world, tmp_path):
    import json

    from spd_lightning.decoding.setup import PairSettings, load_pair

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"question": p.text}) for p in toy_prompts(10, seed=4)) + "\n")
    pair = (str(toy_world / "draft"), str(toy_world / "target"))
    settings = PairSettings(*pair, draft_vocab=6, draft_vocab_corpus=str(corpus), section="decode", draft_int8=True)
    draft, target, _ = load_pair(settings)
    head = draft.get_output_embeddings()
    assert isinstance(head, RestrictedHead) and isinstance(head.rows, Int8Linear)
    assert not any(type(m) is nn.Linear for m in draft.modules())
    assert any(type(m) is nn.Linear or "Packed" in type(m).__name__ for m in target.modules())  # the target untouched
