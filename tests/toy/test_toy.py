"""The embedded default world: tokenizer, models and records (SPEC.md, "The embedded default world")."""

import hashlib
import json
import re
import shutil
import time

import pytest
from transformers import AutoConfig, AutoTokenizer

from spd_lightning.data.records import check_vocab, load_records
from spd_lightning.errors import SetupError
from spd_lightning.toy import build
from spd_lightning.toy.build import MANIFEST, SHIPPED_WORLD, LMSpec, ToyWorldSpec, build_toy_world, file_digests
from spd_lightning.toy.task import FILLER_SLOTS
from spd_lightning.toy.tokenizer import build_tokenizer
from spd_lightning.training.datamodule import RecordDataModule

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


# --- the shipped world: the same bytes, records and split on every machine ---

# sha256 of manifest.json, which holds the sha256 of every other file of the world.
SHIPPED_MANIFEST_SHA256 = "9beca76211e3cd94b9cb0ad1b6858e4f32f70479ecc34b92fe87b0e4ecf49ae4"
# sha256 over the records' fields in file order: the records themselves, whatever their JSON layout.
SHIPPED_RECORDS_FINGERPRINT = "673594032cb065cfa0ff7bd21df0bfdd5b76f0b758629c3579c2d4876435e570"


def test_shipped_world_is_pinned(toy_world):
    assert toy_world == SHIPPED_WORLD
    assert hashlib.sha256((toy_world / MANIFEST).read_bytes()).hexdigest() == SHIPPED_MANIFEST_SHA256
    assert file_digests(toy_world) == json.loads((toy_world / MANIFEST).read_text())
    fingerprint = hashlib.sha256()
    lines = (toy_world / "records.jsonl").read_text().splitlines()
    for line in lines:
        r = json.loads(line)
        fields = [r["context_ids"], r["prompt_len"], r["draft_ids"], r["target_ids"], r["reference"]]
        fingerprint.update(json.dumps(fields).encode())
    assert fingerprint.hexdigest() == SHIPPED_RECORDS_FINGERPRINT
    assert len(lines) == 4401
    assert json.loads((toy_world / "stats.json").read_text())["prompts"] == 580


def test_the_record_builder_of_task_prepare_rebuilds_the_shipped_records_byte_for_byte(toy_world, tokenizer):
    from transformers import AutoModelForCausalLM

    from spd_lightning.toy.build import default_spec
    from spd_lightning.toy.records import build_records

    spec = default_spec()
    draft, target = (AutoModelForCausalLM.from_pretrained(toy_world / name) for name in ("draft", "target"))
    records = build_records(draft, target, tokenizer, spec.num_prompts, spec.block_size, spec.seed)
    assert "".join(json.dumps(r) + "\n" for r in records) == (toy_world / "records.jsonl").read_text()


def test_shipped_world_splits_the_same_everywhere(toy_world):
    data = RecordDataModule(path=str(toy_world / "records.jsonl"), seed=0)
    data.setup("fit")
    assert (len(data.train_records), len(data.val_records)) == (3988, 413)


def test_shipped_world_is_checked_not_rebuilt(toy_world):
    files = sorted(p for p in toy_world.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    start = time.perf_counter()
    assert build_toy_world(toy_world, verbose=False) == toy_world
    assert time.perf_counter() - start < 2.0  # no training happened
    assert sorted(p for p in toy_world.rglob("*") if p.is_file()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_other_settings_on_the_shipped_world_say_how_to_build_them(toy_world):
    spec = build.default_spec()
    spec.num_prompts = 10
    with pytest.raises(SetupError, match=r"toy.spec differs .*toy.out=\.cache/toy"):
        build_toy_world(toy_world, spec, verbose=False)


def test_a_damaged_shipped_world_is_named(toy_world, tmp_path, monkeypatch):
    copy = tmp_path / "world"
    shutil.copytree(toy_world, copy)
    monkeypatch.setattr(build, "SHIPPED_WORLD", copy)
    build_toy_world(copy, verbose=False)  # intact
    with (copy / "target" / "model.safetensors").open("r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(SetupError, match=r"damaged \(target/model.safetensors differ.*git checkout"):
        build_toy_world(copy, verbose=False)


# --- a world built from scratch (python -m spd_lightning.toy.build) ---

TINY_SPEC = ToyWorldSpec(
    target=LMSpec(hidden_size=64, num_layers=1, num_heads=2, steps=20, lr=3e-3, batch_size=16, seed=0),
    draft=LMSpec(hidden_size=64, num_layers=1, num_heads=2, steps=5, lr=3e-3, batch_size=16, seed=1),
    num_prompts=16,
)


def test_a_world_built_from_scratch_is_whole_and_reused(tmp_path):
    out = build_toy_world(tmp_path / "world", TINY_SPEC, verbose=False)
    for name in ("records.jsonl", "stats.json", "build.json", MANIFEST, "target/config.json", "draft/tokenizer.json"):
        assert (out / name).is_file(), name
    assert not (tmp_path / "world.partial").exists()
    assert json.loads((out / MANIFEST).read_text()) == file_digests(out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert build_toy_world(out, TINY_SPEC, verbose=False) == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # reused, not rebuilt
