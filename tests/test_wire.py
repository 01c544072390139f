"""The wire pumps (xcsave-helper wire-send / wire-recv, csrc/wire.c; WIRE.md).

Driven directly: socketpairs for the channels, pipes for the plain stream
in and out, each pump a supervised HelperRun.  Checked: bytes in == bytes
out for every option, the rate cap's accuracy (a property of the cap, not a
speed), a cap changed mid-flight, resume after a channel is cut, and every
hostile input an attacker (or a broken peer) could send, each failing in
one line with its errno and without allocating what the frame claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from xcsave import proto
from xcsave.events import Event, LogEvent, WireStatsEvent
from xcsave.supervisor import HelperRun, HelperSpec, RunResult, helper_path

MAGIC = 0x46534358
HDR = struct.Struct("<IBBHIIQQ")
DATA, END, ACK, RESUME = 1, 2, 3, 4
FRAME = 64 * 1024  # small frames: many of them per test


def _zstd_built() -> bool:
    r = subprocess.run([str(helper_path()), "--version"], capture_output=True, check=True)
    return b" zstd libzstd" in r.stdout


needs_zstd = pytest.mark.skipif(
    not _zstd_built(), reason="the helper was built without zstd (install libzstd-dev)"
)


def fill(kind: str, size: int, seed: int = 1) -> bytes:
    """random, zero, text (compressible, costs zstd time) or mixed pages."""
    rnd = random.Random(seed)
    if kind == "random":
        return rnd.randbytes(size)
    if kind == "zero":
        return bytes(size)
    words = [rnd.randbytes(rnd.randint(2, 9)).hex().encode() for _ in range(400)]
    if kind == "text":
        out = bytearray()
        while len(out) < size:
            out += b" ".join(rnd.choices(words, k=64)) + b"\n"
        return bytes(out[:size])
    assert kind == "mixed"
    pages = []
    for i in range(size // 4096 + 1):
        pick = i % 4
        pages.append(
            bytes(4096)
            if pick in (0, 1)
            else rnd.randbytes(4096)
            if pick == 2
            else fill("text", 4096, seed + i)
        )
    return b"".join(pages)[:size]


@dataclass
class Side:
    """One pump's run: its HelperRun, events and result (or exception)."""

    run: HelperRun
    events: list[Event] = field(default_factory=list)
    result: RunResult | None = None
    error: BaseException | None = None

    def stats(self) -> WireStatsEvent:
        last = [e for e in self.events if isinstance(e, WireStatsEvent)]
        assert last, "no wire_stats"
        return last[-1]

    def errors(self) -> list[LogEvent]:
        return [e for e in self.events if isinstance(e, LogEvent) and e.level >= 8]


def _spec(mode: str, args: Sequence[str], fds: Sequence[int]) -> HelperSpec:
    return HelperSpec(
        mode=mode,
        dialect=proto.XCSAVE_1,
        args=("--xcsave-1", mode, *args),
        pass_fds=tuple(fds),
        domain=mode,
        backend="wire",
    )


def _side(mode: str, args: Sequence[str], fds: Sequence[int]) -> Side:
    side = Side(HelperRun(_spec(mode, args, fds)))
    side.run.on_event = side.events.append
    return side


async def _run(side: Side, timeout: float = 60) -> None:
    try:
        side.result = await side.run.run(timeout)
    except Exception as e:  # judged by the test
        side.error = e


async def _started(*sides: Side) -> None:
    # HelperRun has no "spawned" hook: poll for its process (a few ms).
    while any(s.run.proc is None and s.error is None for s in sides):  # noqa: ASYNC110
        await asyncio.sleep(0.005)


def _chan_args(fds: Sequence[int]) -> list[str]:
    return [a for fd in fds for a in ("--channel-fd", str(fd))]


@contextlib.contextmanager
def _closing(*fds: int) -> Iterator[None]:
    try:
        yield
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _writer(fd: int, data: bytes, chunk: int = 1 << 20) -> threading.Thread:
    def go() -> None:
        with contextlib.suppress(OSError):
            view = memoryview(data)
            while view:
                n = os.write(fd, view[:chunk])
                view = view[n:]
        os.close(fd)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def _reader(fd: int, into: bytearray) -> threading.Thread:
    def go() -> None:
        while chunk := os.read(fd, 1 << 20):
            into.extend(chunk)
        os.close(fd)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


@dataclass
class Transfer:
    sender: Side
    receiver: Side
    out: bytearray
    elapsed: float


async def transfer(
    data: bytes,
    channels: int = 1,
    send_args: Sequence[str] = (),
    recv_args: Sequence[str] = (),
    *,
    frame: int = FRAME,
    window: int = 16 * FRAME,
    during: Callable[[Side, Side, list[tuple[socket.socket, socket.socket]]], Any] | None = None,
    resume: bool = False,
    recv_fds: Sequence[int] = (),
) -> Transfer:
    """data through wire-send -> N socketpairs -> wire-recv; the output."""
    pairs = [socket.socketpair() for _ in range(channels)]
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    common = ["--frame-size", str(frame), "--window", str(window)]
    s_fds = [a.fileno() for a, _ in pairs]
    r_fds = [b.fileno() for _, b in pairs]
    extra_s: list[int] = []
    extra_r: list[int] = []
    res: list[socket.socket] = []
    if resume:
        s_ours, s_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        r_ours, r_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        res = [s_ours, s_theirs, r_ours, r_theirs]
        extra_s, extra_r = [s_theirs.fileno()], [r_theirs.fileno()]
        common_s = ["--resume-sock", str(s_theirs.fileno()), "--resume-timeout-ms", "20000"]
        common_r = ["--resume-sock", str(r_theirs.fileno()), "--resume-timeout-ms", "20000"]
    else:
        common_s = common_r = []
    sender = _side(
        "wire-send",
        ["--in-fd", str(in_r), *_chan_args(s_fds), *common, *common_s, *send_args],
        [in_r, *s_fds, *extra_s],
    )
    receiver = _side(
        "wire-recv",
        ["--out-fd", str(out_w), *_chan_args(r_fds), *common, *common_r, *recv_args],
        [out_w, *r_fds, *extra_r, *recv_fds],
    )
    out = bytearray()
    t0 = time.monotonic()
    try:
        tasks = [asyncio.create_task(_run(sender)), asyncio.create_task(_run(receiver))]
        await _started(sender, receiver)
        os.close(in_r)
        os.close(out_w)
        in_r = out_w = -1
        w = _writer(in_w, data)
        r = _reader(out_r, out)
        if during is not None:
            got = during(sender, receiver, pairs)
            if asyncio.iscoroutine(got):
                await got
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if sender.error or receiver.error:
            # One side failed: the other would wait for it (until its idle timeout).
            await asyncio.wait(pending, timeout=5)
            for side in (sender, receiver):
                await side.run.stop()
        await asyncio.gather(*tasks)
        await asyncio.to_thread(w.join, 10)
        await asyncio.to_thread(r.join, 10)
    finally:
        for fd in (in_r, out_w):
            if fd >= 0:
                os.close(fd)
        for a, b in pairs:
            a.close()
            b.close()
        for s in res:
            s.close()
    return Transfer(sender, receiver, out, time.monotonic() - t0)


def _ok(t: Transfer) -> None:
    assert t.sender.error is None, t.sender.error
    assert t.receiver.error is None, t.receiver.error


# ------------------------------------------------------------------ data path


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["random", "zero", "mixed"])
async def test_bytes_in_equal_bytes_out(kind: str, channels: int) -> None:
    data = fill(kind, 3 * 1024 * 1024 + 12345)  # not a multiple of the frame
    t = await transfer(data, channels)
    _ok(t)
    assert bytes(t.out) == data
    st = t.sender.stats()
    assert st.stream_bytes == len(data)
    assert st.frames == -(-len(data) // FRAME) or st.frames > len(data) // FRAME
    assert len(st.channel_bytes) == channels
    assert sum(st.channel_bytes) == st.wire_bytes
    rst = t.receiver.stats()
    assert rst.stream_bytes == len(data)
    assert rst.wire_bytes == st.wire_bytes
    if channels > 1 and len(data) > 8 * FRAME:
        assert sum(1 for b in st.channel_bytes if b > 0) > 1  # spread over channels


async def test_empty_stream() -> None:
    t = await transfer(b"", 2)
    _ok(t)
    assert t.out == b""
    assert t.sender.stats().frames == 0


async def test_tee_gets_a_copy(tmp_path: Path) -> None:
    data = fill("mixed", 1_000_003)
    tee = os.open(tmp_path / "tee", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with _closing(tee):
        t = await transfer(data, 2, recv_args=["--tee-fd", str(tee)], recv_fds=[tee])
    _ok(t)
    assert bytes(t.out) == data
    assert (tmp_path / "tee").read_bytes() == data


async def test_raw_mode_copies_the_stream() -> None:
    """--raw: no frames, the plain stream as it is (towards a stock receiver)."""
    data = fill("random", 2_000_001)
    a, b = socket.socketpair()
    in_r, in_w = os.pipe()
    side = _side(
        "wire-send",
        ["--in-fd", str(in_r), "--channel-fd", str(a.fileno()), "--raw"],
        [in_r, a.fileno()],
    )
    got = bytearray()

    def read() -> None:
        while chunk := b.recv(1 << 20):
            got.extend(chunk)
            if len(got) >= len(data):
                break

    with a, b:
        task = asyncio.create_task(_run(side))
        await _started(side)
        os.close(in_r)
        _writer(in_w, data)
        await asyncio.gather(task, asyncio.to_thread(read))
    assert side.error is None, side.error
    assert bytes(got) == data
    assert side.stats().wire_bytes == len(data)
