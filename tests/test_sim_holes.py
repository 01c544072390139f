"""Readers never turn holes into pages (issue 12).

A stream of a few pages can claim a domain of 2^20 pages or more: the
restored domain is a sparse file.  Reading a tmpfs hole through the domain's
MAP_SHARED mapping allocates a page, so a digest or a save that read every
page would fill /dev/shm.  Here: digest, info and saves of sparse domains
(every path: sequential, copy threads, a pipe, live, with zero pages sent)
leave the file's allocated blocks as they were, and the digests are those
of the contents (holes hashed as zeros).
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path
from typing import Any

import pytest
from test_sim import HDR, hvm_context, image_header, rec, save_to_file, xxh64

from xcsave import _ext

PAGE = 4096
PAGE_DATA, SDE, END = 1, 16, 0
BIG = 1 << 20  # pages: a 4 GiB domain
# Blocks (512 bytes) a restore of a few pages may allocate: the header,
# the pages, the vCPU context and bitmap pages, with room to spare.
SLACK_BLOCKS = 64 * 8


def sparse_stream(pfns: list[int], pages: int) -> bytes:
    """A v3 stream with one page of 0x40+i at each pfn, claiming ``pages``."""
    body = struct.pack("<II", len(pfns), 0) + b"".join(struct.pack("<Q", p) for p in pfns)
    body += b"".join(bytes([0x40 + i]) * PAGE for i in range(len(pfns)))
    return image_header() + rec(SDE) + rec(PAGE_DATA, body) + hvm_context(pages) + rec(END)


def restore(data: bytes, directory: Path, name: str) -> str:
    src = directory / f"{name}.stream"
    src.write_bytes(data)
    dst = str(directory / name)
    fd = os.open(src, os.O_RDONLY)
    try:
        _ext.engine_restore(fd, dst)
    finally:
        os.close(fd)
    src.unlink()
    return dst


def blocks(path: str | Path) -> int:
    return os.stat(path).st_blocks


def save(src: str, out: Path, **kw: Any) -> dict[str, Any]:
    try:
        return save_to_file(src, out, **kw)
    finally:
        _ext.sim_set_state(src, "running")


def test_digest_hashes_holes_as_zeros(shm_dir: Path) -> None:
    """The digest's definition (docs/sim-format.md) holds over holes."""
    pages = 300
    dom = restore(sparse_stream([3, 200, 299], pages), shm_dir, "d")
    before = blocks(dom)
    data = Path(dom).read_bytes()  # read(2) of a tmpfs hole allocates nothing
    vcpu_off = HDR + pages * PAGE
    d = [
        xxh64(data[HDR:vcpu_off]),
        xxh64(data[vcpu_off : vcpu_off + 512]),
        xxh64(struct.pack("<4Q", pages, 12, 1, 512)),
    ]
    d.append(xxh64(struct.pack("<3Q", *d)))
    assert data[HDR + 200 * PAGE : HDR + 201 * PAGE] == b"\x41" * PAGE
    assert _ext.sim_digest(dom) == struct.pack("<4Q", *d).hex()
    assert blocks(dom) == before


def test_digest_and_info_of_a_huge_sparse_domain_allocate_nothing(shm_dir: Path) -> None:
    dom = restore(sparse_stream([0, 7, BIG - 1], BIG), shm_dir, "big")
    before = blocks(dom)
    assert os.path.getsize(dom) > BIG * PAGE
    assert before < SLACK_BLOCKS
    info = _ext.sim_info(dom)
    assert info["pages"] == BIG
    first = _ext.sim_digest(dom)
    assert _ext.sim_digest(dom) == first
    assert blocks(dom) == before


@pytest.mark.parametrize(
    "how",
    [
        {},
        {"live": True},
        {"copy_threads": 2},
        {"send_zero_pages": True},
        {"send_zero_pages": True, "copy_threads": 2},
        {"send_zero_pages": True, "live": True},
    ],
    ids=["plain", "live", "threads", "zeros", "zeros-threads", "zeros-live"],
)
def test_save_of_a_sparse_domain_allocates_nothing(shm_dir: Path, how: dict[str, Any]) -> None:
    # Sending zero pages writes them all into the stream: a smaller domain.
    pages = 5 * 4096 if how.get("send_zero_pages") else BIG
    dom = restore(sparse_stream([1, 4096, pages - 2], pages), shm_dir, "src")
    before = blocks(dom)
    digest = _ext.sim_digest(dom)
    st = save(dom, shm_dir / "img", **how)
    # A live save clears and reads the dirty log: the bitmap (a bit per
    # page, 1/32768 of the memory) may become pages; guest pages may not.
    bitmap_blocks = -(-pages // 8 // PAGE) * PAGE // 512 if how.get("live") else 0
    assert before <= blocks(dom) <= before + bitmap_blocks
    if how.get("send_zero_pages"):
        assert st["pages_sent"] >= pages
    else:
        assert st["pages_sent"] == 3
        assert st["zero_pages"] == pages - 3
    if how.get("copy_threads"):
        assert st["copy_threads"] == 2
    img = (shm_dir / "img").read_bytes()
    (shm_dir / "img").unlink()
    copy = restore(img, shm_dir, "copy")
    assert _ext.sim_digest(copy) == digest


def test_save_into_a_pipe_of_a_sparse_domain_allocates_nothing(shm_dir: Path) -> None:
    """The pipe path: vmsplice, and the final round's copied tail (whose
    size is worked out scanning down from the top page)."""
    dom = restore(sparse_stream([2, BIG // 2, BIG - 3], BIG), shm_dir, "src")
    before = blocks(dom)
    rfd, wfd = os.pipe()
    chunks: list[bytes] = []

    def drain() -> None:
        while b := os.read(rfd, 1 << 20):
            chunks.append(b)

    t = threading.Thread(target=drain)
    t.start()
    try:
        st = _ext.engine_save(wfd, dom)
    finally:
        os.close(wfd)
        t.join()
        os.close(rfd)
        _ext.sim_set_state(dom, "running")
    assert st["pages_sent"] == 3
    assert blocks(dom) == before
    copy = restore(b"".join(chunks), shm_dir, "copy")
    assert _ext.sim_digest(copy) == _ext.sim_digest(dom)
    assert blocks(dom) == before


def test_a_sparse_live_round_asks_mincore_about_its_own_pages(
    shm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A late live round sends a few scattered pages; its hole checks must
    ask mincore() about those pages, not the 4096-page window around each
    (a few hundred scattered pages of a 1 GiB domain cost ~30 ms a round,
    and as much again in the downtime).  Counted in pages asked, not timed:
    the save runs under strace, which logs each mincore()'s length."""
    import asyncio
    import shutil

    import xcsave
    from xcsave import sim
    from xcsave.policy import Decision, PrecopyStats, Verdict
    from xcsave.supervisor import helper_path

    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed (tools/test installs it)")
    pages = 1 << 16  # 256 MiB
    dom = sim.create(shm_dir / "src.dom", pages * PAGE, seed=3, fill="random")
    log = tmp_path / "helper.strace"
    wrapper = tmp_path / "helper"
    wrapper.write_text(
        f'#!/bin/sh\nexec {strace} -f -e trace=mincore -o {log} {helper_path()} "$@"\n'
    )
    wrapper.chmod(0o700)
    monkeypatch.setenv("XCSAVE_HELPER", str(wrapper))
    written: list[int] = []

    def pol(st: PrecopyStats) -> Verdict:
        if st.iteration == 1:  # round 0 sent everything: now a few scattered writes
            # The dirtier is paced by the clock: on a starved CPU one 2 ms
            # burst can write nothing, so burst until there are some.
            n = 0
            for burst in range(1000):
                n += sim.dirty(dom, 100_000, 0.002, seed=7 + burst)
                if n >= 100:
                    break
            written.append(n)
            return Verdict(Decision.CONTINUE, "one sparse round")
        return Verdict(Decision.STOP_AND_COPY, "done")

    asyncio.run(xcsave.save(shm_dir / "out", sim=dom, live=True, policy=pol))
    sim.set_state(dom, "running")
    asked = sum(
        int(line.split(",")[1]) // PAGE
        for line in log.read_text().splitlines()
        if "mincore(" in line
    )
    assert 0 < written[0] < pages // 16, written
    # Round 0 asks about every page once; the sparse round about its own.
    assert pages <= asked <= pages + 16 * written[0], (asked, written)
