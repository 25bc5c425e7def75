"""Model configs: every file composes and builds its scorer (toy weights standing in for the hub's),
a model that is not on this machine stops the run at once with one message, and LoRA trains only
the adapters and the score head."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException
from peft import PeftModel

from spd_lightning.models.hf import DTYPES
from spd_lightning.models.scorer import ScoringActor
from spd_lightning.tasks.builders import build_scorer
from spd_lightning.tasks.train import build_components

ROOT = Path(__file__).resolve().parents[2]
MODELS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml") if not p.stem.startswith("_"))
# model=judge is not a ScoringActor (tests/judge/test_judge.py builds, trains and decodes it).
SCORING_ACTORS = [name for name in MODELS if name != "judge"]
# The hub id each real-model file names, and the target its vLLM server must report.
HUB = {
    "llama3_8b": ("meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct"),
    "llama3_2_1b": ("meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
    "qwen2_5_0_5b": ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-7B-Instruct"),
    "qwen2_5_7b": ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct"),
}


def test_every_model_file_is_listed():
    assert set(MODELS) == {"toy", "judge", *HUB}


@pytest.mark.parametrize("name", sorted(HUB))
def test_real_model_file_names_hub_id_and_served_name(name: str, tmp_path: Path, compose_train):
    cfg = compose_train([f"model={name}", "target=vllm", "target.url=http://localhost:1/v1"], tmp_path)
    path, served = HUB[name]
    assert (cfg.model.path, cfg.model.tokenizer, cfg.model.served_model_name) == (path, path, served)
    assert cfg.target.model == served  # target=vllm asks the server for this model's target
    assert cfg.model.dtype == "bfloat16" and cfg.model.local_files_only is True


@pytest.mark.parametrize("name", SCORING_ACTORS)
def test_model_file_builds_its_scorer(name: str, toy_world: Path, tmp_path: Path, compose_train):
    stand_in = [] if name == "toy" else [f"model.path={toy_world}/draft"]
    cfg = compose_train([f"model={name}", f"toy.out={toy_world}", *stand_in], tmp_path)
    scorer = build_scorer(cfg.model)
    assert isinstance(scorer, ScoringActor)
    assert next(scorer.backbone.parameters()).dtype == DTYPES[cfg.model.dtype]
    assert isinstance(scorer.backbone, PeftModel) == (cfg.model.lora.r > 0)
    assert scorer.head[0].weight.dtype == torch.float32  # the head stays float32 under a bfloat16 backbone


def test_model_keys_are_checked_at_compose(tmp_path: Path, compose_train):
    for bad in ("model.lora.rank=4", "model.lora.r=four", "model.pth=/models/x", "model.local_files_only=maybe"):
        with pytest.raises(ConfigCompositionException, match=bad.split("=")[0].split(".")[-1]):
            compose_train([bad], tmp_path)


@pytest.mark.cli
def test_missing_model_stops_at_once_with_one_message(tmp_path: Path, toy_world: Path):
    # An empty Hugging Face cache and no HF_HUB_OFFLINE: only model.local_files_only keeps it off the network.
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(PROJECT_ROOT=str(ROOT), HF_HOME=str(tmp_path / "hf"))
    cmd = [sys.executable, str(ROOT / "run.py"), "model=llama3_8b", f"hydra.run.dir={tmp_path}", f"toy.out={toy_world}"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 30
    assert proc.returncode == 1
    assert "error: cannot load the scorer backbone 'meta-llama/Meta-Llama-3-8B-Instruct'" in proc.stderr
    assert "model.path=/local/dir" in proc.stderr
    assert "Traceback" not in proc.stderr and "Retrying" not in proc.stderr


def test_lora_trains_adapters_and_head_only(toy_world: Path, tmp_path: Path, compose_train):
    # kl_coef > 0 also copies the LoRA-wrapped scorer as the frozen reference.
    overrides = [f"toy.out={toy_world}", "model.lora.r=4", "loss.kl_coef=0.05", "data.max_val_records=16"]
    cfg = compose_train(overrides, tmp_path)
    L.seed_everything(0, verbose=False)
    datamodule, module = build_components(cfg)
    scorer = module.scorer
    assert isinstance(scorer.backbone, PeftModel)
    trainable = {n for n, p in scorer.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    assert all(n.startswith("head.") or "lora_" in n for n in trainable), trainable
    assert {n for n, _ in scorer.head.named_parameters()} <= {n.removeprefix("head.") for n in trainable}

    before = {n: p.detach().clone() for n, p in scorer.named_parameters()}
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=datamodule)
    after = dict(scorer.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and changed <= trainable  # frozen backbone weights did not move
    assert any("lora_B" in n for n in changed)  # adapters start at zero and left it
