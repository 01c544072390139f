"""docs/architecture.md's layout names every source file (a read-through
found eleven files and modules it had stopped naming as they were added).

A name counts when the layout block spells it, or a pattern there matches
it the way a shell would (``cmd_*.py``, ``codec.[ch]``)."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("xcsave/*.py", "xcsave/*.pyi", "csrc/*.[ch]", "csrc/*.[ch]pp", "csrc/core/*.[ch]")
NAME = re.compile(r"[\w*\[\]-]+\.(?:py|pyi|\[ch\]|[ch]pp|[ch])(?!\w)")


def layout() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text()
    return text.split("## Layout", 1)[1].split("```")[1]


def test_the_layout_names_every_source_file() -> None:
    names = set(NAME.findall(layout()))
    files = sorted(p for pattern in SOURCES for p in ROOT.glob(pattern))
    assert len(files) > 50  # the globs found the tree
    unnamed = [
        str(p.relative_to(ROOT))
        for p in files
        if not any(fnmatch.fnmatchcase(p.name, n) for n in names)
    ]
    assert not unnamed, f"docs/architecture.md's layout does not name {unnamed}"


def test_a_file_the_layout_does_not_name_is_caught() -> None:
    names = set(NAME.findall(layout()))
    assert any(fnmatch.fnmatchcase("cmd_new.py", n) for n in names)  # the glob covers it
    assert not any(fnmatch.fnmatchcase("wire_new.c", n) for n in names)
