"""task=eval: policies as lookups in an outcome table, and `python run.py task=eval` end to end."""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from wandb_runs import read_wandb_run, wandb_env

from spd_lightning.core.rules import TokenFeatures
from spd_lightning.core.sampling import threshold_decisions
from spd_lightning.errors import SetupError
from spd_lightning.verification.hybrid import Verification
from spd_lightning.verification.outcomes import (
    OutcomeTable,
    PolicyPoint,
    RuleSweep,
    best_at_parity,
    policy_points,
    score_policy,
    tradeoff_rows,
    verify_outcomes,
)

ROOT = Path(__file__).resolve().parents[2]
LAST_LINE = re.compile(r"scorer_accept_len=(\S+) scorer_accuracy=(\S+) sd_accept_len=(\S+) sd_accuracy=(\S+)")

# --- lookups: three records, K=3 -----------------------------------------------------------------
# Reachable block ends: record 0 (mismatches at 0 and 2): j = 0, 2, 3; record 1 (at 2): j = 2, 3;
# record 2 (at 1): j = 1, 3. Unreachable columns hold True: a lookup that read them would show it.
MISMATCH = torch.tensor([[True, False, True], [False, False, True], [False, True, False]])
CORRECT = torch.tensor([[True, True, False, False], [True, True, True, True], [True, True, True, False]])


def table(verified=(True, True, True)) -> OutcomeTable:
    return OutcomeTable(MISMATCH, CORRECT, torch.tensor(verified))


def test_standard_sd_and_accept_all_are_lookups():
    sd = score_policy(table(), ~MISMATCH)  # j = 0, 2, 1: all correct
    assert sd == pytest.approx({"accuracy": 1.0, "accept_len": 1.0, "accepted_mismatches": 0.0})
    everything = score_policy(table(), torch.ones_like(MISMATCH))  # j = 3 everywhere
    assert everything == pytest.approx({"accuracy": 1 / 3, "accept_len": 3.0, "accepted_mismatches": 4 / 3})


def test_a_policy_ends_the_block_at_its_first_rejected_mismatch():
    # Record 0 accepts its first mismatch and rejects the second (j = 2, wrong); the others accept all.
    decisions = torch.tensor([[True, True, False], [True, True, True], [True, True, True]])
    got = score_policy(table(), decisions)
    assert got == pytest.approx({"accuracy": 1 / 3, "accept_len": 8 / 3, "accepted_mismatches": 3 / 3})


def test_unverified_records_are_left_out_of_every_policy():
    assert score_policy(table((True, True, False)), ~MISMATCH)["accept_len"] == pytest.approx(1.0)  # (0 + 2) / 2
    assert score_policy(table((True, True, False)), torch.ones_like(MISMATCH))["accuracy"] == pytest.approx(0.5)


def test_rows_compare_with_standard_sd_and_pick_the_best_at_parity():
    points = [
        PolicyPoint("standard_sd", None, ~MISMATCH),
        PolicyPoint("accept_all", None, torch.ones_like(MISMATCH)),
        PolicyPoint("scorer", 0.9, ~MISMATCH),
        PolicyPoint("scorer", 0.5, torch.tensor([[False, True, True], [True, True, True], [True, True, True]])),
    ]
    rows = tradeoff_rows(table(), points)
    by = {(r["policy"], r["parameter"]): r for r in rows}
    assert by[("accept_all", None)]["accuracy_drop"] == pytest.approx(2 / 3)
    assert by[("accept_all", None)]["accept_len_ratio"] == pytest.approx(3.0)
    # Threshold 0.5: record 0 rejects at 0 (right), records 1 and 2 run to 3 (right, wrong).
    assert by[("scorer", 0.5)]["accuracy"] == pytest.approx(2 / 3)
    assert best_at_parity(rows, 0.02)["scorer"]["parameter"] == 0.9
    assert best_at_parity(rows, 0.5)["scorer"]["parameter"] == 0.5
    assert "accept_all" not in best_at_parity(rows, 0.5)


class StubVerifier:
    """Marks chosen (record, column) outcomes as failed; records what it was asked."""

    def __init__(self, failed: list[tuple[int, int]]):
        self.failed, self.asked, self.checked = failed, None, None

    def verify(self, records, accept_len, check_invalid=True):
        self.asked = accept_len.clone()
        valid = torch.ones_like(accept_len, dtype=torch.bool)
        for b, col in self.failed:
            valid[b, col] = False
        return Verification(accept_len == 3, valid, {}, {"invalid": int((~valid).sum())})

    def check_invalid(self, invalid, total):
        self.checked = (invalid, total)


def test_verify_outcomes_asks_once_for_every_reachable_end():
    mismatch = torch.tensor([[True, False, True], [False, False, False]])
    # Column 1 of record 0 is unreachable (it repeats j = K): its failure must not count.
    verifier = StubVerifier(failed=[(0, 1), (1, 3)])
    got, _ = verify_outcomes(verifier, [None, None], mismatch)
    assert verifier.asked.tolist() == [[0, 3, 2, 3], [3, 3, 3, 3]]
    assert got.verified.tolist() == [True, False]
    assert verifier.checked == (1, 4)  # one failure among the 3 + 1 reachable outcomes


def test_policy_points_cover_every_family():
    mismatch = MISMATCH
    probs = torch.tensor([[0.9, 0.5, 0.2], [0.5, 0.5, 0.6], [0.5, 0.05, 0.5]])
    features = TokenFeatures(
        rank=torch.tensor([[1, 0, 4], [0, 0, 2], [0, 1, 0]]),
        target_entropy=torch.rand(3, 3),
        kl=torch.rand(3, 3),
        target_top1=torch.full((3, 3), 0.5),
    )
    sweep = RuleSweep([0.5, 0.1], [2, 5], None, [0.3], 0.9, auto_thresholds=4)
    points = policy_points(mismatch, probs, features, sweep)
    families = [p.policy for p in points]
    assert families[:2] == ["standard_sd", "accept_all"]
    assert families.count("scorer") == 2 and families.count("topk") == 2
    assert families.count("kl_below") == 4 and families.count("entropy_above") == 1
    scorer_05 = next(p for p in points if p.policy == "scorer" and p.parameter == 0.5)
    assert torch.equal(scorer_05.decisions, threshold_decisions(probs, mismatch, 0.5))
    for p in points:
        assert p.decisions[~mismatch].all(), p.policy  # matches are always accepted


# --- end to end ----------------------------------------------------------------------------------


def run_eval(args: list[str], out: Path, toy_world: Path, env: dict[str, str] | None = None):
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, str(ROOT / "run.py"), "task=eval", f"hydra.run.dir={out}", f"toy.out={toy_world}", *args]
    return subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def eval_run(trained_ckpt: Path, toy_world: Path, tmp_path_factory):
    """`python run.py task=eval` on all 413 held-out records, logging to csv and offline wandb."""
    out = tmp_path_factory.mktemp("eval")
    proc = run_eval([f"ckpt_path={trained_ckpt}", "logger=[csv,wandb]"], out, toy_world, wandb_env(out))
    return out, proc


@pytest.mark.cli
def test_eval_writes_its_files_and_ends_with_the_headline(eval_run, trained_ckpt: Path):
    out, proc = eval_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    report = json.loads((out / "eval.json").read_text())
    last = proc.stdout.strip().splitlines()[-1]
    match = LAST_LINE.fullmatch(last)
    assert match, last
    keys = ("scorer_accept_len", "scorer_accuracy", "sd_accept_len", "sd_accuracy")
    assert [float(v) for v in match.groups()] == [round(report[k], 3) for k in keys]
    assert all(len(v.split(".")[1]) == 3 for v in match.groups())
    assert report["records"] == 413 and report["excluded_records"] == 0

    # The scorer keeps far more draft tokens than standard SD at the same accuracy; accept-all
    # pays for its blocks in accuracy.
    assert report["scorer_accept_len"] >= 1.5 * report["sd_accept_len"]
    assert report["scorer_accuracy"] >= report["sd_accuracy"] - 0.02
    accept_all = next(r for r in report["policies"] if r["policy"] == "accept_all")
    assert accept_all["accuracy"] < report["sd_accuracy"] - 0.2
    # The lookups agree with the training run's own validation on the same records.
    summary = json.loads((trained_ckpt.parents[1] / "summary.json").read_text())
    assert report["scorer_accept_len"] == pytest.approx(summary["val/accept_len"], abs=1e-4)
    assert report["scorer_accuracy"] == pytest.approx(summary["val/accuracy"], abs=1e-4)
    assert report["sd_accept_len"] == pytest.approx(summary["val/standard_sd/accept_len"], abs=1e-4)

    with (out / "tradeoff.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(report["policies"])
    assert {r["policy"] for r in rows} == {"scorer", "standard_sd", "accept_all", "topk", "kl_below", "entropy_above"}
    # The quantile thresholds spread the trained scorer over a curve, not one saturated point.
    assert len({r["accept_len"] for r in rows if r["policy"] == "scorer"}) >= 4
    assert (out / "tradeoff.png").stat().st_size > 10_000


@pytest.mark.cli
def test_eval_logs_table_and_plot_to_wandb(eval_run):

    out, proc = eval_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = [Path(p) for p in glob.glob(str(out / "wandb" / "offline-run-*"))]
    config, history, exit_code = read_wandb_run(run_dir)
    assert exit_code == 0
    assert config["eval"]["topk"] == [2, 3, 5, 10]  # the resolved config
    keys = set().union(*history)
    assert {"eval/scorer_accept_len", "eval/sd_accuracy"} <= keys
    (table_row,) = [h for h in history if h.get("eval/tradeoff/_type") == "table-file"]
    table = json.loads((run_dir / "files" / table_row["eval/tradeoff/path"]).read_text())
    assert table["columns"][:4] == ["policy", "parameter", "accuracy", "accept_len"]
    assert len(table["data"]) == len(json.loads((out / "eval.json").read_text())["policies"])
    assert any("plots/tradeoff/_type" in h for h in history)
    assert (out / "csv" / "metrics.csv").is_file()


def test_eval_without_checkpoint_is_one_clear_error(tmp_path: Path, toy_world: Path, compose_train):
    from spd_lightning.tasks.evaluate import evaluate

    cfg = compose_train(["task=eval", f"toy.out={toy_world}"], tmp_path)
    with pytest.raises(SetupError, match=r"^task=eval needs the trained scorer: ckpt_path=\S+$"):
        evaluate(cfg)


def test_eval_outside_the_toy_world_names_the_rule_models_to_set(
    trained_ckpt: Path, toy_world: Path, tmp_path: Path, compose_train
):
    from spd_lightning.tasks.evaluate import evaluate

    overrides = ["task=eval", "~toy", "data=jsonl", f"data.path={toy_world}/records.jsonl", "~logger"]
    overrides += [
        f"model.path={toy_world}/draft",
        f"model.tokenizer={toy_world}/target",
        f"target.model_path={toy_world}/target",
        f"ckpt_path={trained_ckpt}",
    ]
    cfg = compose_train(overrides, tmp_path)
    with pytest.raises(SetupError, match=r"pair.target is not set .*python run.py pair.target=PATH"):
        evaluate(cfg)


def test_eval_against_a_vllm_server_reads_the_rules_in_process(
    trained_ckpt: Path, toy_world: Path, tmp_path: Path, compose_train, fake_vllm, capsys
):
    from spd_lightning.tasks.evaluate import evaluate

    overrides = ["task=eval", f"toy.out={toy_world}", f"ckpt_path={trained_ckpt}", "target=vllm"]
    overrides += [f"target.url={fake_vllm.url}", "eval.max_records=32", "eval.topk=[2]", "~logger"]
    cfg = compose_train(overrides, tmp_path)
    accept_len = evaluate(cfg)
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["records"] == 32 and accept_len == pytest.approx(report["scorer_accept_len"])
    assert fake_vllm.counts["/v1/completions"] >= 1  # verified by the server
    assert {r["policy"] for r in report["policies"]} >= {"kl_below", "entropy_above"}  # rules in-process
    assert LAST_LINE.fullmatch(capsys.readouterr().out.strip().splitlines()[-1])
