"""Shared fixtures: the embedded default world (the one shipped with the package), composed configs,
and the test tiers (README, "Tests"): unit tests, in-process runs, and command-line runs (marked cli)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hydra_compose import compose_config

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))


def pytest_collection_modifyitems(items) -> None:
    """A test of command-line behaviour (marked cli) starts run.py in a process of its own: slow, always."""
    for item in items:
        if item.get_closest_marker("cli"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def only_cli_tests_start_run_py(request, monkeypatch) -> None:
    """Everything but command-line behaviour runs in process (compose_train, then the task's
    function), so a test that is not marked cli and starts run.py fails at once."""
    if request.node.get_closest_marker("cli"):
        return

    class InProcessOnly(subprocess.Popen):
        def __init__(self, args, *rest, **kwargs) -> None:
            words = args if isinstance(args, (list, tuple)) else str(args).split()
            if any(str(word).endswith("run.py") for word in words):
                raise AssertionError(
                    f"{request.node.nodeid} starts run.py: mark it @pytest.mark.cli (command-line behaviour) "
                    "or call the task in process (compose_train, then train/evaluate/decode/prepare)"
                )
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", InProcessOnly)


@pytest.fixture(scope="session")
def toy_world() -> Path:
    """The shipped world, checked against its manifest: target/, draft/ (transformers dirs with
    tokenizer), records.jsonl. Figures pinned by tests hold on it on every machine."""
    from spd_lightning.toy.build import SHIPPED_WORLD, build_toy_world

    return build_toy_world(SHIPPED_WORLD)


@pytest.fixture(scope="session")
def toy_tokenizer(toy_world: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(toy_world / "target")


@pytest.fixture
def sd_with_changed_draft(toy_world, toy_tokenizer):
    """change(draft, prompts) -> (greedy, standard SD, standard SD after the change): the cached
    loop's generations on 12 toy prompts, K = 4, 20 new tokens at most."""
    from spd_lightning.decoding.loop import LoopSettings, generate_cached
    from spd_lightning.decoding.policies import PolicySettings
    from spd_lightning.decoding.registry import build_policy
    from spd_lightning.targets.local import load_causal_lm
    from spd_lightning.toy.raw import toy_prompts

    def run(change):
        draft, target = load_causal_lm(str(toy_world / "draft")), load_causal_lm(str(toy_world / "target"))
        prompts = [toy_tokenizer(p.text).input_ids for p in toy_prompts(12, seed=5)]
        settings = LoopSettings(4, 20, {toy_tokenizer.eos_token_id}, toy_tokenizer.pad_token_id, 4)
        sd = build_policy("standard_sd", PolicySettings())
        greedy = generate_cached(draft, target, prompts, build_policy("greedy", PolicySettings()), settings)
        full = generate_cached(draft, target, prompts, sd, settings)
        change(draft, prompts)
        return greedy, full, generate_cached(draft, target, prompts, sd, settings)

    return run


@pytest.fixture(scope="session")
def toy_prefixes(toy_tokenizer) -> list[list[int]]:
    """Prompts and partial responses of different lengths (1- and 2-digit operands)."""
    texts = [
        "Q: 3+4= A:",
        "Q: 37+45= A:",
        "Q: 99+99= A: so",
        "Q: 50+7= A: thus the sum",
        "Q: 12+8= A: well our result makes",
        "Q: 61+29= A: hence this total is 9",
        "Q: 5+5= A: so",
        "Q: 18+27= A: thus",
        "Q: 70+30= A:",
        "Q: 44+4= A: so the total",
    ]
    return [toy_tokenizer(t, add_special_tokens=False).input_ids for t in texts]


@pytest.fixture
def compose_train():
    """compose_train(overrides, output_dir) -> the composed train config, as run.py would see it."""
    yield compose_config
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()


@pytest.fixture
def fake_vllm(toy_world):
    """A loopback imitation of a vLLM server serving "toy-target" (tests/fake_vllm.py)."""
    from fake_vllm import FakeVLLM

    server = FakeVLLM(toy_world / "target", served_model="toy-target")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def trained_ckpt(toy_world: Path, tmp_path_factory) -> Path:
    """last.ckpt of a short training run on the default world, in process (60 GRPO steps, ~15 s): a
    scorer that already accepts harmless mismatches and rejects harmful ones, for task=eval/decode tests."""
    from hydra.core.global_hydra import GlobalHydra

    from spd_lightning.tasks.train import train

    out = tmp_path_factory.mktemp("trained")
    overrides = [
        f"toy.out={toy_world}",
        "trainer.max_steps=60",
        "trainer.val_check_interval=60",
        "validate_before_fit=false",
        "~logger",
    ]
    train(compose_config(overrides, out))
    GlobalHydra.instance().clear()
    return out / "checkpoints" / "last.ckpt"
