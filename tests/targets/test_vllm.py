"""The vLLM target against a loopback imitation of a vLLM server (tests/fake_vllm.py).

The fake computes completions with the in-process LocalTarget, so VLLMTarget must return
exactly what the embedded backend returns; faults (5xx, dropped connections, slow answers)
are injected to check the retries and the None-for-failed-prompts contract (SPEC.md, step 4).
"""

from __future__ import annotations

import time

import pytest
from fake_vllm import FakeVLLM

from spd_lightning.errors import SetupError
from spd_lightning.targets.vllm import VLLMTarget, _top_of_last

MAX_NEW = 12
KEY_ENV = "SPD_TEST_VLLM_KEY"  # as conftest.py's


# --- the data path ---


def test_completions_equal_local_backend(fake_vllm, make, local, prefixes):
    assert len({len(p) for p in prefixes}) >= 5  # prefixes of different lengths
    target = make(fake_vllm, prompts_per_request=4)
    out = target.complete(prefixes)
    assert out == local.complete(prefixes)
    assert all(c and c[-1] == local.eos_token_id for c in out)  # each reached EOS within the budget
    assert target.num_failed_requests == 0


def test_prompts_go_as_token_ids_in_chunks(fake_vllm, make, prefixes):
    target = make(fake_vllm, prompts_per_request=4, concurrency=1)
    target.complete(prefixes)
    assert fake_vllm.counts["/v1/completions"] == 3 == target.num_requests  # 10 prompts, 4 per request
    assert fake_vllm.prompts == [prefixes[0:4], prefixes[4:8], prefixes[8:10]]  # token ids, never text
    for body in fake_vllm.completion_bodies:
        assert body["model"] == "toy-target"
        assert body["temperature"] == 0
        assert body["max_tokens"] == MAX_NEW  # explicit: vLLM's default is 16
        assert body["return_token_ids"] is True
        assert "stop" not in body  # sent only when set


def test_stop_is_sent_when_set(fake_vllm, make, prefixes):
    target = make(fake_vllm, stop=["."])
    target.complete(prefixes[:2])
    assert [b["stop"] for b in fake_vllm.completion_bodies] == [["."]]


def test_every_request_is_greedy_whatever_the_servers_generation_config(fake_vllm, make, prefixes):
    target = make(fake_vllm)
    target.complete(prefixes[:2])
    target.propose(prefixes[:2], 3)
    for body in fake_vllm.completion_bodies:
        assert body["temperature"] == 0.0 and body["repetition_penalty"] == 1.0
        assert (body["top_p"], body["top_k"], body["min_p"]) == (1.0, -1, 0.0)
        assert body["presence_penalty"] == body["frequency_penalty"] == 0.0


def test_other_end_of_sequence_ids_are_sent_as_stop_token_ids(fake_vllm, make, prefixes, toy_world, tmp_path):
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    shutil.copytree(toy_world / "target", tmp_path / "target")
    eos = AutoTokenizer.from_pretrained(tmp_path / "target").eos_token_id
    GenerationConfig(eos_token_id=[eos, 7]).save_pretrained(tmp_path / "target")
    target = make(fake_vllm)
    target.check_tokenizer(AutoTokenizer.from_pretrained(tmp_path / "target"))
    target.complete(prefixes[:2])
    assert fake_vllm.completion_bodies[-1]["stop_token_ids"] == [7]
    target.check_tokenizer(AutoTokenizer.from_pretrained(toy_world / "target"))  # one EOS: nothing extra to send
    target.complete(prefixes[:2])
    assert "stop_token_ids" not in fake_vllm.completion_bodies[-1]


def test_max_new_tokens_limits_completions(fake_vllm, make, local, prefixes):
    target = make(fake_vllm, max_new_tokens=3)
    out = target.complete(prefixes[:4])
    assert out == [c[:3] for c in local.complete(prefixes[:4])]
    assert fake_vllm.completion_bodies[0]["max_tokens"] == 3


def test_empty_input_sends_nothing(fake_vllm, make):
    target = make(fake_vllm)
    assert target.complete([]) == []
    assert fake_vllm.counts["/v1/completions"] == 0


def test_two_replicas_both_receive_requests(fake_vllm, toy_world, make, local, prefixes):
    with FakeVLLM(toy_world / "target", served_model="toy-target") as second:
        target = VLLMTarget(
            urls=[fake_vllm.url, second.url],
            model="toy-target",
            max_new_tokens=MAX_NEW,
            prompts_per_request=2,
            backoff_s=0.0,
            api_key_env=KEY_ENV,
        )
        try:
            out = target.complete(prefixes[:8])
        finally:
            target.close()
    assert out == local.complete(prefixes[:8])  # answers come back in the order asked
    assert fake_vllm.counts["/v1/completions"] == 2 and second.counts["/v1/completions"] == 2
    assert fake_vllm.counts["/health"] == 1 and second.counts["/health"] == 1  # both checked at start-up


def test_a_small_step_is_split_over_the_replicas(fake_vllm, toy_world, local, prefixes):
    # 6 prefixes fit one request of 64, but two servers each get half of them.
    with FakeVLLM(toy_world / "target", served_model="toy-target") as second:
        target = VLLMTarget(
            urls=[fake_vllm.url, second.url],
            model="toy-target",
            max_new_tokens=MAX_NEW,
            prompts_per_request=64,
            api_key_env=KEY_ENV,
        )
        try:
            out = target.complete(prefixes[:6])
        finally:
            target.close()
    assert out == local.complete(prefixes[:6])
    assert fake_vllm.counts["/v1/completions"] == 1 and second.counts["/v1/completions"] == 1
    assert target.num_requests == 2


def test_requests_run_concurrently(fake_vllm, make, prefixes):
    fast = make(fake_vllm, prompts_per_request=1, concurrency=4, max_new_tokens=1)
    serial = make(fake_vllm, prompts_per_request=1, concurrency=1, max_new_tokens=1)
    fast.complete(prefixes[:4])  # warm-up, undelayed
    fake_vllm.delay(0.3)
    start = time.perf_counter()
    out = fast.complete(prefixes[:4])
    overlapped = time.perf_counter() - start
    start = time.perf_counter()
    assert serial.complete(prefixes[:4]) == out
    one_by_one = time.perf_counter() - start
    assert None not in out
    assert overlapped < 0.9, overlapped  # 4 requests of 0.3 s in flight together
    assert one_by_one >= 1.2, one_by_one


# --- faults: retries, then None for the prompts of a request that kept failing ---


# when they are the same); the last 3 prompt tokens [5, 6, 7] were a draft block.
REAL_CHOICE = {
    "index": 0,
    "text": " our",
    "logprobs": None,
    "finish_reason": "length",
    "stop_reason": None,
    "token_ids": [9],
    "prompt_logprobs": [
        None,
        {
            "39": {"logprob": -7.371079921722412, "rank": 15, "decoded_token": ":"},
            "5": {"logprob": -1.605904459953308, "rank": 1, "decoded_token": " hence"},
        },
        {
            "31": {"logprob": -12.209351539611816, "rank": 35, "decoded_token": " 3"},
            "15": {"logprob": -1.3157373666763306, "rank": 1, "decoded_token": " equals"},
        },
        {
            "25": {"logprob": -10.9520263671875, "rank": 36, "decoded_token": "7"},
            "17": {"logprob": -1.3514755964279175, "rank": 1, "decoded_token": " gives"},
        },
        {
            "40": {"logprob": -11.088484764099121, "rank": 36, "decoded_token": "+"},
            "43": {"logprob": -0.026477273553609848, "rank": 1, "decoded_token": "."},
        },
        {
            "22": {"logprob": -13.248588562011719, "rank": 42, "decoded_token": "4"},
            "8": {"logprob": -1.0728667974472046, "rank": 1, "decoded_token": " the"},
        },
        {
            "23": {"logprob": -9.868724822998047, "rank": 32, "decoded_token": "5"},
            "43": {"logprob": -0.02900933474302292, "rank": 1, "decoded_token": "."},
        },
        {
            "41": {"logprob": -13.769819259643555, "rank": 38, "decoded_token": "="},
            "43": {"logprob": -0.0008225633064284921, "rank": 1, "decoded_token": "."},
        },
        {
            "42": {"logprob": -12.912932395935059, "rank": 30, "decoded_token": " A"},
            "43": {"logprob": -0.0004888770054094493, "rank": 1, "decoded_token": "."},
        },
        {
            "39": {"logprob": -7.513088226318359, "rank": 7, "decoded_token": ":"},
            "43": {"logprob": -1.7625118494033813, "rank": 1, "decoded_token": "."},
        },
        {"5": {"logprob": -1.580367088317871, "rank": 1, "decoded_token": " hence"}},
        {
            "6": {"logprob": -11.684450149536133, "rank": 29, "decoded_token": " then"},
            "9": {"logprob": -1.0885943174362183, "rank": 1, "decoded_token": " our"},
        },
        {
            "7": {"logprob": -11.43377685546875, "rank": 19, "decoded_token": " well"},
            "9": {"logprob": -1.0919034481048584, "rank": 1, "decoded_token": " our"},
        },
    ],
    "prompt_token_ids": [38, 39, 31, 25, 40, 22, 23, 41, 42, 39, 5, 6, 7],
}


def test_top_tokens_from_real_vllm_prompt_logprobs():
    prompt = REAL_CHOICE["prompt_token_ids"]
    assert _top_of_last(3, REAL_CHOICE, prompt) == [5, 9, 9]  # " hence" agreed; " then", " well" -> " our"
    assert _top_of_last(1, REAL_CHOICE, prompt) == [9]
    last_tied = {"7": {"rank": 1}, "4": {"rank": 1}}
    tie = {**REAL_CHOICE, "prompt_logprobs": [*REAL_CHOICE["prompt_logprobs"][:-1], last_tied]}
    assert _top_of_last(1, tie, prompt) == [4]  # a tie: the smallest id, as torch.argmax
    with pytest.raises(ValueError, match="prompt_logprobs"):
        _top_of_last(1, {**REAL_CHOICE, "prompt_logprobs": None}, prompt)


def test_fake_server_answers_prompt_logprobs_in_vllms_shape(fake_vllm, make, prefixes):
    target = make(fake_vllm)
    body = {"model": "toy-target", "prompt": [prefixes[1] + [5, 6, 7]], "max_tokens": 1, "prompt_logprobs": 1}
    choice = target.session.post(fake_vllm.url + "/completions", json=body, timeout=10).json()["choices"][0]
    rows = choice["prompt_logprobs"]
    assert rows[0] is None and len(rows) == len(body["prompt"][0])
    for pos, row in enumerate(rows[1:], start=1):
        assert str(body["prompt"][0][pos]) == next(iter(row))  # the prompt's own token first
        assert 1 <= len(row) <= 2 and sum(e["rank"] == 1 for e in row.values()) >= 1
        assert set(next(iter(row.values()))) == {"logprob", "rank", "decoded_token"}


def test_propose_and_argmax_along_equal_local_backend(fake_vllm, make, local, prefixes):
    target = make(fake_vllm, prompts_per_request=4, concurrency=1, stop=["."])
    proposals = target.propose(prefixes, 6)
    assert proposals == local.propose(prefixes, 6) and all(len(p) == 6 for p in proposals)
    for body in fake_vllm.completion_bodies:
        assert body["ignore_eos"] is True and body["max_tokens"] == 6 and "stop" not in body
    drafts = [p[:4] for p in proposals]
    drafts[0] = [3, 3, 3, 3]  # a block the target disagrees with
    fake_vllm.completion_bodies.clear()
    along = target.argmax_along(prefixes, drafts)
    assert along == local.argmax_along(prefixes, drafts)
    assert along[0] != drafts[0] and along[1] == drafts[1]
    assert [b["prompt"] for b in fake_vllm.completion_bodies] == [
        [p + d for p, d in zip(prefixes[i : i + 4], drafts[i : i + 4])] for i in (0, 4, 8)
    ]
    assert all(b["prompt_logprobs"] == 1 and b["max_tokens"] == 1 for b in fake_vllm.completion_bodies)
    assert target.argmax_along([], []) == []


def test_complete_with_its_own_budget_over_http(fake_vllm, make, local, prefixes):
    target = make(fake_vllm)
    assert target.complete(prefixes[:3], max_new_tokens=2) == [c[:2] for c in local.complete(prefixes[:3])]
    assert fake_vllm.completion_bodies[-1]["max_tokens"] == 2 and target.max_new_tokens == MAX_NEW


def test_failed_proposals_are_none(fake_vllm, make, prefixes):
    fake_vllm.fail_after(0, status=500)
    target = make(fake_vllm, retries=0, prompts_per_request=4)
    assert target.propose(prefixes[:4], 4) == [None] * 4
    assert target.argmax_along(prefixes[:4], [[3] * 4] * 4) == [None] * 4
    assert target.num_failed_requests == 2


@pytest.mark.parametrize("path", ["/tokenize", "/v1/models"])
def test_a_server_error_in_a_start_up_check_is_one_message_naming_the_url(fake_vllm, make, tokenizer, path):
    fake_vllm.fail_path(path, status=500)
    with pytest.raises(SetupError) as err:
        make(fake_vllm).check_tokenizer(tokenizer)  # make() runs the health and model checks
    message = str(err.value)
    assert f"127.0.0.1:{fake_vllm.port}{path}" in message and "500" in message and "target.url" in message
