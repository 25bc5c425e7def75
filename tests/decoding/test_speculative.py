"""The generation API (spd_lightning/decoding/speculative.py): text in, text and statistics out, on the
toy world's models; its policies by name, and the errors a user meets."""

from __future__ import annotations

import pytest
import torch

from spd_lightning.decoding.policies import PolicySettings
from spd_lightning.decoding.speculative import SpeculativeDecoder
from spd_lightning.errors import SetupError
from spd_lightning.judge.head import TOKEN_FEATURES, JudgeHead, judge_notes, save_judge
from spd_lightning.toy.raw import toy_prompts


@pytest.fixture(scope="module")
def decoders(toy_world):
    """name -> decoder over the toy world's draft and target, from the model directories."""
    pair = (str(toy_world / "draft"), str(toy_world / "target"))
    return {
        name: SpeculativeDecoder.from_pretrained(*pair, name, chat_template=False, kl_threshold=0.85)
        for name in ("greedy", "standard_sd", "kl_below", "accept_all")
    }


def test_text_in_text_and_statistics_out(decoders):
    texts = [p.text for p in toy_prompts(6, seed=4)]
    greedy = decoders["greedy"].generate(texts, max_new_tokens=24)
    sd = decoders["standard_sd"].generate(texts, max_new_tokens=24, batch_size=3)
    assert sd.texts == greedy.texts  # standard SD is lossless, batched or not
    assert all(t for t in sd.texts)
    stats = sd.stats
    assert stats["tokens"] == sum(g.num_tokens for g in sd.generations) > 0
    assert stats["target_calls_per_token"] < 1.0 == greedy.stats["target_calls_per_token"]
    assert stats["tokens_per_s"] > 0 and stats["draft_s"] > 0 and stats["target_s"] > 0
    assert greedy.stats["draft_s"] == 0.0  # greedy never asks the draft
    single = decoders["accept_all"].generate(texts[0], max_new_tokens=24)
    assert single.text == single.texts[0] and single.stats["draft_tokens_kept_per_block"] > 0


def test_a_saved_judge_decodes_at_its_threshold_and_carries_its_notes(toy_world, decoders, tmp_path):
    draft, target, tokenizer = decoders["greedy"].draft, decoders["greedy"].target, decoders["greedy"].tokenizer
    torch.manual_seed(0)
    head = JudgeHead({"tokens": len(TOKEN_FEATURES), "target_hidden": target.config.hidden_size}).eval()
    save_judge(head, tmp_path / "judge.pt", 1.01, {"kl_threshold": 0.5})  # 1.01: it rejects every mismatch
    assert judge_notes(tmp_path / "judge.pt") == {"kl_threshold": 0.5}
    judge = SpeculativeDecoder.from_pretrained(
        str(toy_world / "draft"), str(toy_world / "target"), "judge", str(tmp_path / "judge.pt"), chat_template=False
    )
    texts = [p.text for p in toy_prompts(4, seed=5)]
    assert judge.generate(texts, 24).texts == decoders["standard_sd"].generate(texts, 24).texts

    def keep_every_draft_token(block):  # any decoding.Policy callable works as well as a name
        return torch.ones_like(block.draft_ids, dtype=torch.bool)

    custom = SpeculativeDecoder(draft, target, tokenizer, keep_every_draft_token, chat_template=False)
    assert custom.generate(texts, 24).texts == decoders["accept_all"].generate(texts, 24).texts


def test_bad_settings_stop_with_one_clear_message(decoders, toy_world):
    base = decoders["greedy"]
    models = (base.draft, base.target, base.tokenizer)
    with pytest.raises(SetupError, match="choose among"):
        SpeculativeDecoder(*models, "speculative")
    with pytest.raises(SetupError, match="kl_threshold"):
        SpeculativeDecoder(*models, "kl_below")
    with pytest.raises(SetupError, match="judge"):
        SpeculativeDecoder(*models, "judge", settings=PolicySettings())
    with pytest.raises(SetupError, match="block_size"):
        SpeculativeDecoder(*models, block_size=0)
    with pytest.raises(SetupError, match="is not a file"):
        SpeculativeDecoder.from_pretrained(str(toy_world / "draft"), str(toy_world / "target"), "judge", "nope.pt")
    with pytest.raises(SetupError, match="max_new_tokens"):
        base.generate("12+3=", max_new_tokens=0)
