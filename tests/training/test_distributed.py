"""Distributed training on this CPU machine: DDP and FSDP2 with 2 processes, a multirun of DDP jobs.

The runs are `python run.py` subprocesses, as a user starts them; Lightning then starts rank 1 by
running run.py again (gloo). tests/dist_probe.py rides along in every rank (PYTHONPATH=tests) and
writes what that rank verified and how it holds the scorer's parameters.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.strategies import FSDPStrategy

from spd_lightning.data.records import collate_records
from spd_lightning.tasks.train import build_components, config_flags

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "data.max_val_records=64",
    "validate_before_fit=false",
]
BATCH = 8  # data.batch_size of conf/data/toy.yaml: records per rank and step


def run(args: list[str], tmp_path: Path, toy_world: Path, env: dict[str, str] | None = None):
    """run.py with the probe in every rank; paths.root_dir under tmp_path, so an output directory
    made by a rank where it should not be would show up there (tmp_path/project/outputs)."""
    pythonpath = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHONPATH": pythonpath, **(env or {})}
    cmd = [
        sys.executable,
        str(ROOT / "run.py"),
        *args,
        f"paths.root_dir={tmp_path / 'project'}",
        f"toy.out={toy_world}",
        *TINY,
        "+callbacks.probe._target_=dist_probe.ShardProbe",
        "+callbacks.probe.out=${paths.output_dir}/probe",
    ]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def probes(run_dir: Path) -> list[dict]:
    """The probe reports of ranks 0 and 1."""
    reports = [json.loads((run_dir / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in reports] == [(0, 2), (1, 2)]
    return reports


def assert_ranks_verified_own_shards(ranks: list[dict]) -> None:
    steps0, steps1 = ranks[0]["verified"], ranks[1]["verified"]
    assert len(steps0) == len(steps1) >= 3
    # The sampler split a pass of the shuffle (as many records as fill whole steps of both ranks'
    # batches, training/shuffle.py) between the ranks, half each, none to both.
    shard0, shard1, n = set(ranks[0]["shard"]), set(ranks[1]["shard"]), ranks[0]["num_train"]
    per_pass = n // (2 * BATCH) * 2 * BATCH
    assert len(ranks[0]["shard"]) == len(ranks[1]["shard"]) == per_pass // 2
    assert len(shard0 | shard1) == per_pass and not shard0 & shard1
    for s0, s1 in zip(steps0, steps1):
        # Every step each rank verified the next full batch of its own shard, and only that.
        assert s0["records"] is not None and s1["records"] is not None
        assert len(s0["records"]) == len(s1["records"]) == BATCH
        assert set(s0["records"]) <= shard0 and set(s1["records"]) <= shard1


def assert_rank_zero_wrote_once(proc: subprocess.CompletedProcess, run_dir: Path, tmp_path: Path) -> None:
    assert len(list(tmp_path.rglob("summary.json"))) == 1
    assert (run_dir / "summary.json").is_file() and (run_dir / "training_curves.png").is_file()
    assert proc.stdout.count("summary: ") == 1  # rank 1 printed no summary table (its stdout is ours)
    assert "records:" not in (run_dir / "train_ddp_process_1.log").read_text()  # rank 1 ran here, quietly
    assert not (tmp_path / "project" / "outputs").exists()  # no output directory of a rank of its own


def train_rows(metrics_csv: Path) -> list[dict]:
    with metrics_csv.open() as f:
        return [row for row in csv.DictReader(f) if row.get("verify/unique_prefixes")]


@pytest.mark.cli
def test_ddp_two_cpu_processes(tmp_path: Path, toy_world: Path):
    run_dir = tmp_path / "run"
    # Two PPO epochs: two backward passes per step, both of whose gradients DDP must average.
    # wandb offline, every directory of it under tmp_path: the sample tables go there.
    wandb = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    wandb |= {k: str(tmp_path / "wandb-home" / k) for k in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")}
    args = ["trainer=ddp", "trainer.devices=2", "loss.ppo_epochs=2", "logger=[csv,wandb]", f"hydra.run.dir={run_dir}"]
    proc = run(args, tmp_path, toy_world, wandb)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = probes(run_dir)
    assert_ranks_verified_own_shards(ranks)
    # Gradients were averaged: both replicas hold the same parameters after training.
    assert ranks[0]["param_sum"] == pytest.approx(ranks[1]["param_sum"], rel=1e-9, abs=1e-9)
    # Logged train metrics are reduced over the ranks: counts summed, means averaged.
    rows = train_rows(run_dir / "csv" / "metrics.csv")
    assert len(rows) == len(ranks[0]["verified"])
    for row, s0, s1 in zip(rows, ranks[0]["verified"], ranks[1]["verified"]):
        both = s0["stats"]["unique_prefixes"] + s1["stats"]["unique_prefixes"]
        assert float(row["verify/unique_prefixes"]) == both
        assert float(row["train/accuracy"]) == pytest.approx((s0["accuracy"] + s1["accuracy"]) / 2)
    assert json.loads((run_dir / "summary.json").read_text())["train/steps"] == 6
    assert_rank_zero_wrote_once(proc, run_dir, tmp_path)
    # One wandb run (rank 0's), holding the sample tables; rank 1's logger never started one.
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    assert list(wandb_run.glob("files/media/table/val/samples_*.table.json"))


@pytest.mark.cli
def test_fsdp2_two_cpu_processes_shards_the_scorer(tmp_path: Path, toy_world: Path):
    run_dir = tmp_path / "run"
    # kl_coef > 0 keeps a frozen reference scorer: it is sharded too.
    proc = run(
        ["trainer=fsdp2", "trainer.devices=2", "loss.kl_coef=0.05", f"hydra.run.dir={run_dir}"], tmp_path, toy_world
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = probes(run_dir)
    for rank in ranks:
        assert rank["ref_scorer"] and all(rank["dtensor"])
        # Each rank holds about half of the elements (dimension 0 of every parameter is split).
        assert 0.4 * rank["numel"] < rank["local_numel"] < 0.6 * rank["numel"]
    assert ranks[0]["local_numel"] + ranks[1]["local_numel"] >= ranks[0]["numel"]
    assert_ranks_verified_own_shards(ranks)
    # One checkpoint, written as one shard per rank.
    assert len(list((run_dir / "checkpoints" / "last.ckpt").glob("*.distcp"))) == 2
    assert_rank_zero_wrote_once(proc, run_dir, tmp_path)


@pytest.mark.cli
def test_multirun_of_ddp_jobs_makes_one_directory_per_job(tmp_path: Path, toy_world: Path):
    # The sweep directory is the default, timestamped one (under tmp_path/root): a rank that ran
    # the sweep again would make one of its own a few seconds later.
    proc = run(["-m", "trainer=ddp", "trainer.devices=2", "seed=1,2"], tmp_path, toy_world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = tmp_path / "project" / "outputs" / "train"
    assert [p.name for p in outputs.iterdir()] == ["multiruns"]  # no single-run directory of a rank
    (sweep,) = (outputs / "multiruns").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job, seed in (("0", 1), ("1", 2)):
        job_dir = sweep / job
        assert len(list(job_dir.rglob("summary.json"))) == 1
        probes(job_dir)  # both ranks of this job ran in this job's directory
        assert (job_dir / "train_ddp_process_1.log").is_file()
        assert f"seed: {seed}\n" in (job_dir / "config.yaml").read_text()
    # Rank 1 of each job ran that job alone, not the sweep again.
    assert proc.stdout.count("Launching 2 jobs") == 1
    assert proc.stdout.count("summary: ") == 2


def test_fsdp_file_builds_the_gpu_strategy(tmp_path: Path, toy_world: Path, compose_train):
    """trainer=fsdp is GPU only (Lightning refuses FSDPStrategy on CPU); its strategy still builds
    here, and test_configs instantiates the rest of the file with the strategy removed."""
    cfg = compose_train(["trainer=fsdp", f"toy.out={toy_world}"], tmp_path)
    assert cfg.trainer.accelerator == "gpu"
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert str(strategy.sharding_strategy).endswith("FULL_SHARD")


def test_module_pickles_for_ddp_spawn(tmp_path: Path, toy_world: Path, compose_train):
    """trainer=ddp_spawn pickles the module (scorer, verifier with its local target and
    tokenizer) into every process; the copy verifies exactly like the original."""
    cfg = compose_train(["trainer=ddp_spawn", f"toy.out={toy_world}"], tmp_path)
    datamodule, module = build_components(cfg)
    copy = pickle.loads(pickle.dumps(module))
    batch = collate_records(datamodule.val_records[:4])
    accept_len = torch.tensor([[0, 4]] * 4)
    original = module.verifier.verify(batch.records, accept_len)
    assert torch.equal(copy.verifier.verify(batch.records, accept_len).correct, original.correct)


def test_a_ddp_child_gets_the_config_flags_of_the_command_line():
    """A multirun's DDP children rerun run.py with the job's overrides and these flags alone
    (tasks/train.children_run_this_job), read without Hydra's private argument parser."""
    argv = ["-m", "--config-name", "train", "-cp=conf", "seed=1,2", "-cd", "extra", "trainer=ddp"]
    assert config_flags(argv) == ["--config-path=conf", "--config-name=train", "--config-dir=extra"]
    assert config_flags(["seed=1"]) == []
