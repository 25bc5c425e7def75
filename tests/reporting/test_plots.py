"""reporting/plots.py: the curves a run draws, and redrawing them from a run folder."""

from __future__ import annotations

import subprocess
import sys
import warnings

from spd_lightning.reporting import plots
from spd_lightning.reporting.plots import plot_training_curves, read_metrics

HEADER = "epoch,step,train/reward,train/accept_prob\n"


def test_a_resumed_runs_set_aside_metrics_come_first_and_its_repeats_replace_them(tmp_path):
    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    (csv_dir / "metrics.0.csv").write_text(HEADER + "0,0,0.1,0.5\n0,1,0.2,0.5\n0,2,0.3,0.5\n")
    (csv_dir / "metrics.csv").write_text(HEADER + "0,2,0.9,0.4\n0,3,1.0,0.4\n")  # resumed at step 2
    assert read_metrics(csv_dir / "metrics.csv")["train/reward"] == [(0, 0.1), (1, 0.2), (2, 0.9), (3, 1.0)]


def test_the_curves_of_a_run_folder_can_be_redrawn_from_the_command_line(tmp_path):
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text(HEADER + "0,0,0.1,0.5\n0,1,0.2,0.6\n")
    command = [sys.executable, "-m", "spd_lightning.reporting.plots"]
    done = subprocess.run([*command, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000
    missing = subprocess.run([*command, str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert missing.returncode == 1 and "metrics.csv is not a file" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_panels_with_nothing_logged_yet_say_so_instead_of_an_empty_legend(tmp_path):
    """A run stopped before its first validation has no val/ series: those panels say so, and
    matplotlib is not asked for a legend without labels (it warns)."""
    (tmp_path / "metrics.csv").write_text(HEADER + "0,0,0.1,0.5\n0,1,0.2,0.6\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_training_curves(tmp_path / "metrics.csv", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_validation_points_that_tie_stay_visible_each_policy_drawn_its_own_way(tmp_path, monkeypatch):
    """The scorer often answers as standard SD at validation: equal points must not hide each other."""
    header = "epoch,step,val/accuracy,val/standard_sd/accuracy\n"
    (tmp_path / "metrics.csv").write_text(header + "0,11,0.6,0.6\n")
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    plot_training_curves(tmp_path / "metrics.csv", tmp_path / "curves.png")
    accuracy_panel = next(ax for ax in figures[0].axes if ax.get_title() == "val: accuracy")
    lines = accuracy_panel.get_lines()
    assert [line.get_ydata()[0] for line in lines] == [0.6, 0.6]
    styles = {(line.get_marker(), line.get_fillstyle(), line.get_markersize()) for line in lines}
    assert len(styles) == 2
    (filled,) = [line for line in lines if line.get_fillstyle() == "full"]
    hollow = [line for line in lines if line is not filled]
    assert all(line.get_markersize() > filled.get_markersize() for line in hollow)  # drawn around it


def test_every_method_on_the_batch_speed_plot_has_its_own_colour_past_ten(tmp_path, monkeypatch):
    """The speed bench draws 16 methods: the default cycle of 10 gave two methods one colour."""
    figures = []
    monkeypatch.setattr(plots.plt, "close", figures.append)
    series = {f"method {i}": {1: 1.0 + i, 4: 2.0 + i} for i in range(16)}
    plots.plot_batch_speed(series, {"greedy bound, float32": 5.0}, tmp_path / "speed.png", "t")
    colours = [line.get_color() for line in figures[0].axes[0].get_lines() if line.get_label().startswith("method")]
    assert len(colours) == 16 and len({str(c) for c in colours}) == 16
