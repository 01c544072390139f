"""Live migration between two xcsave peers over the wire (issue 14), end to end.

A real listener and a real sender in one event loop, over --insecure TCP
or TLS on loopback, the guest dirtying pages (``xcsave sim dirty``) while
it moves: with each of --compress zstd/adaptive, --channels 3,
--max-bandwidth, --resume and combinations, the received domain's digest
is the sender's.  ``--save-to`` yields a stream Xen's verify-stream-v2
accepts; live statistics arrive as events; a cap changed through
:class:`xcsave.MigrationControl` reaches the pump; a cap alone (``--raw``)
works towards a plain-stream receiver.  The link cut under tbf (netns) is
hfill's fixture (tests of bench link); here the pumps' resume is exercised
by migrations that negotiate it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_migrate
from conftest import XenVerify
from test_migrate import Net, partials, start_receiver, workload, xcsave_argv
from test_trust_net import listening as receiving
from test_trust_net import tls

import xcsave.sync
from xcsave import migrate, sim, wire
from xcsave.events import Event, MigrationStatsEvent

MiB = 1 << 20


__all__ = ["tls"]  # test_trust_net's fixture, used here


@pytest.fixture
def shm() -> Iterator[Path]:
    yield from test_migrate.shm.__wrapped__()


WIRES: list[dict[str, Any]] = [
    {"compress": "zstd"},
    {"compress": "adaptive"},
    {"channels": 3},
    {"max_bandwidth": "400M"},
    {"resume": True},
    {"compress": "adaptive", "channels": 3, "resume": True, "max_bandwidth": "1G"},
]


@pytest.mark.parametrize("opts", WIRES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
async def test_live_migration_over_the_wire_is_bit_exact(shm: Path, opts: dict[str, Any]) -> None:
    src = sim.create(shm / "src.dom", 64 * MiB, vcpus=2, seed=51)
    dst = shm / "dst.dom"
    events: list[Event] = []
    async with receiving(dst, insecure=True) as (addr, task):
        with workload(src):
            sent = await migrate.migrate(
                sim=src, to=addr, insecure=True, on_event=events.append, **opts
            )
        received = await task
    assert sim.digest(dst) == sim.digest(src)
    assert sim.info(dst)["state"] == "running"
    assert sim.info(src)["state"] == "suspended"
    assert received.fmt == sent.fmt == "libxl"
    assert partials(dst) == []
    stats = [e for e in events if isinstance(e, MigrationStatsEvent)]
    assert stats, "no live statistics"
    last = stats[-1]
    assert last.bytes_sent > 0
    assert last.stream_bytes >= sent.bytes
    assert len(last.channel_bytes) == opts.get("channels", 1)
    assert last.compression_ratio > 0.9  # raw frames cost only their headers


@pytest.mark.parametrize("fast", [True, False], ids=["fast-link", "slow-link"])
async def test_adaptive_probes_the_link_and_drops_the_pumps_when_it_is_fast(
    shm: Path, monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    """``adaptive`` on one channel measures the link first: one faster than
    zstd could compress (wire.DIRECT_RATE; here 1 byte/s, or never) gets the
    stream as it is, without either pump, and live statistics from the
    socket's counters; a slower one the pumps and their adaptive frames."""
    monkeypatch.setattr(wire, "DIRECT_RATE", 1 if fast else 1 << 60)
    src = sim.create(shm / "src.dom", 32 * MiB, vcpus=2, seed=58)
    dst = shm / "dst.dom"
    sent_ev: list[Event] = []
    recv_ev: list[Event] = []
    async with receiving(dst, insecure=True, on_event=recv_ev.append) as (addr, task):
        with workload(src):
            sent = await migrate.migrate(
                sim=src, to=addr, insecure=True, compress="adaptive", on_event=sent_ev.append
            )
        await task
    assert sim.digest(dst) == sim.digest(src)
    notes = " ".join(str(getattr(e, "message", "")) for e in sent_ev + recv_ev)
    pumps = [e for e in sent_ev + recv_ev if getattr(e, "kind", None) == "wire_stats"]
    stats = [e for e in sent_ev if isinstance(e, MigrationStatsEvent)]
    assert "the link probe moved" in notes
    assert stats, "no live statistics"
    if fast:
        assert "goes without the pumps" in notes and "comes without pumps" in notes
        assert pumps == []
        # TCP_INFO: the stream's bytes the receiver acknowledged (the last
        # ones may still be in flight when the helper is done)
        assert sent.bytes // 2 < stats[-1].bytes_sent <= sent.bytes
        # ... and the last figure, once the helper is done, the whole stream
        # it wrote (acknowledged or still in flight): CI once saw it short
        assert stats[-1].bytes_sent == stats[-1].stream_bytes == sent.bytes
        assert stats[-1].channel_bytes == (stats[-1].bytes_sent,)
    else:
        assert "through the pumps" in notes and "without" not in notes
        assert pumps


async def test_tls_channels_and_compression(shm: Path, tls: dict[str, Path]) -> None:
    """Each channel is secured like the first: TLS with the same directory."""
    src = sim.create(shm / "src.dom", 32 * MiB, seed=52)
    dst = shm / "dst.dom"
    async with receiving(dst, tls_dir=tls["receiver"]) as (addr, task):
        with workload(src):
            await migrate.migrate(
                sim=src, to=addr, tls_dir=tls["sender"], compress="zstd", channels=3
            )
        await task
    assert sim.digest(dst) == sim.digest(src)


async def test_compress_level_reaches_the_pump(shm: Path) -> None:
    """``compress_level`` is the level the sender's pump compresses at: on
    text, level 19 packs the same non-live stream tighter than level 1."""
    ratios = {}
    for level in (1, 19):
        src = sim.create(shm / f"src{level}.dom", 8 * MiB, seed=57, fill="text")
        dst = shm / f"dst{level}.dom"
        events: list[Event] = []
        async with receiving(dst, insecure=True) as (addr, task):
            await migrate.migrate(
                sim=src,
                to=addr,
                insecure=True,
                live=False,
                compress="zstd",
                compress_level=level,
                on_event=events.append,
            )
            await task
        assert sim.digest(dst) == sim.digest(src)
        ratios[level] = [e for e in events if isinstance(e, MigrationStatsEvent)][-1]
    assert ratios[19].compression_ratio > ratios[1].compression_ratio * 1.02, ratios


async def test_a_cap_alone_reaches_a_plain_receiver(shm: Path) -> None:
    """--max-bandwidth alone runs the pump --raw: the receiver sees a plain
    xl stream (its format sniffed as ever), no negotiation."""
    src = sim.create(shm / "src.dom", 16 * MiB, seed=53)
    dst = shm / "dst.dom"
    events: list[Event] = []
    async with receiving(dst, insecure=True, on_event=events.append) as (addr, task):
        await migrate.migrate(sim=src, to=addr, insecure=True, max_bandwidth=64 * MiB)
        received = await task
    assert received.fmt == "libxl"
    assert not any("over the wire" in str(getattr(e, "message", "")) for e in events)
    assert sim.digest(dst) == sim.digest(src)


async def _received_with_a_copy(src: Path, dst: Path, copy: Path) -> None:
    async with receiving(dst, insecure=True, save_to=copy) as (addr, task):
        await migrate.migrate(sim=src, to=addr, insecure=True, compress="zstd", live=False)
        await task


def test_save_to_is_a_stream_xen_verifies(
    shm: Path, tmp_path: Path, xen_verify: XenVerify
) -> None:
    src = sim.create(shm / "src.dom", 16 * MiB, seed=54)
    copy = tmp_path / "received.libxl"
    asyncio.run(_received_with_a_copy(src, shm / "dst.dom", copy))
    assert copy.stat().st_mode & 0o777 == 0o600
    verdict = xen_verify(copy, "libxl")
    assert verdict.returncode == 0, verdict.stderr
    r = subprocess.run(xcsave_argv("verify", copy), capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


async def test_save_to_is_removed_when_the_receive_fails(shm: Path, tmp_path: Path) -> None:
    copy = tmp_path / "received.libxl"
    dst = shm / "dst.dom"
    async with receiving(dst, insecure=True, save_to=copy, handshake_timeout=2) as (addr, task):
        r, w = await asyncio.open_connection(*addr)
        await r.readexactly(len(migrate.BANNER))
        w.write(wire.encode(wire.OFFER_MAGIC, wire.Offer(channels=2).body()))
        await w.drain()
        with pytest.raises(migrate.MigrationError, match="JOIN of all 2 channels"):
            await task
        w.close()
    assert not copy.exists()
    assert not dst.exists()


async def test_save_to_refuses_an_existing_file(shm: Path, tmp_path: Path) -> None:
    src = sim.create(shm / "src.dom", 8 * MiB, seed=55)
    copy = tmp_path / "there"
    copy.write_bytes(b"mine")
    dst = shm / "dst.dom"
    async with receiving(dst, insecure=True, save_to=copy) as (addr, task):
        with pytest.raises(migrate.MigrationError):
            await migrate.migrate(sim=src, to=addr, insecure=True, compress="zstd")
        with pytest.raises(migrate.MigrationError, match=r"EEXIST|File exists"):
            await task
    assert copy.read_bytes() == b"mine"
    assert sim.info(src)["state"] == "running"


async def test_the_cap_changed_mid_flight_reaches_the_pump(shm: Path) -> None:
    src = sim.create(shm / "src.dom", 64 * MiB, seed=56)
    dst = shm / "dst.dom"
    control = wire.MigrationControl()
    stats: list[MigrationStatsEvent] = []
    told: list[bool] = []

    def on_event(ev: Event) -> None:
        if isinstance(ev, MigrationStatsEvent):
            stats.append(ev)
            if not told:
                told.append(control.set_max_bandwidth("2G"))

    async with receiving(dst, insecure=True) as (addr, task):
        await migrate.migrate(
            sim=src,
            to=addr,
            insecure=True,
            max_bandwidth="32M",
            control=control,
            on_event=on_event,
        )
        await task
    assert told == [True]
    assert stats[0].rate_limit == 32 * MiB
    assert stats[-1].rate_limit == 2 << 30
    assert sim.digest(dst) == sim.digest(src)


class CuttingProxy:
    """A TCP relay in front of the receiver: :meth:`cut` breaks one of the
    connections it carries (both halves, with an RST) while the others and
    any new ones go on -- a link that drops one connection mid-stream."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.pairs: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        return host, port

    async def _relay(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection(*self.upstream)
        self.pairs.append((cw, sw))

        async def copy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(1 << 16):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(copy(cr, sw), copy(sr, cw))

    def cut(self, index: int) -> None:
        for w in self.pairs[index]:
            w.transport.abort()

    async def close(self) -> None:
        self.server.close()
        for pair in self.pairs:
            for w in pair:
                w.transport.abort()


@pytest.mark.parametrize("lost", [1, 0], ids=["channel-1", "channel-0"])
async def test_resume_after_a_connection_is_cut_mid_stream(shm: Path, lost: int) -> None:
    """--resume: a connection of the migration is broken during the live
    rounds; the sender reconnects (JOIN resume), both pumps take the new
    connection over, the stream completes bit-exact, and the bytes sent in
    all are fewer than a fresh start would need (the stream plus what the
    first attempt had sent)."""
    # Large enough that the save's live rounds outlast the pump's 64 MiB
    # window at the cap: the cut comes before the suspension (after it, no
    # reconnection: the existing in-doubt rules stand).
    src = sim.create(shm / "src.dom", 192 * MiB, seed=57)
    dst = shm / "dst.dom"
    stats: list[MigrationStatsEvent] = []
    lost_events: list[Event] = []
    async with receiving(dst, insecure=True) as (addr, task):
        proxy = CuttingProxy(addr)
        front = await proxy.start()

        def on_event(ev: Event) -> None:
            if isinstance(ev, MigrationStatsEvent):
                stats.append(ev)
                if len(stats) == 1:
                    proxy.cut(lost)
            if ev.kind == "wire_lost":
                lost_events.append(ev)

        try:
            with workload(src):
                sent = await migrate.migrate(
                    sim=src,
                    to=front,
                    insecure=True,
                    channels=2,
                    resume=True,
                    max_bandwidth="48M",
                    on_event=on_event,
                )
            await task
        finally:
            await proxy.close()
    assert lost_events, "the cut was not noticed"
    assert len(proxy.pairs) == 3  # channel 0, channel 1, the replacement
    assert sim.digest(dst) == sim.digest(src)
    assert sim.info(dst)["state"] == "running"
    at_cut = stats[0].stream_bytes
    assert stats[-1].stream_bytes < sent.bytes + at_cut


def test_wire_options_from_the_command_line(shm: Path, tmp_path: Path) -> None:
    """``migrate --compress zstd --channels 2 --max-bandwidth 1gbit --progress json``
    to ``receive --save-to FILE``: exit 0 both, live statistics as JSON lines,
    the copy a stream ``xcsave verify`` accepts, the digests equal."""
    src = sim.create(shm / "src.dom", 32 * MiB, seed=58)
    dst = shm / "dst.dom"
    copy = tmp_path / "copy.libxl"
    receiver, port = start_receiver(
        Net("loopback", "127.0.0.1"), dst, "--insecure", "--save-to", copy
    )
    try:
        with workload(src):
            sender = subprocess.run(
                xcsave_argv(
                    "migrate", "--sim", src, "--to", f"127.0.0.1:{port}", "--insecure",
                    "--live", "--compress", "zstd", "--channels", "2",
                    "--max-bandwidth", "1gbit", "--progress", "json",
                ),
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
        _out, err = receiver.communicate(timeout=60)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    assert sender.returncode == 0, sender.stderr
    assert receiver.returncode == 0, err
    lines = [json.loads(line) for line in sender.stdout.splitlines()]
    stats = [d for d in lines if d.get("event") == "migration_stats"]
    assert stats
    assert len(stats[-1]["channel_bytes"]) == 2
    assert stats[-1]["rate_limit"] == 125_000_000
    assert sim.digest(dst) == sim.digest(src)
    r = subprocess.run(xcsave_argv("verify", copy), capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


def test_sync_twins(shm: Path) -> None:
    """xcsave.sync.migrate / receive: the blocking twins, with the wire options."""
    src = sim.create(shm / "src.dom", 8 * MiB, seed=59)
    dst = shm / "dst.dom"
    bound: queue.Queue[tuple[str, int]] = queue.Queue()
    got: list[migrate.ReceiveResult] = []
    t = threading.Thread(
        target=lambda: got.append(
            xcsave.sync.receive(
                listen=("127.0.0.1", 0), sim=dst, insecure=True, on_listening=bound.put
            )
        )
    )
    t.start()
    try:
        sent = xcsave.sync.migrate(
            sim=src, to=bound.get(timeout=30), insecure=True, compress="zstd", channels=2
        )
    finally:
        t.join(60)
    assert got
    assert got[0].fmt == sent.fmt
    assert sim.digest(dst) == sim.digest(src)


class PausingProxy(CuttingProxy):
    """A relay whose every connection goes silent while paused (no FIN, no
    RST: a pulled cable), and carries on when resumed."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__(upstream)
        self.flowing = asyncio.Event()
        self.flowing.set()

    async def _relay(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        await self.flowing.wait()
        sr, sw = await asyncio.open_connection(*self.upstream)
        self.pairs.append((cw, sw))

        async def copy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await r.read(1 << 16):
                    await self.flowing.wait()
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(copy(cr, sw), copy(sr, cw))


async def test_resume_after_the_link_goes_silent(shm: Path) -> None:
    """--resume: the link goes silent (no FIN, no RST) for longer than the
    idle timeout during the live rounds; both pumps call the channel lost,
    the sender reconnects, and the migration completes bit-exact."""
    src = sim.create(shm / "src.dom", 192 * MiB, seed=58)
    dst = shm / "dst.dom"
    paused = False
    async with receiving(dst, insecure=True, idle_timeout=1.0) as (addr, task):
        proxy = PausingProxy(addr)
        front = await proxy.start()

        def on_event(ev: Event) -> None:
            nonlocal paused
            if isinstance(ev, MigrationStatsEvent) and not paused and ev.stream_bytes > 8 * MiB:
                paused = True
                proxy.flowing.clear()
                asyncio.get_running_loop().call_later(3.0, proxy.flowing.set)

        try:
            with workload(src):
                await migrate.migrate(
                    sim=src,
                    to=front,
                    insecure=True,
                    resume=True,
                    idle_timeout=1.0,
                    max_bandwidth="48M",
                    on_event=on_event,
                )
            await task
        finally:
            await proxy.close()
    assert paused
    assert sim.digest(dst) == sim.digest(src)
