"""xcsave wire 1, the Python side (issue 14): negotiation, JOIN admission, the cap, statistics.

- The messages (OFFER / ACCEPT / JOIN): round trips, and every field a
  peer could get wrong refused in one line (size bomb, garbage, wrong
  types, an answer that grants more than was asked).
- The receiver's book of channels: wrong token, unknown or duplicate
  index, a resume that was not negotiated.
- Hostile peers against a real listener: an OFFER of 1 GiB, garbage JSON,
  JOINs with a wrong token, a JOIN flood, a duplicate channel: each is one
  line, nothing is created, the listener is not wedged.  Hostile receivers
  against a real sender: a stock receiver that hangs up on the offer, and
  one that goes silent after its banner: one line, the domain runs again.
- ``--max-bandwidth``'s one rule, the pumps' argv, the cap's handle and the
  live statistics.

Nothing here needs the pumps themselves (tests/test_wire_migrate.py does).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import test_migrate
from conftest import LogRecords
from test_migrate import partials, xcsave_argv
from test_trust_net import listening

from xcsave import migrate, sim, wire
from xcsave.errors import HandshakeError
from xcsave.events import Event, MigrationStatsEvent, PolicyEvent
from xcsave.handshake import BANNER

MiB = 1 << 20


@pytest.fixture
def shm() -> Iterator[Path]:
    yield from test_migrate.shm.__wrapped__()


# ---------------------------------------------------------------- messages


def test_offer_accept_join_round_trip() -> None:
    offer = wire.Offer(compress="zstd", channels=3, resume=True, format="libxl")
    raw = wire.encode(wire.OFFER_MAGIC, offer.body())
    n = wire.body_length(raw[:12], wire.OFFER_MAGIC, "offer")
    assert n == len(raw) - 12
    assert wire.Offer.parse(wire.decode(raw[12:], "offer")) == offer
    acc = offer.accept(max_channels=2)
    assert acc.channels == 2
    assert len(acc.token) == 32
    assert acc.token != offer.accept().token  # a fresh token per migration
    assert wire.Accept.parse(acc.body(), offer) == acc
    join = wire.Join(acc.token, 1)
    assert wire.Join.parse(join.body()) == join


def test_the_receiver_lowers_what_it_cannot_do() -> None:
    offer = wire.Offer(compress="zstd", channels=64, resume=True, frame=1 << 30, window=1 << 40)
    acc = offer.accept(zstd=False, max_channels=4, resume=False)
    assert (acc.compress, acc.channels, acc.resume) == ("off", 4, False)
    assert acc.frame == wire.FRAME_MAX
    assert acc.window == wire.WINDOW_MAX


def test_a_size_bomb_is_refused_unread() -> None:
    head = wire.OFFER_MAGIC + struct.pack("<I", 1 << 30)
    with pytest.raises(HandshakeError, match=r"1073741824 bytes, more than 4096 \(EMSGSIZE\)"):
        wire.body_length(head, wire.OFFER_MAGIC, "offer")
    with pytest.raises(HandshakeError, match="not b'XcsWire1'"):
        wire.body_length(wire.JOIN_MAGIC + b"\0\0\0\0", wire.OFFER_MAGIC, "offer")
    with pytest.raises(ValueError, match="over 4096"):
        wire.encode(wire.OFFER_MAGIC, {"x": "y" * 5000})


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"{not json", "not UTF-8 JSON"),
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b"[1, 2]", "a JSON list, not an object"),
        (b'"offer"', "a JSON str, not an object"),
    ],
)
def test_garbage_bodies_are_one_line(data: bytes, match: str) -> None:
    with pytest.raises(HandshakeError, match=match) as e:
        wire.decode(data, "offer")
    assert "\n" not in str(e.value)


GOOD_OFFER: dict[str, Any] = wire.Offer(channels=2).body()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"compress": "lz4"}, "'compress' is 'lz4'"),
        ({"compress": 1}, "'compress' is 1, expected a str"),
        ({"channels": 0}, "'channels' is 0"),
        ({"channels": True}, "'channels' is True, expected a int"),
        ({"channels": "2"}, "'channels' is '2'"),
        ({"resume": "yes"}, "'resume' is 'yes'"),
        ({"frame": 1}, "'frame' is 1"),
        ({"window": -1}, "'window' is -1"),
        ({"format": "qcow2"}, "'format' is 'qcow2'"),
        ({"format": None}, "'format' is None"),
        ({"probe": "yes"}, "'probe' is 'yes'"),
    ],
)
def test_a_bad_offer_names_its_field(change: dict[str, Any], match: str) -> None:
    with pytest.raises(HandshakeError, match=match):
        wire.Offer.parse(GOOD_OFFER | change)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"compress": "zstd"}, "zstd granted but not offered"),
        ({"resume": True}, "resume granted but not offered"),
        ({"channels": 3}, "'channels' is 3, expected 1..2"),
        ({"token": "A" * 32}, "not 32 lowercase hex"),
        ({"token": "ab"}, "not 32 lowercase hex"),
        ({"frame": 1 << 30}, "'frame' is"),
        ({"probe": True}, "a probe granted but not offered"),
    ],
)
def test_an_answer_never_grants_more_than_was_offered(change: dict[str, Any], match: str) -> None:
    offer = wire.Offer(channels=2)
    good = offer.accept().body()
    with pytest.raises(HandshakeError, match=match):
        wire.Accept.parse(good | change, offer)


def test_the_link_probe_is_granted_only_where_the_stream_can_go_direct() -> None:
    """The probe may end with the stream on channel 0 as it is: only one
    channel, no resume, and a receiver without a tee (the pump writes it)."""
    offer = wire.Offer(compress="zstd", probe=True)
    assert offer.accept().probe
    assert not offer.accept(direct=False).probe  # --save-to
    assert not dataclasses.replace(offer, channels=2).accept().probe
    assert dataclasses.replace(offer, channels=2).accept(max_channels=1).probe  # lowered to one
    assert not dataclasses.replace(offer, resume=True).accept().probe
    assert not wire.Offer(compress="zstd").accept().probe
    # An offer from an xcsave without the probe parses, without one.
    old = {k: v for k, v in offer.body().items() if k != "probe"}
    assert wire.Offer.parse(old).probe is False
    assert wire.Accept.parse(offer.accept().body(), offer).probe is True


def test_joins_admit_each_channel_once_with_the_token() -> None:
    acc = wire.Offer(channels=3, resume=True).accept()
    book = wire.Joins(acc)
    other = "0" * 32 if acc.token != "0" * 32 else "1" * 32
    assert book.claim(wire.Join(other, 1)) == "a JOIN with an unknown token"
    assert book.claim(wire.Join(acc.token, 3)) == "a JOIN for channel 3 of 3"
    assert book.claim(wire.Join(acc.token, 0)) == "a JOIN for channel 0 of 3"
    assert book.claim(wire.Join(acc.token, 2, resume=True)) is not None  # never joined
    assert book.claim(wire.Join(acc.token, 1)) is None
    assert book.claim(wire.Join(acc.token, 1)) == "a second JOIN for channel 1"
    assert not book.complete
    assert book.claim(wire.Join(acc.token, 2)) is None
    assert book.complete
    assert book.claim(wire.Join(acc.token, 1, resume=True)) is None  # a replacement
    book.closed = True
    assert book.claim(wire.Join(acc.token, 1, resume=True)) == "a JOIN after the stream ended"
    no_resume = wire.Joins(wire.Offer(channels=2).accept())
    assert no_resume.claim(wire.Join(no_resume.accept.token, 1)) is None
    assert "not negotiated" in (
        no_resume.claim(wire.Join(no_resume.accept.token, 1, resume=True)) or ""
    )


# ---------------------------------------------------------------- the cap


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("0", 0),
        ("4096", 4096),
        ("100M", 100 * MiB),
        ("100MB/s", 100 * MiB),
        ("100MiB", 100 * MiB),
        ("1G", 1 << 30),
        ("64k", 64 << 10),
        ("1gbit", 125_000_000),
        ("500mbit", 62_500_000),
        ("10gbit/s", 1_250_000_000),
        ("8bit", 1),
        ("1.5G", 3 << 29),
    ],
)
def test_parse_rate(text: str, rate: int) -> None:
    assert wire.parse_rate(text) == rate


@pytest.mark.parametrize("text", ["", "fast", "1gbps", "-1M", "1x", "1 G bit", "M", "0.1", "1e9"])
def test_parse_rate_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="bad rate"):
        wire.parse_rate(text)


@pytest.mark.parametrize("text", ["1025T", "99999999999999999999999gbit", str(wire.MAX_RATE + 1)])
def test_parse_rate_refuses_what_no_pump_takes(text: str) -> None:
    """Above the helper's bound (1 PiB/s): refused here, in one line, before a
    migration starts -- not by the pump after the source was suspended."""
    with pytest.raises(ValueError, match=r"must be 0 \(no cap\) to 1125899906842624 bytes/s"):
        wire.parse_rate(text)
    assert wire.parse_rate("1024T") == wire.MAX_RATE


@pytest.mark.parametrize("rate", [-1, wire.MAX_RATE + 1])
def test_a_cap_out_of_range_is_refused_by_the_api(rate: int) -> None:
    with pytest.raises(ValueError, match="no cap"):
        wire.MigrationControl().set_max_bandwidth(rate)
    with pytest.raises(ValueError, match="max_bandwidth must be"):
        wire.checked_rate(rate, "max_bandwidth")


class FakePump:
    def __init__(self) -> None:
        self.sent: list[tuple[str, tuple[int, ...]]] = []

    def send(self, name: str, *args: int) -> bool:
        self.sent.append((name, args))
        return True


def test_migration_control_tells_a_running_pump() -> None:
    control = wire.MigrationControl()
    assert control.set_max_bandwidth("1gbit") is False  # not running: kept for the start
    assert control.max_bandwidth == 125_000_000
    pump = FakePump()
    control.attach(pump)
    assert control.set_max_bandwidth(10 * MiB) is True
    assert control.set_max_bandwidth(0) is True
    assert pump.sent == [("wire_rate", (10 * MiB,)), ("wire_rate", (0,))]
    with pytest.raises(ValueError, match="0 \\(no cap\\) to"):
        control.set_max_bandwidth(-1)
    control.attach(None)
    assert control.set_max_bandwidth(1) is False


def test_pump_argv_is_wires() -> None:
    send = wire.PumpPlan(
        "wire-send",
        5,
        (6, 7),
        compress="adaptive",
        max_bandwidth=1000,
        resume_fd=9,
        idle_timeout=2.5,
    )
    argv = send.argv()
    assert argv[:4] == ("--xcsave-1", "wire-send", "--in-fd", "5")
    assert " ".join(argv).count("--channel-fd") == 2
    assert argv[argv.index("--compress") + 1] == "adaptive"
    assert argv[argv.index("--max-bandwidth") + 1] == "1000"
    assert argv[argv.index("--resume-sock") + 1] == "9"
    assert argv[argv.index("--idle-timeout-ms") + 1] == "2500"
    assert "--level" not in argv  # the pump's own default for the mode
    assert send.fds() == (5, 6, 7, 9)
    leveled = wire.PumpPlan("wire-send", 5, (6,), compress="zstd", level=7).argv()
    assert leveled[leveled.index("--level") + 1] == "7"
    assert "--level" not in wire.PumpPlan("wire-send", 5, (6,), level=7).argv()  # off: none
    raw = wire.PumpPlan("wire-send", 5, (6,), raw=True, max_bandwidth=10).argv()
    assert "--raw" in raw
    assert "--frame-size" not in raw
    recv = wire.PumpPlan("wire-recv", 4, (6,), tee_fd=8)
    assert recv.argv()[2:4] == ("--out-fd", "4")
    assert "--compress" not in recv.argv()
    assert recv.fds() == (4, 6, 8)


# ---------------------------------------------------------------- statistics


@dataclass(frozen=True)
class FakeWireStats(Event):
    kind = "wire_stats"  # what the pump's generated WireStatsEvent is called
    stream_bytes: int
    wire_bytes: int
    frames: int
    frames_compressed: int
    rate_limit: int
    blocked_ns: int
    duration_ns: int
    channel_bytes: tuple[int, ...]


def test_live_stats_combine_rounds_and_wire_figures() -> None:
    got: list[Event] = []
    stats = wire.LiveStats("migrate", "d", got.append)
    stats.feed(PolicyEvent("save", "d", 2, 1000, 256, 0))
    stats.feed(FakeWireStats("w", "d", 4 * MiB, 2 * MiB, 4, 4, 0, 0, 10**9, (MiB, MiB)))
    (ev,) = got
    assert isinstance(ev, MigrationStatsEvent)
    assert ev.bytes_sent == 2 * MiB
    assert ev.compression_ratio == 2.0
    assert ev.bytes_remaining == 256 * 4096
    assert ev.iteration == 2
    assert ev.channel_bytes == (MiB, MiB)
    assert ev.throughput > 0
    assert ev.expected_downtime_ms > 0
    assert json.loads(json.dumps(ev.asdict()))["event"] == "migration_stats"


# ---------------------------------------------------------------- hostile senders


@contextlib.asynccontextmanager
async def receiving(
    dst: Path, **kw: Any
) -> AsyncIterator[tuple[tuple[str, int], asyncio.Task[migrate.ReceiveResult]]]:
    """A listener in a task (test_trust_net's), --insecure."""
    async with listening(dst, insecure=True, **kw) as got:
        yield got


async def peer(
    addr: tuple[str, int],
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await asyncio.open_connection(*addr)
    try:
        async with asyncio.timeout(20):
            assert await r.readexactly(len(BANNER)) == BANNER
    except BaseException:
        w.close()
        raise
    return r, w


async def offered(
    addr: tuple[str, int], offer: wire.Offer
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, wire.Accept]:
    """A sender's channel 0 up to the receiver's answer."""
    r, w = await peer(addr)
    w.write(wire.encode(wire.OFFER_MAGIC, offer.body()))
    head = await r.readexactly(12)
    body = await r.readexactly(wire.body_length(head, wire.OFFER_MAGIC, "accept"))
    return r, w, wire.Accept.parse(wire.decode(body, "accept"), offer)


async def joined(addr: tuple[str, int], join: wire.Join) -> bool:
    """Send a JOIN on a new connection; whether the receiver hung up on it."""
    r, w = await peer(addr)
    w.write(wire.encode(wire.JOIN_MAGIC, join.body()))
    try:
        async with asyncio.timeout(5):
            return await r.read(1) == b""
    except TimeoutError:
        return False  # kept: admitted
    finally:
        w.close()


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (wire.OFFER_MAGIC + struct.pack("<I", 1 << 30), r"more than 4096 \(EMSGSIZE\)"),
        (wire.OFFER_MAGIC + struct.pack("<I", 9) + b"{garbage!", "not UTF-8 JSON"),
        (
            wire.encode(wire.OFFER_MAGIC, GOOD_OFFER | {"channels": -5}),
            "'channels' is -5",
        ),
        (wire.OFFER_MAGIC + struct.pack("<I", 100) + b"{", "no complete wire offer within"),
    ],
    ids=["size-bomb", "garbage-json", "bad-field", "silence-mid-offer"],
)
async def test_a_hostile_offer_fails_the_receive_in_one_line(
    shm: Path, payload: bytes, match: str
) -> None:
    dst = shm / "dst.dom"
    async with receiving(dst, handshake_timeout=2) as (addr, task):
        _r, w = await peer(addr)
        e = await _refused(w, payload, task, match)
    assert "nothing was kept here" in e
    assert not dst.exists()
    assert partials(dst) == []


async def _refused(
    w: asyncio.StreamWriter,
    payload: bytes,
    task: asyncio.Task[migrate.ReceiveResult],
    match: str,
) -> str:
    """``payload`` from a hostile sender fails the receive in one line: which."""
    w.write(payload)
    await w.drain()
    with pytest.raises(migrate.MigrationError, match=match) as e:
        await task
    w.close()
    assert "\n" not in str(e.value)
    return str(e.value)


PROBING = wire.Offer(compress="zstd", probe=True)


def _probe(n: int, data: bytes = b"") -> bytes:
    return wire.probe_head(n) + (data or bytes(n))


@pytest.mark.parametrize(
    ("after_accept", "match"),
    [
        (wire.probe_head(wire.PROBE_MAX + 1), r"a probe of 16777217 bytes.*\(EMSGSIZE\)"),
        (b"GARBAGE!" + bytes(4), r"bad the sender's link probe: b'GARBAGE!'.*\(EPROTO\)"),
        (_probe(10) * 4, r"after 3 probe\(s\).*\(EPROTO\)"),
        (_probe(1000)[:500], "no complete the sender's link probe within"),
        (wire.encode(wire.OFFER_MAGIC, {"direct": "yes"}), r"'direct' is 'yes'"),
        (wire.OFFER_MAGIC + struct.pack("<I", 1 << 30), r"more than 4096 \(EMSGSIZE\)"),
    ],
    ids=["size-bomb", "garbage", "too-many", "silence", "bad-mode", "mode-size-bomb"],
)
async def test_a_hostile_link_probe_fails_the_receive_in_one_line(
    shm: Path, after_accept: bytes, match: str
) -> None:
    """The probe is a sender's input like any other: bounded in size, in
    count and in time, each failure one line, nothing kept."""
    dst = shm / "dst.dom"
    async with receiving(dst, handshake_timeout=2) as (addr, task):
        _r, w, acc = await offered(addr, PROBING)
        assert acc.probe
        await _refused(w, after_accept, task, match)
    assert not dst.exists()
    assert partials(dst) == []


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_sender_hanging_up_mid_probe_fails_the_receive(shm: Path, how: str) -> None:
    """A FIN ends the probe's read early; an RST (SO_LINGER 0) fails the
    read itself: both are one line, not a bare socket error."""
    dst = shm / "dst.dom"
    async with receiving(dst, handshake_timeout=5) as (addr, task):
        _r, w, _ = await offered(addr, PROBING)
        w.write(_probe(100_000)[:50_000])
        await w.drain()
        await asyncio.sleep(0.1)  # read by the receiver before the reset
        if how == "reset":
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.close()
        with pytest.raises(migrate.MigrationError, match="ECONNRESET") as e:
            await task
    assert "\n" not in str(e.value)
    assert not dst.exists()
    assert partials(dst) == []


async def test_the_receiver_echoes_each_probe_once_read(shm: Path) -> None:
    """Each PROBE is answered by its header with length 0, once all of it
    arrived (the sender times that): never before."""
    dst = shm / "dst.dom"
    async with receiving(dst, handshake_timeout=5) as (addr, task):
        r, w, _ = await offered(addr, PROBING)
        w.write(_probe(100_000)[:60_000])
        await w.drain()
        with pytest.raises(TimeoutError):  # 40000 bytes short: no echo
            async with asyncio.timeout(0.3):
                await r.readexactly(12)
        w.write(_probe(100_000)[60_000:])
        await w.drain()
        async with asyncio.timeout(5):
            assert await r.readexactly(12) == wire.probe_head(0)
        w.close()
        with pytest.raises(migrate.MigrationError):
            await task


async def test_a_join_with_a_wrong_token_or_a_second_join_is_refused(
    shm: Path, migrate_log: LogRecords
) -> None:
    """The listener stays open for a wire migration's JOINs: the right one
    is kept, a wrong token, a duplicate index and a flood are each hung up
    on with one log line; the migration then misses its last channel and
    fails after the handshake timeout, nothing kept."""
    dst = shm / "dst.dom"
    async with receiving(dst, handshake_timeout=8) as (addr, task):
        _r, w, acc = await offered(addr, wire.Offer(channels=3))
        assert acc.channels == 3
        wrong = "f" * 32 if acc.token != "f" * 32 else "e" * 32
        assert await joined(addr, wire.Join(wrong, 1))
        _keep_r, keep_w = await peer(addr)  # the right JOIN, kept open
        keep_w.write(wire.encode(wire.JOIN_MAGIC, wire.Join(acc.token, 1).body()))
        await keep_w.drain()
        await asyncio.sleep(0.2)
        assert await joined(addr, wire.Join(acc.token, 1))  # a duplicate index
        flood = await asyncio.gather(*(joined(addr, wire.Join(wrong, 2)) for _ in range(12)))
        assert all(flood)
        with pytest.raises(migrate.MigrationError, match="JOIN of all 3 channels") as e:
            await task
        keep_w.close()
        w.close()
    assert "ETIMEDOUT" in str(e.value)
    assert migrate_log.messages("a JOIN with an unknown token")
    assert migrate_log.messages("a second JOIN for channel 1")
    assert not dst.exists()


async def test_a_join_without_a_migration_is_refused_and_the_sender_still_gets_in(
    shm: Path, migrate_log: LogRecords
) -> None:
    """A JOIN that comes first names no migration: refused, and the listener
    then takes a plain xl migration as before."""
    src = sim.create(shm / "src.dom", 4 * MiB, seed=41)
    dst = shm / "dst.dom"
    async with receiving(dst, handshake_timeout=10) as (addr, task):
        assert await joined(addr, wire.Join("a" * 32, 1))
        await migrate.migrate(sim=src, to=addr, insecure=True)
        await task
    assert sim.digest(dst) == sim.digest(src)
    assert migrate_log.messages("a JOIN while no wire migration is under way")


# ---------------------------------------------------------------- hostile receivers


@contextlib.asynccontextmanager
async def fake_receiver(
    behaviour: str,
) -> AsyncIterator[tuple[str, int]]:
    """A listener that sends the banner, then: ``stock`` reads a little and
    hangs up (an xl receiver reading our offer as a bad stream), ``silent``
    says nothing more, ``bomb`` answers with a 1 GiB length; ``probe-*``
    grant the link probe, read the first, and echo garbage or nothing."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            w.write(BANNER)
            await w.drain()
            if behaviour.startswith("probe"):
                head = await r.readexactly(12)
                body = await r.readexactly(wire.body_length(head, wire.OFFER_MAGIC, "offer"))
                offer = wire.Offer.parse(wire.decode(body, "offer"))
                w.write(wire.encode(wire.OFFER_MAGIC, offer.accept().body()))
                await r.readexactly(wire.probe_length(await r.readexactly(12), "probe"))
                w.write(b"NOTPROBE\0\0\0\0" if behaviour == "probe-garbage" else b"")
                await w.drain()
            elif behaviour != "silent":
                await r.read(64)
            if behaviour == "bomb":
                w.write(wire.OFFER_MAGIC + struct.pack("<I", 1 << 30))
                await w.drain()
            if behaviour != "stock":
                await asyncio.sleep(30)
        except (asyncio.CancelledError, OSError):
            pass  # the test is over, or the sender hung up
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()


@pytest.mark.parametrize(
    ("behaviour", "match"),
    [
        ("stock", "does not speak xcsave's wire extensions"),
        ("silent", "no complete answer to our wire offer within 2 s"),
        ("bomb", "more than 4096 \\(EMSGSIZE\\)"),
        ("probe-garbage", "bad probe echo: b'NOTPROBE.*EPROTO"),
        ("probe-silent", "receiver's probe echo.*ETIMEDOUT"),
    ],
)
async def test_a_sender_with_extensions_and_a_receiver_that_cannot(
    shm: Path, behaviour: str, match: str
) -> None:
    src = sim.create(shm / "src.dom", 4 * MiB, seed=42)
    sim.set_state(src, "running")
    compress = "adaptive" if behaviour.startswith("probe") else "zstd"
    async with fake_receiver(behaviour) as addr:
        with pytest.raises(migrate.MigrationError, match=match) as e:
            await migrate.migrate(
                sim=src, to=addr, insecure=True, compress=compress, handshake_timeout=2
            )
    assert "\n" not in str(e.value)
    assert f"{src} is running here again" in str(e.value)
    assert sim.info(src)["state"] == "running"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"compress": "lz4"}, "compress is one of"),
        ({"channels": 0}, "channels is 1..16"),
        ({"channels": 99}, "channels is 1..16"),
        ({"max_bandwidth": "fast"}, "bad rate"),
        ({"max_bandwidth": -1}, "max_bandwidth must be 0"),
        ({"compress": "zstd", "compress_level": 20}, "compress_level is 0 .default. or 1..19"),
        ({"compress": "zstd", "compress_level": True}, "compress_level is 0"),
        ({"compress_level": 3}, "compress_level needs compress="),
    ],
)
async def test_bad_options_are_refused_before_connecting(
    shm: Path, kw: dict[str, Any], match: str
) -> None:
    src = sim.create(shm / "src.dom", 4 * MiB, seed=43)
    with pytest.raises(ValueError, match=match):
        await migrate.migrate(sim=src, to=("127.0.0.1", 9), insecure=True, **kw)


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--channels", "0"], "bad channel count"),
        (["--channels", "x"], "bad channel count"),
        (["--max-bandwidth", "1gbps"], "bad rate"),
        (["--max-bandwidth", "2000T"], "must be 0 (no cap) to"),  # the pump's bound, up front
        (["--compress", "lz4"], "invalid choice"),
        (["--compress", "zstd", "--compress-level", "0"], "must be from 1 to 19"),
        (["--compress", "zstd", "--compress-level", "x"], "is not a whole number"),
    ],
)
def test_cli_refuses_bad_wire_options(shm: Path, flags: list[str], match: str) -> None:
    sim.create(shm / "src.dom", 4 * MiB, seed=44)
    r = subprocess.run(
        xcsave_argv("migrate", "--sim", str(shm / "src.dom"), "--to", "127.0.0.1:9", *flags),
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2
    assert match in r.stderr


def test_ssh_refuses_the_extensions_it_cannot_carry(shm: Path) -> None:
    sim.create(shm / "src.dom", 4 * MiB, seed=45)
    r = subprocess.run(
        xcsave_argv(
            "migrate",
            "--sim",
            str(shm / "src.dom"),
            "--to",
            "ssh://nobody@localhost",
            "--channels",
            "2",
        ),
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2
    assert "need a TCP or TLS transport" in r.stderr
    assert r.stderr.count("\n") == 1
