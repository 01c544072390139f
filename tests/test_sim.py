"""Simulated domains and the native stream engine, through ``xcsave._ext``.

The engine runs in-process here (``engine_save``/``engine_restore``); the
helper runs the same C code behind the protocol.  Streams are checked with
Xen's own ``verify-stream-v2`` (conftest's ``xen_verify``) and by restoring
them: a restored domain must have the source's digest.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xcsave import _ext

PAGE = 4096
HDR = 4096  # docs/sim-format.md: the header page, then the guest pages
WRAPS = ["libxc", "libxl", "xl"]
REC_CAP = 128 << 20

# libxc record types used below
END, PAGE_DATA, HVM_CONTEXT, HVM_PARAMS, CHECKPOINT, SDE = 0, 1, 9, 10, 14, 16
CPUID_POLICY, MSR_POLICY = 0x11, 0x12  # the static data before SDE (v3 only)


# --------------------------------------------------------------- helpers


def make(tmp_path: Path, name: str, pages: int, vcpus: int = 1, seed: int = 0) -> str:
    path = str(tmp_path / name)
    _ext.sim_create(path, pages, vcpus, seed)
    return path


def save_to_file(src: str, out: Path, **kw: Any) -> dict[str, Any]:
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        return dict(_ext.engine_save(fd, src, **kw))
    finally:
        os.close(fd)


def restore_from_bytes(data: bytes, tmp_path: Path, dst: str, **kw: Any) -> dict[str, Any]:
    f = tmp_path / "in.stream"
    f.write_bytes(data)
    fd = os.open(f, os.O_RDONLY)
    try:
        return dict(_ext.engine_restore(fd, dst, **kw))
    finally:
        os.close(fd)


def leftovers(directory: Path) -> list[str]:
    """Restore targets or partial files left in a directory."""
    return sorted(p.name for p in directory.iterdir() if "partial" in p.name or p.name == "dst")


def rec(rtype: int, body: bytes = b"") -> bytes:
    pad = (-len(body)) % 8
    return struct.pack("<II", rtype, len(body)) + body + b"\0" * pad


def image_header(version: int = 3) -> bytes:
    ihdr = struct.pack(">QIIHHI", 0xFFFFFFFFFFFFFFFF, 0x58454E46, version, 0, 0, 0)
    dhdr = struct.pack("<IHHII", 2, 12, 0, 4, 17)
    return ihdr + dhdr


def records(stream: bytes, off: int = 40) -> Iterator[tuple[int, int, int]]:
    """(offset, type, length) of each libxc record up to and including END."""
    while off < len(stream):
        rtype, length = struct.unpack_from("<II", stream, off)
        yield off, rtype, length
        off += 8 + length + (-length) % 8
        if rtype == END:
            return


def split_records(stream: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """A bare libxc stream as (image header, [(type, whole record bytes)])."""
    out = []
    for off, rtype, length in records(stream):
        out.append((rtype, stream[off : off + 8 + length + (-length) % 8]))
    return stream[:40], out


def xxh64(data: bytes, seed: int = 0) -> int:
    """Reference XXH64 (public algorithm) to pin the digest definition."""
    p1, p2, p3, p4, p5 = (
        0x9E3779B185EBCA87,
        0xC2B2AE3D27D4EB4F,
        0x165667B19E3779F9,
        0x85EBCA77C2B2AE63,
        0x27D4EB2F165667C5,
    )
    m = (1 << 64) - 1

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (64 - r))) & m

    def rnd(acc: int, v: int) -> int:
        return (rotl((acc + v * p2) & m, 31) * p1) & m

    n, i = len(data), 0
    if n >= 32:
        v = [(seed + p1 + p2) & m, (seed + p2) & m, seed, (seed - p1) & m]
        while i + 32 <= n:
            for j in range(4):
                v[j] = rnd(v[j], int.from_bytes(data[i + 8 * j : i + 8 * j + 8], "little"))
            i += 32
        h = (rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18)) & m
        for x in v:
            h = (((h ^ rnd(0, x)) * p1) + p4) & m
    else:
        h = (seed + p5) & m
    h = (h + n) & m
    while i + 8 <= n:
        h ^= rnd(0, int.from_bytes(data[i : i + 8], "little"))
        h = (rotl(h, 27) * p1 + p4) & m
        i += 8
    if i + 4 <= n:
        h ^= (int.from_bytes(data[i : i + 4], "little") * p1) & m
        h = (rotl(h, 23) * p2 + p3) & m
        i += 4
    while i < n:
        h ^= (data[i] * p5) & m
        h = (rotl(h, 11) * p1) & m
        i += 1
    h ^= h >> 33
    h = (h * p2) & m
    h ^= h >> 29
    h = (h * p3) & m
    h ^= h >> 32
    return h


# ------------------------------------------------------ simulated domains


def test_create_is_deterministic(tmp_path: Path) -> None:
    a = make(tmp_path, "a", 2048, 2, seed=1)
    b = make(tmp_path, "b", 2048, 2, seed=1)
    c = make(tmp_path, "c", 2048, 2, seed=2)
    assert _ext.sim_digest(a) == _ext.sim_digest(b)
    assert _ext.sim_digest(a) != _ext.sim_digest(c)
    assert (
        Path(a).read_bytes()[HDR : HDR + 2048 * PAGE]
        == Path(b).read_bytes()[HDR : HDR + 2048 * PAGE]
    )


def test_create_has_guest_like_pages(tmp_path: Path) -> None:
    n = 4096
    data = Path(make(tmp_path, "d", n, seed=7)).read_bytes()
    pages = [data[HDR + i * PAGE : HDR + (i + 1) * PAGE] for i in range(n)]
    counts = Counter(hashlib.sha1(p).digest() for p in pages)
    zero = sum(1 for p in pages if not any(p))
    repeated = sum(1 for p in pages if any(p) and counts[hashlib.sha1(p).digest()] > 1)
    unique = n - zero - repeated
    assert 0.20 * n <= zero <= 0.30 * n
    assert 0.05 * n <= repeated <= 0.15 * n
    assert unique >= 0.55 * n


def test_info(tmp_path: Path) -> None:
    path = make(tmp_path, "i", 1000, 3, seed=9)
    info = _ext.sim_info(path)
    assert info["pages"] == 1000
    assert info["page_shift"] == 12
    assert info["vcpus"] == 3
    assert info["state"] == "running"
    assert info["logdirty"] is False
    assert info["dirty_count"] == 0
    assert info["memory"] == 1000 * PAGE
    assert info["size"] == os.path.getsize(path)


def test_digest_definition(tmp_path: Path) -> None:
    """docs/sim-format.md: four XXH64s (pages, vCPUs, shape, the three)."""
    path = make(tmp_path, "x", 5, 2, seed=3)
    data = Path(path).read_bytes()
    pages = data[HDR : HDR + 5 * PAGE]
    vcpu_off = HDR + 5 * PAGE
    vcpus = data[vcpu_off : vcpu_off + 2 * 512]
    d = [xxh64(pages), xxh64(vcpus), xxh64(struct.pack("<4Q", 5, 12, 2, 512))]
    d.append(xxh64(struct.pack("<3Q", *d)))
    assert _ext.sim_digest(path) == struct.pack("<4Q", *d).hex()
    assert xxh64(b"") == 0xEF46DB3751D8E999  # the algorithm's published vector


def test_set_state(tmp_path: Path) -> None:
    path = make(tmp_path, "s", 16)
    for state in ("paused", "suspended", "running"):
        _ext.sim_set_state(path, state)
        assert _ext.sim_info(path)["state"] == state
    with pytest.raises(ValueError, match="state"):
        _ext.sim_set_state(path, "sleeping")


def test_missing_domain_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        _ext.sim_info(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError):
        _ext.sim_remove(str(tmp_path / "nope"))


def test_remove(tmp_path: Path) -> None:
    path = make(tmp_path, "r", 16)
    _ext.sim_remove(path)
    assert not os.path.exists(path)


def test_dirty_writes_at_the_rate(tmp_path: Path) -> None:
    path = make(tmp_path, "w", 8192)
    before = _ext.sim_digest(path)
    t0 = time.monotonic()
    n = _ext.sim_dirty(path, 2000, 1.0, 5)
    elapsed = time.monotonic() - t0
    assert 0.95 <= elapsed < 2.5
    # Paced by credit, never ahead of the rate; a loaded CI box may lag.
    assert 1000 <= n <= 2300
    assert _ext.sim_info(path)["pages_written"] == n
    assert _ext.sim_digest(path) != before


def test_dirty_writes_nothing_while_paused(tmp_path: Path) -> None:
    path = make(tmp_path, "p", 4096)
    for state in ("paused", "suspended"):
        _ext.sim_set_state(path, state)
        before = _ext.sim_digest(path)
        assert _ext.sim_dirty(path, 100_000, 0.3, 1) == 0
        assert _ext.sim_digest(path) == before
        assert _ext.sim_info(path)["pages_written"] == 0


def test_dirty_stops_when_the_domain_is_paused(tmp_path: Path) -> None:
    path = make(tmp_path, "q", 4096)
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(_ext.sim_dirty(path, 5000, 1.0, 2)))
    t.start()
    time.sleep(0.3)
    _ext.sim_set_state(path, "paused")  # returns once no write is in flight
    frozen = _ext.sim_digest(path)
    written = _ext.sim_info(path)["pages_written"]
    t.join()
    assert _ext.sim_digest(path) == frozen
    assert result == [written]
    assert 300 <= written <= 2500


# ------------------------------------------------------------ save/verify


@pytest.mark.parametrize("live", [False, True], ids=["nonlive", "live"])
@pytest.mark.parametrize("wrap", WRAPS)
def test_stream_passes_xen_verifier(
    tmp_path: Path, xen_verify: Any, wrap: str, live: bool
) -> None:
    src = make(tmp_path, "src", 3000, 2, seed=4)
    out = tmp_path / f"{wrap}.stream"
    st = save_to_file(src, out, live=live, wrap=wrap)
    assert st["bytes_written"] == out.stat().st_size
    proc = xen_verify(out, wrap)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_stats_and_zero_pages(tmp_path: Path) -> None:
    src = make(tmp_path, "src", 3000, seed=4)
    st = save_to_file(src, tmp_path / "s")
    zero = sum(
        1
        for i in range(3000)
        if not any(Path(src).read_bytes()[HDR + i * PAGE : HDR + (i + 1) * PAGE])
    )
    assert st["zero_pages"] == zero
    assert st["pages_sent"] == 3000 - zero
    assert st["rounds"] == 1
    assert st["pages_per_round"] == [3000 - zero]
    st_all = save_to_file(src, tmp_path / "s2", send_zero_pages=True)
    assert st_all["pages_sent"] == 3000
    assert st_all["zero_pages"] == 0


def test_progress_first_and_last(tmp_path: Path) -> None:
    src = make(tmp_path, "src", 5000, seed=1)
    st = save_to_file(src, tmp_path / "s")
    prog = st["progress"]
    assert prog[0] == ("Frames", 0, 5000)
    assert prog[-1] == ("Frames", 5000, 5000)
    assert len(prog) <= 2 + 5000 // 1024


@pytest.mark.parametrize("wrap", WRAPS)
def test_roundtrip(tmp_path: Path, wrap: str) -> None:
    src = make(tmp_path, "src", 4000, 3, seed=11)
    stream = tmp_path / "s"
    save_to_file(src, stream, wrap=wrap)
    assert _ext.sim_info(src)["state"] == "suspended"  # saved domains stay suspended
    dst = str(tmp_path / "dst")
    res = restore_from_bytes(stream.read_bytes(), tmp_path, dst, wrap=wrap)
    assert _ext.sim_digest(dst) == _ext.sim_digest(src)
    info = _ext.sim_info(dst)
    assert info["state"] == "paused"  # restored domains start paused
    assert (info["pages"], info["vcpus"]) == (4000, 3)
    assert res["store_gfn"] == 3999
    assert res["console_gfn"] == 3998
    assert res["bytes_read"] == stream.stat().st_size
    assert leftovers(tmp_path) == ["dst"]


@pytest.mark.parametrize("wrap", WRAPS)
def test_restore_reads_exactly_the_stream(tmp_path: Path, wrap: str) -> None:
    src = make(tmp_path, "src", 500, seed=2)
    stream = tmp_path / "s"
    save_to_file(src, stream, wrap=wrap)
    data = stream.read_bytes() + b"TRAILING bytes that belong to someone else"
    f = tmp_path / "t"
    f.write_bytes(data)
    fd = os.open(f, os.O_RDONLY)
    try:
        _ext.engine_restore(fd, str(tmp_path / "dst"), wrap=wrap)
        assert os.lseek(fd, 0, os.SEEK_CUR) == stream.stat().st_size
    finally:
        os.close(fd)


def restore_fed(
    data: bytes,
    dst: Path,
    wrap: str,
    *,
    chunk: int,
    pause: float = 0.0,
    nonblocking: bool = False,
) -> None:
    """engine_restore from a pipe a thread feeds ``chunk`` bytes at a time."""
    rfd, wfd = os.pipe()
    os.set_blocking(rfd, not nonblocking)

    def feed() -> None:
        with os.fdopen(wfd, "wb", buffering=0) as w:
            for i in range(0, len(data), chunk):
                w.write(data[i : i + chunk])
                time.sleep(pause)

    t = threading.Thread(target=feed)
    t.start()
    try:
        _ext.engine_restore(rfd, str(dst), wrap=wrap)
    finally:
        t.join()
        os.close(rfd)


def test_restore_through_a_pipe(tmp_path: Path) -> None:
    src = make(tmp_path, "src", 3000, 2, seed=6)
    stream = tmp_path / "s"
    save_to_file(src, stream, wrap="xl")
    # Small writes: the reader must loop over short reads.
    restore_fed(stream.read_bytes(), tmp_path / "dst", "xl", chunk=7000)
    assert _ext.sim_digest(str(tmp_path / "dst")) == _ext.sim_digest(src)


def test_nonblocking_pipes(tmp_path: Path) -> None:
    """O_NONBLOCK stream fds (an asyncio toolstack's) wait instead of failing."""
    src = make(tmp_path, "src", 3000, seed=6)
    rfd, wfd = os.pipe()
    os.set_blocking(wfd, False)
    chunks: list[bytes] = []

    def drain() -> None:
        while chunk := os.read(rfd, 10000):
            chunks.append(chunk)
            time.sleep(0.0005)  # slower than the writer: EAGAIN happens

    t = threading.Thread(target=drain)
    t.start()
    try:
        st = _ext.engine_save(wfd, src, wrap="libxl")
    finally:
        os.close(wfd)
        t.join()
        os.close(rfd)
    data = b"".join(chunks)
    assert len(data) == st["bytes_written"]

    # A feeder slower than the reader: EAGAIN happens.
    restore_fed(data, tmp_path / "dst", "libxl", chunk=50000, pause=0.001, nonblocking=True)
    assert _ext.sim_digest(str(tmp_path / "dst")) == _ext.sim_digest(src)


def test_restore_accepts_v2_and_params_before_context(tmp_path: Path) -> None:
    src = make(tmp_path, "src", 700, 2, seed=8)
    stream = tmp_path / "s"
    save_to_file(src, stream)
    _head, recs = split_records(stream.read_bytes())
    types = [t for t, _ in recs]
    assert types[:3] == [CPUID_POLICY, MSR_POLICY, SDE] and types[-1] == END
    # v2: no static data (no policies, no STATIC_DATA_END); HVM_PARAMS ahead
    # of HVM_CONTEXT; an optional record the restorer must skip.
    skip = (CPUID_POLICY, MSR_POLICY, SDE, HVM_CONTEXT, HVM_PARAMS, END)
    body = [r for t, r in recs if t not in skip]
    ctx = next(r for t, r in recs if t == HVM_CONTEXT)
    params = next(r for t, r in recs if t == HVM_PARAMS)
    v2 = image_header(2) + b"".join(body) + rec(0x80000123, b"opt") + params + ctx + rec(END)
    res = restore_from_bytes(v2, tmp_path, str(tmp_path / "dst"))
    assert _ext.sim_digest(str(tmp_path / "dst")) == _ext.sim_digest(src)
    assert res["bytes_read"] == len(v2)


def one_page_stream(pfn_words: list[int], pages: int, count: int | None = None) -> bytes:
    """A v3 stream with one PAGE_DATA batch and a valid HVM context after it."""
    n = len(pfn_words) if count is None else count
    body = struct.pack("<II", n, 0) + b"".join(struct.pack("<Q", w) for w in pfn_words)
    body += b"\x5a" * PAGE * len(pfn_words)
    return image_header() + rec(SDE) + rec(PAGE_DATA, body) + hvm_context(pages) + rec(END)


def hvm_context(pages: int, vcpus: int = 1) -> bytes:
    blob = struct.pack("<HHI", 1, 0, 24) + struct.pack("<IIQII", 0x54381286, 1, 0, 0, 2000000)
    blob += (
        struct.pack("<HHI", 0x78, 0, 32)
        + b"XCSIMHVM"
        + struct.pack("<IIQII", 1, 512, pages, vcpus, 12)
    )
    for v in range(vcpus):
        blob += struct.pack("<HHI", 2, v, 512) + bytes([v]) * 512
    blob += struct.pack("<HHI", 0, 0, 0)
    return rec(HVM_CONTEXT, blob)


def test_crafted_stream_restores(tmp_path: Path) -> None:
    dst = str(tmp_path / "dst")
    restore_from_bytes(one_page_stream([3], 8), tmp_path, dst)
    data = Path(dst).read_bytes()
    assert data[HDR + 3 * PAGE : HDR + 4 * PAGE] == b"\x5a" * PAGE
    assert not any(data[HDR : HDR + 3 * PAGE])


def expect_refusal(tmp_path: Path, stream: bytes, err: int, match: str, **kw: Any) -> None:
    with pytest.raises(OSError, match=match) as exc:
        restore_from_bytes(stream, tmp_path, str(tmp_path / "dst"), **kw)
    assert exc.value.errno == err
    assert leftovers(tmp_path) == []  # no half-built domain, no partial file


def test_restore_refuses_pfn_out_of_range(tmp_path: Path) -> None:
    src = make(tmp_path, "src", 2048, seed=3)
    stream = tmp_path / "s"
    save_to_file(src, stream)
    expect_refusal(
        tmp_path,
        stream.read_bytes(),
        errno.ERANGE,
        r"PAGE_DATA at offset \d+: pfn 0x400 out of range \(domain has 1024 pages\)",
        max_pages=1024,
    )


def test_restore_refuses_pages_beyond_the_stream_domain(tmp_path: Path) -> None:
    expect_refusal(
        tmp_path,
        one_page_stream([40], 8),
        errno.ERANGE,
        "sent pfn 0x28 but the domain has 8 pages",
    )


def test_restore_refuses_domain_larger_than_max_pages(tmp_path: Path) -> None:
    expect_refusal(
        tmp_path,
        one_page_stream([1], 4096),
        errno.ERANGE,
        "more than the 100 allowed",
        max_pages=100,
    )


def test_restore_refuses_record_over_cap(tmp_path: Path) -> None:
    stream = image_header() + rec(SDE) + struct.pack("<II", PAGE_DATA, 200_000_000)
    expect_refusal(tmp_path, stream, errno.EMSGSIZE, f"record length 200000000 exceeds {REC_CAP}")


def test_restore_refuses_big_batch(tmp_path: Path) -> None:
    stream = one_page_stream([0], 8, count=1025)
    expect_refusal(tmp_path, stream, errno.EINVAL, r"batch of 1025 pages \(must be 1\.\.1024\)")


def test_restore_refuses_bad_page_data_length(tmp_path: Path) -> None:
    body = struct.pack("<IIQ", 1, 0, 2) + b"\0" * 100
    stream = image_header() + rec(SDE) + rec(PAGE_DATA, body) + rec(END)
    expect_refusal(tmp_path, stream, errno.EINVAL, "expected 4112")


def test_restore_refuses_unknown_mandatory_record(tmp_path: Path) -> None:
    stream = image_header() + rec(SDE) + rec(0x4242, b"x") + rec(END)
    expect_refusal(tmp_path, stream, errno.EINVAL, "unknown mandatory record type 0x4242")


def test_restore_refuses_checkpoint_in_plain_stream(tmp_path: Path) -> None:
    stream = image_header() + rec(SDE) + rec(CHECKPOINT) + rec(END)
    expect_refusal(tmp_path, stream, errno.EINVAL, "non-checkpointed")


def test_restore_refuses_stream_without_context(tmp_path: Path) -> None:
    expect_refusal(
        tmp_path, image_header() + rec(SDE) + rec(END), errno.EINVAL, "without HVM_CONTEXT"
    )


def test_restore_refuses_truncated_stream(tmp_path: Path) -> None:
    src = make(tmp_path, "src", 1000, seed=3)
    stream = tmp_path / "s"
    save_to_file(src, stream, wrap="libxl")
    data = stream.read_bytes()
    expect_refusal(tmp_path, data[: len(data) // 2], errno.EIO, "truncated", wrap="libxl")


def test_restore_refuses_wrong_wrap(tmp_path: Path) -> None:
    src = make(tmp_path, "src", 100, seed=3)
    stream = tmp_path / "s"
    save_to_file(src, stream, wrap="libxc")
    expect_refusal(tmp_path, stream.read_bytes(), errno.EINVAL, "not an xl savefile", wrap="xl")


def test_restore_keeps_an_existing_domain_on_failure(tmp_path: Path) -> None:
    dst = make(tmp_path, "dst", 64, seed=1)
    before = _ext.sim_digest(dst)
    with pytest.raises(OSError, match="without HVM_CONTEXT"):
        restore_from_bytes(image_header() + rec(SDE) + rec(END), tmp_path, dst)
    assert _ext.sim_digest(dst) == before


# ------------------------------------------------------------------- live


def test_live_save_with_a_running_workload(tmp_path: Path, xen_verify: Any) -> None:
    src = make(tmp_path, "src", 16384, 2, seed=5)
    written: list[int] = []
    t = threading.Thread(target=lambda: written.append(_ext.sim_dirty(src, 20000, 3.0, 9)))
    t.start()
    time.sleep(0.2)
    stream = tmp_path / "s"
    try:
        st = save_to_file(src, stream, live=True, wrap="libxl")
    finally:
        t.join()
    # The workload stopped writing when the save suspended the domain.
    assert _ext.sim_info(src)["state"] == "suspended"
    assert _ext.sim_info(src)["logdirty"] is False
    assert 0 < written[0] < 20000 * 3
    assert st["rounds"] >= 2
    assert sum(st["pages_per_round"]) == st["pages_sent"]
    assert st["downtime_ns"] < st["duration_ns"]
    dst = str(tmp_path / "dst")
    restore_from_bytes(stream.read_bytes(), tmp_path, dst, wrap="libxl")
    assert _ext.sim_digest(dst) == _ext.sim_digest(src)
    assert xen_verify(stream, "libxl").returncode == 0


def test_policy_sees_the_rounds(tmp_path: Path) -> None:
    src = make(tmp_path, "src", 2048, seed=5)
    calls: list[tuple[int, int, int]] = []

    def policy(iteration: int, total_written: int, dirty: int) -> int:
        calls.append((iteration, total_written, dirty))
        return 0 if iteration < 3 else 1

    st = save_to_file(src, tmp_path / "s", live=True, policy=policy)
    # Asked before every round after the first full pass.
    assert [c[0] for c in calls] == [1, 2, 3]
    assert calls[0][1] == st["pages_per_round"][0]
    assert st["rounds"] == 4  # 0, 1, 2 live, then the final round


def test_policy_stop_at_once(tmp_path: Path) -> None:
    src = make(tmp_path, "src", 512, seed=5)
    dst = str(tmp_path / "dst")
    st = save_to_file(src, tmp_path / "s", live=True, policy=lambda *_: 1)
    assert st["rounds"] == 2  # the full pass, then the final round
    restore_from_bytes((tmp_path / "s").read_bytes(), tmp_path, dst)
    assert _ext.sim_digest(dst) == _ext.sim_digest(src)


def test_policy_abort(tmp_path: Path) -> None:
    src = make(tmp_path, "src", 2048, seed=5)
    with pytest.raises(OSError, match="aborted by the precopy policy") as exc:
        save_to_file(src, tmp_path / "s", live=True, policy=lambda *_: -1)
    assert exc.value.errno == errno.ECANCELED
    info = _ext.sim_info(src)
    assert info["state"] == "running"
    assert info["logdirty"] is False


def test_policy_exception_propagates(tmp_path: Path) -> None:
    src = make(tmp_path, "src", 256, seed=5)

    def policy(*_: int) -> int:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        save_to_file(src, tmp_path / "s", live=True, policy=policy)
    assert _ext.sim_info(src)["state"] == "running"


def test_guest_that_does_not_suspend(tmp_path: Path) -> None:
    src = make(tmp_path, "src", 256, seed=5)
    with pytest.raises(OSError, match="guest did not suspend") as exc:
        save_to_file(src, tmp_path / "s", suspend=lambda: False)
    assert exc.value.errno == errno.EIO
    assert _ext.sim_info(src)["state"] == "running"


@pytest.mark.parametrize("live", [False, True], ids=["nonlive", "live"])
def test_failed_save_leaves_the_source_running(tmp_path: Path, live: bool) -> None:
    src = make(tmp_path, "src", 4096, seed=5)
    rfd, wfd = os.pipe()
    os.close(rfd)  # EPIPE on the first write (Python ignores SIGPIPE)
    try:
        with pytest.raises(BrokenPipeError, match="writing"):
            _ext.engine_save(wfd, src, live=live)
    finally:
        os.close(wfd)
    info = _ext.sim_info(src)
    assert info["state"] == "running"
    assert info["logdirty"] is False


def test_failure_after_suspend_restores_running(tmp_path: Path) -> None:
    src = make(tmp_path, "src", 4096, seed=5)
    rfd, wfd = os.pipe()
    reader_done = threading.Event()

    def reader() -> None:
        # Take part of the stream, then hang up in the middle of the pages.
        os.read(rfd, 65536)
        os.close(rfd)
        reader_done.set()

    t = threading.Thread(target=reader)
    t.start()
    try:
        with pytest.raises(BrokenPipeError):
            _ext.engine_save(wfd, src)
    finally:
        t.join()
        os.close(wfd)
    assert reader_done.is_set()
    assert _ext.sim_info(src)["state"] == "running"


def test_save_of_a_missing_domain(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="opening sim domain"):
        save_to_file(str(tmp_path / "nope"), tmp_path / "s")


# ------------------------------------------------------------------ remus


def remus_save(tmp_path: Path, src: str, wrap: str, checkpoints: int) -> tuple[Path, list[str]]:
    """Save with a workload between checkpoints; returns each checkpoint's digest."""
    digests: list[str] = []

    def checkpoint() -> int:
        # Runs after the checkpoint went out and the domain was resumed:
        # the digest is that checkpoint's state; then the guest writes on.
        digests.append(_ext.sim_digest(src))
        _ext.sim_dirty(src, 0, 0.01, len(digests))
        return 1

    stream = tmp_path / f"remus-{wrap}"
    st = save_to_file(
        src, stream, wrap=wrap, stream_type="remus", checkpoints=checkpoints, checkpoint=checkpoint
    )
    assert st["rounds"] == checkpoints
    digests.append(_ext.sim_digest(src))  # the last checkpoint: no callback after it
    return stream, digests


@pytest.mark.parametrize("wrap", WRAPS)
def test_remus_roundtrip(tmp_path: Path, wrap: str) -> None:
    src = make(tmp_path, "src", 2048, 2, seed=12)
    stream, digests = remus_save(tmp_path, src, wrap, 3)
    assert len(set(digests)) == 3
    assert _ext.sim_info(src)["state"] == "running"  # resumed after each checkpoint
    dst = str(tmp_path / "dst")
    res = restore_from_bytes(stream.read_bytes(), tmp_path, dst, wrap=wrap, stream_type="remus")
    assert res["checkpoints"] == 3
    assert _ext.sim_digest(dst) == digests[-1]


def checkpoint_ends(stream: bytes) -> list[int]:
    """Offsets just past each CHECKPOINT record of a bare libxc Remus stream."""
    ends, off = [], 40
    while off < len(stream):
        rtype, length = struct.unpack_from("<II", stream, off)
        off += 8 + length + (-length) % 8
        if rtype == CHECKPOINT:
            ends.append(off)
    return ends


def test_remus_fails_over_to_the_last_complete_checkpoint(tmp_path: Path) -> None:
    src = make(tmp_path, "src", 2048, 2, seed=13)
    stream, digests = remus_save(tmp_path, src, "libxc", 3)
    data = stream.read_bytes()
    ends = checkpoint_ends(data)
    assert len(ends) == 3 and ends[-1] == len(data)
    # Cut inside checkpoint 3: checkpoint 2 stands.
    dst = str(tmp_path / "dst")
    res = restore_from_bytes(data[: ends[1] + 100], tmp_path, dst, stream_type="remus")
    assert res["checkpoints"] == 2
    assert _ext.sim_digest(dst) == digests[1]
    # Cut inside checkpoint 1: nothing consistent to fail over to.
    os.unlink(dst)
    expect_refusal(tmp_path, data[: ends[0] - 100], errno.EIO, "truncated", stream_type="remus")


def test_remus_restore_checkpoint_callback_can_stop(tmp_path: Path) -> None:
    src = make(tmp_path, "src", 512, seed=14)
    stream, digests = remus_save(tmp_path, src, "libxl", 3)
    seen: list[int] = []

    def checkpoint() -> int:
        seen.append(1)
        return 2 if len(seen) == 2 else 1  # XGR_CHECKPOINT_FAILOVER at the 2nd

    dst = str(tmp_path / "dst")
    res = restore_from_bytes(
        stream.read_bytes(),
        tmp_path,
        dst,
        wrap="libxl",
        stream_type="remus",
        checkpoint=checkpoint,
    )
    assert res["checkpoints"] == 2
    assert _ext.sim_digest(dst) == digests[1]
