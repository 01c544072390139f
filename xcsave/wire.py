"""xcsave wire 1, the Python side: negotiation, channel admission, the pumps' argv, the cap.

Between two xcsave peers the stream may be compressed, spread over several
connections, capped and resumed (issue 14).  Bulk data never enters Python:
the save helper writes the plain stream into a pipe, the ``wire-send`` pump
(a mode of ``xcsave-helper``) frames it onto the channels, the peer's
``wire-recv`` pump writes it in order into a pipe the restore helper reads.
This module holds what Python does around them (see docs/architecture.md,
"Migration", for the messages and the frames):

* the negotiation on channel 0 right after the banner: the sender's
  :class:`Offer` (``XcsWire1`` + u32 length + JSON), the receiver's
  :class:`Accept` (it may lower what was offered; it names the migration
  with a random token), and each further channel's :class:`Join`
  (``XcsJoin1`` + u32 length + JSON).  Bodies are JSON objects of at most
  :data:`BODY_MAX` bytes, read within the handshake timeout: a size bomb,
  garbage, silence or an unknown field value is one :class:`HandshakeError`;
* :class:`Joins`, the receiver's book of which channels of which migration
  have joined (wrong token, duplicate channel, unknown index: refused);
* :func:`parse_rate`, the one rule for ``--max-bandwidth``;
* :class:`MigrationControl`, the handle that changes the cap while the
  migration runs (the pump's ``wire_rate`` message);
* :class:`LiveStats`, which turns the save helper's rounds and the pump's
  ``wire_stats`` into :class:`~xcsave.events.MigrationStatsEvent`.

No extension asked: none of this runs and the stream is byte-identical to
xl's (a ``max_bandwidth`` alone runs the pump in ``--raw`` mode, which
copies the plain stream under the cap: a stock receiver still reads it).
"""

from __future__ import annotations

import dataclasses
import errno as errno_mod
import fcntl
import hmac
import json
import re
import secrets
import socket
import struct
import termios
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from . import formats
from .defaults import PAGE_SIZE
from .errors import HandshakeError
from .events import Event, MigrationStatsEvent, PolicyEvent

__all__ = [
    "BODY_MAX",
    "COMPRESS",
    "FRAME_MAX",
    "JOIN_MAGIC",
    "MAX_CHANNELS",
    "MAX_LEVEL",
    "OFFER_MAGIC",
    "WINDOW_MAX",
    "Accept",
    "Join",
    "Joins",
    "LiveStats",
    "MigrationControl",
    "Offer",
    "decode",
    "encode",
    "parse_rate",
]

#: Magic of the OFFER and the ACCEPT (channel 0) and of a JOIN (the others).
OFFER_MAGIC: Final = b"XcsWire1"
JOIN_MAGIC: Final = b"XcsJoin1"
MAGIC_LEN: Final = 8
#: The largest negotiation body (JSON bytes); a longer one is refused unread.
BODY_MAX: Final = 4096
#: ``--compress`` values; the wire carries "off" or "zstd" (adaptive is the sender's own rule).
COMPRESS: Final = ("off", "zstd", "adaptive")
#: zstd's highest level the pump takes (``--level``; its own bound, 19).
MAX_LEVEL: Final = 19
#: Most channels a migration may use (the receiver lowers an offer of more).
MAX_CHANNELS: Final = 16
#: A DATA frame's raw bytes: the default, and the largest either side accepts.
FRAME_DEFAULT: Final = 1 << 20
FRAME_MAX: Final = 4 << 20
#: Out-of-order bytes the receiver buffers (and the sender keeps unacknowledged).
WINDOW_DEFAULT: Final = 64 << 20
WINDOW_MAX: Final = 64 << 20
#: The link probe (``adaptive`` with one channel, no resume, no cap): the
#: sender times PROBE messages (magic, u32 length, that many bytes) until
#: the receiver echoes each one's header with length 0, then says in a
#: MODE body (``{"direct": bool}``, OFFER_MAGIC) whether the stream goes
#: without the pumps.  The rate is the difference of two probes over the
#: difference of their times (what is fixed, the round trip and the two
#: event loops, cancels out), first 1 MiB against 64 KiB, then 16 MiB only
#: when that says the link may be fast enough (a slow link pays for 1 MiB).
PROBE_MAGIC: Final = b"XcsProb1"
PROBE_SIZES: Final = (64 << 10, 1 << 20, 16 << 20)
#: The largest probe a receiver reads, and how many it answers.
PROBE_MAX: Final = 16 << 20
PROBES_MAX: Final = 3
#: A link that moves at least this much (bytes/s) goes without the pumps:
#: zstd (level 1, one core) does not compress memory that fast, so frames
#: could only cost, and the pumps themselves cost a third of the time on a
#: fast link (docs/performance.md).  Roughly 8.6 Gbit/s.
DIRECT_RATE: Final = 1 << 30
#: How often live statistics come (the pump's wire_stats, or TCP_INFO without one).
STATS_INTERVAL: Final = 0.5
#: A migration's token: 16 random bytes as 32 lowercase hex digits.
_TOKEN = re.compile(r"[0-9a-f]{32}")

_LEN = struct.Struct("<I")


def _bad(what: str, why: str) -> HandshakeError:
    return HandshakeError(f"bad {what}: {why} (EPROTO)", errno=errno_mod.EPROTO)


def encode(magic: bytes, body: Mapping[str, Any]) -> bytes:
    """``magic`` + u32 length + the JSON ``body`` (compact, UTF-8)."""
    data = json.dumps(dict(body), separators=(",", ":"), sort_keys=True).encode()
    if len(data) > BODY_MAX:
        raise ValueError(f"a negotiation body of {len(data)} bytes is over {BODY_MAX}")
    return magic + _LEN.pack(len(data)) + data


def body_length(head: bytes, magic: bytes, what: str) -> int:
    """The body length announced by a 12-byte ``head``; refused unless it is
    ``magic`` and at most :data:`BODY_MAX` (a size bomb is never read)."""
    if head[:MAGIC_LEN] != magic:
        raise _bad(what, f"it starts with {head[:MAGIC_LEN]!r}, not {magic!r}")
    return _length(head, BODY_MAX, "a body", what)


def _length(head: bytes, limit: int, kind: str, what: str) -> int:
    """The u32 length after a 12-byte ``head``'s magic, at most ``limit``."""
    (n,) = _LEN.unpack(head[MAGIC_LEN:])
    if n > limit:
        raise HandshakeError(
            f"bad {what}: {kind} of {n} bytes, more than {limit} (EMSGSIZE)",
            errno=errno_mod.EMSGSIZE,
        )
    return int(n)


def decode(data: bytes, what: str) -> dict[str, Any]:
    """A negotiation body: a JSON object, or :class:`HandshakeError` (EPROTO)."""
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(what, f"not UTF-8 JSON ({e})") from None
    if not isinstance(body, dict):
        raise _bad(what, f"a JSON {type(body).__name__}, not an object")
    return body


def _get(body: Mapping[str, Any], key: str, kind: type, what: str) -> Any:
    value = body.get(key)
    # bool is an int to isinstance: an int field must not take true/false.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _bad(what, f"{key!r} is {value!r}, expected a {kind.__name__}")
    return value


def _int_in(body: Mapping[str, Any], key: str, lo: int, hi: int, what: str) -> int:
    value: int = _get(body, key, int, what)
    if not lo <= value <= hi:
        raise _bad(what, f"{key!r} is {value}, expected {lo}..{hi}")
    return value


def _compress(body: Mapping[str, Any], what: str) -> str:
    value: str = _get(body, "compress", str, what)
    if value not in ("off", "zstd"):
        raise _bad(what, f"'compress' is {value!r}, expected 'off' or 'zstd'")
    return value


@dataclass(frozen=True)
class _Message:
    """A negotiation message: its JSON body is its fields."""

    def body(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Offer(_Message):
    """What the sender asks for (channel 0, after the banner)."""

    compress: str = "off"  # "off" | "zstd" ("adaptive" is offered as zstd)
    channels: int = 1
    resume: bool = False
    frame: int = FRAME_DEFAULT
    window: int = WINDOW_DEFAULT
    format: str = "libxl"
    probe: bool = False  # the sender would measure the link (PROBE_MAGIC) and maybe go direct

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> Offer:
        """An offer as received: every field checked (one line naming the bad one)."""
        what = "offer"
        fmt: str = _get(body, "format", str, what)
        if fmt not in formats.STREAM:
            raise _bad(what, f"'format' is {fmt!r}, expected one of {formats.STREAM}")
        return cls(
            compress=_compress(body, what),
            channels=_int_in(body, "channels", 1, 1 << 16, what),
            resume=_get(body, "resume", bool, what),
            frame=_int_in(body, "frame", 4096, 1 << 30, what),
            window=_int_in(body, "window", 4096, 1 << 40, what),
            format=fmt,
            # (absent from an offer of an older xcsave: no probe)
            probe=_get(body, "probe", bool, what) if "probe" in body else False,
        )

    def accept(
        self,
        *,
        zstd: bool = True,
        max_channels: int = MAX_CHANNELS,
        resume: bool = True,
        direct: bool = True,
    ) -> Accept:
        """The receiver's answer: what it can do of this offer (``zstd``: the
        helper has it; ``max_channels``, ``resume``: what it can admit;
        ``direct``: it can take the stream without its pump, i.e. no tee),
        and a fresh token."""
        frame = min(self.frame, FRAME_MAX)
        channels = min(self.channels, max_channels)
        resume = self.resume and resume
        return Accept(
            compress=self.compress if zstd else "off",
            channels=channels,
            resume=resume,
            token=secrets.token_hex(16),
            frame=frame,
            window=max(frame, min(self.window, WINDOW_MAX)),
            probe=self.probe and direct and channels == 1 and not resume,
        )


@dataclass(frozen=True)
class Accept(_Message):
    """What the receiver grants (never more than offered) and the migration's token."""

    compress: str
    channels: int
    resume: bool
    token: str
    frame: int = FRAME_DEFAULT
    window: int = WINDOW_DEFAULT
    probe: bool = False

    @classmethod
    def parse(cls, body: Mapping[str, Any], offer: Offer) -> Accept:
        """An answer to ``offer``: refused if it grants what was not asked."""
        what = "accept"
        compress = _compress(body, what)
        if compress == "zstd" and offer.compress == "off":
            raise _bad(what, "zstd granted but not offered")
        resume: bool = _get(body, "resume", bool, what)
        if resume and not offer.resume:
            raise _bad(what, "resume granted but not offered")
        token: str = _get(body, "token", str, what)
        if not _TOKEN.fullmatch(token):
            raise _bad(what, "'token' is not 32 lowercase hex digits")
        frame = _int_in(body, "frame", 4096, offer.frame, what)
        probe = _get(body, "probe", bool, what) if "probe" in body else False
        if probe and not offer.probe:
            raise _bad(what, "a probe granted but not offered")
        return cls(
            compress=compress,
            channels=_int_in(body, "channels", 1, offer.channels, what),
            resume=resume,
            token=token,
            frame=frame,
            window=_int_in(body, "window", frame, offer.window, what),
            probe=probe,
        )


def probe_length(head: bytes, what: str) -> int:
    """The length of the PROBE whose 12-byte ``head`` this is; refused past
    :data:`PROBE_MAX` (EMSGSIZE) before a byte of it is read."""
    return _length(head, PROBE_MAX, "a probe", what)


def probe_head(n: int) -> bytes:
    """A PROBE's header (n bytes follow), or with 0 the receiver's echo."""
    return PROBE_MAGIC + _LEN.pack(n)


def mode_direct(body: Mapping[str, Any]) -> bool:
    """The MODE body after the probes: whether the stream goes without the pumps."""
    return bool(_get(body, "direct", bool, "mode"))


@dataclass(frozen=True)
class Join(_Message):
    """A further channel (or, with ``resume``, a replacement) names its migration."""

    token: str
    channel: int
    resume: bool = False

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> Join:
        what = "join"
        token: str = _get(body, "token", str, what)
        if not _TOKEN.fullmatch(token):
            raise _bad(what, "'token' is not 32 lowercase hex digits")
        return cls(
            token=token,
            channel=_int_in(body, "channel", 0, MAX_CHANNELS - 1, what),
            resume=_get(body, "resume", bool, what),
        )


class Joins:
    """The receiver's book of one migration's channels (what a JOIN may claim).

    Channel 0 is the negotiating connection itself.  A JOIN is admitted when
    its token is this migration's (compared in constant time), its index is
    1..n-1 and that index has not joined yet -- or, with resume granted, when
    it replaces any channel, 0 included (``resume=True``): a replaced channel
    0 then carries the rest of xl's handshake.  Anything else
    is refused with the reason (the listener logs it, hangs up and goes on).
    """

    def __init__(self, accept: Accept) -> None:
        self.accept = accept
        self.joined: set[int] = {0}
        self.closed = False  # the stream is over: nothing joins any more

    def claim(self, join: Join) -> str | None:
        """None when ``join`` is admitted (and recorded), else why not."""
        if not hmac.compare_digest(join.token, self.accept.token):
            return "a JOIN with an unknown token"
        if self.closed:
            return "a JOIN after the stream ended"
        if not (0 if join.resume else 1) <= join.channel < self.accept.channels:
            return f"a JOIN for channel {join.channel} of {self.accept.channels}"
        if join.resume:
            if not self.accept.resume:
                return "a resuming JOIN, but resume was not negotiated"
            if join.channel not in self.joined:
                return f"a resuming JOIN for channel {join.channel}, which never joined"
            return None
        if join.channel in self.joined:
            return f"a second JOIN for channel {join.channel}"
        self.joined.add(join.channel)
        return None

    @property
    def complete(self) -> bool:
        return len(self.joined) == self.accept.channels


# ----------------------------------------------------------------- the cap

_RATE = re.compile(
    r"\s*(\d+(?:\.\d+)?)\s*(?:(?P<bits>[kmgt]?)bit(?:/s)?|(?P<bytes>[kmgt]?)(?:i?b)?(?:/s)?)\s*",
    re.IGNORECASE,
)


def parse_rate(text: str) -> int:
    """``--max-bandwidth RATE`` -> bytes per second (0: no cap).

    The rule: a number, then either ``bit`` (bits per second, decimal
    multiples as tc writes them: ``1gbit`` = 10^9 bit/s = 125,000,000
    bytes/s, ``100mbit``) or a byte size (binary multiples like every other
    xcsave size: ``100M``, ``100MB/s`` and ``100MiB`` are 100 MiB/s, a bare
    number is bytes/s).  ``bps`` is refused: tc reads it as bytes, others
    as bits.
    """
    m = _RATE.fullmatch(text)
    if m is None or "bps" in text.lower():
        raise ValueError(
            f"bad rate {text!r}: expected e.g. 1gbit, 500mbit (bits/s) or 100M, 125MB/s "
            "(bytes/s, binary multiples); 0: no cap"
        )
    value = float(m.group(1))
    bits = m.group("bits")
    if bits is not None:
        rate = int(value * 1000 ** "_kmgt".index(bits.lower() or "_") / 8)
    else:
        rate = int(value * 1024 ** "_kmgt".index((m.group("bytes") or "").lower() or "_"))
    if value > 0 and rate == 0:
        raise ValueError(f"bad rate {text!r}: under 1 byte/s (0 is no cap)")
    return checked_rate(rate, f"rate {text!r}")


#: The highest cap a pump takes, bytes/s (helper_main.c's --max-bandwidth: 1 PiB/s).
MAX_RATE: Final = 1 << 50


def checked_rate(rate: int | str, what: str = "a bandwidth cap") -> int:
    """A cap in bytes/s (or a :func:`parse_rate` text), 0 (none) to
    :data:`MAX_RATE`; ValueError naming ``what`` otherwise."""
    value = parse_rate(rate) if isinstance(rate, str) else int(rate)
    if not 0 <= value <= MAX_RATE:
        raise ValueError(f"{what} must be 0 (no cap) to {MAX_RATE} bytes/s, not {value}")
    return value


class _Sender(Protocol):
    def send(self, name: str, *args: int) -> bool: ...


class MigrationControl:
    """Changes a running migration: pass it as ``control=`` to :func:`xcsave.migrate.migrate`.

    :meth:`set_max_bandwidth` takes effect at once when the sender's pump
    runs (its token bucket restarts from now at the new rate), and is kept
    for the pump if it has not started yet; 0 lifts the cap.  Only the
    sender's cap: the receiver has none.
    """

    def __init__(self, max_bandwidth: int = 0) -> None:
        self.max_bandwidth = max_bandwidth
        self._pump: _Sender | None = None

    def set_max_bandwidth(self, rate: int | str) -> bool:
        """The new cap (bytes/s, or a :func:`parse_rate` text).  True when a
        running pump was told, False when it will start with it (or is gone)."""
        value = checked_rate(rate)
        self.max_bandwidth = value
        return self._pump.send("wire_rate", value) if self._pump is not None else False

    def attach(self, pump: _Sender | None) -> None:
        """The pump a running migration feeds (None once it has ended)."""
        self._pump = pump


# ----------------------------------------------------------------- live statistics


@dataclass
class LiveStats:
    """Combines the save helper's rounds and the pump's figures into
    :class:`~xcsave.events.MigrationStatsEvent` (like QEMU's query-migrate).

    Fed every event of both runs (:meth:`feed`); emits one stats event per
    ``wire_stats`` (every 500 ms) to ``sink``.  Estimates: bytes remaining
    = the last round's dirty pages x 4096; expected downtime = remaining /
    throughput; dirty rate = dirty pages / the last round's duration.
    """

    op: str
    domain: str
    sink: Callable[[Event], object] | None
    iteration: int = 0
    dirty_pages: int = 0
    dirty_rate: float = 0.0
    _round_at: float = field(default_factory=time.monotonic)
    _last: tuple[float, int] | None = None  # (monotonic, wire_bytes) of the previous figures

    def feed(self, ev: Event) -> None:
        if isinstance(ev, PolicyEvent):
            now = time.monotonic()
            took = now - self._round_at
            self._round_at = now
            self.iteration = ev.iteration
            self.dirty_pages = ev.dirty_count
            self.dirty_rate = ev.dirty_count / took if took > 0 else 0.0
        elif getattr(ev, "kind", None) == "wire_stats":
            self._wire(ev)

    def _wire(self, ev: Any) -> None:
        self.figures(
            int(ev.wire_bytes),
            int(ev.stream_bytes),
            int(ev.duration_ns),
            int(ev.rate_limit),
            tuple(int(b) for b in ev.channel_bytes),
        )

    def figures(
        self,
        wire: int,
        stream: int,
        duration_ns: int,
        rate_limit: int,
        channel_bytes: tuple[int, ...],
    ) -> None:
        """One reading of the link: the pump's ``wire_stats``, or (a stream
        sent without the pumps) the socket's own counters."""
        now = time.monotonic()
        prev, self._last = self._last, (now, wire)
        dt = now - prev[0] if prev else duration_ns / 1e9
        sent = wire - (prev[1] if prev else 0)
        throughput = sent / dt if dt > 0 else 0.0
        remaining = self.dirty_pages * PAGE_SIZE
        if self.sink is None:
            return
        self.sink(
            MigrationStatsEvent(
                self.op,
                self.domain,
                bytes_sent=wire,
                stream_bytes=stream,
                bytes_remaining=remaining,
                dirty_rate=round(self.dirty_rate, 1),
                throughput=round(throughput, 1),
                compression_ratio=round(stream / wire, 3) if wire else 1.0,
                expected_downtime_ms=round(1000 * remaining / throughput, 1)
                if throughput > 0
                else 0.0,
                iteration=self.iteration,
                rate_limit=rate_limit,
                channel_bytes=channel_bytes,
            )
        )


#: struct tcp_info (linux/tcp.h): tcpi_bytes_acked, a u64 at this offset.
_TCPI_BYTES_ACKED: Final = 120


def tcp_bytes_acked(sock: socket.socket) -> int | None:
    """The bytes the peer has acknowledged on a TCP socket (TCP_INFO), or
    None where the kernel does not say (not TCP, too old a kernel)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None
    if len(info) < _TCPI_BYTES_ACKED + 8:
        return None
    return int(struct.unpack_from("<Q", info, _TCPI_BYTES_ACKED)[0])


def tcp_bytes_written(sock: socket.socket) -> int | None:
    """The bytes written to a TCP socket so far: acknowledged, and still in
    its send queue (SIOCOUTQ), or None where the kernel does not say."""
    acked = tcp_bytes_acked(sock)
    try:
        queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)  # = SIOCOUTQ
    except OSError:
        return None
    return None if acked is None else acked + int(struct.unpack("<i", queued)[0])


# ----------------------------------------------------------------- the pumps

#: How long a pump waits for a replacement channel after one is lost (resume).
RESUME_TIMEOUT: Final = 30.0
#: The sender's reconnection attempts after a lost channel, and the first pause
#: between them (doubled each time, up to :data:`RESUME_BACKOFF_MAX`).
RESUME_TRIES: Final = 6
RESUME_BACKOFF: Final = 0.25
RESUME_BACKOFF_MAX: Final = 4.0


@dataclass(frozen=True)
class PumpPlan:
    """What one pump run is given (the argv in csrc/helper_main.c's usage).
    ``in_fd`` for wire-send, ``out_fd`` for wire-recv; channel order is
    channel index."""

    mode: str  # "wire-send" | "wire-recv"
    stream_fd: int
    channel_fds: tuple[int, ...]
    raw: bool = False
    compress: str = "off"
    level: int = 0  # zstd's (0: the pump's default)
    max_bandwidth: int = 0
    frame: int = FRAME_DEFAULT
    window: int = WINDOW_DEFAULT
    resume_fd: int | None = None
    tee_fd: int | None = None
    idle_timeout: float | None = None

    def argv(self) -> tuple[str, ...]:
        send = self.mode == "wire-send"
        args = ["--xcsave-1", self.mode, "--in-fd" if send else "--out-fd", str(self.stream_fd)]
        for fd in self.channel_fds:
            args += ["--channel-fd", str(fd)]
        if self.raw:
            args.append("--raw")
        else:
            args += ["--frame-size", str(self.frame), "--window", str(self.window)]
        if send and self.compress != "off":
            args += ["--compress", self.compress]
            if self.level:
                args += ["--level", str(self.level)]
        if send and self.max_bandwidth:
            args += ["--max-bandwidth", str(self.max_bandwidth)]
        if self.tee_fd is not None:
            args += ["--tee-fd", str(self.tee_fd)]
        if self.resume_fd is not None:
            args += ["--resume-sock", str(self.resume_fd)]
            args += ["--resume-timeout-ms", str(int(RESUME_TIMEOUT * 1000))]
        if self.idle_timeout:
            args += ["--idle-timeout-ms", str(int(self.idle_timeout * 1000))]
        return tuple(args)

    def fds(self) -> tuple[int, ...]:
        extra = (self.resume_fd, self.tee_fd)
        return (self.stream_fd, *self.channel_fds, *(fd for fd in extra if fd is not None))
