"""tools/build-isolation (issue 15, item 11): a build skips pip's isolated
environment only when the build requirements at hand are new enough --
pybind11, and setuptools >= 77 (older ones cannot read the project's
metadata: the lab's wheel failed on a machine with setuptools 65.5)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "build-isolation"


def _python_with(tmp_path: Path, setuptools: str | None) -> Path:
    mods = tmp_path / "mods"
    (mods / "pybind11").mkdir(parents=True)
    (mods / "pybind11" / "__init__.py").write_text("")
    if setuptools is not None:
        (mods / "setuptools").mkdir()
        (mods / "setuptools" / "__init__.py").write_text(f"__version__ = {setuptools!r}\n")
    py = tmp_path / "python"
    py.write_text(f'#!/bin/sh\nPYTHONPATH={mods} exec {sys.executable} -s "$@"\n')
    py.chmod(0o755)
    return py


@pytest.mark.parametrize(
    ("setuptools", "want"),
    [
        ("65.5.0", ""),
        ("76.9", ""),
        ("77.0.3", "--no-build-isolation"),
        ("80.1", "--no-build-isolation"),
    ],
)
def test_isolation_only_when_setuptools_is_too_old(
    tmp_path: Path, setuptools: str, want: str
) -> None:
    r = subprocess.run(
        [str(TOOL), str(_python_with(tmp_path, setuptools))],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == want
