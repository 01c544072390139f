"""The native code's layers (docs/architecture.md, "The stream codec"):
no include circle in csrc/, and the helper does not carry the verifier.

A module is a .c file with its header: ``scan.c`` + ``xcs_scan.h`` is
``scan``, ``codec.c`` + ``codec.h`` is ``codec``.  A module that includes
another's header depends on it; the graph must have no cycle, except the
helper <-> its generated encoders (``xcsave_msgs.h`` is written from
``xcsave/proto.py`` for the helper and includes the helper's own header).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)
ALLOWED = {frozenset({"helper", "xcsave_msgs"})}


def module(path: Path) -> str:
    stem = path.stem
    return stem.removeprefix("xcs_")


def include_graph() -> dict[str, set[str]]:
    files = [p for p in CSRC.rglob("*") if p.suffix in (".c", ".h", ".cpp", ".hpp")]
    by_name = {p.name: p for p in files}
    graph: dict[str, set[str]] = {}
    for p in files:
        deps = graph.setdefault(module(p), set())
        for inc in INCLUDE.findall(p.read_text()):
            target = by_name.get(Path(inc).name)
            if target is not None and module(target) != module(p):
                deps.add(module(target))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's nodes, found by a DFS from each node (the graph is small)."""
    found: list[list[str]] = []
    seen: set[frozenset[str]] = set()

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                key = frozenset(path)
                if key not in seen and key not in ALLOWED:
                    seen.add(key)
                    found.append([*path, start])
            elif nxt not in path and nxt > start:  # each cycle once, from its least node
                walk(start, nxt, [*path, nxt])

    for n in sorted(graph):
        walk(n, n, [n])
    return found


def test_no_include_circle_in_csrc() -> None:
    graph = include_graph()
    assert {"codec", "source", "walker", "scan", "legacy", "engine_restore"} <= set(graph)
    assert cycles(graph) == []


def test_the_layers_point_down() -> None:
    """codec is pure (no I/O layer below it); the source knows no format
    beyond bytes; the walker knows no client; legacy does not see the verifier."""
    g = include_graph()
    assert not g["codec"] & {"source", "walker", "scan", "stream_io", "engine", "legacy"}
    assert not g["source"] & {"walker", "scan", "legacy", "engine_restore"}
    assert not g["walker"] & {"scan", "engine_restore", "engine", "legacy"}
    assert "scan" not in g["legacy"]


def test_cycle_finder_finds_a_planted_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"helper": {"xcsave_msgs"}, "xcsave_msgs": {"helper"}}) == []
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_helper_does_not_link_the_verifier() -> None:
    from xcsave.supervisor import helper_path

    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    out = subprocess.run([nm, str(helper_path())], capture_output=True, text=True, check=False)
    if "no symbols" in out.stderr:
        pytest.skip("the helper is stripped")
    defined = {line.split()[-1] for line in out.stdout.splitlines() if " T " in line}
    assert {"xcs_walk", "xcs_source_open", "xcs_legacy_run"} <= defined
    assert "xcs_scan_fd" not in defined
