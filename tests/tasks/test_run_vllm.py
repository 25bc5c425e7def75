"""`python run.py target=vllm ...` end to end, against the loopback fake vLLM server.

The fake server runs in a thread of this pytest process; run.py runs as a subprocess and
reaches it over 127.0.0.1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_run import SUMMARY_KEYS, run

# Command-line behaviour: run.py in a process of its own (README, "Tests").
pytestmark = pytest.mark.cli

# Keep validation to one batch: the runs here check the wiring and the failure path.
FAST = ["data.max_val_records=64", "target.model=toy-target"]


def test_run_against_vllm_server(tmp_path: Path, toy_world: Path, fake_vllm):
    args = ["target=vllm", f"target.url={fake_vllm.url}", "trainer.max_steps=30", "trainer.val_check_interval=10"]
    proc = run(args + FAST, tmp_path, toy_world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["train/steps"] == 30
    # start-up checks, then every completion went over HTTP as token ids with the configured budget
    assert fake_vllm.counts["/health"] >= 1 and fake_vllm.counts["/v1/models"] >= 1
    assert fake_vllm.counts["/tokenize"] >= 1  # the tokenizer check
    assert fake_vllm.counts["/v1/completions"] >= 30  # at least one request per training step
    for body in fake_vllm.completion_bodies:
        assert body["max_tokens"] == 16 and body["temperature"] == 0
        assert all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in body["prompt"])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_server_failing_mid_run_stops_cleanly_with_intact_checkpoint(tmp_path: Path, toy_world: Path, fake_vllm):
    # With data.max_val_records=64 a run sends 2 requests for the validation before training and
    # then about 1 per training step (later validations are mostly answered from the cache):
    # failing after 10 lets the validation (and checkpoint) at step 5 happen first.
    fake_vllm.fail_after(10, status=500)
    args = [
        "target=vllm",
        f"target.url={fake_vllm.url}",
        "trainer.max_steps=100",
        "trainer.val_check_interval=5",
        # Failures are immediate 500s; a generous timeout keeps a loaded machine from adding timeouts.
        "target.retries=1",
        "target.backoff_s=0",
        "target.timeout_s=10",
    ]
    proc = run(args + FAST, tmp_path, toy_world)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "could not be verified" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert fake_vllm.counts["/v1/completions"] > 10  # it did fail mid-run, after the first 10 requests
    assert not (tmp_path / "summary.json").exists()
    # The message points at the last checkpoint, which loads.
    # NOTE: fails with Lightning 2.6.6 and conf/callbacks/default.yaml as shipped (save_last: true,
    # save_top_k: 0): ModelCheckpoint.on_validation_end only writes last.ckpt when a top-k
    # checkpoint was saved at that step, so no checkpoint exists before training ends and the
    # hint is left out. The assertion states the documented behaviour ("After every validation,
    # save last.ckpt").
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert f"ckpt_path={ckpt}" in proc.stderr, proc.stderr[-3000:]
    state = torch.load(ckpt, weights_only=False, map_location="cpu")
    assert state["global_step"] >= 5 and state["global_step"] % 5 == 0
    assert state["state_dict"]
