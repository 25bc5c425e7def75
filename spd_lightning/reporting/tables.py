"""Tables of measured figures: printed to a terminal or a log, and written as markdown beside the
JSON they come from, so a docs/ page copies them (python -m spd_lightning.reporting.docs) instead
of having them typed by hand.

A log has no terminal width, and rich then lays tables out for 80 columns, cutting what does not
fit to "stand…". Every column here folds instead, and callers keep labels short, so a table reads
the same in a log, at 80 columns and wider.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table


@dataclass
class FigureTable:
    """One table: a title, column headers, rows of cells (the first names the row)."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def add(self, *cells: str) -> None:
        self.rows.append([str(c) for c in cells])

    def rich(self) -> Table:
        """Left-aligned names, right-aligned figures; a cell too long for its column wraps."""
        table = Table(title=self.title)
        for n, name in enumerate(self.columns):
            table.add_column(name, justify="left" if n == 0 else "right", overflow="fold")
        for row in self.rows:
            table.add_row(*row)
        return table

    def markdown(self) -> str:
        def line(cells: list[str]) -> str:  # a | inside a cell would end it
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        lines = [f"**{self.title}**", "", line(self.columns)]
        lines.append("| " + " | ".join(["---"] + ["---:"] * (len(self.columns) - 1)) + " |")
        lines += [line(row) for row in self.rows]
        return "\n".join(lines)


def print_tables(*tables: FigureTable, notes: tuple[str, ...] = (), console: Console | None = None) -> None:
    """Prints each table, then each note (wrapped at the console's width)."""
    console = console or Console()
    for table in tables:
        console.print(table.rich())
    for note in notes:
        console.print(note)


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (platform.processor() elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> str:
    """What the figures were measured on: CPU model, the vector extensions that decide which
    kernels pay (AVX-512, its bfloat16 dot products, AMX), cores, torch version, GPU if any."""
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        line = next((x for x in cpuinfo.read_text().splitlines() if x.startswith("flags")), "")
        flags = set(line.split(":", 1)[-1].split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    extensions = ", ".join(f for f in wanted if f in flags) or "none of AVX2/AVX-512/AMX seen"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu_model()} ({extensions}), {cores} cores, torch {torch.__version__}{gpu}"


def command_line() -> str:
    """The command that is running, as a user would type it."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(".py"):
        argv[0] = Path(argv[0]).name if Path(argv[0]).parent == Path(".") else argv[0]
    # A command names files relative to the project (its data beside it as ../), not this machine's paths.
    here = str(Path.cwd()) + os.sep
    beside = str(Path.cwd().parent) + os.sep
    return "python " + shlex.join(a.replace(here, "").replace(beside, "../") for a in argv)


def provenance() -> str:
    """One line: the command, the machine and the date (a plot's footer)."""
    return f"{command_line()} | {machine()} | {datetime.date.today().isoformat()}"


def write_markdown(path: Path, tables: list[FigureTable], notes: tuple[str, ...] = (), sample: str = "") -> Path:
    """`path` (…/NAME.md): the tables in markdown, headed by what measured them (command, machine,
    date, `sample`: the sample sizes), so a docs/ page can copy the file as it is."""
    provenance = [
        f"Command: `{command_line()}`",
        f"Machine: {machine()}",
        f"Date: {datetime.date.today().isoformat()}",
    ]
    if sample:
        provenance.append(f"Sample: {sample}")
    body = ["<br>\n".join(provenance), *(t.markdown() for t in tables), *notes]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(body) + "\n")
    return path
