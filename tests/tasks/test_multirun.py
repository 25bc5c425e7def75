"""`python run.py -m ...` as a user runs it: every job writes its summary, a failing job does not stop
the others, and the Optuna search reports its best trial."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Command-line behaviour: run.py in a process of its own (README, "Tests").
pytestmark = pytest.mark.cli

ROOT = Path(__file__).resolve().parents[2]
# A tiny budget per job: 4 steps, validation every 2 on 32 records.
TINY = ["trainer.max_steps=4", "trainer.val_check_interval=2", "data.max_val_records=32", "validate_before_fit=false"]


def multirun(args: list[str], sweep_dir: Path, toy_world: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    cmd = [sys.executable, str(ROOT / "run.py"), "-m", f"hydra.sweep.dir={sweep_dir}", f"toy.out={toy_world}", *TINY]
    return subprocess.run([*cmd, *args], cwd=sweep_dir.parent, env=env, capture_output=True, text=True, timeout=300)


def test_two_jobs_write_their_summaries_and_wandb_runs(tmp_path: Path, toy_world: Path):
    sweep = tmp_path / "sweep"
    proc = multirun(["seed=1,2", "logger=[csv,wandb]"], sweep, toy_world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["train/steps"] == 4 and "val/accept_len" in summary
    assert "seed=2" in yaml.safe_load((sweep / "1" / ".hydra" / "overrides.yaml").read_text())
    # Each job finished its wandb run, so the next one started its own.
    runs = [list((sweep / job / "wandb").glob("offline-run-*")) for job in ("0", "1")]
    assert [len(r) for r in runs] == [1, 1] and runs[0][0].name != runs[1][0].name


def test_failing_jobs_do_not_stop_the_others(tmp_path: Path, toy_world: Path):
    sweep = tmp_path / "sweep"
    missing = tmp_path / "missing.jsonl"
    # Four jobs: 0 and 1 have no record file (a user error: one line), 2 runs, 3 asks for an
    # optimizer that takes no weight_decay (an error of the code's kind: logged with its traceback).
    optimizers = "optimizer._target_=torch.optim.AdamW,torch.optim.Rprop"
    proc = multirun([f"data.path={missing},{toy_world / 'records.jsonl'}", optimizers], sweep, toy_world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        assert not (sweep / job / "summary.json").exists()
        log = (sweep / job / "run.log").read_text()
        assert f"job {job} failed: record file {missing} does not exist" in log and "Traceback" not in log
    summary = json.loads((sweep / "2" / "summary.json").read_text())
    assert summary["train/steps"] == 4
    assert not (sweep / "3" / "summary.json").exists()
    log = (sweep / "3" / "run.log").read_text()
    assert "job 3 failed" in log and "Traceback" in log and "weight_decay" in log


def test_optuna_search_reports_its_best_trial(tmp_path: Path, toy_world: Path):
    sweep = tmp_path / "sweep"
    args = ["hparams_search=optuna", "hydra.sweeper.n_trials=2"]
    proc = multirun(args, sweep, toy_world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"reward.weight_b", "reward.weight_c", "reward.token_bonus", "optimizer.lr"}
    # The best value is what run.py returned: optimized_metric of the better of the two trials.
    metric = "val/accept_len_at_parity"
    values = [json.loads((sweep / job / "summary.json").read_text())[metric] for job in ("0", "1")]
    assert results["best_value"] == pytest.approx(max(values))
    assert "Best value" in proc.stdout + proc.stderr
