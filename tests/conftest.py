"""Shared fixtures: the embedded default world (the one shipped with the package), composed configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra_compose import compose_config

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))


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
    """last.ckpt of a short `python run.py` on the default world (60 GRPO steps, ~20 s): a scorer
    that already accepts harmless mismatches and rejects harmful ones, for task=eval/decode tests."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("trained")
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        f"toy.out={toy_world}",
        "trainer.max_steps=60",
        "trainer.val_check_interval=60",
        "validate_before_fit=false",
        f"hydra.run.dir={out}",
    ]
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, timeout=600)
    return out / "checkpoints" / "last.ckpt"
