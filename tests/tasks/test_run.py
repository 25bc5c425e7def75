"""`python run.py` as a user runs it: the default world trains, learns, and writes its summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spd_lightning.reporting.names import VAL_POLICIES, val_key
from spd_lightning.reporting.plots import read_metrics

# Command-line behaviour: run.py in a process of its own (README, "Tests").
pytestmark = pytest.mark.cli

ROOT = Path(__file__).resolve().parents[2]
SUMMARY_KEYS = [val_key(policy, metric) for policy in VAL_POLICIES for metric in ("accuracy", "accept_len")]


def run(args: list[str], tmp_path: Path, toy_world: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "run.py"), f"hydra.run.dir={tmp_path}", f"toy.out={toy_world}", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


def test_default_run_learns_and_writes_summary(tmp_path: Path, toy_world: Path):
    proc = run([], tmp_path, toy_world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary)
    assert "SPD scorer (trained)" in proc.stdout and "standard SD" in proc.stdout
    # The bar for real learning: longer accepted blocks than standard SD (>= +20%)
    # at the same accuracy (within 2 points), on a task where accepting everything hurts.
    assert summary["val/accept_len"] >= 1.2 * summary["val/standard_sd/accept_len"]
    assert summary["val/accuracy"] >= summary["val/standard_sd/accuracy"] - 0.02
    assert summary["val/accept_all/accuracy"] < summary["val/standard_sd/accuracy"] - 0.1
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "csv" / "metrics.csv").is_file()


def test_missing_record_file_is_one_clear_error(tmp_path: Path, toy_world: Path):
    proc = run([f"data.path={tmp_path / 'missing.jsonl'}"], tmp_path, toy_world)
    assert proc.returncode == 1
    assert "missing.jsonl does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_malformed_record_names_file_line_and_field(tmp_path: Path, toy_world: Path):
    good = (toy_world / "records.jsonl").read_text().splitlines()[:50]
    bad = json.loads(good[0])
    bad["prompt_len"] = "seven"
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(good[:2] + [json.dumps(bad)] + good[2:]) + "\n")
    proc = run([f"data.path={path}"], tmp_path, toy_world)
    assert proc.returncode == 1
    assert f"{path}:3: field 'prompt_len'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_target_model_is_one_clear_error(tmp_path: Path, toy_world: Path):
    proc = run([f"target.model_path={tmp_path / 'no-such-model'}"], tmp_path, toy_world)
    assert proc.returncode == 1
    assert "no-such-model" in proc.stderr and "target.model_path" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resume_from_last_checkpoint(tmp_path: Path, toy_world: Path):
    first, second = tmp_path / "first", tmp_path / "second"
    for d in (first, second):
        d.mkdir()
    budget = ["trainer.val_check_interval=5", "data.max_val_records=64"]
    proc = run(["trainer.max_steps=10", "validate_before_fit=false", *budget], first, toy_world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = first / "checkpoints" / "last.ckpt"
    proc = run(["trainer.max_steps=15", f"ckpt_path={ckpt}", *budget], second, toy_world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The resumed run continues from step 10 instead of starting over, and its "initial/" numbers
    # are those of the checkpoint it resumed from, not of a fresh scorer.
    resumed, before = (json.loads((d / "summary.json").read_text()) for d in (second, first))
    assert resumed["train/steps"] == 15
    assert resumed["initial/val/accept_len"] == before["val/accept_len"]
    assert resumed["initial/val/accuracy"] == before["val/accuracy"]
    # The running count of target completions goes on from the checkpoint's.
    totals = [read_metrics(d / "csv" / "metrics.csv")["verify/total_completions"] for d in (first, second)]
    assert totals[1][0][1] > totals[0][-1][1]


def test_a_run_resumed_in_its_own_folder_keeps_the_curves_of_the_steps_before(tmp_path: Path, toy_world: Path):
    budget = ["trainer.val_check_interval=5", "data.max_val_records=64", "validate_before_fit=false"]
    proc = run(["trainer.max_steps=10", *budget], tmp_path, toy_world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run(
        ["trainer.max_steps=15", f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", *budget], tmp_path, toy_world
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "csv" / "metrics.0.csv").is_file()  # the first run's, set aside
    steps = [s for s, _ in read_metrics(tmp_path / "csv" / "metrics.csv")["train/reward"]]
    assert min(steps) < 10 <= max(steps) and steps == sorted(steps)  # both runs' steps, once each
