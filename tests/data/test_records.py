"""Records: loading with clear errors, the split by prompt, batching, the DataModule (SPEC.md, "One record")."""

import json
import random

import pytest
import torch

from spd_lightning.data.records import (
    Record,
    RecordBatch,
    RecordError,
    check_vocab,
    collate_records,
    load_records,
    split_by_prompt,
)
from spd_lightning.training.datamodule import RecordDataModule


def rec(**over) -> dict:
    """A valid record dict (K=2); keyword arguments override fields."""
    r = {"context_ids": [5, 6, 7], "prompt_len": 2, "draft_ids": [8, 9], "target_ids": [8, 4], "reference": "12"}
    r.update(over)
    return r


def write_lines(path, lines) -> str:
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_valid_file_loads(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", [json.dumps(rec()), json.dumps(rec(reference="7"))])
    records = load_records(path)
    assert len(records) == 2
    assert records[0] == Record([5, 6, 7], 2, [8, 9], [8, 4], "12")
    assert records[1].reference == "7" and records[0].block_size == 2


BAD_LINES = {
    "not_json": ("{not json", None),
    "not_object": ("[1, 2, 3]", None),
    "missing_field": (json.dumps({k: v for k, v in rec().items() if k != "target_ids"}), "target_ids"),
    "non_int_ids": (json.dumps(rec(context_ids=[1, "2", 3])), "context_ids"),
    "float_ids": (json.dumps(rec(draft_ids=[1.0, 2])), "draft_ids"),
    "bool_ids": (json.dumps(rec(target_ids=[True, 2])), "target_ids"),
    "negative_id": (json.dumps(rec(draft_ids=[8, -1])), "draft_ids"),
    "empty_list": (json.dumps(rec(context_ids=[])), "context_ids"),
    "prompt_len_0": (json.dumps(rec(prompt_len=0)), "prompt_len"),
    "prompt_len_too_big": (json.dumps(rec(prompt_len=4)), "prompt_len"),
    "prompt_len_bool": (json.dumps(rec(prompt_len=True)), "prompt_len"),
    "prompt_len_str": (json.dumps(rec(prompt_len="2")), "prompt_len"),
    "k_differs": (json.dumps(rec(target_ids=[8, 4, 1])), "target_ids"),
    "reference_not_str": (json.dumps(rec(reference=12)), "reference"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_malformed_line_names_file_line_and_field(tmp_path, case):
    line, field = BAD_LINES[case]
    # the bad line is line 3, after a good line and a blank line: line numbers count blank lines
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(rec()), "", line])
    with pytest.raises(RecordError) as err:
        load_records(path)
    msg = str(err.value)
    assert f"{path}:3" in msg
    if field is not None:
        assert field in msg


def test_not_json_and_not_object_say_so(tmp_path):
    with pytest.raises(RecordError, match="not valid JSON"):
        load_records(write_lines(tmp_path / "a.jsonl", ["{oops"]))
    with pytest.raises(RecordError, match="JSON object"):
        load_records(write_lines(tmp_path / "b.jsonl", ['"a string"']))


def test_block_size_must_agree_with_earlier_lines(tmp_path):
    # each line is valid alone; the second has K=3 while the first has K=2
    second = rec(draft_ids=[1, 2, 3], target_ids=[1, 2, 4])
    path = write_lines(tmp_path / "k.jsonl", [json.dumps(rec()), json.dumps(second)])
    with pytest.raises(RecordError, match=r"K=3.*K=2") as err:
        load_records(path)
    assert f"{path}:2" in str(err.value) and "draft_ids" in str(err.value)


def test_empty_file_and_missing_file(tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(RecordError, match="no records") as err:
        load_records(empty)
    assert empty in str(err.value)
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(RecordError, match="does not exist") as err:
        load_records(missing)
    assert str(missing) in str(err.value)


def test_blank_lines_are_skipped(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", ["", json.dumps(rec()), "  ", "", json.dumps(rec(reference="x"))])
    assert [r.reference for r in load_records(path)] == ["12", "x"]


def test_check_vocab_names_record_and_field():
    records = [Record([1, 2], 1, [3], [4], "a"), Record([1, 2], 1, [3], [10], "a")]
    check_vocab(records, vocab_size=11, source="src.jsonl")  # 10 < 11: fine
    with pytest.raises(RecordError) as err:
        check_vocab(records, vocab_size=10, source="src.jsonl")
    msg = str(err.value)
    assert "src.jsonl" in msg and "record 1" in msg and "target_ids" in msg and "10" in msg


def synthetic(num_prompts: int, blocks_per_prompt: int = 3) -> list[Record]:
    rng = random.Random(0)
    out = []
    for p in range(num_prompts):
        prompt = [p % 97, p // 97, rng.randint(0, 50)]
        for s in range(blocks_per_prompt):  # same prompt, growing response
            out.append(Record(prompt + [9] * s, len(prompt), [1, 2], [1, 3], str(p)))
    return out


def prompt_key(r: Record) -> tuple:
    return tuple(r.context_ids[: r.prompt_len])


def test_split_is_deterministic_and_seed_dependent():
    records = synthetic(200)
    a, b = split_by_prompt(records, 0.3, seed=1), split_by_prompt(records, 0.3, seed=1)
    assert a == b
    assert split_by_prompt(records, 0.3, seed=2)[1] != a[1]  # another seed, another split
    assert len(a[0]) + len(a[1]) == len(records)


def test_split_keeps_each_prompt_on_one_side():
    train, val = split_by_prompt(synthetic(300), 0.25, seed=0)
    assert train and val
    assert not {prompt_key(r) for r in train} & {prompt_key(r) for r in val}


@pytest.mark.parametrize("fraction", [0.1, 0.5])
def test_split_roughly_honours_fraction(fraction):
    records = synthetic(1000, blocks_per_prompt=1)
    _, val = split_by_prompt(records, fraction, seed=0)
    assert abs(len(val) / len(records) - fraction) < 0.05


def test_split_zero_fraction_and_out_of_range():
    records = synthetic(10)
    assert split_by_prompt(records, 0.0, seed=0) == (records, [])
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="val_fraction"):
            split_by_prompt(records, bad, seed=0)


def test_collate_right_pads():
    records = [Record([1, 2, 3], 2, [4, 5], [4, 6], "a"), Record([7], 1, [8, 9], [10, 9], "b")]
    batch = collate_records(records, pad_id=0)
    assert isinstance(batch, RecordBatch) and len(batch) == 2
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch.context_len.tolist() == [3, 1]
    assert batch.draft_ids.tolist() == [[4, 5], [8, 9]]
    assert batch.target_ids.tolist() == [[4, 6], [10, 9]]
    assert batch.input_ids.dtype == batch.draft_ids.dtype == batch.target_ids.dtype == torch.long
    # the draft tokens sit right after each context
    for b in range(2):
        c = int(batch.context_len[b])
        assert batch.input_ids[b, c : c + 2].tolist() == batch.draft_ids[b].tolist()
    assert collate_records(records, pad_id=42).input_ids[1, -1] == 42


def write_records(path, records: list[Record]) -> str:
    return write_lines(path, [json.dumps(r.__dict__) for r in records])


def test_datamodule_splits_and_batches(tmp_path):
    records = synthetic(100)
    dm = RecordDataModule(write_records(tmp_path / "r.jsonl", records), val_fraction=0.2, batch_size=4, seed=0)
    dm.setup("fit")
    assert len(dm.train_records) + len(dm.val_records) == len(records)
    assert not {prompt_key(r) for r in dm.train_records} & {prompt_key(r) for r in dm.val_records}
    assert dm.block_size == 2
    batches = list(dm.train_dataloader())
    assert batches and all(isinstance(b, RecordBatch) and len(b) == 4 for b in batches)
    assert batches[0].input_ids.shape[0] == 4
    val = next(iter(dm.val_dataloader()))
    assert isinstance(val, RecordBatch) and len(val) == min(64, len(dm.val_records))


def test_datamodule_val_path_and_cap(tmp_path):
    train_path = write_records(tmp_path / "train.jsonl", synthetic(10))
    val_path = write_records(tmp_path / "val.jsonl", synthetic(20)[:30])
    dm = RecordDataModule(train_path, val_path=val_path, max_val_records=7, batch_size=2)
    dm.setup()
    assert len(dm.train_records) == 30  # the whole train file: no split with a val file
    assert len(dm.val_records) == 7  # capped
    assert dm.val_records == load_records(val_path)[:7]


def test_datamodule_empty_side_raises(tmp_path):
    path = write_records(tmp_path / "r.jsonl", synthetic(1))  # one prompt: one side must be empty
    dm = RecordDataModule(path, val_fraction=0.5)
    with pytest.raises(RecordError, match="split left") as err:
        dm.setup()
    assert path in str(err.value)
    dm0 = RecordDataModule(write_records(tmp_path / "s.jsonl", synthetic(50)), val_fraction=0.0)
    with pytest.raises(RecordError, match="0 val"):
        dm0.setup()


def test_datamodule_too_few_train_records_for_one_batch(tmp_path):
    # drop_last would silently give an epoch of zero steps.
    path = write_records(tmp_path / "train.jsonl", synthetic(3))
    val = write_records(tmp_path / "val.jsonl", synthetic(2))
    dm = RecordDataModule(path, val_path=val, batch_size=64)
    with pytest.raises(RecordError, match="batch_size=64"):
        dm.setup()


def test_an_out_of_vocabulary_id_is_reported_at_its_line_in_the_file(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", [json.dumps(rec()), "", json.dumps(rec(target_ids=[5, 900]))])
    records = load_records(path)
    with pytest.raises(RecordError) as err:
        check_vocab(records[1:], vocab_size=100, source=str(path))  # after a split, the index means nothing
    assert str(err.value).startswith(f"{path}:3: field 'target_ids' holds token id 900")


def test_a_records_file_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(json.dumps(rec()).encode() + b"\n" + b'{"context_ids": [1], "reference": "\xff\xfe"}\n')
    with pytest.raises(RecordError) as err:
        load_records(path)
    assert str(err.value).startswith(f"{path}:2: not UTF-8 text (byte 0xff")
    assert "(data.path)" in str(err.value)
