"""Fixtures of the target backend tests: the toy target in process, and VLLMTarget against the fake server."""

from __future__ import annotations

import pytest
from fake_vllm import FakeVLLM

from spd_lightning.targets.local import LocalTarget
from spd_lightning.targets.vllm import VLLMTarget

MAX_NEW = 12
KEY_ENV = "SPD_TEST_VLLM_KEY"  # not VLLM_API_KEY: a developer's real key must not leak in


@pytest.fixture(scope="module")
def tokenizer(toy_tokenizer):
    return toy_tokenizer


@pytest.fixture(scope="module")
def local(toy_world):
    return LocalTarget(str(toy_world / "target"), max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def prefixes(toy_prefixes):
    return toy_prefixes


@pytest.fixture
def make(monkeypatch):
    """make(server_or_url, **kwargs) -> a VLLMTarget, closed after the test."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    made = []

    def _make(server, **kwargs):
        url = server.url if isinstance(server, FakeVLLM) else server
        kwargs.setdefault("model", "toy-target")
        kwargs.setdefault("max_new_tokens", MAX_NEW)
        kwargs.setdefault("backoff_s", 0.0)
        kwargs.setdefault("startup_timeout_s", 5.0)
        kwargs.setdefault("api_key_env", KEY_ENV)
        target = VLLMTarget(url=url, **kwargs)
        made.append(target)
        return target

    yield _make
    for target in made:
        target.close()
