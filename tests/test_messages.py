"""Messages a person reads once (issue 15, item 3): no errno said twice, the
user's path named (never our temporaries), exit 1 for a failure and 2 only
for usage (docs/reliability.md)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import xcsave_cli

from xcsave import corpus
from xcsave.errors import HelperFailed, with_errno


def test_with_errno_says_the_errno_once() -> None:
    assert with_errno("write: No space left on device", errno.ENOSPC) == (
        "write: No space left on device (ENOSPC)"
    )
    assert with_errno("read: Is a directory (EISDIR)", errno.EISDIR) == (
        "read: Is a directory (EISDIR)"
    )
    assert with_errno("save failed", errno.EIO) == "save failed: Input/output error (EIO)"
    e = HelperFailed("writing PAGE_DATA: No space left on device", retval=-1, errno=errno.ENOSPC)
    assert str(e) == "writing PAGE_DATA: No space left on device (ENOSPC)"


def _one_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.mark.parametrize("cmd", ["inspect", "verify"])
def test_a_directory_is_named_and_said_once(cmd: str, tmp_path: Path) -> None:
    r = xcsave_cli(cmd, tmp_path)
    assert r.returncode == 1
    assert _one_line(r) == f"xcsave: {cmd}: {tmp_path}: read: Is a directory (EISDIR)"


def test_restore_from_a_directory_says_eisdir_once(
    tmp_path: Path, sim_env: dict[str, str]
) -> None:
    r = xcsave_cli("restore", tmp_path, "--sim", "never", env=sim_env)
    assert r.returncode == 1
    line = _one_line(r)
    assert line.endswith("Is a directory (EISDIR)") and line.count("EISDIR") == 1, line


@contextlib.contextmanager
def _tmpfs(where: Path, *opts: str) -> Iterator[Path]:
    """A small tmpfs (root only): a full or read-only filesystem on demand."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_convert_onto_a_full_filesystem_names_the_output(tmp_path: Path) -> None:
    legacy = tmp_path / "big.legacy"
    corpus.write_big_legacy(legacy, 4 << 20)
    with _tmpfs(tmp_path / "full", "size=256k") as full:
        out = full / "out.img"
        r = xcsave_cli("convert", legacy, out, "--width", "64", "--guest", "hvm")
        assert r.returncode == 1
        line = _one_line(r)
        assert line.startswith(f"xcsave: convert: {out}: ") and line.endswith("(ENOSPC)"), line
        assert line.count("No space left on device") == 1, line
        assert os.listdir(full) == []  # nothing half-written, under any name


def test_convert_onto_a_read_only_filesystem_is_a_failure(tmp_path: Path) -> None:
    legacy = tmp_path / "small.legacy"
    legacy.write_bytes(corpus.tiny_legacy().build())
    with _tmpfs(tmp_path / "ro", "size=64k", "ro") as ro:
        out = ro / "out.img"
        r = xcsave_cli("convert", legacy, out, "--width", "64", "--guest", "hvm")
        assert r.returncode == 1  # the operation failed; the command line was fine
        assert _one_line(r) == f"xcsave: convert: {out}: Read-only file system (EROFS)"


def test_save_onto_a_full_filesystem_says_enospc_once(
    tmp_path: Path, sim_env: dict[str, str]
) -> None:
    r = xcsave_cli("sim", "create", "d", "--memory", "4M", env=sim_env)
    assert r.returncode == 0, r.stderr
    with _tmpfs(tmp_path / "full", "size=256k") as full:
        r = xcsave_cli("save", "--sim", "d", full / "d.img", env=sim_env)
        assert r.returncode == 1
        line = _one_line(r)
        assert line.endswith("(ENOSPC)") and line.count("No space left on device") == 1, line
        assert "xcsave-tmp" not in line
        assert os.listdir(full) == []
