"""copy_threads: a sim save into a regular file written by N threads at once
(csrc/core/engine_save.c, "parallel copy").  The stream must be the one the
sequential path writes, valid for both verifiers, restore bit-exact, and
leave the fd's position right after it; where it cannot apply (a pipe,
O_APPEND) nothing changes; a write error fails in one line."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import XenVerify
from test_perf_paths import save_through_pipe
from test_sim_helper import cli

import xcsave
import xcsave.sync
from xcsave import _ext, sim, streamtools

MiB = 1 << 20
WRAPS = ["libxc", "libxl", "xl"]
STOP_AND_COPY, CONTINUE = 1, 0
PREFIX = b"caller's own bytes before the stream\n"
SUFFIX = b"and the caller's bytes after it\n"


@pytest.fixture
def dom(tmp_path: Path) -> Path:
    # 12 MiB of data and 4 MiB of zero pages (sim.create leaves some zero)
    return sim.create(tmp_path / "src.dom", 32 * MiB, vcpus=2, seed=11)


def save_framed(src: Path, out: Path, threads: int, **kw: Any) -> tuple[dict[str, Any], bytes]:
    """Save through an fd at a non-zero offset, then write more through it.

    Returns the stats and the stream itself; checks that the bytes before it
    are intact and that the fd was left exactly at its end.
    """
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, PREFIX)
        st = dict(_ext.engine_save(fd, str(src), copy_threads=threads, **kw))
        end = os.lseek(fd, 0, os.SEEK_CUR)
        os.write(fd, SUFFIX)
    finally:
        os.close(fd)
    data = out.read_bytes()
    assert end == len(PREFIX) + st["bytes_written"]
    assert len(data) == end + len(SUFFIX)
    assert data.startswith(PREFIX)
    assert data.endswith(SUFFIX)
    return st, data[len(PREFIX) : end]


def check_stream(stream: bytes, wrap: str, tmp_path: Path, xen_verify: XenVerify) -> Path:
    """Both verifiers accept the stream; returns the domain restored from it."""
    f = tmp_path / f"check.{wrap}"
    f.write_bytes(stream)
    res = streamtools.verify(str(f), wrap)
    assert res.valid, res.error
    v = xen_verify(f, wrap)
    assert v.returncode == 0, v.stdout + v.stderr
    target = tmp_path / "restored.dom"
    with contextlib.suppress(FileNotFoundError):
        sim.remove(target)
    fd = os.open(f, os.O_RDONLY)
    try:
        _ext.engine_restore(fd, str(target), wrap)
    finally:
        os.close(fd)
    return target


def same_but_guest_time(a: bytes, b: bytes, page_data_end: int) -> None:
    """a == b but for X86_TSC_INFO's 8-byte nanoseconds (from the domain's
    generation, which each resume bumps); every PAGE_DATA byte is equal."""
    assert len(a) == len(b)
    diff = next((i for i in range(len(a)) if a[i] != b[i]), None)
    if diff is None:
        return
    assert diff >= page_data_end
    assert a[diff + 8 :] == b[diff + 8 :]


@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("zeros", [False, True], ids=["skip-zero", "send-zero"])
@pytest.mark.parametrize("wrap", WRAPS)
def test_non_live_threaded_save_is_the_sequential_stream(
    wrap: str, zeros: bool, threads: int, dom: Path, tmp_path: Path, xen_verify: XenVerify
) -> None:
    seq, seq_stream = save_framed(dom, tmp_path / "seq", 1, wrap=wrap, send_zero_pages=zeros)
    sim.set_state(dom, "running")
    st, stream = save_framed(dom, tmp_path / "par", threads, wrap=wrap, send_zero_pages=zeros)
    # the option did something: the page data went through the threads
    assert seq["threaded_bytes"] == 0
    assert st["copy_threads"] == threads
    batches = -(-st["pages_sent"] // 1024)
    assert st["threaded_bytes"] == st["pages_sent"] * (4096 + 8) + 16 * batches
    assert any(f"copy threads: {threads} threads wrote" in m for _, _, m in st["log"])
    for key in ("pages_sent", "zero_pages", "bytes_written", "pages_per_round", "rounds"):
        assert st[key] == seq[key], key
    assert (st["zero_pages"] > 0) != zeros
    same_but_guest_time(stream, seq_stream, len(stream) - 4096)
    target = check_stream(stream, wrap, tmp_path, xen_verify)
    assert sim.digest(target) == sim.digest(dom)


@pytest.mark.parametrize("threads", [2, 4])
@pytest.mark.parametrize("wrap", WRAPS)
def test_live_threaded_save_with_big_dirty_rounds(
    wrap: str, threads: int, dom: Path, tmp_path: Path, xen_verify: XenVerify
) -> None:
    """Round 0 (full, zero pages skipped), a live dirty round and the frozen
    final round all big enough for the threads (>= XCS_COPY_MIN_PAGES)."""

    def policy(iteration: int, total_written: int, dirty_count: int) -> int:
        # dirty at least 6000 of the 8192 pages before each next round, however
        # slowly the workload runs on a loaded machine; the third round is final
        for k in range(200):
            if sim.info(dom)["dirty_count"] >= 6000:
                break
            sim.dirty(dom, 200_000, 0.03, seed=iteration * 1000 + k)
        return CONTINUE if iteration < 2 else STOP_AND_COPY

    st, stream = save_framed(dom, tmp_path / "live", threads, wrap=wrap, live=True, policy=policy)
    rounds = st["pages_per_round"]
    assert len(rounds) == 3
    assert min(rounds) >= 4096, rounds  # every round went through the threads
    assert st["copy_threads"] == threads
    assert st["threaded_bytes"] >= sum(rounds) * (4096 + 8)
    assert st["pages_sent"] == sum(rounds)
    target = check_stream(stream, wrap, tmp_path, xen_verify)
    assert sim.digest(target) == sim.digest(dom)  # the source stays suspended


def test_into_a_pipe_or_o_append_it_falls_back(
    dom: Path, tmp_path: Path, xen_verify: XenVerify
) -> None:
    stream, st = save_through_pipe(str(dom), vmsplice=True, wrap="libxl", copy_threads=4)
    assert st["threaded_bytes"] == 0
    assert st["copy_threads"] == 0
    target = check_stream(stream, "libxl", tmp_path, xen_verify)
    assert sim.digest(target) == sim.digest(dom)

    sim.set_state(dom, "running")
    out = tmp_path / "append"
    out.write_bytes(PREFIX)
    fd = os.open(out, os.O_WRONLY | os.O_APPEND)
    try:
        st = _ext.engine_save(fd, str(dom), copy_threads=4)
    finally:
        os.close(fd)
    assert st["threaded_bytes"] == 0
    data = out.read_bytes()
    assert data.startswith(PREFIX)
    check_stream(data[len(PREFIX) :], "libxc", tmp_path, xen_verify)


def test_extension_rejects_bad_thread_counts(dom: Path, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "x", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for bad in (0, 65):
            with pytest.raises(ValueError, match="copy_threads"):
                _ext.engine_save(fd, str(dom), copy_threads=bad)
    finally:
        os.close(fd)


# ------------------------------------------------------------ through the helper


@pytest.mark.parametrize("live", [False, True], ids=["nonlive", "live"])
@pytest.mark.parametrize("fmt", WRAPS)
def test_helper_save_with_copy_threads(
    fmt: str, live: bool, dom: Path, tmp_path: Path, xen_verify: XenVerify
) -> None:
    out = tmp_path / f"dom.{fmt}"
    res = xcsave.sync.save(out, sim=dom, fmt=fmt, live=live, copy_threads=2)
    assert res.stats is not None
    assert out.stat().st_size == res.stats.bytes
    said = [e.message for e in res.logs if "copy threads:" in e.message]
    assert said and said[0].startswith("copy threads: 2 threads wrote"), [
        e.message for e in res.logs
    ]
    target = check_stream(out.read_bytes(), fmt, tmp_path, xen_verify)
    assert sim.digest(target) == sim.digest(dom)


def test_cli_copy_threads(dom: Path, tmp_path: Path, xen_verify: XenVerify) -> None:
    out = tmp_path / "cli.xl"
    r = cli("-vv", "save", "--sim", dom, out, "--format", "xl", "--copy-threads", "4")
    assert r.returncode == 0, r.stderr
    assert "copy threads: 4 threads wrote" in r.stderr
    assert xen_verify(out, "xl").returncode == 0
    r = cli("save", "--sim", dom, tmp_path / "bad", "--copy-threads", "0")
    assert r.returncode == 2  # a usage error, named where it is parsed
    assert "argument --copy-threads: 0: must be from 1 to 64" in r.stderr, r.stderr
    assert not (tmp_path / "bad").exists()


def test_api_refuses_copy_threads_where_it_has_no_meaning(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="simulated domains"):
        xcsave.sync.save(tmp_path / "o", domid=3, copy_threads=2, callbacks=xcsave.Callbacks())
    with pytest.raises(ValueError, match="from 1 to 64"):
        xcsave.sync.save(tmp_path / "o", sim=tmp_path / "d", copy_threads=0)
    assert not list(tmp_path.iterdir())


def test_write_error_fails_in_one_line_and_leaves_no_file(dom: Path, tmp_path: Path) -> None:
    """RLIMIT_FSIZE mid-stream: the copy threads' pwritev gets EFBIG."""
    out = tmp_path / "big.img"
    argv = [sys.executable, "-P", "-m", "xcsave", "save", "--sim", str(dom), str(out)]
    r = subprocess.run(
        ["prlimit", f"--fsize={8 * MiB}", *argv, "--copy-threads", "2"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "EFBIG" in lines[0] or "File too large" in lines[0], r.stderr
    assert "copy thread" in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == [dom]
    assert sim.info(dom)["state"] == "running"
