"""bench/speed.py's code paths on the default world (toy-sized; its figures come from the real
pair, never from CI), and the pieces it is built from."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from torch import nn

from spd_lightning.models.vocab_head import LEFT_OUT, RestrictedHead, frequent_tokens, restrict_output_layer
from spd_lightning.targets.local import load_causal_lm
from spd_lightning.tasks.speed import (
    CallCounter,
    OnePrompt,
    Run,
    RunStore,
    bytes_read_per_token,
    greedy_bound_tps,
    interleaved,
    memory_bandwidth_gbs,
    weight_bytes,
)
from spd_lightning.toy.raw import toy_prompts

ROOT = Path(__file__).resolve().parents[2]


def test_a_restricted_head_scores_the_kept_tokens_as_the_full_head_and_leaves_out_the_rest():
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    keep = torch.tensor([3, 7, 20, 49])
    restricted = RestrictedHead(head, keep)
    hidden = torch.randn(2, 5, 16)  # [B, T, H]
    with torch.no_grad():
        full, small = head(hidden), restricted(hidden)  # [B, T, V] each
    assert small.shape == full.shape
    assert torch.allclose(small[..., keep], full[..., keep])
    left_out = torch.ones(50, dtype=torch.bool)
    left_out[keep] = False
    assert (small[..., left_out] == LEFT_OUT).all()
    assert torch.isfinite(torch.log_softmax(small, -1)).all()  # the KL rule's logs stay finite


def test_frequent_tokens_keep_the_most_common_ids_and_the_end_of_sequence():
    kept = frequent_tokens([[5, 5, 5, 2], [2, 9], [5, 1]], 2, always={0})
    assert kept.tolist() == [0, 2, 5]


def test_standard_sd_with_a_restricted_draft_head_stays_lossless(sd_with_changed_draft, toy_tokenizer):
    def restrict(draft, prompts):
        restrict_output_layer(draft, frequent_tokens(prompts, 8, always={toy_tokenizer.eos_token_id}))

    greedy, full, small = sd_with_changed_draft(restrict)
    assert [g.response_ids for g in small] == [g.response_ids for g in greedy] == [g.response_ids for g in full]
    # Fewer tokens to propose: fewer kept, never a token outside the head (kept ones are the target's own).
    assert sum(g.accepted_draft_tokens for g in small) < sum(g.accepted_draft_tokens for g in full)


def test_the_bound_and_the_store():
    bandwidth = memory_bandwidth_gbs(gib=0.0625, repeats=2)
    assert min(bandwidth.values()) > 0.1 and set(bandwidth) == {"copy", "read", "gemv"}
    model = nn.Linear(10, 10)
    assert weight_bytes(model) == 110 * 4 and weight_bytes(model, torch.bfloat16) == 110 * 2
    assert greedy_bound_tps(20.0, 2 * 10**9) == 10.0


@pytest.mark.parametrize("tied", [False, True])
def test_a_greedy_token_reads_one_row_of_an_untied_input_embedding(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)  # fmt: skip
    model = LlamaForCausalLM(config)
    table = 100 * 8 * 4  # the input embedding's bytes in float32
    expected = weight_bytes(model) if tied else weight_bytes(model) - table + 8 * 4
    assert bytes_read_per_token(model) == expected
    assert bytes_read_per_token(model, torch.bfloat16) == expected // 2


def test_a_stored_run_is_not_made_again(tmp_path):
    store, made = RunStore(tmp_path), []

    def make() -> Run:
        made.append(1)
        return Run([[1, 2, 3]], 2.0, target_calls=2)

    assert store.get("greedy_b1", make).tokens_per_s == 1.5
    assert store.get("greedy_b1", make).target_calls == 2 and len(made) == 1


def test_interleaved_methods_take_turns_prompt_by_prompt_and_keep_their_own_time(tmp_path):
    log, counter = [], CallCounter(nn.Linear(1, 1))

    def method(name: str, calls: int) -> OnePrompt:
        def make(prompt: list[int], max_new_tokens: int) -> tuple[list[int], int]:
            log.append((name, len(prompt)))
            counter.calls += calls
            return prompt[:max_new_tokens], 1

        return make

    prompts = [[1] * 20, [2] * 20, [3] * 20]
    runs = interleaved({"a": method("a", 1), "b": method("b", 3)}, prompts, 5, counter)
    # One short warm-up call each, then a-b, b-a, a-b: drift over time hits both alike.
    assert log == [("a", 16), ("b", 16), ("a", 20), ("b", 20), ("b", 20), ("a", 20), ("a", 20), ("b", 20)]
    assert runs["a"].rows == [[1] * 5, [2] * 5, [3] * 5] and runs["b"].target_calls == 9 and runs["a"].kept == 3
    store = RunStore(tmp_path)
    store.path("a_b1").write_text(json.dumps(asdict(Run([[7]], 1.0))) + "\n")
    log.clear()
    again = store.get_interleaved({"a": method("a", 1), "b": method("b", 1)}, prompts[:1], 5, counter)
    assert again["a"].rows == [[7]] and {name for name, _ in log} == {"b"}  # only the missing one is made
    assert store.load("b_b1").rows == [[1] * 5]


def test_the_bench_runs_every_local_stage_on_the_default_world(toy_world, tmp_path):
    data = tmp_path / "gsm8k"
    data.mkdir()
    for split, seed in (("test", 1), ("train", 2)):
        lines = [json.dumps({"question": p.text, "answer": "#### 1"}) for p in toy_prompts(20, seed=seed)]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--pair", str(toy_world), "--gsm8k", str(data), "--skip", "0", "--prompts", "2", "--batch-prompts", "4",
            "--batch-sizes", "1", "4", "--max-new-tokens", "12", "--vllm", "--judge", str(tmp_path / "none.pt"),
            "--draft-vocab", "16", "--out", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "speed.py"), *args], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    for key in ("sd_tps=", "hf_assisted_k_tps=", "hf_greedy_tps=", "vllm_sd_tps=nan", "vllm_tps=nan", "sd_tps_b8=",
                "vllm_sd_tps_b8=nan", "greedy_limit_tps=", "greedy_tps="):  # fmt: skip
        assert key in last, last
    out = tmp_path / "out"
    assert (out / "speed_batch.png").stat().st_size > 10_000 and "ours: greedy, bfloat16" in (
        out / "speed.md"
    ).read_text()
    summary = json.loads((out / "speed.json").read_text())
    assert summary["last_line"]["greedy_tps"] > 0 and summary["kernels"]["draft_vocab"] <= 17
    stored = {path.stem for path in (out / "runs").glob("*.json")}
    assert {"hf_greedy_k_b1", "standard_sd_vocab_b1", "greedy_bf16_b1", "standard_sd_b8", "standard_sd_int8_b1",
            "standard_sd_int8_vocab_b1", "hf_assisted_k_int8_b1"} <= stored  # fmt: skip
    runs = {stem: json.loads((out / "runs" / f"{stem}.json").read_text()) for stem in stored}
    # Standard SD writes the target's greedy tokens whichever draft proposes.
    assert runs["standard_sd_int8_vocab_b1"]["rows"] == runs["standard_sd_b1"]["rows"] == runs["greedy_b1"]["rows"]


@pytest.mark.parametrize("plain_rows", [0, 2])
def test_a_packed_output_layer_is_restricted_and_stays_packed(plain_rows):
    from spd_lightning.models.packed import PackedLinear, pack_linears

    torch.manual_seed(0)

    class Model(nn.Module):  # the two methods transformers' causal LMs have
        def __init__(self) -> None:
            super().__init__()
            self.lm_head = nn.Linear(16, 50)

        def get_output_embeddings(self):
            return self.lm_head

        def set_output_embeddings(self, head):
            self.lm_head = head

    model, keep, hidden = Model(), torch.tensor([1, 4, 30]), torch.randn(3, 16)  # hidden: [B, H]
    with torch.no_grad():
        full = model.lm_head(hidden)  # [B, V]
        plain = model.lm_head
        assert pack_linears(model) == 1
        model.lm_head.keep_plain(plain, plain_rows)
        restricted = restrict_output_layer(model, keep)
        assert isinstance(restricted.rows, PackedLinear) and restricted.rows.plain_rows == plain_rows
        assert torch.allclose(model.lm_head(hidden)[:, keep], full[:, keep], atol=1e-5)  # 3 rows: packed
        assert torch.allclose(model.lm_head(hidden[:1])[:, keep], full[:1, keep], atol=1e-5)  # 1 row


def test_transformers_assisted_generation_drafts_exactly_k_tokens_when_told(toy_world, toy_tokenizer):
    from transformers import GenerationConfig

    from spd_lightning.tasks.speed import CallCounter, hf_generate

    draft, target = load_causal_lm(str(toy_world / "draft")), load_causal_lm(str(toy_world / "target"))
    eos, pad = {toy_tokenizer.eos_token_id}, toy_tokenizer.pad_token_id
    for model in (draft, target):
        model.generation_config = GenerationConfig(eos_token_id=sorted(eos), pad_token_id=pad)
    prompts = [toy_tokenizer(p.text).input_ids for p in toy_prompts(6, seed=3)]
    greedy = [hf_generate(target, [p], 20, pad, eos) for p in prompts]
    counter, calls = CallCounter(target), {}
    for k in (1, 4):
        before = counter.calls
        rows = [hf_generate(target, [p], 20, pad, eos, draft, assistant_tokens=k) for p in prompts]
        assert rows == greedy  # lossless either way
        calls[k] = (counter.calls - before) / sum(len(r[0]) for r in rows)
    assert calls[1] >= 0.5 and calls[4] < calls[1]  # one draft token per round: at most two tokens per call
    assert draft.generation_config.num_assistant_tokens == GenerationConfig().num_assistant_tokens  # restored


def test_vllms_speculation_settings_and_counters():
    from spd_lightning.tasks.vllm_speed import parse_spec_counters, server_args

    assert "--speculative-config" not in server_args("plain", "d", 4, "float32", 2048)
    args = server_args("draft", "/m/draft", 4, "float32", 2048)
    config = json.loads(args[args.index("--speculative-config") + 1])
    assert config == {"method": "draft_model", "model": "/m/draft", "num_speculative_tokens": 4}
    metrics = "\n".join([
        "# HELP vllm:spec_decode_num_drafts_total Number of drafts.",
        'vllm:spec_decode_num_drafts_total{engine="0",model_name="target"} 154.0',
        'vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="target"} 500.0',
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",position="0"} 140.0',
        'vllm:num_requests_running{engine="0"} 0.0',
    ])  # fmt: skip
    counters = parse_spec_counters(metrics)
    assert counters["drafts"] == 154.0 and counters["accepted_tokens"] == 500.0 and len(counters) == 3


def test_the_draft_vocab_knob_restricts_the_loaded_draft_and_names_a_missing_corpus(toy_world, tmp_path):
    import pytest

    from spd_lightning.decoding.setup import PairSettings, load_pair
    from spd_lightning.errors import RecordError, SetupError

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"question": p.text}) for p in toy_prompts(10, seed=4)) + "\n")
    pair = (str(toy_world / "draft"), str(toy_world / "target"))
    draft, _, _ = load_pair(PairSettings(*pair, draft_vocab=6, draft_vocab_corpus=str(corpus), section="decode"))
    head = draft.get_output_embeddings()
    assert isinstance(head, RestrictedHead) and 6 <= len(head.keep) <= 8  # the 6 most frequent and the EOS ids
    with pytest.raises(SetupError, match="decode.draft_vocab_corpus"):
        load_pair(PairSettings(*pair, draft_vocab=6, section="decode"))
    with pytest.raises(SetupError, match="not a file"):
        load_pair(PairSettings(*pair, draft_vocab=6, draft_vocab_corpus=str(tmp_path / "no.jsonl"), section="decode"))
    corpus.write_text('{"question": "1 + 1"}\n{"question": \n')
    with pytest.raises(RecordError, match=rf"{corpus}:2: not valid JSON"):
        load_pair(PairSettings(*pair, draft_vocab=6, draft_vocab_corpus=str(corpus), section="decode"))


def test_the_pass_cost_bench_times_every_kernel_kind_on_the_toy_target(toy_world, tmp_path):
    kinds = ["float32", "float32-packed", "float32-auto", "float32-int8"]
    args = ["--model", str(toy_world / "target"), "--context", "8", "--tokens", "1", "2", "--repeats", "1",
            "--identity", "6", "--out", str(tmp_path), "--kinds", *kinds]  # fmt: skip
    bench = [sys.executable, str(ROOT / "bench" / "pass_cost.py")]
    done = subprocess.run([*bench, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "float32-auto: " in done.stdout and "probe ms as loaded/packed" in done.stdout
    table = (tmp_path / "pass_cost.md").read_text()
    assert all(f"| {kind} |" in table for kind in kinds)
    # float32 agrees with itself on every greedy token: the identity column compares, not copies.
    assert re.search(r"^float32 +greedy: the first 6 of 6 tokens as float32's", done.stdout, re.M)
    wrong = subprocess.run([*bench, *args[: -len(kinds)], "float32-fast"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "--kinds float32-fast: a dtype, optionally -packed, -auto or -int8" in wrong.stderr


def test_the_compiled_greedy_bench_writes_every_way_and_its_last_line_on_the_toy_target(toy_world, tmp_path):
    data = tmp_path / "gsm8k"
    data.mkdir()
    lines = [json.dumps({"question": p.text, "answer": "#### 1"}) for p in toy_prompts(3, seed=1)]
    (data / "test.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--model", str(toy_world / "target"), "--gsm8k", str(data), "--skip", "0", "--prompts", "2",
            "--max-new-tokens", "4", "--dtypes", "float32", "--out", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "compiled_greedy.py"), *args], capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"eager_tps=\S+ static_tps=\S+ compiled_tps=\S+ compile_s=\S+ same=[0-2]", last), last
    table = (tmp_path / "out" / "compiled_greedy.md").read_text()
    assert all(f"| float32, {way} |" in table for way in ("dynamic cache", "static cache", "static cache, compiled"))
