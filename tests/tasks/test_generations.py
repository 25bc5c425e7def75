"""bench/whole_generations.py's stages on the default world: mined labels, sweeps, the report."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from spd_lightning.decoding.features import FeatureCache
from spd_lightning.judge.head import TOKEN_FEATURES, JudgeHead
from spd_lightning.tasks.generation_report import _panel, last_line, report
from spd_lightning.tasks.generation_sweep import (
    Point,
    SweepSettings,
    choose,
    families,
    grid_on_disk,
    kept_grid,
    stage_sweep,
)
from spd_lightning.tasks.generations import (
    ROOT,
    TOY_PAIR,
    WorldSettings,
    fit_supervised_head,
    head_from_checkpoint,
    load_world,
    mined_labels,
    portable_checkpoint,
    run_to_its_end,
    stage_responses,
    toy_sets,
)


@pytest.fixture
def world(toy_world, tmp_path):
    w = load_world("toy", WorldSettings(toy_world, toy_sets(24, 16, 24), tmp_path, 24))
    stage_responses(w)
    return w


def test_mined_labels_are_autojudges_and_standard_sd_keeps_every_own_answer(world, tmp_path):
    prompts, asks, labels = mined_labels(world, world.sets["train"].prompts, 4, tmp_path / "mined.json")
    assert len(asks) > 10 and 0 < int(labels.sum()) < len(labels)  # harmless and important mismatches both
    assert (prompts, asks, labels.tolist()) == _mined_again(world, tmp_path / "mined.json")
    head = fit_supervised_head(world, FeatureCache(world.draft, world.target), prompts, asks, labels, 50, 0)
    results = stage_sweep(world, {"supervised": head}, [2], SweepSettings(2))
    sd = results[2]["sd"]["test"][0]
    assert sd.agreement == 1.0  # standard SD writes the target's own responses
    accept_all = results[2]["accept_all"]["test"][0]
    assert accept_all.tokens_per_call > sd.tokens_per_call and accept_all.accuracy < sd.accuracy
    line = report(results, families({"supervised": head}), tmp_path, 0.01, "test sample")
    assert line.startswith("gen_rl_tpc=nan gen_rl_accuracy=nan block_rl_tpc=nan sup_tpc=")  # heads not given: nan
    assert "sd_accuracy=" in line and line.endswith("n=24")
    assert (tmp_path / "generations.png").is_file() and "Machine:" in (tmp_path / "generations.md").read_text()
    with pytest.MonkeyPatch.context() as patch:  # a resumed sweep meets the same grid, on any CPU
        patch.setattr("spd_lightning.tasks.generation_sweep.thresholds_for", lambda *a: pytest.fail("new grid"))
        again = stage_sweep(world, {"supervised": head}, [2], SweepSettings(2))  # read back from disk
    assert again[2]["sd"]["test"][0].correct == sd.correct
    assert again[2]["supervised"]["choose"] == results[2]["supervised"]["choose"]


def test_a_head_swept_by_name_joins_the_last_line_after_the_fixed_figures():
    def point(name, right, tokens):  # 4 problems, 10 target calls
        return Point(name, 0.5, [True] * right + [False] * (4 - right), [True] * 4, tokens, 10, 1, 2)

    sd, one = point("sd", 3, 60), point("gen_rl_one", 3, 75)
    results = {8: {"sd": {"chosen": sd, "test": [sd]}, "gen_rl_one": {"chosen": one, "test": [one]},
                   "entropy": {"chosen": sd, "test": [sd]}}}  # fmt: skip
    line = last_line(results, families({"gen_rl_one": None}))
    assert line.startswith("gen_rl_tpc=nan gen_rl_accuracy=nan block_rl_tpc=nan sup_tpc=nan kl_tpc=nan sd_tpc=6.000")
    assert line.endswith("sd_accuracy=0.750 gen_rl_one_tpc=7.500 gen_rl_one_accuracy=0.750 n=4")
    assert "entropy" not in line  # a rule, not a head


def test_a_family_keeps_its_colour_in_every_panel_whichever_others_were_swept():
    import matplotlib.pyplot as plt

    fams = families({"gen_rl": None, "gen_rl_one": None})
    one = Point("gen_rl_one", 0.5, [True], [True], 5, 1, 1, 2)
    fig, (k4, k8) = plt.subplots(1, 2)
    _panel(k4, {"gen_rl_one": {"choose": [one], "chosen": None}}, fams, "choose")  # gen_rl not swept at K = 4
    _panel(k8, {"gen_rl": {"choose": [one], "chosen": None}, "gen_rl_one": {"choose": [one], "chosen": None}},
           fams, "choose")  # fmt: skip
    colours = [{line.get_label(): line.get_color() for line in ax.get_lines()} for ax in (k4, k8)]
    plt.close(fig)
    assert colours[0]["GRPO gen., one"] == colours[1]["GRPO gen., one"] != colours[1]["GRPO gen."]


def test_a_family_swept_before_grids_were_kept_resumes_at_its_measured_thresholds(tmp_path):
    kl = next(f for f in families({}) if f.name == "kl")
    measured = [Point("kl", t, [True], [True], 8, 2, 1, 1) for t in (-1.25, -0.5)]
    (tmp_path / "K8_choose_kl.json").write_text(json.dumps([vars(p) for p in measured]))
    progress = SimpleNamespace(folder=tmp_path)  # no cache: a new grid would need one
    assert kept_grid(None, None, kl, 8, progress, 2) == [-1.25, -0.5]
    assert json.loads((tmp_path / "K8_grid2_kl.json").read_text()) == [-1.25, -0.5]  # kept from now on
    assert kept_grid(None, None, kl, 8, progress, 2) == [-1.25, -0.5]


def test_top_k_sweeps_its_tightest_settings_first_as_many_as_points_asks(tmp_path):
    topk = next(f for f in families({}) if f.name == "topk")
    progress = SimpleNamespace(folder=tmp_path)
    assert kept_grid(None, None, topk, 8, progress, 2) == [-1.0, -2.0]  # k = 2, 3: accept ranks 2 and 2-3
    assert grid_on_disk(topk, 8, progress, 4) == [-1.0, -2.0, -4.0, -9.0]  # k = 2, 3, 5, 10


def _mined_again(world, path: Path):
    """mined_labels read back from `path`, with mining itself made to fail."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("spd_lightning.tasks.generations.mine_labels", lambda *a: pytest.fail("mined again"))
        prompts, asks, labels = mined_labels(world, world.sets["train"].prompts, 4, path)
    return prompts, asks, labels.tolist()


@pytest.mark.cli
def test_the_bench_runs_every_stage_as_documented(tmp_path):
    args = ["--train", "24", "--choose", "16", "--test", "16", "--k", "4", "--points", "2", "--train-steps", "4"]
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "whole_generations.py"), *args, "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-2]  # then "stage sweep: N s"
    for key in ("gen_rl_tpc=", "gen_rl_accuracy=", "block_rl_tpc=", "sup_tpc=", "kl_tpc=", "sd_tpc=", "n=16"):
        assert key in last, last
    assert (Path(tmp_path) / "heads" / "gen_rl" / "checkpoints" / "last.ckpt").is_file()
    # Committed with the store on the real pair: the run's records name the project's folders
    # relative to it (only the shipped toy world is named where the package lies).
    hparams = (tmp_path / "heads" / "gen_rl" / "csv" / "hparams.yaml").read_text().splitlines()
    assert [line for line in hparams if str(ROOT) in line and "toy/world" not in line] == []
    inspect = [sys.executable, str(ROOT / "bench" / "head_inspect.py"), "--noise-heads", "3",
               "--ckpt", str(tmp_path / "heads" / "gen_rl" / "checkpoints" / "last.ckpt"),
               "--features", str(tmp_path / "heads" / "features.pt"), "--store", str(tmp_path / "completions.jsonl"),
               "--tokenizer", str(TOY_PAIR / "target")]  # fmt: skip
    done = subprocess.run(inspect, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("gen_rl_step_4: digits=")
    assert "3 linear heads trained the same way" in (tmp_path / "heads" / "gen_rl" / "head_inspect.md").read_text()
    ranking = [sys.executable, str(ROOT / "bench" / "mismatch_ranking.py"), "--episodes", str(tmp_path),
               "--tokenizer", str(TOY_PAIR / "target"), "--folds", "2", "--bootstrap", "5", "--steps", "5"]  # fmt: skip
    done = subprocess.run(ranking, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    for key in ("kl=", "entropy=", "topk=", "supervised=", "block_rl=", "gen_rl=", "fit_tokens=", "fit_hidden="):
        assert key in last, last
    assert (tmp_path / "mismatch_ranking.png").is_file()
    replay = [sys.executable, str(ROOT / "bench" / "grpo_replay.py"), "--episodes", str(tmp_path), "--world", "toy",
              "--tokenizer", str(TOY_PAIR / "target"), "--train", "24", "--choose", "16", "--test", "16",
              "--batches", "3", "--seeds", "1", "--folds", "2", "--bootstrap", "5", "--max-forks", "1"]  # fmt: skip
    done = subprocess.run(replay, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    for key in ("reference_run_auc_3=", "target_one_auc_3=", "shuffled_uncapped_auc_3=", "logistic="):
        assert key in last, last
    assert (tmp_path / "grpo_replay_forks1.png").is_file()  # --max-forks: its own files beside the run's
    assert "at most 1 kept" in (tmp_path / "grpo_replay_forks1.md").read_text()
    run = tmp_path / "heads" / "gen_rl"
    at = [sys.executable, str(ROOT / "bench" / "checkpoint_auc.py"), "--run", str(run), "--episodes", str(tmp_path),
          "--tokenizer", str(TOY_PAIR / "target"), "--bootstrap", "5"]  # fmt: skip
    done = subprocess.run(at, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("auc_first=")
    assert "batches=" in done.stdout.strip().splitlines()[-1] and (run / "held_out_auc.png").is_file()
    # A run's head by name beside the rules, forks completed a few tokens at a time (new ones at K = 2);
    # a sweep of some families reports beside the world's generations.md, not over it.
    again = ["--train", "24", "--choose", "16", "--test", "16", "--k", "2", "--points", "2", "--no-heads",
             "--head", f"one={run}", "--families", "sd", "one", "--segment", "2", "--out", str(tmp_path)]  # fmt: skip
    whole = (tmp_path / "generations.md").read_text()
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "whole_generations.py"), *again],
                          capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "sweep" / "K2_choose_one.json").is_file() and (tmp_path / "generations.md").read_text() == whole
    assert "| one |" in (tmp_path / "generations_last_sweep.md").read_text()


def test_a_sweep_keeps_each_point_as_it_is_measured_and_resumes_from_it(world, monkeypatch):
    import spd_lightning.tasks.generation_sweep as sweep

    first = sweep.stage_sweep(world, {}, [2], SweepSettings(2, names=("kl",)))
    path = world.out / "sweep" / "K2_test_kl.json"
    grid = [p.threshold for p in first[2]["kl"]["test"]]
    assert len(grid) == 2 and len(json.loads(path.read_text())) == 2
    # As if stopped after the first point: only that one on disk, marked so a recompute would show.
    kept = json.loads(path.read_text())[:1]
    kept[0]["tokens"] = -1
    path.write_text(json.dumps(kept))
    measured = []
    real = sweep.evaluate_point
    monkeypatch.setattr(sweep, "evaluate_point", lambda *a, **k: measured.append(a[3]) or real(*a, **k))
    again = sweep.stage_sweep(world, {}, [2], SweepSettings(2, names=("kl",)))
    assert again[2]["kl"]["test"][0].tokens == -1  # read back, not measured again
    assert measured == [grid[1]] and again[2]["kl"]["test"][1].tokens == first[2]["kl"]["test"][1].tokens


def test_the_test_set_can_hold_only_the_threshold_chosen_on_the_choosing_set(world, tmp_path):
    settings = SweepSettings(3, tolerance=0.05, test_points="chosen", names=("kl", "accept_all"))
    results = stage_sweep(world, {}, [2], settings)[2]
    kl, sd = results["kl"], results["sd"]
    assert len(kl["choose"]) == 3 and len(sd["test"]) == 1
    pick = choose(kl["choose"], sd["choose"][0], 0.05)
    assert [p.threshold for p in kl["test"]] == ([pick.threshold] if pick.family == "kl" else [])
    assert results["accept_all"]["test"] == []  # it never passes the tolerance on this world
    report({2: results}, families({}), tmp_path, 0.05, "test sample")  # a family without test points draws
    assert (tmp_path / "generations.png").is_file()


def test_a_report_on_disk_measures_nothing_and_says_what_is_missing(world, tmp_path, monkeypatch):
    import spd_lightning.tasks.generation_sweep as sweep

    # Tolerance 1: every threshold passes, so the KL rule's chosen point is its own.
    chosen = SweepSettings(2, tolerance=1.0, test_points="chosen", names=("kl",))
    sweep.stage_sweep(world, {}, [2], chosen)
    (world.out / "sweep" / "K2_test_kl.json").unlink()  # as if stopped before its test point
    monkeypatch.setattr(sweep, "evaluate_point", lambda *a, **k: pytest.fail("a report on disk measured a point"))
    monkeypatch.setattr(sweep, "thresholds_for", lambda *a, **k: pytest.fail("a report on disk computed a grid"))
    # Asked for 3 points a family, it reads the 2 the sweep measured rather than computing a grid of 3.
    on_disk = SweepSettings(3, tolerance=1.0, test_points="chosen", names=("kl", "entropy", "topk"), on_disk=True)
    saved = {path: path.stat().st_mtime_ns for path in (world.out / "sweep").glob("*.pt")}
    results = sweep.stage_sweep(world, {}, [2], on_disk)[2]
    assert saved and saved == {path: path.stat().st_mtime_ns for path in (world.out / "sweep").glob("*.pt")}
    assert "entropy" not in results and "topk" not in results  # never swept at K = 2: left out, not measured
    assert len(results["kl"]["choose"]) == 2 and results["kl"]["chosen"] is None
    assert results["sd"]["chosen"] is results["sd"]["test"][0]
    report({2: results}, families({}), tmp_path, 1.0, "test sample")
    assert "test point not measured" in (tmp_path / "generations.md").read_text()
    with pytest.raises(SystemExit, match="standard SD at K = 4"):
        sweep.stage_sweep(world, {}, [4], on_disk)


CHILD = """
import signal, sys, time
def finish(*_):
    time.sleep(0.3)  # a step ending
    open(sys.argv[1], "w").write("saved")
    sys.exit(0)
signal.signal(signal.SIGTERM, finish)
open(sys.argv[2], "w").write("ready")
time.sleep(30)
"""


def test_a_stopped_bench_lets_its_training_run_end_its_step(tmp_path):
    saved, ready = tmp_path / "saved", tmp_path / "ready"

    def stop(*_):  # the bench's own SIGTERM handler raises SystemExit
        raise SystemExit(143)

    def stop_once_ready(*_):
        if ready.is_file():
            stop()
        signal.setitimer(signal.ITIMER_REAL, 0.1)

    previous = signal.signal(signal.SIGALRM, stop_once_ready)
    signal.setitimer(signal.ITIMER_REAL, 0.1)
    try:
        with pytest.raises(SystemExit):
            run_to_its_end([sys.executable, "-c", CHILD, str(saved), str(ready)], tmp_path)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert saved.read_text() == "saved"  # the child was told to stop and was waited for, not killed


@pytest.mark.parametrize("inputs", [("tokens",), ("tokens", "target_hidden")])
def test_a_heads_inputs_come_back_from_its_checkpoint(tmp_path, inputs):
    head = JudgeHead({"tokens": len(TOKEN_FEATURES), "target_hidden": 12}, inputs)
    torch.nn.init.normal_(head.net[0].weight)
    state = {f"scorer.head.{k}": v for k, v in head.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "last.ckpt")
    loaded = head_from_checkpoint(tmp_path / "last.ckpt")
    assert loaded.inputs == inputs
    assert torch.equal(loaded.net[0].weight, head.net[0].weight)


def test_a_portable_checkpoint_names_project_folders_relative_to_the_project(tmp_path):
    run = ROOT / "data" / "episodes" / "heads" / "gen_rl"
    weights = {"scorer.head.net.0.weight": torch.randn(1, 8)}
    saved = {"state_dict": weights, "global_step": 3,
             "callbacks": {"ModelCheckpoint": {"dirpath": str(run / "checkpoints")}},
             "hyper_parameters": {"completions_path": str(ROOT / "store.jsonl"), "threshold": 0.5}}  # fmt: skip
    torch.save(saved, tmp_path / "last.ckpt")
    portable_checkpoint(tmp_path / "last.ckpt")
    back = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert back["callbacks"]["ModelCheckpoint"]["dirpath"] == "data/episodes/heads/gen_rl/checkpoints"
    assert back["hyper_parameters"] == {"completions_path": "store.jsonl", "threshold": 0.5}
    assert torch.equal(back["state_dict"]["scorer.head.net.0.weight"], weights["scorer.head.net.0.weight"])
    assert back["global_step"] == 3
