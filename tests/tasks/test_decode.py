"""task=decode: whole generations with draft, target and trained scorer, against the baselines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from spd_lightning.errors import SetupError
from spd_lightning.tasks.decode import decode

ROOT = Path(__file__).resolve().parents[2]
HEADLINE = re.compile(
    r"^scorer_accuracy=(?P<scorer_acc>[\d.]+) scorer_target_calls_per_token=(?P<scorer_cpt>[\d.]+) "
    r"sd_accuracy=(?P<sd_acc>[\d.]+) sd_target_calls_per_token=(?P<sd_cpt>[\d.]+) "
    r"greedy_accuracy=(?P<greedy_acc>[\d.]+)$"
)


def run_decode(args: list[str], out: Path, toy_world: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "run.py"), "task=decode", f"hydra.run.dir={out}", f"toy.out={toy_world}", *args]
    return subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("kv_cache", [False, True])
def test_baselines_in_process_write_decode_json(compose_train, toy_world: Path, tmp_path: Path, kv_cache: bool):
    overrides = [f"toy.out={toy_world}", "task=decode", "data.num_prompts=12", "decode.policies=[standard_sd,greedy]"]
    cfg = compose_train([*overrides, f"decode.kv_cache={kv_cache}"], tmp_path)
    metric = decode(cfg)  # no scorer among the policies: no checkpoint needed
    summary = json.loads((tmp_path / "decode.json").read_text())
    assert metric is None  # the default optimized_metric is the scorer's, which did not run
    assert summary["greedy/target_calls_per_token"] == 1.0
    assert summary["standard_sd/same_as_greedy"] == 1.0
    assert summary["standard_sd/accuracy"] == summary["greedy/accuracy"] >= 0.9
    assert summary["standard_sd/target_calls_per_token"] < 1.0
    low, high = summary["greedy/accuracy_ci95_low"], summary["greedy/accuracy_ci95_high"]
    assert low < summary["greedy/accuracy"] <= high  # Wilson, 12 prompts
    samples = [json.loads(line) for line in (tmp_path / "decode_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and samples[0]["greedy"]["response"] == samples[0]["standard_sd"]["response"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ([], "task=decode needs the trained scorer: ckpt_path="),
        (["decode.policies=[greedy,beam]"], r"decode.policies \['greedy', 'beam'\]: choose among"),
        (["decode.policies=[greedy]", "pair.target=no-such-model"], "(?s)'no-such-model'.*pair.target="),
        (["decode.policies=[greedy]", "decode.block_size=0"], "decode.block_size, .* must be >= 1"),
        (["decode.policies=[greedy,kl_below]"], "decode.policies has kl_below: set decode.kl_threshold="),
        (["decode.policies=[greedy,judge]"], "decode.policies has judge, but decode.judge_path=None is not a file"),
    ],
)
def test_bad_settings_are_one_clear_error(compose_train, toy_world: Path, tmp_path: Path, overrides, message):
    cfg = compose_train([f"toy.out={toy_world}", "task=decode", "data.num_prompts=4", *overrides], tmp_path)
    with pytest.raises(SetupError, match=message):
        decode(cfg)


def test_a_saved_judge_decodes_at_its_saved_threshold(compose_train, toy_world: Path, tmp_path: Path):
    """task=judge saves judges with save_judge; decode.judge_path runs one (here an accept-all
    judge at its saved threshold 0: it must emit what accept_all emits)."""
    from spd_lightning.judge.head import TOKEN_FEATURES, JudgeHead, save_judge

    head = JudgeHead({"tokens": len(TOKEN_FEATURES), "target_hidden": 128})
    save_judge(head, tmp_path / "judge.pt", threshold=0.0)
    overrides = [
        f"toy.out={toy_world}",
        "task=decode",
        "data.num_prompts=8",
        "decode.policies=[greedy,judge,accept_all]",
    ]
    cfg = compose_train([*overrides, f"decode.judge_path={tmp_path / 'judge.pt'}"], tmp_path)
    decode(cfg)
    summary = json.loads((tmp_path / "decode.json").read_text())
    assert summary["judge/target_calls_per_token"] == summary["accept_all/target_calls_per_token"]
    assert summary["judge/accuracy"] == summary["accept_all/accuracy"]


@pytest.mark.parametrize("kv_cache", [False, True])
def test_the_judge_watching_standard_sd_predicts_which_generations_it_changes(
    compose_train, toy_world: Path, tmp_path: Path, kv_cache: bool
):
    """With decode.judge_path, standard SD runs with the judge watching: it stays lossless, and
    the judge at any threshold writes exactly standard SD's response wherever its watched_max is
    below that threshold; at judge_watch/threshold_at_tolerance it changes at most that share."""
    import torch

    from spd_lightning.judge.head import TOKEN_FEATURES, JudgeHead, save_judge

    torch.manual_seed(0)
    head = JudgeHead({"tokens": len(TOKEN_FEATURES), "target_hidden": 128})
    torch.nn.init.normal_(head.net[-1].weight, std=0.5)  # probabilities spread around 0.5
    save_judge(head, tmp_path / "judge.pt", threshold=0.5)
    base = [f"toy.out={toy_world}", "task=decode", "data.num_prompts=16", f"decode.kv_cache={kv_cache}"]
    base += [f"decode.judge_path={tmp_path / 'judge.pt'}", "decode.judge_tolerance=0.25", "decode.batch_size=5"]

    def run(threshold: float | None, name: str) -> tuple[dict, list[dict]]:
        cfg = compose_train(
            [
                *base,
                "decode.policies=[greedy,standard_sd,judge]",
                "decode.judge_threshold=" + ("null" if threshold is None else repr(threshold)),
            ],
            tmp_path / name,
        )
        decode(cfg)
        samples = (tmp_path / name / "decode_samples.jsonl").read_text().splitlines()
        return json.loads((tmp_path / name / "decode.json").read_text()), [json.loads(line) for line in samples]

    summary, samples = run(None, "saved")
    assert summary["standard_sd/same_as_greedy"] == 1.0  # watching changes nothing standard SD emits
    watched = [s["standard_sd"].get("judge_watched_max") for s in samples]
    assert summary["judge_watch/changed_at_threshold_in_use"] == sum(w is not None and w >= 0.5 for w in watched) / 16
    assert (tmp_path / "saved" / "judge_watch.png").stat().st_size > 10_000
    chosen = summary["judge_watch/threshold_at_tolerance"]
    assert summary["judge_watch/changed_at_tolerance"] == 4 / 16  # floor(0.25 * 16) with these spread probabilities
    summary, samples = run(chosen, "chosen")
    # Exactly the generations whose watched_max reaches the threshold change; the rest are standard SD's.
    changed = [s["judge"]["response"] != s["standard_sd"]["response"] for s in samples]
    assert changed == [w is not None and w >= chosen for w in watched]
    assert summary["judge/target_calls_per_token"] < summary["standard_sd/target_calls_per_token"]


def test_prompts_without_answers_are_judged_against_greedy(compose_train, toy_world: Path, tmp_path: Path):
    raw = tmp_path / "questions.jsonl"
    raw.write_text("".join(json.dumps({"question": f"Q: {a}+{a}= A:"}) + "\n" for a in range(5)))
    base = [f"toy.out={toy_world}", "task=decode", "data=prompts", f"data.raw={raw}", "data.answer_key=null"]
    cfg = compose_train([*base, "decode.policies=[greedy,standard_sd]"], tmp_path)
    decode(cfg)
    summary = json.loads((tmp_path / "decode.json").read_text())
    assert summary["greedy/accuracy"] == summary["standard_sd/accuracy"] == 1.0  # SD is lossless
    cfg = compose_train([*base, "decode.policies=[standard_sd]"], tmp_path)
    with pytest.raises(SetupError, match="must include greedy"):
        decode(cfg)


@pytest.mark.cli
def test_decode_end_to_end_beats_standard_sd(trained_ckpt: Path, toy_world: Path, tmp_path: Path):
    out = tmp_path / "run"
    proc = run_decode([f"ckpt_path={trained_ckpt}", "data.num_prompts=30"], out, toy_world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    match = HEADLINE.match(last)
    assert match, last
    figures = {k: float(v) for k, v in match.groupdict().items()}
    summary = json.loads((out / "decode.json").read_text())
    assert summary["num_prompts"] == 30 and summary["standard_sd/same_as_greedy"] == 1.0
    assert figures["scorer_cpt"] == pytest.approx(summary["scorer/target_calls_per_token"], abs=1e-4)
    # The trained scorer needs far fewer target calls than standard SD, at greedy's accuracy
    # (within a few points), while accepting every mismatch loses it.
    assert figures["scorer_cpt"] < 0.8 * figures["sd_cpt"]
    assert figures["scorer_acc"] >= figures["greedy_acc"] - 0.07
    assert summary["accept_all/accuracy"] < figures["greedy_acc"] - 0.3
    assert len((out / "decode_samples.jsonl").read_text().splitlines()) == 30


@pytest.mark.cli
def test_decode_a_prompt_file(toy_world: Path, tmp_path: Path):
    raw = tmp_path / "prompts.jsonl"
    lines = [{"question": f"Q: {a}+{b}= A:", "answer": str(a + b)} for a, b in [(3, 4), (37, 45), (12, 8), (50, 25)]]
    raw.write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n")
    out = tmp_path / "run"
    proc = run_decode(["data=prompts", f"data.raw={raw}", "decode.policies=[greedy,standard_sd]"], out, toy_world)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "decode.json").read_text())
    assert summary["num_prompts"] == 4  # the malformed line is skipped and reported
    assert "prompts.jsonl:5" in proc.stderr + (out / "run.log").read_text()
    # The shipped target answers 3+4 with 8 (one-digit sums are rare in its training) and solves the rest.
    assert summary["greedy/accuracy"] == summary["standard_sd/accuracy"] == 0.75
    assert proc.stdout.strip().splitlines()[-1] == "sd_accuracy=0.7500 sd_target_calls_per_token={:.4f} {}".format(
        summary["standard_sd/target_calls_per_token"], "greedy_accuracy=0.7500"
    )
