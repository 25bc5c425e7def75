"""task=prepare: raw prompts -> records, on the embedded default world (spd_lightning/tasks/prepare.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_vllm import FakeVLLM
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import spd_lightning.tasks.prepare as prepare_module
from spd_lightning.data.answers import extract_final_number
from spd_lightning.data.builder import (
    BlockSpec,
    ResponseReader,
    block_starts,
    records_for_prompts,
    strip_eos,
    summarise,
)
from spd_lightning.data.prompts import Prompt
from spd_lightning.data.records import REQUIRED_FIELDS, load_records
from spd_lightning.data.resumable import ResumableJsonl
from spd_lightning.errors import RecordError, SetupError
from spd_lightning.models.lm import greedy_responses
from spd_lightning.tasks.prepare import prepare
from spd_lightning.toy.raw import write_raw_prompts

ROOT = Path(__file__).resolve().parents[2]
# The toy world's records were built from its first prompts drawn with seed 0 (toy.spec.seed).
NUM_PROMPTS = 24


# --- the pure parts: block starts, records from stub backends, the resumable writer ---


class StubBackend:
    """Response [7, 8, 9] + EOS to every prompt; proposes `proposal`; the target's token is always 8."""

    def __init__(self, proposal=(8, 8), fail=False):
        self.proposal, self.fail = list(proposal), fail

    def complete(self, prefixes, max_new_tokens=None):
        return [[7, 8, 9, 1][:max_new_tokens] for _ in prefixes]

    def propose(self, contexts, k):
        return [None if self.fail else self.proposal[:k] for _ in contexts]

    def argmax_along(self, contexts, drafts):
        return [[8] * len(d) for d in drafts]


def stub_records(reference="dataset", stride=1, max_new_tokens=8, draft=None):
    prompts = [Prompt(3, "a", "9"), Prompt(5, "b", "4")]
    spec = BlockSpec(block_size=2, stride=stride, max_new_tokens=max_new_tokens, reference=reference)
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    reader = ResponseReader(1, decode, lambda r, a: r.endswith(a))
    return records_for_prompts(prompts, [[2], [3, 3]], draft or StubBackend(), StubBackend(), spec, reader)


def test_block_starts_and_eos():
    assert list(block_starts(7, 1)) == list(range(7)) and list(block_starts(7, 3)) == [0, 3, 6]
    assert list(block_starts(0, 1)) == []
    assert strip_eos([5, 6, 1], 1) == ([5, 6], False) and strip_eos([5, 6], 1) == ([5, 6], True)


def test_records_from_stub_backends():
    rows, counts = stub_records(draft=StubBackend(proposal=(8, 5)))  # second draft token never matches
    assert [(r["context_ids"], r["prompt_index"]) for r in rows] == [
        ([2], 3),
        ([2, 7], 3),
        ([2, 7, 8], 3),
        ([3, 3], 5),
        ([3, 3, 7], 5),
        ([3, 3, 7, 8], 5),
    ]
    assert rows[0] == {
        "context_ids": [2],
        "prompt_len": 1,
        "draft_ids": [8, 5],
        "target_ids": [8, 8],
        "reference": "9",
        "prompt_index": 3,
    }
    assert (counts.records, counts.blocks, counts.mismatches, counts.target_solves) == (6, 6, 6, 1)
    _, counts = stub_records()  # the draft always agrees: every block is dropped
    assert (counts.records, counts.blocks, counts.blocks_without_mismatch) == (0, 6, 6)
    rows, counts = stub_records(reference="target", stride=2, max_new_tokens=2, draft=StubBackend((5, 5)))
    assert {r["reference"] for r in rows} == {"8"}  # the final number of the capped response "7 8"
    assert [len(r["context_ids"]) - r["prompt_len"] for r in rows] == [0, 0]  # starts 0 (2 is past the end)
    assert counts.responses_capped == 2
    stats = summarise(counts, prompts_skipped=1, block_size=2)
    assert stats["mismatches_per_block"] == 2.0 and stats["prompts_skipped"] == 1 and stats["target_solves"] == 0
    with pytest.raises(SetupError, match="draft .* failed for 6 of 6"):
        stub_records(draft=StubBackend(fail=True))


def test_resumable_writer_commits_truncates_and_refuses(tmp_path):
    writer = ResumableJsonl(tmp_path, {"k": 4, "model": {"path": "a"}})
    writer.commit([{"x": 1}, {"x": 2}], done=2, counts={"records": 2})
    with (tmp_path / "records.jsonl").open("a") as f:
        f.write('{"x": 3}\n{"x"')  # rows of a chunk that never committed
    again = ResumableJsonl(tmp_path, {"k": 4, "model": {"path": "a"}})
    assert (again.done, again.counts) == (2, {"records": 2})
    assert (tmp_path / "records.jsonl").read_text() == '{"x": 1}\n{"x": 2}\n'
    with pytest.raises(SetupError, match=r"model.path: 'a' -> 'b'.*start over: HINT"):
        ResumableJsonl(tmp_path, {"k": 4, "model": {"path": "b"}}, fix_hint="HINT")
    (tmp_path / "records.jsonl").write_text("")
    with pytest.raises(SetupError, match="shorter"):
        ResumableJsonl(tmp_path, {"k": 4, "model": {"path": "a"}})
    fresh = ResumableJsonl(tmp_path, {"k": 5}, overwrite=True)
    assert fresh.done == 0 and (tmp_path / "records.jsonl").read_text() == ""


# --- task=prepare on the embedded default world ---


@pytest.fixture
def run_prepare(compose_train, toy_world: Path, tmp_path: Path):
    """run_prepare(raw, *overrides, out=...) -> the output directory, after prepare(cfg)."""

    def _run(raw: Path, *overrides: str, out: Path | None = None) -> Path:
        out = out or tmp_path / "out"
        cfg = compose_train(
            [
                "task=prepare",
                f"toy.out={toy_world}",
                f"data.raw={raw}",
                f"prepare.out={out}",
                "prepare.max_new_tokens=12",  # as the toy build: responses are ~8 tokens
                "prepare.prompts_per_chunk=8",
                *overrides,
            ],
            tmp_path,
        )
        prepare(cfg)
        return out

    return _run


@pytest.fixture(scope="module")
def toy_raw(tmp_path_factory) -> Path:
    return write_raw_prompts(tmp_path_factory.mktemp("raw") / "toy.jsonl", NUM_PROMPTS, seed=0)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def spec_fields(rows: list[dict]) -> list[dict]:
    return [{k: r[k] for k in REQUIRED_FIELDS} for r in rows]


def test_reproduces_the_toy_worlds_records(run_prepare, toy_raw, toy_world, toy_tokenizer):
    out = run_prepare(toy_raw)
    rows = read_jsonl(out / "records.jsonl")
    assert all(set(r) == {*REQUIRED_FIELDS, "prompt_index"} for r in rows)
    expected = read_jsonl(toy_world / "records.jsonl")
    assert len(rows) > 5 * NUM_PROMPTS
    assert spec_fields(rows) == expected[: len(rows)]
    # ... and the next toy record belongs to the next prompt: none of the last prompt's were missed.
    last = json.loads(toy_raw.read_text().splitlines()[-1])["question"]
    nxt = expected[len(rows)]
    assert nxt["context_ids"][: nxt["prompt_len"]] != toy_tokenizer(last).input_ids
    assert sorted({r["prompt_index"] for r in rows}) == list(range(1, NUM_PROMPTS + 1))  # line numbers
    stats = json.loads((out / "stats.json").read_text())
    assert stats["records"] == len(rows) and stats["prompts"] == NUM_PROMPTS and stats["prompts_skipped"] == 0
    assert stats["blocks"] == len(rows) + stats["blocks_without_mismatch"]
    mismatches = sum(d != t for r in rows for d, t in zip(r["draft_ids"], r["target_ids"]))
    assert stats["mismatches_per_block"] == pytest.approx(mismatches / len(rows))
    assert stats["target_solves"] >= 0.9 and stats["responses_capped"] == 0
    assert len(load_records(out / "records.jsonl")) == len(rows)  # the training loader reads it


def test_stride_keeps_every_nth_block_start(run_prepare, toy_raw, tmp_path):
    every = read_jsonl(run_prepare(toy_raw, "data.limit=6", out=tmp_path / "every") / "records.jsonl")
    third = run_prepare(toy_raw, "data.limit=6", "prepare.stride=3", out=tmp_path / "third")
    third = read_jsonl(third / "records.jsonl")
    start = [len(r["context_ids"]) - r["prompt_len"] for r in third]
    assert third and all(s % 3 == 0 for s in start)
    assert spec_fields(third) == spec_fields([r for r in every if (len(r["context_ids"]) - r["prompt_len"]) % 3 == 0])


def test_interrupted_run_resumes_without_duplicates_or_gaps(run_prepare, toy_raw, tmp_path, monkeypatch):
    small = ("data.limit=12", "prepare.prompts_per_chunk=4")
    whole = run_prepare(toy_raw, *small, out=tmp_path / "whole")
    real = prepare_module.records_for_prompts
    calls = []

    def crash_on_third_chunk(*args, **kwargs):
        calls.append(len(args[0]))
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a Ctrl-C in the middle of the third chunk
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "records_for_prompts", crash_on_third_chunk)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_prepare(toy_raw, *small, out=out)
    assert json.loads((out / "progress.json").read_text())["done"] == 8  # two chunks of 4 committed
    with (out / "records.jsonl").open("a") as f:
        f.write('{"context_ids": [38, 39')  # and a write torn by the crash
    calls.clear()
    run_prepare(toy_raw, *small, out=out)
    assert calls == [4]  # only the last chunk was prepared again
    assert (out / "records.jsonl").read_bytes() == (whole / "records.jsonl").read_bytes()
    assert (out / "stats.json").read_text() == (whole / "stats.json").read_text()
    calls.clear()
    run_prepare(toy_raw, *small, out=out)  # a finished run: nothing to do, nothing changes
    assert calls == []
    assert (out / "records.jsonl").read_bytes() == (whole / "records.jsonl").read_bytes()


def test_rerun_with_other_settings_refuses_unless_overwrite(run_prepare, toy_raw, tmp_path):
    out = run_prepare(toy_raw, "data.limit=3")
    with pytest.raises(SetupError, match=r"block_size: 4 -> 3.*prepare.overwrite=true"):
        run_prepare(toy_raw, "data.limit=3", "prepare.block_size=3")
    other = tmp_path / "other.jsonl"
    other.write_text("".join(toy_raw.read_text().splitlines(keepends=True)[3:6]))
    with pytest.raises(SetupError, match="raw_sha256"):
        run_prepare(other, "data.limit=3")
    run_prepare(toy_raw, "data.limit=3", "prepare.block_size=3", "prepare.overwrite=true")
    assert {len(r["draft_ids"]) for r in read_jsonl(out / "records.jsonl")} == {3}
    (out / "progress.json").unlink()
    with pytest.raises(SetupError, match="cannot be resumed"):
        run_prepare(toy_raw, "data.limit=3", "prepare.block_size=3")


def test_reference_target_is_the_targets_final_number(run_prepare, toy_raw, toy_world, tmp_path):
    questions = tmp_path / "questions.jsonl"  # no answers at all
    answers = {}
    with questions.open("w") as f:
        for line in toy_raw.read_text().splitlines()[:8]:
            obj = json.loads(line)
            answers[obj["question"]] = obj["answer"]
            f.write(json.dumps({"question": obj["question"]}) + "\n")
    with pytest.raises(SetupError, match="prepare.reference=target"):
        run_prepare(questions, "data.answer_key=null")
    out = run_prepare(questions, "data.answer_key=null", "prepare.reference=target")
    rows = read_jsonl(out / "records.jsonl")
    assert rows and all(r["reference"].isdigit() for r in rows)
    # Each record's reference is the final number of the target's own greedy response to its prompt.
    tokenizer = AutoTokenizer.from_pretrained(toy_world / "target")
    target = AutoModelForCausalLM.from_pretrained(toy_world / "target")
    lines = questions.read_text().splitlines()
    prompts = [tokenizer(json.loads(line)["question"]).input_ids for line in lines]
    responses = greedy_responses(target, prompts, 12, tokenizer.eos_token_id, tokenizer.pad_token_id)
    own = [extract_final_number(tokenizer.decode(r, skip_special_tokens=True)) for r in responses]
    assert [r["reference"] for r in rows] == [own[r["prompt_index"] - 1] for r in rows]
    # ... which is not always the dataset's answer: the shipped target misses one of these 8 sums.
    assert sum(own[i] != answers[json.loads(line)["question"]] for i, line in enumerate(lines)) == 1
    stats = json.loads((out / "stats.json").read_text())
    assert stats["target_solves"] is None and stats["prompts_without_reference"] == 0


def test_malformed_lines_skipped_with_line_numbers_or_fatal(run_prepare, toy_raw, tmp_path, caplog):
    good = toy_raw.read_text().splitlines()[:4]
    raw = tmp_path / "messy.jsonl"
    raw.write_text("\n".join([good[0], "{not json", good[1], '{"answer": "3"}', good[2], good[3]]) + "\n")
    with caplog.at_level("WARNING"):
        out = run_prepare(raw)
    assert f"{raw}:2: not valid JSON" in caplog.text and f"{raw}:4: field 'question'" in caplog.text
    stats = json.loads((out / "stats.json").read_text())
    assert stats["prompts_skipped"] == 2 and stats["prompts"] == 4
    assert sorted({r["prompt_index"] for r in read_jsonl(out / "records.jsonl")}) == [1, 3, 5, 6]
    with pytest.raises(RecordError, match=rf"{raw}:2: not valid JSON"):
        run_prepare(raw, "data.on_error=fail", out=tmp_path / "fail")


def test_vllm_draft_and_target_give_the_same_records(run_prepare, toy_raw, toy_world, fake_vllm, tmp_path):
    local = run_prepare(toy_raw, "data.limit=8", out=tmp_path / "local")
    expected = (local / "records.jsonl").read_bytes()
    with FakeVLLM(toy_world / "draft", served_model="toy-draft") as draft_server:
        served = ["draft=vllm", f"draft.url={draft_server.url}", "draft.model=toy-draft"]
        target = ["target=vllm", f"target.url={fake_vllm.url}", "target.model=toy-target"]
        both = run_prepare(toy_raw, "data.limit=8", *served, *target, out=tmp_path / "both")
        assert (both / "records.jsonl").read_bytes() == expected
        bodies = draft_server.completion_bodies
        assert bodies and all(b["ignore_eos"] is True and b["max_tokens"] == 4 for b in bodies)
    assert any(b.get("prompt_logprobs") == 1 and b["max_tokens"] == 1 for b in fake_vllm.completion_bodies)
    mixed = run_prepare(toy_raw, "data.limit=8", *target, out=tmp_path / "mixed")  # local draft, vLLM target
    assert (mixed / "records.jsonl").read_bytes() == expected


def test_failing_server_stops_with_a_resume_hint(run_prepare, toy_raw, fake_vllm, tmp_path):
    fake_vllm.fail_after(0, status=500)
    target = ["target=vllm", f"target.url={fake_vllm.url}", "target.model=toy-target", "target.retries=0"]
    with pytest.raises(SetupError, match="rerun the same command to resume"):
        run_prepare(toy_raw, "data.limit=4", *target)
    assert json.loads((tmp_path / "out" / "progress.json").read_text())["done"] == 0


def test_draft_with_another_vocabulary_is_one_clear_error(run_prepare, toy_raw, tmp_path):
    other = tmp_path / "other_draft"
    config = LlamaConfig(
        vocab_size=20,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(other)
    with pytest.raises(SetupError) as err:
        run_prepare(toy_raw, "data.limit=2", f"draft.model_path={other}")
    msg = str(err.value)
    assert "tokenizer mismatch: the draft model has 20 embeddings" in msg
    assert str(other) in msg and "target" in msg and "model.tokenizer" in msg


def test_draft_vllm_without_url_names_the_draft_group(run_prepare, toy_raw):
    with pytest.raises(SetupError, match=r"draft=vllm needs draft.url"):
        run_prepare(toy_raw, "data.limit=2", "draft=vllm")


@pytest.mark.cli
def test_end_to_end_prepare_then_train(toy_world, tmp_path):
    raw = write_raw_prompts(tmp_path / "prompts.jsonl", 20)
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(ROOT / "run.py"), f"toy.out={toy_world}", *args]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    out = tmp_path / "prepared"
    proc = run("task=prepare", f"data.raw={raw}", f"prepare.out={out}", f"hydra.run.dir={tmp_path / 'prep'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "records from 20 prompts" in proc.stdout + proc.stderr
    assert json.loads((out / "stats.json").read_text())["prompts"] == 20
    train_args = [
        "data=jsonl",
        f"data.path={out / 'records.jsonl'}",
        "data.val_fraction=0.3",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "validate_before_fit=false",
        f"hydra.run.dir={tmp_path / 'train'}",
    ]
    proc = run(*train_args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "train" / "summary.json").read_text())["train/steps"] == 3
