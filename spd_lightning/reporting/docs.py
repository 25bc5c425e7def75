"""Copies measured tables into the docs/ pages, so a rerun of the measuring command refreshes
the page instead of someone retyping figures.

    python -m spd_lightning.reporting.docs            # every page under docs/
    python -m spd_lightning.reporting.docs --check    # exit 1 when a page differs from its outputs

A page marks each block that a command writes (reporting.tables.write_markdown: the tables with
the command, the machine, the date and the sample sizes above them):

    <!-- figures from outputs/decode_speed/decode_speed.md -->
    ...replaced by that file's contents...
    <!-- end of figures -->

A block whose file is not there (the command has not been rerun on this machine) is left as it is.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

BLOCK = re.compile(r"(<!-- figures from (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- end of figures -->)", re.S)


def refresh(page: str, root: Path) -> tuple[str, list[tuple[str, bool]]]:
    """(the page with every block whose file exists replaced by it, [(file, replaced)])."""
    seen: list[tuple[str, bool]] = []

    def replace(match: re.Match) -> str:
        source = root / match["path"]
        seen.append((match["path"], source.is_file()))
        if not source.is_file():
            return match[0]
        return match[1] + source.read_text().rstrip("\n") + "\n" + match[4]

    return BLOCK.sub(replace, page), seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="the project root (outputs/ and docs/ under it)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page would change")
    args = parser.parse_args()
    root, stale = Path(args.root), []
    for page in sorted((root / "docs").glob("*.md")):
        text = page.read_text()
        new, blocks = refresh(text, root)
        for source, found in blocks:
            print(f"{page.relative_to(root)}: {source} {'found' if found else 'not here: kept as it is'}")
        if new != text:
            stale.append(page)
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        sys.exit(f"out of date with outputs/: {', '.join(map(str, stale))}")


if __name__ == "__main__":
    main()
