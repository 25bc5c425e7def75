"""The embedded default world: tokenizer, models and records (SPEC.md, "The embedded default world")."""

import json
import re
import time

import pytest
from transformers import AutoConfig, AutoTokenizer

from spd_lightning.data import check_vocab, load_records
from spd_lightning.toy.build import build_toy_world
from spd_lightning.toy.task import FILLER_SLOTS
from spd_lightning.toy.tokenizer import build_tokenizer

TEXT = "Q: 37+45= A: so the total is 82."
FILLER_TOKENS = {f" {w}" for slot in FILLER_SLOTS for w in slot}
DIGIT_TOKENS = {str(d) for d in range(10)} | {f" {d}" for d in range(10)}


@pytest.fixture(scope="module")
def tokenizer(toy_world):
    return AutoTokenizer.from_pretrained(toy_world / "target")


@pytest.fixture(scope="module")
def records(toy_world):
    return load_records(toy_world / "records.jsonl")


def test_tokenizer_round_trips_task_text():
    tok = build_tokenizer()
    ids = tok(TEXT).input_ids
    assert tok.decode(ids) == TEXT
    assert tok.unk_token_id not in ids  # every piece of the task is in the vocabulary
    assert tok.decode(tok(" 82").input_ids) == " 82"  # not " 8 2"
    assert tok.convert_ids_to_tokens(tok(" 82").input_ids) == [" 8", "2"]  # digits are single tokens
    assert " so" in tok.convert_ids_to_tokens(ids)  # words keep their leading space


def test_saved_tokenizer_matches_built_one(tokenizer, toy_world):
    built = build_tokenizer()
    for text in (TEXT, "Q: 0+99= A: well our sum gives 99.", " 1 2 3"):
        assert tokenizer(text).input_ids == built(text).input_ids
        assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.eos_token_id == built.eos_token_id and tokenizer.pad_token_id == built.pad_token_id
    # draft and target share one vocabulary
    draft = AutoTokenizer.from_pretrained(toy_world / "draft")
    assert draft.get_vocab() == tokenizer.get_vocab()


def test_models_fit_tokenizer_and_head_dim(toy_world, tokenizer):
    target = AutoConfig.from_pretrained(toy_world / "target")
    assert target.hidden_size // target.num_attention_heads >= 32  # vLLM needs head_dim >= 32
    assert target.hidden_size % target.num_attention_heads == 0
    assert 2 <= target.num_hidden_layers <= 4
    assert target.eos_token_id == tokenizer.eos_token_id
    for name in ("target", "draft"):
        assert AutoConfig.from_pretrained(toy_world / name).vocab_size == len(tokenizer)
    draft = AutoConfig.from_pretrained(toy_world / "draft")
    # the draft is the weaker model
    assert draft.hidden_size * draft.num_hidden_layers < target.hidden_size * target.num_hidden_layers


def test_records_load_and_have_mismatches(records, tokenizer):
    assert len(records) > 100
    assert {r.block_size for r in records} == {4}
    assert all(any(d != t for d, t in zip(r.draft_ids, r.target_ids)) for r in records)
    check_vocab(records, len(tokenizer), "toy records")


def test_records_reference_is_the_sum(records, tokenizer):
    # the prompt is "Q: a+b= A:" and the reference is a+b
    for r in records[::50]:
        prompt = tokenizer.decode(r.context_ids[: r.prompt_len])
        m = re.fullmatch(r"Q: (\d+)\+(\d+)= A:", prompt)
        assert m, prompt
        assert r.reference == str(int(m[1]) + int(m[2]))


def test_records_hold_both_kinds_of_mismatch(records, tokenizer):
    kinds = {"filler": 0, "digit": 0}
    for r in records:
        for d, t in zip(r.draft_ids, r.target_ids):
            if d == t:
                continue
            dt, tt = tokenizer.convert_ids_to_tokens([d, t])
            if dt in FILLER_TOKENS and tt in FILLER_TOKENS:
                kinds["filler"] += 1  # a synonym: harmless
            elif dt in DIGIT_TOKENS and tt in DIGIT_TOKENS:
                kinds["digit"] += 1  # another number: harmful
    assert kinds["filler"] >= 10 and kinds["digit"] >= 10, kinds


def test_stats_match_records(toy_world, records):
    stats = json.loads((toy_world / "stats.json").read_text())
    assert stats["records"] == len(records)
    assert stats["prompts"] == len({tuple(r.context_ids[: r.prompt_len]) for r in records})


def test_build_is_a_noop_when_built(toy_world):
    files = sorted(p for p in toy_world.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    start = time.perf_counter()
    assert build_toy_world(toy_world, verbose=False) == toy_world
    assert time.perf_counter() - start < 2.0  # no training happened
    assert sorted(p for p in toy_world.rglob("*") if p.is_file()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == before
