"""task=judge: the judges that task=decode and the generation API load are trained by a task, through
judge/fit.py's one loop; bench/judges.py runs the same function."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from spd_lightning.decoding.speculative import SpeculativeDecoder
from spd_lightning.judge.head import judge_notes
from spd_lightning.tasks.decode import decode
from spd_lightning.tasks.judge import judge
from spd_lightning.toy.raw import toy_prompts

LAST_LINE = re.compile(r"^rl_accept_len=(\S+) rl_accuracy=(\S+) sup_accept_len=\S+ sup_accuracy=\S+ "
                       r"kl_accept_len=\S+ kl_accuracy=\S+ sd_accept_len=(\S+) sd_accuracy=(\S+)$", re.M)  # fmt: skip


@pytest.mark.slow
def test_task_judge_trains_the_judges_that_decode_loads(compose_train, toy_world: Path, tmp_path: Path, capsys):
    cfg = compose_train([f"toy.out={toy_world}", "task=judge", "judge.steps=100"], tmp_path)
    metric = judge(cfg)
    out = capsys.readouterr().out
    rl_len, rl_acc, sd_len, sd_acc = map(float, LAST_LINE.search(out).groups())
    assert metric == pytest.approx(rl_len, abs=5e-4) and rl_len > 2 * sd_len  # more kept per block than SD
    assert rl_acc >= sd_acc - cfg.judge.tolerance  # at parity
    for name in ("judge_sup.pt", "judge_grpo.pt", "judge_exact.pt", "judges.json", "judges.md", "tradeoff.csv"):
        assert (tmp_path / name).is_file(), name
    assert "Machine:" in (tmp_path / "judges.md").read_text()
    assert judge_notes(tmp_path / "judge_grpo.pt")["parity_measure"] == "agreement"
    assert json.loads((tmp_path / "judges.json").read_text())["heldout_records"] > 100

    decoded = tmp_path / "decode"
    overrides = [f"toy.out={toy_world}", "task=decode", "data.num_prompts=12", "decode.policies=[greedy,judge]",
                 f"decode.judge_path={tmp_path / 'judge_grpo.pt'}"]  # fmt: skip
    decode(compose_train(overrides, decoded))
    summary = json.loads((decoded / "decode.json").read_text())
    assert summary["judge/target_calls_per_token"] < 1.0 == summary["greedy/target_calls_per_token"]

    api = SpeculativeDecoder.from_pretrained(
        str(toy_world / "draft"), str(toy_world / "target"), "judge", str(tmp_path / "judge_grpo.pt"),
        chat_template=False,
    )  # fmt: skip
    assert api.generate([p.text for p in toy_prompts(3, seed=1)], 16).stats["draft_tokens_kept_per_block"] > 0
