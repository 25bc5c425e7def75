"""The SPD scorer: backbone + score head, one accept logit per draft position (SPEC.md, step 1)."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel

from spd_lightning.data.records import Record, collate_records, load_records
from spd_lightning.models.scorer import ScoringActor

K = 4


def tiny_backbone(seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return LlamaModel(config).eval()


def actor(init_accept_prob: float = 0.5, perturb: bool = False) -> ScoringActor:
    model = ScoringActor(tiny_backbone(), init_accept_prob=init_accept_prob).eval()
    if perturb:  # a trained head: the output no longer ignores its features
        torch.manual_seed(1)
        nn.init.normal_(model.head[-1].weight, std=1.0)
    return model


def logits_of(model: ScoringActor, records: list[Record]) -> torch.Tensor:
    batch = collate_records(records)
    with torch.no_grad():
        return model(batch.input_ids, batch.attention_mask, batch.context_len, batch.target_ids)


SHORT = Record([3, 4, 5], 2, [6, 7, 8, 9], [6, 11, 12, 9], "x")
LONG = Record([3, 4, 5, 13, 14, 15, 16, 17, 18], 2, [19, 20, 21, 22], [19, 23, 24, 25], "y")


def test_output_shape_and_dtype():
    out = logits_of(actor(), [SHORT, LONG, SHORT])
    assert out.shape == (3, K) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("p", [0.5, 0.2, 0.9])
def test_initial_accept_prob_everywhere(p):
    # zero-initialised output weights: every position starts at the configured prior
    probs = torch.sigmoid(logits_of(actor(init_accept_prob=p), [SHORT, LONG]))
    torch.testing.assert_close(probs, torch.full((2, K), p), atol=1e-6, rtol=0)


def test_padding_invariance():
    # the short record is right-padded next to a longer one: its logits must not move
    model = actor(perturb=True)
    alone = logits_of(model, [SHORT])
    batched = logits_of(model, [SHORT, LONG])
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1], logits_of(model, [LONG])[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[0], batched[1])  # the perturbed head is not constant


def with_field(r: Record, field: str, i: int, value: int) -> Record:
    ids = list(getattr(r, field))
    ids[i] = value
    return Record(**{**r.__dict__, field: ids})


def test_logit_depends_on_target_token_at_its_position():
    model = actor(perturb=True)
    base = logits_of(model, [SHORT])[0]
    changed = logits_of(model, [with_field(SHORT, "target_ids", 1, 40)])[0]
    assert abs(changed[1] - base[1]) > 1e-4  # the alternative token is a feature of position 1
    # other positions do not see target_ids[1]
    torch.testing.assert_close(changed[[0, 2, 3]], base[[0, 2, 3]], atol=1e-6, rtol=0)


def test_logit_is_causal_in_draft_tokens():
    model = actor(perturb=True)
    base = logits_of(model, [SHORT])[0]
    changed = logits_of(model, [with_field(SHORT, "draft_ids", 2, 41)])[0]
    # positions before 2 never see draft[2]; positions 2 and 3 do
    torch.testing.assert_close(changed[:2], base[:2], atol=1e-6, rtol=0)
    assert (changed[2:] - base[2:]).abs().min() > 1e-4


def test_logit_depends_on_context():
    model = actor(perturb=True)
    base = logits_of(model, [SHORT])[0]
    changed = logits_of(model, [with_field(SHORT, "context_ids", 1, 42)])[0]
    assert (changed - base).abs().min() > 1e-4


def test_zero_init_output_layer_still_learns():
    # zero output weights must still receive a gradient, or the head could never leave the prior
    model = actor().train()
    batch = collate_records([SHORT, LONG])
    model(batch.input_ids, batch.attention_mask, batch.context_len, batch.target_ids).sum().backward()
    assert model.head[-1].weight.grad.abs().sum() > 0
    assert model.head[-1].bias.grad.abs().sum() > 0


def test_from_pretrained_toy_draft(toy_world):
    model = ScoringActor.from_pretrained(str(toy_world / "draft"), init_accept_prob=0.3).eval()
    assert model.backbone.config.hidden_size == model.head[0].in_features // 2
    records = load_records(toy_world / "records.jsonl")[:3]
    probs = torch.sigmoid(logits_of(model, records))
    assert probs.shape == (3, records[0].block_size)
    torch.testing.assert_close(probs, torch.full_like(probs, 0.3), atol=1e-6, rtol=0)
    # the backbone holds the trained draft weights, not a fresh random init
    from safetensors.torch import load_file

    saved = load_file(str(toy_world / "draft" / "model.safetensors"))
    key = next(k for k in saved if k.endswith("embed_tokens.weight"))
    torch.testing.assert_close(model.backbone.get_input_embeddings().weight, saved[key])
