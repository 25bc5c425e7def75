"""Loggers: csv, tensorboard, wandb (offline, read back from its run file), none; the sample dashboard."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from wandb_runs import read_wandb_run, wandb_env

from spd_lightning.data.records import Record, collate_records
from spd_lightning.errors import SetupError
from spd_lightning.training.callbacks import SAMPLE_COLUMNS, SampleDashboard, finish_wandb, log_config, render_block

ROOT = Path(__file__).resolve().parents[2]
TINY = ["trainer.max_steps=10", "trainer.val_check_interval=5", "data.max_val_records=64"]


def run(args: list[str], tmp_path: Path, toy_world: Path, env: dict[str, str] | None = None):
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, str(ROOT / "run.py"), f"hydra.run.dir={tmp_path}", f"toy.out={toy_world}", *TINY, *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.cli
def test_csv_and_wandb_offline_log_everything(tmp_path: Path, toy_world: Path):
    proc = run(["logger=[csv,wandb]"], tmp_path, toy_world, wandb_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    (run_dir,) = [Path(p) for p in glob.glob(str(tmp_path / "wandb" / "offline-run-*"))]
    config, history, exit_code = read_wandb_run(run_dir)
    assert exit_code == 0  # finished, not left open

    # The resolved config, whole: not overwritten by the module's own hparams.
    assert config["loss"]["num_samples"] == 8
    assert config["optimizer"]["lr"] == pytest.approx(3.0e-3)
    assert config["trainer"]["max_steps"] == 10

    keys = set().union(*history)
    expected = ["train/reward", "train/scenario_A", "verify/completions", "val/accuracy", "val/standard_sd/accept_len"]
    assert set(expected) <= keys, set(expected) - keys

    # One histogram and one table per validation: before fit, at steps 5 and 10 (the summary reads
    # step 10's: the final weights are not validated twice).
    hists = [h for h in history if h.get("val/accept_prob_mismatch/_type") == "histogram"]
    tables = [h for h in history if h.get("val/samples/_type") == "table-file"]
    assert len(hists) == len(tables) == 3
    assert sum(hists[0]["val/accept_prob_mismatch/values"]) > 0
    table = json.loads((run_dir / "files" / tables[-1]["val/samples/path"]).read_text())
    assert table["columns"] == SAMPLE_COLUMNS
    assert 1 <= len(table["data"]) <= 16
    row = dict(zip(table["columns"], table["data"][0]))
    assert row["verdict"] in ("correct", "wrong") and row["scenario"] in "ABCD"
    assert "✓" in row["draft"] or "✗" in row["draft"]  # every row has a mismatch: a decision

    (image,) = [h for h in history if "plots/training_curves/_type" in h]
    (png,) = image["plots/training_curves/filenames"]
    assert (run_dir / "files" / png).is_file()


@pytest.mark.cli
def test_tensorboard_writes_events(tmp_path: Path, toy_world: Path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    proc = run(["logger=tensorboard"], tmp_path, toy_world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    tags = {v.tag for path in events for event in EventFileLoader(str(path)).Load() for v in event.summary.value}
    assert {"train/reward", "val/accuracy", "val/standard_sd/accept_len"} <= tags
    assert "num_samples: 8" in (tmp_path / "tensorboard" / "hparams.yaml").read_text()  # the resolved config
    assert not (tmp_path / "csv").exists() and not (tmp_path / "wandb").exists()


@pytest.mark.cli
def test_no_logger(tmp_path: Path, toy_world: Path):
    # Hydra 1.3 rejects `logger=null` for a config group; `~logger` (or `logger=[]`) drops it.
    proc = run(["~logger"], tmp_path, toy_world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "summary.json").is_file()
    assert not any((tmp_path / d).exists() for d in ("csv", "tensorboard", "wandb"))


# --- SampleDashboard, without a training run ---------------------------------------------------


def toy_batch():
    """Two records, K=4: the first has mismatches at positions 0 and 2, the second none."""
    records = [
        Record([1, 2, 3, 4, 5], 2, [7, 9, 13, 16], [5, 9, 11, 15], "82"),
        Record([1, 2, 3], 2, [4, 4, 4, 4], [4, 4, 4, 4], "7"),
    ]
    batch = collate_records(records)
    mismatch = batch.draft_ids != batch.target_ids
    outputs = {
        "accept_probs": torch.tensor([[0.9, 0.5, 0.1, 0.3], [0.5, 0.5, 0.5, 0.5]]),
        "mismatch": mismatch,
        "accept_len": torch.tensor([[2, 0, 4], [4, 4, 4]]),
        "correct": torch.tensor([[True, True, False], [True, True, True]]),
        "rewards": torch.tensor([[1.25, 0.5, -1.0], [1.5, 1.5, 1.5]]),
        "texts": {(0, 2): "so 82.", (0, 0): "so 82.", (0, 4): "so 83.", (1, 4): "7."},
    }
    return batch, outputs


class Untouchable(dict):
    def __getitem__(self, key):
        raise AssertionError(f"the dashboard read {key!r} without a wandb logger")


def fake_trainer(loggers, rank_zero: bool = True):
    return SimpleNamespace(loggers=loggers, is_global_zero=rank_zero, sanity_checking=False, global_step=7)


def test_dashboard_is_a_noop_without_wandb(tmp_path: Path):
    from lightning.pytorch.loggers import CSVLogger

    batch, _ = toy_batch()
    dash = SampleDashboard()
    for loggers in ([], [CSVLogger(tmp_path)]):
        trainer = fake_trainer(loggers)
        dash.on_validation_epoch_start(trainer, None)
        dash.on_validation_batch_end(trainer, None, Untouchable(), batch, 0)
        dash.on_validation_epoch_end(trainer, None)
        assert dash._probs == [] and dash._rows == []


def wandb_logger_capturing(tmp_path: Path):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), mode="disabled")
    logged: list[tuple[dict, int]] = []
    logger.log_metrics = lambda metrics, step=None: logged.append((metrics, step))
    return logger, logged


def test_dashboard_logs_histogram_and_table_on_rank_zero_only(tmp_path: Path):
    batch, outputs = toy_batch()
    logger, logged = wandb_logger_capturing(tmp_path)
    dash = SampleDashboard(num_samples=4)

    other_rank = fake_trainer([logger], rank_zero=False)
    dash.on_validation_epoch_start(other_rank, None)
    dash.on_validation_batch_end(other_rank, None, Untouchable(), batch, 0)
    dash.on_validation_epoch_end(other_rank, None)
    assert logged == []

    trainer = fake_trainer([logger])
    dash.on_validation_epoch_start(trainer, None)
    dash.on_validation_batch_end(trainer, None, outputs, batch, 0)
    dash.on_validation_epoch_end(trainer, None)
    ((metrics, step),) = logged
    assert step == 7
    hist = metrics["val/accept_prob_mismatch"]
    assert sum(hist.histogram) == 3  # the three mismatches of record 0; record 1 has none
    table = metrics["val/samples"]
    assert table.columns == SAMPLE_COLUMNS
    (row,) = table.data  # record 1 has no mismatch: no decision to show
    row = dict(zip(SAMPLE_COLUMNS, row))
    # No tokenizer on this module: token ids are shown as they are.
    assert row["draft"] == "[7 ✓0.90] 9 [13 ✗0.10] (16)"
    assert row["target_token"] == "11" and row["accept_len"] == 2
    assert row["response"] == "so 82." and row["verdict"] == "correct" and row["scenario"] == "A"
    assert row["reward"] == pytest.approx(1.25) and row["step"] == 7


def test_render_block_marks_every_kind_of_position():
    # A whole block accepted: no target token, nothing unexecuted.
    assert render_block(None, [1, 2, 3], [False, True, False], [0.5, 0.75, 0.5], 3) == "1 [2 ✓0.75] 3"
    # Rejected at 0: the rest never ran.
    assert render_block(None, [1, 2, 3], [True, True, False], [0.25, 0.75, 0.5], 0) == "[1 ✗0.25] (2) (3)"


def test_finish_wandb_ends_a_crashed_run_as_failed(tmp_path: Path, monkeypatch):
    import wandb

    for key, value in wandb_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    wandb.init(project="spd-lightning-test", dir=str(tmp_path), mode="offline")
    finish_wandb(crashed=True)
    assert wandb.run is None
    (run_dir,) = [Path(p) for p in glob.glob(str(tmp_path / "wandb" / "offline-run-*"))]
    assert read_wandb_run(run_dir)[2] == 1
    finish_wandb()  # no run: nothing to do


def test_wandb_without_login_is_one_clear_error(tmp_path: Path):
    from wandb.errors import UsageError

    logger, _ = wandb_logger_capturing(tmp_path)

    def no_key(params):
        raise UsageError("No API key configured. Use `wandb login` to log in.")

    logger.log_hyperparams = no_key
    with pytest.raises(SetupError, match="WANDB_MODE=offline"):
        log_config([logger], {"seed": 0})


def test_the_logged_config_names_paths_under_the_project_root_relative_to_it(tmp_path: Path):
    root = tmp_path / "project"
    config = {
        "paths": {"output_dir": str(root / "outputs" / "run"), "root_dir": str(root)},
        "data": {"raw": str(tmp_path / "shared" / "train.jsonl"), "files": [str(root / "a.jsonl")]},
        "seed": 0,
        "name": str(root) + "-copy",  # a sibling folder whose name begins like the root's
    }
    logged = []
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path / "csv"))
    logger.log_hyperparams = logged.append
    log_config([logger], config, root=root)
    assert logged[0]["paths"] == {"output_dir": "outputs/run", "root_dir": "."}
    assert logged[0]["data"] == {"raw": str(tmp_path / "shared" / "train.jsonl"), "files": ["a.jsonl"]}
    assert logged[0]["seed"] == 0 and logged[0]["name"] == str(root) + "-copy"
