"""Training in process: the task's `train(cfg)` on a composed config (as run.py calls it), and the
LightningModule built by hand from its parts, without Hydra."""

from __future__ import annotations

import json
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from spd_lightning.core.exact import ExactLoss
from spd_lightning.core.grpo import GRPOLoss
from spd_lightning.core.reward import RewardWeights
from spd_lightning.data.answers import gsm8k_final_number
from spd_lightning.models.scorer import ScoringActor
from spd_lightning.reporting.names import PARITY_METRIC, VAL_METRICS, VAL_POLICIES, val_key
from spd_lightning.targets.local import LocalTarget
from spd_lightning.tasks.train import train
from spd_lightning.training.datamodule import RecordDataModule
from spd_lightning.training.module import SPDModule
from spd_lightning.verification.hybrid import HybridVerifier


def test_fast_dev_run_in_process_writes_the_summary(toy_world: Path, tmp_path: Path, compose_train):
    cfg = compose_train([f"toy.out={toy_world}", "debug=fdr", "~logger"], tmp_path)
    assert train(cfg) is not None  # optimized_metric, for Hydra's sweepers
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {val_key(p, m) for p in VAL_POLICIES for m in VAL_METRICS} | {PARITY_METRIC} <= set(summary)
    assert summary["train/steps"] == 1


def test_a_run_with_validation_off_trains_and_says_so(toy_world: Path, tmp_path: Path, compose_train):
    cfg = compose_train([f"toy.out={toy_world}", "~logger", "trainer.max_steps=2", "+trainer.limit_val_batches=0"],
                        tmp_path)  # fmt: skip
    train(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["train/steps"] == 2 and summary[PARITY_METRIC] != summary[PARITY_METRIC]  # NaN: nothing validated
    assert "no validation ran" in (tmp_path / "summary.md").read_text()


def test_checkpoints_name_project_folders_relative_to_it(toy_world: Path, tmp_path: Path, compose_train, monkeypatch):
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))  # the run writes under it
    cfg = compose_train([f"toy.out={toy_world}", "~logger", "trainer.max_steps=2", "+trainer.limit_val_batches=0"],
                        tmp_path)  # fmt: skip
    train(cfg)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    dirpaths = [state["dirpath"] for state in saved["callbacks"].values() if "dirpath" in state]
    assert dirpaths == ["checkpoints"]
    assert str(tmp_path) not in repr({k: v for k, v in saved.items() if k not in ("state_dict", "optimizer_states")})
    assert saved["state_dict"] and saved["global_step"] == 2
    # Resumed, the checkpoint callback takes its folder back (Lightning warns when it has changed).
    cfg = compose_train([f"toy.out={toy_world}", "~logger", "trainer.max_steps=3", "+trainer.limit_val_batches=0",
                         f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}"], tmp_path)  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="The dirpath has changed")
        train(cfg)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3


def test_a_run_stopped_mid_training_still_draws_its_curves(toy_world: Path, tmp_path: Path, compose_train, monkeypatch):
    step = SPDModule.training_step

    def stopped_at_the_fourth(self, batch, batch_idx):
        if self.global_step == 3:
            raise KeyboardInterrupt  # what Ctrl+C raises; Lightning turns it into SystemExit
        return step(self, batch, batch_idx)

    monkeypatch.setattr(SPDModule, "training_step", stopped_at_the_fourth)
    cfg = compose_train([f"toy.out={toy_world}", "logger=csv", "trainer.max_steps=10"], tmp_path)
    with pytest.raises(SystemExit):
        train(cfg)
    assert (tmp_path / "training_curves.png").is_file() and not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("max_steps, validations", [(4, 2), (3, 2)], ids=["last-step-validated", "not"])
def test_the_summary_validates_again_only_weights_fit_did_not_validate(
    max_steps, validations, toy_world: Path, tmp_path: Path, compose_train, monkeypatch
):
    started = []
    step = SPDModule.validation_step

    def counted(self, batch, batch_idx):
        started.extend([self.global_step] if batch_idx == 0 else [])
        return step(self, batch, batch_idx)

    monkeypatch.setattr(SPDModule, "validation_step", counted)
    budget = ["trainer.val_check_interval=2", "data.max_val_records=16"]
    overrides = [f"toy.out={toy_world}", "~logger", "validate_before_fit=false", f"trainer.max_steps={max_steps}"]
    cfg = compose_train([*overrides, *budget], tmp_path)
    train(cfg)
    # In fit after steps 2 and 4 (or 2, then once more for the summary at 3), never twice at one step.
    assert len(started) == validations and started[-1] == max_steps
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {val_key(p, m) for p in VAL_POLICIES for m in VAL_METRICS} <= set(summary)


class MetricsOf(L.Callback):
    """What the module logged at each training step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})


@pytest.mark.parametrize("loss", [GRPOLoss(num_samples=4), ExactLoss()], ids=["grpo", "exact"])
def test_the_module_built_from_its_parts_trains_and_validates(loss, toy_world: Path, tmp_path: Path, toy_tokenizer):
    scorer = ScoringActor.from_pretrained(str(toy_world / "draft"), local_files_only=True)
    verifier = HybridVerifier(LocalTarget(str(toy_world / "target")), toy_tokenizer, gsm8k_final_number)
    optimizer = partial(torch.optim.AdamW, lr=1e-3)
    module = SPDModule(scorer, verifier, RewardWeights(), loss, optimizer)
    data = RecordDataModule(str(toy_world / "records.jsonl"), max_val_records=16, batch_size=4, val_batch_size=16)
    metrics = MetricsOf()
    trainer = L.Trainer(
        max_steps=3, limit_val_batches=1, val_check_interval=3, accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[metrics], default_root_dir=tmp_path,
    )  # fmt: skip
    before = [p.detach().clone() for p in module.scorer.head.parameters()]
    trainer.fit(module, datamodule=data)
    assert len(metrics.steps) == 3
    last = metrics.steps[-1]
    assert 0.0 <= last["train/accuracy"] <= 1.0 and 0.0 <= last["train/accept_len"] <= 4.0
    scenarios = sum(last[f"train/scenario_{s}"] for s in "ABCD")
    assert scenarios == pytest.approx(1.0, abs=1e-5)  # expectations under the policy: the shares sum to 1
    assert module.verify_totals["completions"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, module.scorer.head.parameters()))
    assert {val_key(p, "accuracy") for p in VAL_POLICIES} <= set(trainer.callback_metrics)
