"""docs/ pages copy their tables from what the measuring commands wrote (reporting/docs.py)."""

from __future__ import annotations

from pathlib import Path

from spd_lightning.reporting.docs import BLOCK, refresh

ROOT = Path(__file__).resolve().parents[2]


def test_a_block_is_replaced_by_its_file_and_a_missing_file_keeps_the_block(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.md").write_text("Command: `python x.py`\n\n| a |\n| --- |\n| 2 |\n")
    page = (
        "# Page\n<!-- figures from out/a.md -->\n| a |\n| --- |\n| 1 |\n<!-- end of figures -->\n"
        "text\n<!-- figures from out/b.md -->\nold\n<!-- end of figures -->\n"
    )
    new, blocks = refresh(page, tmp_path)
    assert blocks == [("out/a.md", True), ("out/b.md", False)]
    assert "| 2 |" in new and "| 1 |" not in new and "Command: `python x.py`" in new
    assert "old\n<!-- end of figures -->" in new and new.startswith("# Page\n") and "text\n" in new
    assert refresh(new, tmp_path)[0] == new  # a second run changes nothing


def test_every_block_of_the_docs_names_a_command_and_a_machine():
    pages = sorted((ROOT / "docs").glob("*.md"))
    blocks = [(page.name, m) for page in pages for m in BLOCK.finditer(page.read_text())]
    assert blocks, "docs/ pages copy their tables from outputs/"
    for name, match in blocks:
        body = match["body"]
        assert body.startswith("Command: `python "), (name, match["path"])
        assert "Machine: " in body and "Date: " in body, (name, match["path"])
