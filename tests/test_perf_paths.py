"""The fast paths of the engine: vmsplice into a pipe (engine_save.c's
page-lifetime rule) against the writev path, and the bench CLI at tiny sizes.

Never asserts a time: only which path ran (``spliced_bytes``), that the
bytes are the same, and that what was saved restores bit-exactly.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xcsave import _ext

PAGE = 4096
X86_TSC_INFO = 0x08
END = 0


def make(tmp_path: Path, name: str, pages: int, seed: int = 3) -> str:
    path = str(tmp_path / name)
    _ext.sim_create(path, pages, 2, seed)
    return path


def save_through_pipe(src: str, *, vmsplice: bool, **kw: Any) -> tuple[bytes, dict[str, Any]]:
    """engine_save into a pipe drained by a reader thread, as ``| cat`` would."""
    old = os.environ.pop("XCSAVE_NO_VMSPLICE", None)
    if not vmsplice:
        os.environ["XCSAVE_NO_VMSPLICE"] = "1"
    r, w = os.pipe()
    chunks: list[bytes] = []

    def reader() -> None:
        while b := os.read(r, 1 << 20):
            chunks.append(b)

    t = threading.Thread(target=reader)
    t.start()
    try:
        st = dict(_ext.engine_save(w, src, **kw))
    finally:
        os.close(w)
        t.join()
        os.close(r)
        os.environ.pop("XCSAVE_NO_VMSPLICE", None)
        if old is not None:
            os.environ["XCSAVE_NO_VMSPLICE"] = old
    return b"".join(chunks), st


def records(stream: bytes, off: int = 40) -> Iterator[tuple[int, int, int]]:
    while off + 8 <= len(stream):
        rtype, length = struct.unpack_from("<II", stream, off)
        yield off, rtype, length
        if rtype == END:
            return
        off += 8 + length + (-length) % 8


def mask_tsc(stream: bytes) -> bytes:
    """Zero X86_TSC_INFO's nsec: it follows the domain's generation, which
    every suspend bumps, so two saves of one domain differ only there."""
    out = bytearray(stream)
    for off, rtype, _length in records(stream):
        if rtype == X86_TSC_INFO:
            out[off + 16 : off + 24] = bytes(8)
    return bytes(out)


def restore_bytes(data: bytes, tmp_path: Path, dst: str) -> None:
    f = tmp_path / "in.stream"
    f.write_bytes(data)
    fd = os.open(f, os.O_RDONLY)
    try:
        _ext.engine_restore(fd, dst)
    finally:
        os.close(fd)


# 2 MiB+ of pages: more than a 1 MiB pipe plus the copied tail, so the
# stop-and-copy round has pages to vmsplice.
PAGES = 1024


def test_vmsplice_taken_for_a_pipe_not_with_the_switch(tmp_path: Path) -> None:
    src = make(tmp_path, "src", PAGES)
    _ext.sim_set_state(src, "suspended")
    a, st_a = save_through_pipe(src, vmsplice=True)
    b, st_b = save_through_pipe(src, vmsplice=False)
    assert st_a["spliced_bytes"] > 0
    # at least a pipe's worth of the tail went by copy (page-lifetime rule)
    assert st_a["bytes_written"] - st_a["spliced_bytes"] >= (1 << 20)
    assert st_b["spliced_bytes"] == 0
    assert len(a) == len(b) == st_a["bytes_written"]
    assert mask_tsc(a) == mask_tsc(b)
    for name, data in (("dst_a", a), ("dst_b", b)):
        dst = str(tmp_path / name)
        restore_bytes(data, tmp_path, dst)
        assert _ext.sim_digest(dst) == _ext.sim_digest(src)


def test_no_vmsplice_into_a_file_or_for_a_small_domain(tmp_path: Path) -> None:
    src = make(tmp_path, "src", PAGES)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        st = _ext.engine_save(fd, src)
    finally:
        os.close(fd)
    assert st["spliced_bytes"] == 0
    _ext.sim_set_state(src, "running")
    small = make(tmp_path, "small", 64)  # smaller than the copied tail
    data, st = save_through_pipe(small, vmsplice=True)
    assert st["spliced_bytes"] == 0
    restore_bytes(data, tmp_path, str(tmp_path / "dst"))
    assert _ext.sim_digest(str(tmp_path / "dst")) == _ext.sim_digest(small)


def test_synchronous_reader_after_the_save_does_not_hang(tmp_path: Path) -> None:
    """A stream that fits in the pipe, read only after the save returned:
    the writev path allows it, so the vmsplice path must not wait for it."""
    src = make(tmp_path, "src", 64)
    r, w = os.pipe()
    try:
        st = _ext.engine_save(w, src)
        os.close(w)
        w = -1
        data = b""
        while b := os.read(r, 1 << 20):
            data += b
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)
    assert len(data) == st["bytes_written"]


@pytest.mark.parametrize("wrap", ["libxc", "libxl", "xl"])
def test_vmsplice_stream_restores_bit_exact(tmp_path: Path, wrap: str) -> None:
    src = make(tmp_path, "src", PAGES)
    data, st = save_through_pipe(src, vmsplice=True, wrap=wrap)
    assert st["spliced_bytes"] > 0
    r, w = os.pipe()
    dst = str(tmp_path / "dst")

    def feed() -> None:
        view = memoryview(data)
        while view:
            n = os.write(w, view[: 1 << 20])
            view = view[n:]
        os.close(w)

    # restore from a pipe too (the restore path reads a pipe differently)
    t = threading.Thread(target=feed)
    t.start()
    try:
        _ext.engine_restore(r, dst, wrap=wrap)
    finally:
        t.join()
        os.close(r)
    assert _ext.sim_digest(dst) == _ext.sim_digest(src)


def _feed(fd: int, data: bytes) -> None:
    """Write all of data to fd (a pipe or a socket), then close it."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.close(fd)


@pytest.mark.parametrize("source", ["pipe", "file", "socket"])
def test_restore_moves_pages_kernel_side_unless_switched_off(tmp_path: Path, source: str) -> None:
    """From a pipe (splice), a file (copy_file_range) or a socket (splice
    through a private pipe) the page data never enters the helper;
    XCSAVE_NO_SPLICE=1 forces read + pwrite.  Both build the same domain."""
    src = make(tmp_path, "src", 2048)
    stream, _st = save_through_pipe(src, vmsplice=True)
    results = {}
    for switch in ("0", "1"):
        dst = str(tmp_path / f"dst-{switch}")
        os.environ["XCSAVE_NO_SPLICE"] = switch
        try:
            if source == "file":
                path = tmp_path / "stream"
                path.write_bytes(stream)
                fd = os.open(path, os.O_RDONLY)
                try:
                    res = _ext.engine_restore(fd, dst)
                finally:
                    os.close(fd)
            else:
                if source == "socket":
                    a, b = socket.socketpair()
                    r, w = os.dup(a.fileno()), os.dup(b.fileno())
                    a.close()
                    b.close()
                else:
                    r, w = os.pipe()
                t = threading.Thread(target=_feed, args=(w, stream))
                t.start()
                try:
                    res = _ext.engine_restore(r, dst)
                finally:
                    t.join()
                    os.close(r)
        finally:
            os.environ.pop("XCSAVE_NO_SPLICE", None)
        assert res["bytes_read"] == len(stream)
        results[switch] = res["kernel_moved_bytes"]
        assert _ext.sim_digest(dst) == _ext.sim_digest(src)
    assert results["0"] >= res["pages_received"] * PAGE
    assert results["1"] == 0


@pytest.mark.parametrize("reader", ["restore", "slow"])
def test_live_save_under_dirty_workload_vmsplices_every_round(tmp_path: Path, reader: str) -> None:
    """Live save into a pipe while ``sim dirty`` rewrites pages: every round
    is vmspliced, live ones too (page-lifetime rule, part 1: a page rewritten
    while its reference waits in the pipe is dirty again and resent), and the
    target matches the (then suspended) source bit for bit.

    ``restore`` reads the pipe concurrently; ``slow`` drains it 64 KiB per
    millisecond into a file first, so that round 0's references wait in the
    pipe for a second while the workload rewrites every page many times
    over, and restores from that file afterwards."""
    src = make(tmp_path, "src", 16384)  # 64 MiB
    dst = str(tmp_path / "dst")
    work = subprocess.Popen(
        [
            sys.executable,
            "-P",
            "-m",
            "xcsave",
            "sim",
            "dirty",
            src,
            "--rate",
            "200000",
            "--duration",
            "60",
        ],
        stdout=subprocess.DEVNULL,
    )
    relayed = tmp_path / "stream"
    try:
        deadline = time.monotonic() + 10
        while _ext.sim_info(src)["pages_written"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        written_before = _ext.sim_info(src)["pages_written"]
        r, w = os.pipe()
        out: dict[str, Any] = {}

        def restore() -> None:
            out["res"] = _ext.engine_restore(r, dst)

        def relay() -> None:
            with relayed.open("wb") as f:
                while b := os.read(r, 65536):
                    f.write(b)
                    time.sleep(0.001)

        t = threading.Thread(target=restore if reader == "restore" else relay)
        t.start()
        try:
            # one live round, then stop: the final round is whatever round 0
            # let the workload dirty
            st = _ext.engine_save(w, src, live=True, policy=lambda it, tw, dc: 1)
        finally:
            os.close(w)
            t.join()
            os.close(r)
        rewritten = _ext.sim_info(src)["pages_written"] - written_before
    finally:
        work.kill()
        work.wait()
    assert st["rounds"] == 2
    live, final = st["pages_per_round"]
    assert live > 8192  # round 0: every page but the zero ones
    assert final > 0  # pages were rewritten after round 0 read the log: resent
    # the live round went by reference, all of it
    assert st["spliced_bytes"] >= live * PAGE
    if reader == "slow":
        assert rewritten > 16384  # every page, on average, changed in the pipe's time
        fd = os.open(relayed, os.O_RDONLY)
        try:
            _ext.engine_restore(fd, dst)
        finally:
            os.close(fd)
    assert _ext.sim_info(src)["state"] == "suspended"
    assert _ext.sim_digest(dst) == _ext.sim_digest(src)


# ------------------------------------------------------------- legacy converter

LEGACY_PAGES = 700  # several batches: write_big_legacy(..., batch=256)


@pytest.fixture(scope="module")
def legacy_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from xcsave import corpus

    path = tmp_path_factory.mktemp("legacy") / "hvm.legacy"
    corpus.write_big_legacy(path, LEGACY_PAGES * PAGE, batch=256)
    return path


def convert_fds(in_fd: int, out_fd: int, *, splice: bool, stream_type: str = "plain") -> Any:
    old = os.environ.pop("XCSAVE_NO_SPLICE", None)
    if not splice:
        os.environ["XCSAVE_NO_SPLICE"] = "1"
    try:
        return _ext.convert_legacy(
            in_fd, out_fd, 64, "hvm", "libxl", False, False, stream_type, False
        )
    finally:
        os.environ.pop("XCSAVE_NO_SPLICE", None)
        if old is not None:
            os.environ["XCSAVE_NO_SPLICE"] = old


def feed(data: bytes) -> tuple[int, threading.Thread]:
    """A pipe read end with ``data`` written into it by a thread."""
    r, w = os.pipe()

    def writer() -> None:
        try:
            os.write(w, data) if len(data) < 65536 else _write_all(w, data)
        finally:
            os.close(w)

    t = threading.Thread(target=writer)
    t.start()
    return r, t


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def drain(r: int, chunks: list[bytes]) -> threading.Thread:
    def reader() -> None:
        while b := os.read(r, 1 << 20):
            chunks.append(b)

    t = threading.Thread(target=reader)
    t.start()
    return t


def convert_via(src_kind: str, dst_kind: str, image: Path, tmp: Path, *, splice: bool,
                stream_type: str = "plain") -> tuple[bytes, Any]:  # fmt: skip
    """Convert ``image`` reading a file or a pipe, writing a file, an
    O_APPEND file or a pipe; returns the output and the statistics."""
    threads: list[threading.Thread] = []
    if src_kind == "file":
        in_fd = os.open(image, os.O_RDONLY)
    else:
        in_fd, t = feed(image.read_bytes())
        threads.append(t)
    chunks: list[bytes] = []
    out_path = tmp / f"out-{src_kind}-{dst_kind}-{splice}"
    read_end = -1
    if dst_kind == "pipe":
        read_end, out_fd = os.pipe()
        threads.append(drain(read_end, chunks))
    else:
        flags = (
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_APPEND if dst_kind == "append" else 0)
        )
        out_fd = os.open(out_path, flags, 0o644)
    try:
        st = convert_fds(in_fd, out_fd, splice=splice, stream_type=stream_type)
    finally:
        os.close(in_fd)
        os.close(out_fd)
        for t in threads:
            t.join()
        if read_end >= 0:
            os.close(read_end)
    out = b"".join(chunks) if dst_kind == "pipe" else out_path.read_bytes()
    return out, st


@pytest.mark.parametrize(
    ("src_kind", "dst_kind", "by_kernel"),
    [
        ("file", "file", True),  # copy_file_range
        ("file", "pipe", True),  # sendfile: page-cache pages into the pipe
        ("file", "append", False),  # both refuse O_APPEND: through memory, same bytes
        ("pipe", "pipe", True),  # splice
        ("pipe", "file", True),  # splice
    ],
)
def test_converter_moves_page_data_in_the_kernel(
    src_kind: str, dst_kind: str, by_kernel: bool, legacy_image: Path, tmp_path: Path
) -> None:
    """Never a time: which path ran (kernel_copied_bytes) and that the bytes
    equal those of the buffered path (XCSAVE_NO_SPLICE=1)."""
    ref, ref_st = convert_via("file", "file", legacy_image, tmp_path, splice=False)
    assert ref_st["kernel_copied_bytes"] == 0
    out, st = convert_via(src_kind, dst_kind, legacy_image, tmp_path, splice=True)
    assert out == ref
    assert st["out_bytes"] == len(ref) and st["pages"] == LEGACY_PAGES
    assert st["kernel_copied_bytes"] == (LEGACY_PAGES * PAGE if by_kernel else 0)
    plain, plain_st = convert_via(src_kind, dst_kind, legacy_image, tmp_path, splice=False)
    assert plain == ref and plain_st["kernel_copied_bytes"] == 0


def test_converter_to_dev_null_and_remus_pipe_input(legacy_image: Path, tmp_path: Path) -> None:
    # /dev/null takes sendfile too; a checkpointed stream on a pipe goes
    # through memory (it must end at a record edge if a checkpoint is cut).
    in_fd = os.open(legacy_image, os.O_RDONLY)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        st = convert_fds(in_fd, null, splice=True)
    finally:
        os.close(in_fd)
        os.close(null)
    assert st["kernel_copied_bytes"] == LEGACY_PAGES * PAGE
    _out, st = convert_via(
        "pipe", "file", legacy_image, tmp_path, splice=True, stream_type="remus"
    )
    assert st["kernel_copied_bytes"] == 0 and st["pages"] == LEGACY_PAGES


@pytest.mark.parametrize("src_kind", ["file", "pipe"])
def test_converter_truncated_page_data_by_kernel(
    src_kind: str, legacy_image: Path, tmp_path: Path
) -> None:
    """Cut inside the second batch's pages: the same one-line truncation as
    the buffered path, whichever way the pages were going."""
    from xcsave.errors import StreamError

    cut = tmp_path / "cut.legacy"
    cut.write_bytes(legacy_image.read_bytes()[: 2 * 256 * (PAGE + 8) + 100])
    messages = []
    for splice in (True, False):
        with pytest.raises(StreamError, match="stream truncated") as ei:
            convert_via(src_kind, "file", cut, tmp_path, splice=splice)
        messages.append(str(ei.value))
    if src_kind == "file":  # checked before anything moved: the same words
        assert messages[0] == messages[1]


# ------------------------------------------------------------- bench CLI

BENCH_ARGS = {
    "save": ["--memory", "16M", "--repeat", "1"],
    "save-file": ["--memory", "32M", "--repeat", "1", "--copy-threads", "2"],
    "restore": ["--memory", "16M", "--repeat", "1"],
    "migrate": ["--memory", "16M", "--rate", "2000", "--repeat", "1"],
    "callbacks": ["--rounds", "20"],
    "verify": ["--memory", "16M", "--repeat", "1"],
    "convert": ["--memory", "16M", "--repeat", "1"],
}


@pytest.mark.parametrize("bench", sorted(BENCH_ARGS))
def test_bench_subcommand_prints_json(bench: str) -> None:
    p = subprocess.run(
        [sys.executable, "-P", "-m", "xcsave", "bench", bench, *BENCH_ARGS[bench], "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout.strip().splitlines()[-1])
    assert data["bench"] == bench
    assert "skipped" in data or data["measured"] is not None
    if bench == "save-file":  # the N-thread side really ran threaded
        assert data["threaded_bytes"] > 0


def _compare_trees() -> Any:
    """bench/compare_trees.py, loaded from the source tree (it is no module)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "compare_trees.py"
    spec = importlib.util.spec_from_file_location("compare_trees", path)
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_trees_runs_both_installs(capsys: pytest.CaptureFixture[str]) -> None:
    """The same install as base and new: every metric measured on both sides."""
    ct = _compare_trees()
    argv = ["--base", sys.executable, "--new", sys.executable, "--repeat", "1"]
    rc = ct.main([*argv, "--memory", "16M", "--benches", "restore", "save", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [(m["bench"], m["metric"]) for m in out["metrics"]] == [
        ("restore", "measured"),
        ("save", "measured"),
    ]
    assert all(m["base"] > 0 and m["new"] > 0 for m in out["metrics"])


def test_compare_trees_tolerance(monkeypatch: pytest.MonkeyPatch) -> None:
    """--tolerance fails a slower candidate, GB/s (higher is better) and seconds
    (lower is better) alike, and passes one within it."""
    ct = _compare_trees()
    figures: dict[str, dict[str, float]] = {}
    monkeypatch.setattr(ct, "run_one", lambda py, bench, extra: figures[py])
    argv = ["--base", "base", "--new", "new", "--repeat", "2", "--tolerance", "0.05"]
    figures.update(base={"measured": 1.0}, new={"measured": 0.9})
    assert ct.main([*argv, "--benches", "restore"]) == 1  # 0.9 GB/s against 1.0
    assert ct.main([*argv, "--benches", "save"]) == 1
    figures.update(new={"measured": 0.97})
    assert ct.main([*argv, "--benches", "restore"]) == 0
    figures.update(base={"measured": 1.0, "api_s": 0.01}, new={"measured": 1.1, "api_s": 0.01})
    assert ct.main([*argv, "--benches", "verify"]) == 1  # 1.1 s against 1.0
    figures.update(new={"measured": 0.9, "api_s": 0.0101})
    assert ct.main([*argv, "--benches", "verify"]) == 0
