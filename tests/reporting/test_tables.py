"""Tables of measured figures (spd_lightning/reporting/tables.py): readable at 80 columns and in a
log (they wrap, never truncate), and written as markdown headed by what measured them."""

from __future__ import annotations

import io

import torch
from rich.console import Console

from spd_lightning.reporting.tables import FigureTable, command_line, machine, print_tables, write_markdown
from spd_lightning.tasks.decode import report


def rendered(*tables: FigureTable, width: int = 80) -> str:
    out = io.StringIO()
    print_tables(*tables, console=Console(file=out, width=width, color_system=None))
    return out.getvalue()


def test_a_table_too_wide_for_80_columns_wraps_instead_of_cutting_words():
    table = FigureTable("wide", ["policy", *[f"column number {n}" for n in range(8)]])
    table.add("zero-cost judge, supervised (AutoJudge labels)", *[f"{1234.5678 * n:.3f}" for n in range(8)])
    text = rendered(table)
    assert "…" not in text
    assert max(map(len, text.splitlines())) <= 80


def test_decode_tables_keep_every_figure_readable_at_80_columns():
    summary = {"num_prompts": 200, "block_size": 4}
    for name in ("greedy", "standard_sd", "scorer", "kl_below", "judge", "accept_all"):
        figures = ("accuracy", "accuracy_ci95_low", "accuracy_ci95_high", "target_calls_per_token",
                   "accepted_draft_tokens_per_block", "tokens_per_prompt", "speedup_vs_greedy")  # fmt: skip
        summary.update({f"{name}/{m}": 0.975 for m in figures})
        summary[f"{name}/tokens_per_s"] = 12345.678
    tables, _ = report(summary)
    text = rendered(*tables)
    assert "…" not in text and max(map(len, text.splitlines())) <= 80
    for row in ("greedy target", "standard SD", "SPD scorer", "KL rule", "zero-cost judge", "accept all"):
        assert row in text  # whole, on one line
    for header in ("accuracy", "95% CI low", "calls/tok", "kept/blk", "tokens", "tok/s*", "x greedy*"):
        assert header in text
    assert "12345.678" in text


def test_markdown_names_command_machine_date_and_sample(tmp_path):
    table = FigureTable("Speed", ["method", "tok/s", "max |dw|"])
    table.add("ours | packed", "4.47", "1e-7")
    path = write_markdown(tmp_path / "bench.md", [table], ("a note",), sample="5 prompts")
    text = path.read_text()
    assert text.startswith("Command: `python ")
    assert f"torch {torch.__version__}" in text and "cores" in machine()
    assert "Sample: 5 prompts" in text and "Date: 20" in text
    assert "| method | tok/s | max \\|dw\\| |\n| --- | ---: | ---: |\n| ours \\| packed | 4.47 | 1e-7 |" in text
    assert text.rstrip().endswith("a note")


def test_a_figures_command_names_files_relative_to_the_project_not_this_machine(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    argv = ["run.py", f"data.raw={tmp_path}/shared/gsm8k/train.jsonl", f"hydra.run.dir={project}/outputs/x"]
    monkeypatch.setattr("sys.argv", argv)
    assert command_line() == "python run.py data.raw=../shared/gsm8k/train.jsonl hydra.run.dir=outputs/x"
