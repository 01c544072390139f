"""Live migration over TCP: xl's handshake around the stream, no Python in the data path.

The sender's helper writes the migration stream straight to the connected
socket and the receiver's helper reads it straight from the accepted one
(the socket's fd is handed to :func:`xcsave.api.save` / :func:`~xcsave.api.restore`
by number).  Python only speaks the few fixed-size messages of xl's
handshake around the stream (:mod:`xcsave.handshake`, which also says why
nothing here ever reads ahead).

The domain runs in exactly one place at the end.  Until the sender has sent
GO, any failure (the receiver refusing, dying mid-stream, a broken or late
message, a failed restore) resumes the sender's copy and the receiver
removes whatever it built.  After GO, the sender resumes only when the
receiver says its copy failed *and* that it has removed it (the second GO).
If the connection breaks between GO and the report, nobody can know whether
the receiver started its copy: like xl, the sender then leaves its copy
suspended and raises :class:`MigrationInDoubt` instead of risking two
running copies.

Transports (who may speak this protocol to us): a listener or a direct
connection is either TLS with mutual certificates (``tls_dir``, see
:mod:`xcsave.tls`) or plain TCP by explicit choice (``insecure=True``);
:mod:`xcsave.ssh` runs the receiver through the system's ``ssh`` and
:func:`receive_stdio` is its far end (the handshake and the stream on
stdin/stdout).  The listener keeps listening until a peer passes
authentication and sends the start of a stream (:func:`receive`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno as errno_mod
import functools
import os
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol, TypedDict, Unpack

from . import api, files, wire
from . import handshake as hs
from . import lock as _lock
from . import sim as simdom
from ._log import logger
from .defaults import CHANNELS, HANDSHAKE_TIMEOUT, IDLE_TIMEOUT
from .errors import (
    HandshakeError,
    MigrationError,
    MigrationInDoubt,
    XcsaveError,
    error_text,
    oserror_text,
)
from .events import DoneEvent, Event, LogEvent, ProgressEvent
from .handshake import BANNER, GO, READY, REPORT, Address, Endpoint, Fds, format_address
from .jobs import Outcome, Summary, run_many
from .policy import Policy
from .proto import XCSAVE_1
from .supervisor import Callbacks, HelperRun, HelperSpec, RunResult, Supervisor, helper_path
from .wire import MigrationControl

__all__ = [
    "BANNER",
    "CHANNELS",
    "GO",
    "HANDSHAKE_TIMEOUT",
    "IDLE_TIMEOUT",
    "READY",
    "REPORT",
    "HandshakeError",
    "MigrationControl",
    "MigrationError",
    "MigrationInDoubt",
    "MigrationResult",
    "NetOptions",
    "Outcome",
    "ReceiveOptions",
    "ReceiveResult",
    "SendOptions",
    "Summary",
    "default_max_memory",
    "format_address",
    "migrate",
    "migrate_on",
    "receive",
    "receive_on",
    "receive_stdio",
    "resolve_tls",
    "run_many",
]

log = logger(__name__)

#: A listener admits at most this many unauthenticated peers at once.
MAX_CANDIDATES: Final = 8

EventSink = Callable[[Event], object]


class NetOptions(TypedDict, total=False):
    """What every migration entry point takes by keyword and passes on as
    ``**net`` (one list; the defaults are :data:`NET_DEFAULTS`)."""

    #: the helper's overall bound (s; None: none)
    timeout: float | None
    #: each handshake message, and a connecting peer's admission (s)
    handshake_timeout: float | None
    #: a stream silent this long once started fails (ETIMEDOUT; None: never)
    idle_timeout: float | None
    #: told every event (the helper's, relabelled, and the handshake's steps)
    on_event: EventSink | None
    #: runs the helpers (default: a private one)
    supervisor: Supervisor | None


class SendOptions(NetOptions, total=False):
    """A sender's options besides :class:`NetOptions`: the wire extensions
    (issue 14; offered only when asked for, and then the receiver must be
    xcsave's: see :mod:`xcsave.wire`)."""

    #: "off" (default), "zstd", or "adaptive" (zstd only when it pays)
    compress: str
    #: zstd's level, 1..19 (0, the default: the pump's, 3 for zstd; adaptive
    #: starts at 1, tries 3 where the link leaves time, keeps 3 or more as given)
    compress_level: int
    #: data channels (TCP/TLS only; default 1)
    channels: int
    #: the cap, bytes/s or a :func:`xcsave.wire.parse_rate` text (0: none)
    max_bandwidth: int | str
    #: reconnect a channel lost during the live rounds (TCP/TLS only)
    resume: bool
    #: changes the cap while the migration runs
    control: MigrationControl | None


class ReceiveOptions(NetOptions, total=False):
    """A receiver's options besides :class:`NetOptions` (see :func:`receive_on`)."""

    #: refuse a larger domain before allocating it (None: :func:`default_max_memory`)
    max_memory: int | None
    #: replace an existing domain of that name once the received copy starts
    force: bool
    #: also write the received plain stream into this new file (0600; needs the wire)
    save_to: str | os.PathLike[str] | None


#: What an option left out of :class:`NetOptions` is.
NET_DEFAULTS: Final[NetOptions] = {
    "timeout": None,
    "handshake_timeout": HANDSHAKE_TIMEOUT,
    "idle_timeout": IDLE_TIMEOUT,
    "on_event": None,
    "supervisor": None,
}
#: ... and one left out of :class:`ReceiveOptions`.
RECEIVE_DEFAULTS: Final[ReceiveOptions] = {
    **NET_DEFAULTS,
    "max_memory": None,
    "force": False,
    "save_to": None,
}
#: ... and one left out of :class:`SendOptions`.
SEND_DEFAULTS: Final[SendOptions] = {
    **NET_DEFAULTS,
    "compress": "off",
    "compress_level": 0,
    "channels": 1,
    "max_bandwidth": 0,
    "resume": False,
    "control": None,
}


def _helper_options(o: NetOptions, ev: EventSink, *, pumped: bool = False) -> dict[str, Any]:
    """What a migration's helper run (:func:`xcsave.api.save` / ``restore``) is given of ``o``.

    A helper behind a wire pump (``pumped``) has no idle timeout of its own:
    its stream is a local pipe, and the link is the pump's to watch -- a
    resumable pump waits out a lost channel (its idle and resume deadlines
    bound that), and a pump that gives up closes the pipe."""
    return {
        "timeout": o["timeout"],
        "idle_timeout": None if pumped else o["idle_timeout"],
        "on_event": ev,
        "supervisor": o["supervisor"],
    }


@dataclass
class MigrationResult:
    """A successful migration, as the sender saw it."""

    domain: str  # the sender's (now suspended) domain
    peer: str
    save: RunResult
    fmt: str
    #: suspend -> the receiver's report that its copy runs (sender's clock)
    downtime_ns: int
    seconds: float  # connect -> report
    #: each precopy round's duration (s), from the helper's progress events
    round_seconds: list[float] = field(default_factory=list)
    #: ``time.monotonic()`` when the sender's helper had sent the whole stream
    stream_done_at: float = 0.0

    @property
    def bytes(self) -> int:
        return self.save.stats.bytes if self.save.stats else 0

    @property
    def gbps(self) -> float:
        """Stream throughput (GB/s, 10^9 bytes) over the helper's own save time."""
        st = self.save.stats
        if st is None or st.duration_ns <= 0:
            return 0.0
        return st.bytes / st.duration_ns

    @property
    def pages_per_round(self) -> tuple[int, ...]:
        return self.save.stats.pages_per_round if self.save.stats else ()


@dataclass
class ReceiveResult:
    """A successful receive: the domain runs here now."""

    domain: str
    peer: str
    restore: RunResult
    fmt: str
    seconds: float  # banner -> report sent
    #: True when the report could not be delivered (the sender may be in doubt)
    report_lost: bool = False


# ----------------------------------------------------------------- socket I/O


def _same_kind(e: BaseException) -> type[MigrationError]:
    """The class to re-raise ``e`` as, with the migration's context in the message."""
    if isinstance(e, MigrationError) and not isinstance(e, MigrationInDoubt):
        return type(e)
    return MigrationError


def _failure(e: BaseException, text: str) -> MigrationError:
    """``e`` re-raised as its kind (:func:`_same_kind`) with the migration's ``text``
    (raise it ``from e``)."""
    return _same_kind(e)(text, errno=getattr(e, "errno", None))


def _cause(e: BaseException, idle_timeout: float | None = None) -> str:
    """``e`` as the middle of a one-line message; a helper's ETIMEDOUT with
    an idle timeout says which bound it was."""
    if (
        idle_timeout
        and getattr(e, "errno", None) == errno_mod.ETIMEDOUT
        and not isinstance(e, (HandshakeError, OSError))
    ):
        return f"{e} (no stream bytes moved for {idle_timeout:g} s: --idle-timeout)"
    return error_text(e)


async def _connect(to: Address, timeout: float | None) -> socket.socket:
    loop = asyncio.get_running_loop()
    host, port = to
    where = format_address(to)
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise MigrationError(f"cannot resolve {host!r}: {e.strerror}") from e
    last: OSError | None = None
    for family, type_, proto, _name, addr in infos:
        sock = socket.socket(family, type_, proto)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, addr)
        except TimeoutError:
            sock.close()
            last = TimeoutError(errno_mod.ETIMEDOUT, os.strerror(errno_mod.ETIMEDOUT), where)
        except OSError as e:
            sock.close()
            # asyncio's own text ("Connect call failed ...") repeats the address.
            last = type(e)(e.errno, os.strerror(e.errno) if e.errno else e.strerror, where)
        except BaseException:
            sock.close()
            raise
        else:
            return sock
    assert last is not None
    raise last


# ----------------------------------------------------------------- transport security

#: What --insecure prints (once, on stderr) and the library logs.
INSECURE_WARNING: Final = (
    "warning: --insecure: plain TCP, neither authenticated nor encrypted: anyone who can "
    "reach the port can send a domain, anyone on the path can read its memory"
)


class _Channel(Protocol):
    """What the handshake runs on once the peer is admitted (TLS or plain TCP)."""

    sock: socket.socket
    peer: str

    async def aclose(self) -> None: ...


@dataclass
class _Plain:
    """Plain TCP (``insecure``): the connected socket itself, owned by the caller."""

    sock: socket.socket
    peer: str

    async def aclose(self) -> None:
        return None


def resolve_tls(tls_dir: str | os.PathLike[str] | None, insecure: bool) -> Path | None:
    """The TLS directory a direct TCP transport uses, or None for plain TCP.

    ``tls_dir`` wins; ``insecure`` chooses plain TCP (logged as a warning);
    with neither, the default TLS directory (:func:`xcsave.tls.default_tls_dir`)
    if it exists.  Otherwise :class:`ValueError` naming both choices: nothing
    goes over an unauthenticated channel by default.
    """
    if tls_dir is not None and insecure:
        raise ValueError("give tls_dir (TLS) or insecure=True (plain TCP), not both")
    if insecure:
        log.info("%s", INSECURE_WARNING)
        return None
    if tls_dir is not None:
        return Path(tls_dir)
    from .tls import default_tls_dir

    default = default_tls_dir()
    if default.is_dir():
        return default
    raise ValueError(
        f"a direct TCP migration needs authentication: give a TLS directory (--tls-dir DIR; "
        f"the default {default} does not exist) or choose plain TCP explicitly (--insecure)"
    )


@contextlib.asynccontextmanager
async def _secured(
    sock: socket.socket, tls: Path | None, *, server_name: str | None, timeout: float | None
) -> AsyncIterator[_Channel]:
    """``sock`` as a channel: TLS (client when ``server_name`` is given, else
    server) over it, or itself when ``tls`` is None.  Closed when the block ends."""
    if tls is None:
        yield _Plain(sock, hs.peer_name(sock))
        return
    from . import tls as tlsmod

    if server_name is not None:
        ch: _Channel = await tlsmod.tls_client(
            sock, tls_dir=tls, server_name=server_name, handshake_timeout=timeout
        )
    else:
        ch = await tlsmod.tls_server(sock, tls_dir=tls, handshake_timeout=timeout)
    try:
        yield ch
    finally:
        await _close_quietly(ch)


async def _close_quietly(ch: _Channel) -> None:
    """Close a channel whose outcome is already decided: a late failure is logged only."""
    try:
        await ch.aclose()
    except XcsaveError as e:
        log.warning("closing the channel with %s: %s", ch.peer, e)


# ----------------------------------------------------------------- events


class _Events:
    """Relabels a helper's events as the migration's and notes round timings."""

    def __init__(self, op: str, domain: str, sink: EventSink | None) -> None:
        self.op = op
        self.domain = domain
        self.sink = sink
        self.t0 = time.monotonic()
        self._round_starts: list[float] = []
        self._round_last: float = 0.0
        self._doing: str | None = None

    def __call__(self, ev: Event) -> None:
        if isinstance(ev, ProgressEvent):
            if ev.doing_what != self._doing:
                self._doing = ev.doing_what
                self._round_starts.append(ev.elapsed)
            self._round_last = ev.elapsed
        if isinstance(ev, DoneEvent):
            return  # the migration is done only after the handshake: see done()
        if self.sink is not None:
            self.sink(dataclasses.replace(ev, op=self.op, domain=self.domain))

    def note(self, message: str, level: int = 5) -> None:
        """A handshake step: to the log (INFO) and, as a log event, to the sink."""
        log.info("%s %s: %s", self.op, self.domain, message)
        if self.sink is not None:
            self.sink(LogEvent(self.op, self.domain, level, -1, self.op, message))

    def done(self, ok: bool, error: str = "") -> None:
        if self.sink is not None:
            self.sink(DoneEvent(self.op, self.domain, ok, error, time.monotonic() - self.t0))

    def round_seconds(self) -> list[float]:
        starts = self._round_starts
        ends = [*starts[1:], self._round_last]
        return [max(0.0, e - s) for s, e in zip(starts, ends, strict=True)]


# ----------------------------------------------------------------- the wire (issue 14)


async def _recv_body(ep: Endpoint, magic: bytes, what: str, timeout: float | None) -> Any:
    """One negotiation message (``magic`` + u32 length + JSON), all within
    ``timeout``: the length is checked before a byte of the body is read."""
    async with _deadline(timeout, what):
        head = await hs.recv_exact(ep, wire.MAGIC_LEN + 4, what, None)
        n = wire.body_length(head, magic, what)
        return wire.decode(await hs.recv_exact(ep, n, what, None), what)


@contextlib.asynccontextmanager
async def _deadline(timeout: float | None, what: str) -> AsyncIterator[None]:
    """The block within ``timeout`` (one deadline: a trickle cannot stretch it)."""
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError:
        raise HandshakeError(
            f"no complete {what} within {timeout:g} s (ETIMEDOUT)", errno=errno_mod.ETIMEDOUT
        ) from None


def _offer(o: SendOptions, fmt: str) -> wire.Offer | None:
    """The offer these options make (None: no extension, the plain xl stream);
    ValueError for an option out of range."""
    if o["compress"] not in wire.COMPRESS:
        raise ValueError(f"compress is one of {wire.COMPRESS}, not {o['compress']!r}")
    level = o["compress_level"]
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= wire.MAX_LEVEL:
        raise ValueError(f"compress_level is 0 (default) or 1..{wire.MAX_LEVEL}, not {level!r}")
    if level and o["compress"] == "off":
        raise ValueError("compress_level needs compress='zstd' or 'adaptive'")
    if not 1 <= o["channels"] <= wire.MAX_CHANNELS:
        raise ValueError(f"channels is 1..{wire.MAX_CHANNELS}, not {o['channels']}")
    if o["compress"] == "off" and o["channels"] == 1 and not o["resume"]:
        return None
    compress = "off" if o["compress"] == "off" else "zstd"
    return wire.Offer(compress=compress, channels=o["channels"], resume=o["resume"], format=fmt)


def _checked(o: SendOptions, fmt: str) -> tuple[wire.Offer | None, int]:
    """The offer and the cap (bytes/s) of these options; ValueError for a bad one.
    ``adaptive`` on one channel, without resume, a cap or a control, offers
    the link probe (the stream may then go without the pumps)."""
    offer, rate = _offer(o, fmt), wire.checked_rate(o["max_bandwidth"], "max_bandwidth")
    if (
        offer is not None
        and o["compress"] == "adaptive"
        and offer.channels == 1
        and not offer.resume
        and not rate
        and o["control"] is None
    ):
        offer = dataclasses.replace(offer, probe=True)
    return offer, rate


async def _negotiate(sock: socket.socket, offer: wire.Offer, timeout: float | None) -> wire.Accept:
    """Send ``offer``, read the receiver's answer (the sender's side)."""
    await hs.send(sock, wire.encode(wire.OFFER_MAGIC, offer.body()), "our wire offer", timeout)
    try:
        body = await _recv_body(sock, wire.OFFER_MAGIC, "answer to our wire offer", timeout)
    except HandshakeError as e:
        if e.errno != errno_mod.ECONNRESET:
            raise
        raise HandshakeError(
            "the receiver hung up on our wire offer: it does not speak xcsave's wire "
            "extensions (a stock xl receiver?); migrate without --compress, --channels "
            "and --resume (EPROTONOSUPPORT)",
            errno=errno_mod.EPROTONOSUPPORT,
        ) from e
    return wire.Accept.parse(body, offer)


async def _probe(sock: socket.socket, timeout: float | None) -> tuple[bool, float]:
    """The sender's link probe (after an ACCEPT granting it): the PROBEs of
    :data:`wire.PROBE_SIZES`, the last only if the first two say the link
    may be fast enough, then MODE.  Whether the stream goes without the
    pumps, and the rate measured (bytes/s)."""
    block = os.urandom(64 << 10)  # incompressible, should anything on the path compress
    took: list[float] = []
    rate = 0.0
    for n in wire.PROBE_SIZES:
        probe = wire.probe_head(n) + block * (n // len(block))  # made before the clock starts
        t0 = time.monotonic()
        await hs.send(sock, probe, "a link probe", timeout)
        echo = await hs.recv_exact(sock, wire.MAGIC_LEN + 4, "the receiver's probe echo", timeout)
        took.append(time.monotonic() - t0)
        if echo != wire.probe_head(0):
            raise HandshakeError(f"bad probe echo: {echo!r} (EPROTO)", errno=errno_mod.EPROTO)
        if len(took) > 1:
            extra = took[-1] - took[0]
            rate = (n - wire.PROBE_SIZES[0]) / extra if extra > 0 else float("inf")
            if rate < wire.DIRECT_RATE / 4:
                break  # slow: no need for the large one
    direct = len(took) == len(wire.PROBE_SIZES) and rate >= wire.DIRECT_RATE
    mode = wire.encode(wire.OFFER_MAGIC, {"direct": direct})
    await hs.send(sock, mode, "our wire mode", timeout)
    return direct, rate


async def _answer_probes(sock: socket.socket, timeout: float | None) -> bool:
    """The receiver's side of the link probe: each PROBE read whole (bounded,
    at most :data:`wire.PROBES_MAX` of them) and echoed, then the sender's
    MODE; all within one ``timeout``.  Whether the stream comes direct."""
    what = "the sender's link probe"
    async with _deadline(timeout, what):
        for probes in range(wire.PROBES_MAX + 1):
            head = await hs.recv_exact(sock, wire.MAGIC_LEN + 4, what, None)
            if head[: wire.MAGIC_LEN] == wire.OFFER_MAGIC:
                n = wire.body_length(head, wire.OFFER_MAGIC, "wire mode")
                body = wire.decode(await hs.recv_exact(sock, n, "wire mode", None), "wire mode")
                return wire.mode_direct(body)
            if head[: wire.MAGIC_LEN] != wire.PROBE_MAGIC or probes == wire.PROBES_MAX:
                raise HandshakeError(
                    f"bad {what}: {head[: wire.MAGIC_LEN]!r} after {probes} probe(s), "
                    "expected a probe or the mode (EPROTO)",
                    errno=errno_mod.EPROTO,
                )
            await hs.recv_drop(sock, wire.probe_length(head, what), what, None)
            await hs.send(sock, wire.probe_head(0), "our probe echo", None)
    raise AssertionError("unreachable")  # the loop returns or raises


#: Opens one more channel of a migration to the same receiver (secured like
#: channel 0), reads its banner and sends ``join``: the sender's side of a JOIN.
ChannelOpener = Callable[[wire.Join], contextlib.AbstractAsyncContextManager[_Channel]]


async def _pump(
    plan: wire.PumpPlan, domain: str, ev: EventSink, control: MigrationControl | None
) -> RunResult:
    """One wire pump run (``xcsave-helper wire-send`` / ``wire-recv``) to its end."""
    spec = HelperSpec(
        mode=plan.mode,
        dialect=XCSAVE_1,
        args=plan.argv(),
        pass_fds=plan.fds(),
        domain=domain,
        backend="wire",
    )
    run = HelperRun(spec, on_event=ev)
    if control is not None:
        control.attach(run)
    try:
        return await run.run()
    finally:
        if control is not None:
            control.attach(None)


async def _with_pump(
    pump: Callable[[], Awaitable[RunResult]],
    pump_fd: int,
    helper: Callable[[], Awaitable[RunResult]],
    helper_fd: int,
) -> RunResult:
    """Run a pump and a save/restore helper joined by a pipe; the helper's result.

    Each pipe end is closed here as soon as its run ends, so the other sees
    EOF (the pump: the stream is complete) or EPIPE.  The first failure
    stops the other run; the pump's error wins (a lost link is the cause,
    the helper's EPIPE its consequence).
    """

    async def owning(run: Callable[[], Awaitable[RunResult]], fd: int) -> RunResult:
        try:
            return await run()
        finally:
            os.close(fd)

    pumping = asyncio.create_task(owning(pump, pump_fd))
    helping = asyncio.create_task(owning(helper, helper_fd))
    tasks = (pumping, helping)
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in tasks:
        if not t.cancelled() and (exc := t.exception()) is not None:
            raise exc
    return helping.result()


@dataclass
class _WireSend:
    """The sender's use of the wire: what was accepted, its extra channels, resume."""

    o: SendOptions
    offer: wire.Offer | None
    rate: int
    opener: ChannelOpener | None
    stack: contextlib.AsyncExitStack
    accepted: wire.Accept | None = None
    channels: list[socket.socket] = field(default_factory=list)
    resume_sock: socket.socket | None = None
    suspended: bool = False
    direct: bool = False  # the link probe said: no pumps
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def pumped(self) -> bool:
        """Whether the stream goes through a pump (any extension the probe did
        not waive, a cap, or a control)."""
        return (
            (self.offer is not None and not self.direct)
            or self.rate > 0
            or self.o["control"] is not None
        )

    async def start(self, sock: socket.socket, ev: _Events, timeout: float | None) -> None:
        """Negotiate on channel 0 and open the others (after the banner)."""
        self.channels = [sock]
        if self.offer is None:
            return
        acc = self.accepted = await _negotiate(sock, self.offer, timeout)
        ev.note(
            f"wire: compress {acc.compress}, {acc.channels} channel(s)"
            + (", resume" if acc.resume else "")
        )
        if acc.channels > 1 and self.opener is None:
            raise MigrationError("--channels needs a TCP or TLS transport", errno=errno_mod.EINVAL)
        for i in range(1, acc.channels):
            assert self.opener is not None
            ch = await self.stack.enter_async_context(self.opener(wire.Join(acc.token, i)))
            self.channels.append(ch.sock)
        if acc.probe:
            self.direct, rate = await _probe(sock, timeout)
            ev.note(
                f"wire: the link probe moved {rate / (1 << 20):.0f} MiB/s: "
                + (
                    "faster than zstd, the stream goes without the pumps"
                    if self.direct
                    else "adaptive compression through the pumps"
                )
            )

    async def send_direct(
        self,
        save: Callable[[int, EventSink], Awaitable[RunResult]],
        sock: socket.socket,
        ev: _Events,
        domain: str,
    ) -> RunResult:
        """The stream as it is on channel 0 (the probe's verdict), with live
        statistics from the socket's own counters (TCP_INFO) in place of a
        pump's."""
        stats = wire.LiveStats("migrate", domain, ev.sink)
        base = wire.tcp_bytes_written(sock)  # the handshake's bytes, acked or not
        t0 = time.monotonic_ns()

        def save_event(e: Event) -> None:
            stats.feed(e)
            ev(e)

        def reading(final: bool = False) -> None:
            # Live: what the receiver acknowledged (the link's progress).
            # Final: what the helper wrote, all of the stream, some of it
            # perhaps still in flight when the helper is done.
            now = wire.tcp_bytes_written(sock) if final else wire.tcp_bytes_acked(sock)
            if now is not None and base is not None:
                n = now - base
                stats.figures(n, n, time.monotonic_ns() - t0, 0, (n,))

        async def poll() -> None:
            while True:
                await asyncio.sleep(wire.STATS_INTERVAL)
                reading()

        polling = asyncio.create_task(poll())
        try:
            with hs.lent_to_helper(sock) as fd:
                result = await save(fd, save_event)
            reading(final=True)
            return result
        finally:
            polling.cancel()
            await asyncio.gather(polling, return_exceptions=True)

    async def send(
        self, save: Callable[[int, EventSink], Awaitable[RunResult]], ev: _Events, domain: str
    ) -> RunResult:
        """The save helper writes into a pipe; the pump puts it on the channels."""
        acc = self.accepted
        control = self.o["control"]
        if control is not None and self.rate:
            control.max_bandwidth = self.rate
        rate = control.max_bandwidth if control is not None else self.rate
        r, w = os.pipe()
        resume_theirs: socket.socket | None = None
        if acc is not None and acc.resume:
            self.resume_sock, resume_theirs = socket.socketpair(
                socket.AF_UNIX, socket.SOCK_SEQPACKET
            )
        plan = wire.PumpPlan(
            "wire-send",
            r,
            tuple(c.fileno() for c in self.channels),
            raw=acc is None,
            compress=self.o["compress"] if acc is not None and acc.compress != "off" else "off",
            level=self.o["compress_level"],
            max_bandwidth=rate,
            frame=acc.frame if acc else wire.FRAME_DEFAULT,
            window=acc.window if acc else wire.WINDOW_DEFAULT,
            resume_fd=resume_theirs.fileno() if resume_theirs is not None else None,
            idle_timeout=self.o["idle_timeout"],
        )
        stats = wire.LiveStats("migrate", domain, ev.sink)

        def pump_event(e: Event) -> None:
            stats.feed(e)
            ev(e)
            if getattr(e, "kind", None) == "wire_lost":
                self._lost(int(getattr(e, "channel", 0)))

        def save_event(e: Event) -> None:
            stats.feed(e)
            ev(e)

        for c in self.channels:
            c.setblocking(True)  # the pump's; see hs.lent_to_helper
        try:
            return await _with_pump(
                lambda: _pump(plan, domain, pump_event, control),
                r,
                lambda: save(w, save_event),
                w,
            )
        finally:
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for c in self.channels:
                c.setblocking(False)
            for end in (self.resume_sock, resume_theirs):
                if end is not None:
                    end.close()

    def _lost(self, index: int) -> None:
        """A channel failed (the pump's ``wire_lost``): reconnect it, if resume
        was negotiated and the domain still runs (after suspension the
        existing in-doubt rules stand: no new connection)."""
        if self.resume_sock is None or self.opener is None or self.suspended:
            return
        task = asyncio.create_task(self._reconnect(index))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reconnect(self, index: int) -> None:
        assert self.accepted is not None
        assert self.opener is not None
        assert self.resume_sock is not None
        delay = wire.RESUME_BACKOFF
        for attempt in range(1, wire.RESUME_TRIES + 1):
            try:
                join = wire.Join(self.accepted.token, index, resume=True)
                ch = await self.stack.enter_async_context(self.opener(join))
                ch.sock.setblocking(True)
                # fd trick: the pump takes the new connection over from its
                # resume socket (SCM_RIGHTS), in the lost channel's slot.
                socket.send_fds(self.resume_sock, [struct.pack("<I", index)], [ch.sock.fileno()])
                self.channels[index] = ch.sock
                log.info("wire: channel %d reconnected (attempt %d)", index, attempt)
                return
            except (OSError, XcsaveError) as e:
                log.warning(
                    "wire: reconnecting channel %d, attempt %d of %d: %s",
                    index,
                    attempt,
                    wire.RESUME_TRIES,
                    error_text(e),
                )
            await asyncio.sleep(delay)
            delay = min(2 * delay, wire.RESUME_BACKOFF_MAX)
        log.error("wire: channel %d lost for good; the pump gives up", index)


# ----------------------------------------------------------------- sender


@_lock.holding("sim", resolve=simdom.resolve)
async def migrate_on(
    sock: socket.socket,
    *,
    sim: str | os.PathLike[str],
    live: bool = True,
    policy: Policy | None = None,
    fmt: str = "libxl",
    stream: int | None = None,
    peer: str | None = None,
    opener: ChannelOpener | None = None,
    **net: Unpack[SendOptions],
) -> MigrationResult:
    """Migrate a simulated domain over ``sock``, a connected socket (the sender's side).

    ``sock`` stays the caller's (it is not closed).  See the module docstring
    for the handshake and what each failure leaves where.  ``stream``, if
    given, is a separate fd the stream is written to (the write end of a
    pipe to a local receiver); the handshake stays on ``sock``.
    ``idle_timeout``: a receiver that takes no stream bytes for that long
    fails the migration (ETIMEDOUT).  ``peer`` names the receiver in
    messages (default: the socket's peer address).

    The wire extensions (:class:`SendOptions`: ``compress``, ``channels``,
    ``resume``) are offered to the receiver right after its banner;
    ``opener`` opens channels 1..n-1 (:func:`migrate` gives one).  With
    them, or a ``max_bandwidth`` cap, or a ``control``, the helper writes
    into a pipe and a wire pump puts the stream on the channel(s).
    """
    if fmt not in api.FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected one of {api.FORMATS}")
    o: SendOptions = {**SEND_DEFAULTS, **net}
    offer, rate = _checked(o, fmt)  # ValueError before anything happens
    if stream is not None and (offer is not None or rate or o["control"] is not None):
        raise ValueError("the wire extensions and the cap need the stream on the socket")
    src = simdom.resolve(sim)
    before = simdom.state(src)  # also: FileNotFoundError for a domain that does not exist
    peer = peer or hs.peer_name(sock)
    handshake_timeout = o["handshake_timeout"]
    ev = _Events("migrate", str(src), o["on_event"])
    hs.nonblocking(sock)
    hs.tune(sock, handshake_timeout)
    t0 = time.monotonic()
    t_suspend: list[float] = []

    stack = contextlib.AsyncExitStack()
    wired = _WireSend(o, offer, rate, opener if isinstance(sock, socket.socket) else None, stack)

    def suspended() -> bool:
        t_suspend.append(time.monotonic())
        wired.suspended = True  # a link lost from here on is not reconnected
        return True  # the engine then marks the domain suspended

    async def save(fd: int, sink: EventSink) -> RunResult:
        return await api.save(
            fd,
            sim=src,
            live=live,
            fmt=fmt,
            policy=policy,
            callbacks=Callbacks(suspend=suspended),
            **_helper_options(o, sink, pumped=wired.pumped),
        )

    committed = False  # GO sent: from here on, resuming could make two copies run
    try:
        await hs.expect(sock, BANNER, "the receiver's banner", handshake_timeout)
        await wired.start(sock, ev, handshake_timeout)
        ev.note(f"receiver {peer} ready; sending {'live ' if live else ''}{fmt} stream")
        if wired.pumped:
            assert isinstance(sock, socket.socket)
            saved = await wired.send(save, ev, str(src))
            sock = wired.channels[0]  # a resumed channel 0 carries the rest
        elif wired.direct:
            assert isinstance(sock, socket.socket)
            saved = await wired.send_direct(save, sock, ev, str(src))
        else:
            with hs.lent_to_helper(sock, stream) as fd:
                saved = await save(fd, ev)
        stream_done_at = time.monotonic()
        ev.note("stream sent; waiting for the receiver to confirm")
        await hs.expect(sock, READY, "the receiver's 'domain received'", handshake_timeout)
        committed = True  # set first: a failure while sending GO is in doubt too
        await hs.send(sock, GO, "'domain is yours'", handshake_timeout)
        await hs.expect(sock, REPORT, "the receiver's report", handshake_timeout)
        status = (await hs.recv_exact(sock, 1, "the receiver's status byte", handshake_timeout))[0]
        if status != 0:
            await hs.expect(sock, GO, "the receiver's permission to resume", handshake_timeout)
            committed = False
            raise MigrationError(
                f"the receiver could not start its copy (status {status})", errno=status
            )
    except BaseException as e:
        cause = _cause(e, o["idle_timeout"])
        if committed:
            ev.done(False, f"in doubt: {cause}")
            if isinstance(e, Exception):
                raise MigrationInDoubt(
                    f"migrate {src} to {peer}: the connection broke in the final handshake "
                    f"({cause}): {src} stays suspended here and may be running there; "
                    f"check {peer} before resuming either copy (xcsave sim resume)",
                    errno=getattr(e, "errno", None),
                ) from e
            note = (
                f"migrate {src} to {peer} was interrupted in the final handshake: {src} "
                f"stays suspended here and may be running there; check {peer} before "
                "resuming either copy"
            )
            log.error("%s", note)
            e.add_note(note)  # for whoever reports the cancellation (the CLI does)
            raise
        state = simdom.put_back(src, before)
        ev.done(False, cause)
        if isinstance(e, Exception):
            raise _failure(
                e, f"migrate {src} to {peer} failed: {cause}; {src} is {state} here again"
            ) from e
        raise
    finally:
        await stack.aclose()  # the wire's other channels (and replacements)
    t_end = time.monotonic()
    ev.note("the receiver runs the domain; ours stays suspended")
    ev.done(True)
    downtime = t_end - t_suspend[0] if t_suspend else 0.0
    return MigrationResult(
        domain=str(src),
        peer=peer,
        save=saved,
        fmt=fmt,
        downtime_ns=int(downtime * 1e9),
        seconds=t_end - t0,
        round_seconds=ev.round_seconds(),
        stream_done_at=stream_done_at,
    )


@_lock.holding("sim", resolve=simdom.resolve)
async def migrate(
    *,
    sim: str | os.PathLike[str],
    to: Address,
    live: bool = True,
    policy: Policy | None = None,
    fmt: str = "libxl",
    tls_dir: str | os.PathLike[str] | None = None,
    insecure: bool = False,
    **net: Unpack[SendOptions],
) -> MigrationResult:
    """Live-migrate the simulated domain ``sim`` to the receiver at ``to=(host, port)``.

    The channel is TLS with mutual certificates from ``tls_dir`` (the
    receiver must present a certificate for ``host``), or plain TCP when
    ``insecure`` (neither authenticated nor encrypted: anyone on the path
    reads the guest's memory); with neither, the default TLS directory if
    it exists (see :func:`resolve_tls`).

    On success the receiver's copy runs and ours is left suspended.  On
    failure ours runs again (:class:`MigrationError`) -- except when the
    link broke after we gave the receiver permission to start, where it
    stays suspended (:class:`MigrationInDoubt`).  Connection failures are
    the ``OSError`` from connect (e.g. ``ConnectionRefusedError``), with
    ``host:port`` as its filename; the domain is untouched then.

    The wire extensions of :class:`SendOptions` need an xcsave receiver;
    its further channels go to the same address, secured like the first.
    """
    path = _resolve_existing(sim)
    tls = resolve_tls(tls_dir, insecure)
    _checked({**SEND_DEFAULTS, **net}, fmt)  # ValueError before connecting
    handshake_timeout = net.get("handshake_timeout", HANDSHAKE_TIMEOUT)

    @contextlib.asynccontextmanager
    async def connected() -> AsyncIterator[_Channel]:
        sock = await _connect(to, handshake_timeout)
        with sock:
            hs.tune(sock, handshake_timeout)
            async with _secured(sock, tls, server_name=to[0], timeout=handshake_timeout) as ch:
                yield ch

    @contextlib.asynccontextmanager
    async def opener(join: wire.Join) -> AsyncIterator[_Channel]:
        async with connected() as ch:
            hs.nonblocking(ch.sock)
            await hs.expect(ch.sock, BANNER, "the receiver's banner", handshake_timeout)
            what = f"the JOIN of channel {join.channel}"
            await hs.send(
                ch.sock, wire.encode(wire.JOIN_MAGIC, join.body()), what, handshake_timeout
            )
            yield ch

    async with connected() as ch:
        return await migrate_on(
            ch.sock,
            sim=path,
            live=live,
            policy=policy,
            fmt=fmt,
            peer=ch.peer,
            opener=opener,
            **net,
        )


def _resolve_existing(dom: str | os.PathLike[str]) -> Path:
    path = simdom.resolve(dom)
    simdom.state(path)  # FileNotFoundError (ENOENT) before we connect anywhere
    return path


# ----------------------------------------------------------------- receiver


@_lock.holding("sim", resolve=simdom.resolve)
async def receive_on(
    sock: Endpoint,
    *,
    sim: str | os.PathLike[str],
    fmt: str = "auto",
    stream: int | None = None,
    admitted_fmt: str | None = None,
    peer: str | None = None,
    desk: _JoinDesk | None = None,
    **opts: Unpack[ReceiveOptions],
) -> ReceiveResult:
    """Receive a domain over ``sock``, a connected socket (the receiver's side).

    ``sim`` must not exist yet, unless ``force``: an existing one is then
    replaced when the received copy starts, and stays as it was on any
    failure before.  ``sock`` stays the caller's.  On any failure before the
    domain runs, the partial or complete copy is removed.
    ``stream``, if given, is a separate fd the stream is read from (the read
    end of a pipe from a local sender); a pipe cannot be peeked at, so
    ``fmt`` must then be given (so too for a pair of fds, :func:`receive_stdio`).

    Bounds: ``max_memory`` (bytes) refuses a stream whose domain is larger
    before anything is allocated (None: :func:`default_max_memory`, 0: only
    the helper's own cap); ``idle_timeout`` fails the receive (ETIMEDOUT)
    when the stream stays silent that long once started.  ``admitted_fmt``:
    the caller already sent the banner and checked that the stream starts
    as this format (:func:`receive`'s listener).  ``peer`` names the sender.
    """
    if fmt != "auto" and fmt not in api.FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected auto or one of {api.FORMATS}")
    if (stream is not None or isinstance(sock, Fds)) and fmt == "auto" and not admitted_fmt:
        raise ValueError("a separate stream fd cannot be peeked at: give its format")
    target = simdom.resolve(sim)
    o: ReceiveOptions = {**RECEIVE_DEFAULTS, **opts}
    handshake_timeout = o["handshake_timeout"]
    built = api.SimTarget.begin(target, force=o["force"])  # EEXIST unless force
    peer = peer or hs.peer_name(sock)
    max_memory = o["max_memory"]
    limit = default_max_memory(target) if max_memory is None else max_memory
    ev = _Events("receive", str(target), o["on_event"])
    hs.nonblocking(sock)
    hs.tune(sock, handshake_timeout)
    t0 = time.monotonic()
    running = False
    tee: _Tee | None = None
    keep = contextlib.AsyncExitStack()  # the wire's channels, until the report is sent

    async def restore(fd: int, fmt: str, sink: EventSink, pumped: bool) -> RunResult:
        return await api.restore(
            fd,
            sim=built,
            fmt=fmt,
            max_memory=limit,
            **_helper_options(o, sink, pumped=pumped),
        )

    try:
        if admitted_fmt is not None:
            detected = admitted_fmt
        else:
            await hs.send(sock, BANNER, "the banner", handshake_timeout)
            detected = (
                fmt
                if stream is not None or isinstance(sock, Fds)
                else await hs.stream_format(
                    sock, fmt, handshake_timeout, {wire.OFFER_MAGIC: "wire"}
                )
            )
        if o["save_to"] is not None:
            if detected != "wire":
                raise MigrationError(
                    "--save-to needs the wire: the sender's --compress, --channels or --resume",
                    errno=errno_mod.EPROTONOSUPPORT,
                )
            tee = _Tee(o["save_to"])
        if detected == "wire":
            assert isinstance(sock, socket.socket)
            detected, restored, sock = await _receive_wire(
                sock,
                desk=desk,
                o=o,
                fmt=fmt,
                ev=ev,
                restore=restore,
                domain=str(target),
                tee=tee,
                keep=keep,
            )
        else:
            ev.note(f"receiving a {detected} stream from {peer}")
            with hs.lent_to_helper(sock, stream) as fd:
                restored = await restore(fd, detected, ev, False)
        ev.note("stream received; asking for permission to start")
        await hs.send(sock, READY, "'domain received'", handshake_timeout)
        await hs.expect(sock, GO, "the sender's 'domain is yours'", handshake_timeout)
        try:
            simdom.set_state(built.partial, "running")
            built.commit()  # the old domain (with force) stays until here
            running = True
            status = 0
        except OSError as e:
            log.error("starting %s: %s", target, oserror_text(e, filename=False))
            status = (e.errno or errno_mod.EIO) & 0xFF or 1
        if status:
            # xl's order: report, remove our copy, then give the sender its domain back.
            await hs.send(sock, REPORT + bytes([status]), "the failure report", handshake_timeout)
            built.discard()
            await hs.send(sock, GO, "the permission to resume", handshake_timeout)
            raise MigrationError(
                f"could not start the received domain (status {status})", errno=status
            )
        report_lost = False
        try:
            await hs.send(sock, REPORT + b"\0", "the report", handshake_timeout)
        except HandshakeError as e:
            # Ours runs; the sender keeps its copy suspended (it is in doubt).
            report_lost = True
            log.warning("%s runs here, but the sender did not get the report: %s", target, e)
    except BaseException as e:
        if not running:
            built.discard()
            if tee is not None:
                tee.discard()
        cause = _cause(e, o["idle_timeout"])
        ev.done(False, cause)
        if isinstance(e, Exception) and not running:
            raise _failure(
                e, f"receive of {target} from {peer} failed: {cause}; nothing was kept here"
            ) from e
        raise
    finally:
        await keep.aclose()
    ev.note("the domain runs here")
    ev.done(True)
    return ReceiveResult(
        domain=str(target),
        peer=peer,
        restore=restored,
        fmt=detected,
        seconds=time.monotonic() - t0,
        report_lost=report_lost,
    )


@functools.cache
def _helper_has_zstd() -> bool:
    """Whether the helper was built with libzstd (its ``--version`` says)."""
    r = subprocess.run([str(helper_path()), "--version"], capture_output=True, check=False)  # noqa: S603 (our helper)
    return b" zstd " in r.stdout


class _Tee:
    """``--save-to FILE``: a new private file (0600, O_EXCL|O_NOFOLLOW|O_CLOEXEC)
    the receiver's pump also writes the plain stream into; removed on failure."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self.fd: int | None = files.create_private(self.path)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


async def _receive_wire(
    sock: socket.socket,
    *,
    desk: _JoinDesk | None,
    o: ReceiveOptions,
    fmt: str,
    ev: _Events,
    restore: Callable[[int, str, EventSink, bool], Awaitable[RunResult]],
    domain: str,
    tee: _Tee | None,
    keep: contextlib.AsyncExitStack,
) -> tuple[str, RunResult, socket.socket]:
    """The receiver's side of the wire: answer the offer on ``sock`` (channel
    0), admit the other channels' JOINs from ``desk`` (None: channel 0 only,
    no resume), and run the wire-recv pump into a pipe the restore reads.
    The channels are closed by ``keep``; returns the format, the restore's
    result and channel 0 (a replacement, if the first was lost and resumed)."""
    hto = o["handshake_timeout"]
    body = await _recv_body(sock, wire.OFFER_MAGIC, "wire offer", hto)
    offer = wire.Offer.parse(body)
    if fmt not in ("auto", offer.format):
        raise HandshakeError(
            f"the sender sends a {offer.format} stream, not {fmt}", errno=errno_mod.EPROTO
        )
    acc = offer.accept(
        zstd=_helper_has_zstd(),
        max_channels=wire.MAX_CHANNELS if desk is not None else 1,
        resume=desk is not None,
        direct=tee is None,  # the tee is written by the pump
    )
    await hs.send(sock, wire.encode(wire.OFFER_MAGIC, acc.body()), "our wire answer", hto)
    ev.note(
        f"receiving a {offer.format} stream over the wire: compress {acc.compress}, "
        f"{acc.channels} channel(s)" + (", resume" if acc.resume else "")
    )
    extra: dict[int, _Admitted] = {}
    channels = [sock]
    ours: socket.socket | None = None
    theirs: socket.socket | None = None
    feeding: asyncio.Task[None] | None = None
    try:
        if desk is not None:
            desk.book = wire.Joins(acc)
            async with _deadline(hto, f"JOIN of all {acc.channels} channels"):
                while len(extra) < acc.channels - 1:
                    join, got = await desk.arrived.get()
                    keep.push_async_callback(got.aclose)
                    extra[join.channel] = got
            if not acc.resume:
                desk.stop()  # every channel is here: nobody else gets in
            channels += [extra[i].channel.sock for i in sorted(extra)]
        if acc.probe and await _answer_probes(sock, hto):
            ev.note("the sender's link probe found a fast link: the stream comes without pumps")
            with hs.lent_to_helper(sock) as fd:
                return offer.format, await restore(fd, offer.format, ev, False), sock
        if acc.resume and desk is not None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            feeding = asyncio.create_task(_feed_resumed(desk, ours, channels, keep))
        r, w = os.pipe()
        plan = wire.PumpPlan(
            "wire-recv",
            w,
            tuple(c.fileno() for c in channels),
            frame=acc.frame,
            window=acc.window,
            resume_fd=theirs.fileno() if theirs is not None else None,
            tee_fd=tee.fd if tee is not None else None,
            idle_timeout=o["idle_timeout"],
        )
        for c in channels:
            c.setblocking(True)  # the pump's; see hs.lent_to_helper
        try:
            restored = await _with_pump(
                lambda: _pump(plan, domain, ev, None),
                w,
                lambda: restore(r, offer.format, ev, True),
                r,
            )
        finally:
            for c in channels:
                c.setblocking(False)
    finally:
        if desk is not None:
            desk.stop()
            if desk.book is not None:
                desk.book.closed = True
        if feeding is not None:
            feeding.cancel()
            await asyncio.gather(feeding, return_exceptions=True)
        for end in (ours, theirs):
            if end is not None:
                end.close()
        if tee is not None:
            tee.close()
    return offer.format, restored, channels[0]


async def _feed_resumed(
    desk: _JoinDesk,
    resume: socket.socket,
    channels: list[socket.socket],
    keep: contextlib.AsyncExitStack,
) -> None:
    """Hand each resuming JOIN's connection to the receiver's pump (in ``channels``
    too: a new channel 0 carries the rest of the handshake)."""
    while True:
        join, got = await desk.arrived.get()
        keep.push_async_callback(got.aclose)
        channels[join.channel] = got.channel.sock
        got.channel.sock.setblocking(True)
        # fd trick: the pump takes the connection over (SCM_RIGHTS) in the
        # lost channel's slot, and sends RESUME on it first thing.
        socket.send_fds(resume, [struct.pack("<I", join.channel)], [got.channel.sock.fileno()])
        log.info("wire: channel %d resumed", join.channel)


def default_max_memory(target: Path) -> int:
    """The largest domain a receive accepts by default (bytes).

    The host's physical memory, and no more than the filesystem that holds
    the target (a simulated domain is a file there: /dev/shm is RAM): a
    domain larger than either could not run here anyway, so refusing its
    stream costs nothing legitimate, while a 6 MB stream that claims 64 GiB
    is stopped before anything is allocated.
    """
    limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for d in (target.parent, *target.parent.parents):
        try:
            st = os.statvfs(d)
        except OSError:
            continue
        return min(limit, st.f_blocks * st.f_frsize)
    return limit


def _listener(listen: Address) -> socket.socket:
    host, port = listen
    infos = socket.getaddrinfo(
        host or "127.0.0.1", port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, type_, proto, _name, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as e:
            raise type(e)(e.errno, e.strerror, format_address(listen)) from None
        sock.listen(MAX_CANDIDATES)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _admit(
    conn: socket.socket,
    tls: Path | None,
    fmt: str,
    timeout: float | None,
    stack: contextlib.AsyncExitStack,
) -> tuple[_Channel, str]:
    """Authenticate a candidate (TLS), send the banner, check the start of its
    stream: all within ``timeout`` (one deadline, so a trickle cannot stretch it)."""
    try:
        async with asyncio.timeout(timeout):
            ch = await stack.enter_async_context(
                _secured(conn, tls, server_name=None, timeout=timeout)
            )
            await hs.send(ch.sock, BANNER, "the banner", None)
            detected = await hs.stream_format(ch.sock, fmt, None, _WIRE_MAGICS)
    except TimeoutError:
        raise HandshakeError(
            f"no TLS handshake, banner and start of a stream within {timeout:g} s (ETIMEDOUT)",
            errno=errno_mod.ETIMEDOUT,
        ) from None
    return ch, detected


@dataclass
class _Admitted:
    conn: socket.socket
    channel: _Channel
    fmt: str
    stack: contextlib.AsyncExitStack

    async def aclose(self) -> None:
        await self.stack.aclose()
        self.conn.close()


#: What the listener's peek may find besides a stream: the wire's OFFER (a
#: sender with extensions) and JOIN (a further channel of one).
_WIRE_MAGICS: Final = {wire.OFFER_MAGIC: "wire", wire.JOIN_MAGIC: "join"}


class _JoinDesk:
    """Where the listener hands the channels that JOIN to the receive under way.

    ``book`` is set once the receive has accepted an offer; until then (and
    for a JOIN that :class:`xcsave.wire.Joins` refuses) a JOIN is refused.
    ``stop`` ends the listening (set by :func:`_admitting`).
    """

    def __init__(self) -> None:
        self.book: wire.Joins | None = None
        self.arrived: asyncio.Queue[tuple[wire.Join, _Admitted]] = asyncio.Queue()
        self.stop: Callable[[], None] = lambda: None

    def claim(self, join: wire.Join, got: _Admitted) -> str | None:
        """None when ``got`` is the receive's now, else why it is refused."""
        if self.book is None:
            return "a JOIN while no wire migration is under way"
        why = self.book.claim(join)
        if why is None:
            self.arrived.put_nowait((join, got))
        return why


@contextlib.asynccontextmanager
async def _admitting(
    lsock: socket.socket,
    *,
    target: Path,
    tls: Path | None,
    fmt: str,
    timeout: float | None,
    desk: _JoinDesk,
) -> AsyncIterator[asyncio.Future[_Admitted]]:
    """Accept peers on ``lsock`` while the block runs; the first that passes
    :func:`_admit` with a stream (or a wire offer) wins the future.

    Candidates are handled concurrently, at most :data:`MAX_CANDIDATES` at
    once (the rest wait in the kernel's backlog), so a silent or slow peer
    never blocks a good one; each refused peer is logged in one line and
    hung up on.  Nothing is created for a refused peer.  A peer that sends
    a JOIN goes to ``desk`` (the receive under way decides).  ``desk.stop()``
    stops accepting.
    """
    loop = asyncio.get_running_loop()
    won: asyncio.Future[_Admitted] = loop.create_future()
    slots = asyncio.Semaphore(MAX_CANDIDATES)
    pending: set[asyncio.Task[None]] = set()
    # Every accepted socket until it is handed over: a candidate task
    # cancelled before it ever ran cannot close its own.
    conns: set[socket.socket] = set()

    async def candidate(conn: socket.socket) -> None:
        peer = hs.peer_name(conn)
        got = _Admitted(conn, _Plain(conn, peer), "", contextlib.AsyncExitStack())
        kept = False
        try:
            with contextlib.suppress(OSError):
                hs.tune(conn, timeout)
            got.channel, got.fmt = await _admit(conn, tls, fmt, timeout, got.stack)
            if got.fmt == "join":
                body = await _recv_body(got.channel.sock, wire.JOIN_MAGIC, "JOIN", timeout)
                why = desk.claim(wire.Join.parse(body), got)
                if why is not None:
                    raise HandshakeError(why, errno=errno_mod.EPERM)
                kept = True
            elif not won.done():
                won.set_result(got)
                kept = True
            else:
                raise HandshakeError("a second sender", errno=errno_mod.EBUSY)
        except Exception as e:
            log.warning("receive %s: refused %s: %s", target, peer, _cause(e))
        finally:
            slots.release()
            if kept:
                conns.discard(conn)
            else:
                await got.aclose()

    async def accept_loop() -> None:
        while True:
            await slots.acquire()
            try:
                conn, _addr = await loop.sock_accept(lsock)
            except BaseException:
                slots.release()
                raise
            conns.add(conn)
            conn.setblocking(False)
            task = asyncio.create_task(candidate(conn))
            pending.add(task)
            task.add_done_callback(pending.discard)

    def accept_failed(task: asyncio.Task[None]) -> None:
        # accept() itself failed (e.g. EMFILE): that ends the receive.
        if not won.done() and not task.cancelled():
            won.set_exception(task.exception() or RuntimeError("the accept loop ended"))

    acceptor = asyncio.create_task(accept_loop())
    acceptor.add_done_callback(accept_failed)

    def stop() -> None:
        acceptor.cancel()

    desk.stop = stop
    try:
        yield won
    finally:
        acceptor.cancel()
        for task in list(pending):
            task.cancel()
        await asyncio.gather(acceptor, *pending, return_exceptions=True)
        for conn in conns:
            conn.close()


@_lock.holding("sim", resolve=simdom.resolve)
async def receive(
    *,
    listen: Address | socket.socket,
    sim: str | os.PathLike[str],
    fmt: str = "auto",
    accept_timeout: float | None = None,
    tls_dir: str | os.PathLike[str] | None = None,
    insecure: bool = False,
    on_listening: Callable[[Address], object] | None = None,
    **opts: Unpack[ReceiveOptions],
) -> ReceiveResult:
    """Receive one migration on ``listen`` and run the received domain as ``sim``.

    ``listen`` is ``(host, port)`` (bound exactly; an empty host is
    127.0.0.1, loopback only; ``port`` 0 picks one, and ``on_listening`` is
    told the real address) or a listening socket of the caller's.

    Who gets in: with TLS (``tls_dir``, or the default directory, see
    :func:`resolve_tls`) only a peer whose certificate the CA signed; with
    ``insecure`` anyone who can connect.  Either way a peer is admitted
    only once it has sent the start of an xl, libxl or libxc stream after
    the banner, all within ``handshake_timeout``; until then the listener
    keeps listening (up to ``accept_timeout``), admitting up to
    :data:`MAX_CANDIDATES` peers at once, and drops each that fails (one
    log line each, nothing created).  The listening socket is closed as soon
    as one is admitted: a second sender is refused.  ``max_memory`` and
    ``idle_timeout`` bound the stream (see :func:`receive_on`).  An existing
    ``sim`` is refused (EEXIST) before listening, unless ``force``.
    """
    target = simdom.resolve(sim)
    api.check_replace(target, opts.get("force", False))  # EEXIST before listening, unless force
    if fmt != "auto" and fmt not in api.FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected auto or one of {api.FORMATS}")
    tls = resolve_tls(tls_dir, insecure)
    api.sweep_stale_partials(target)  # a killed receiver's, before we wait for a sender
    owned = not isinstance(listen, socket.socket)
    lsock = _listener(listen) if not isinstance(listen, socket.socket) else listen
    try:
        lsock.setblocking(False)
        name = lsock.getsockname()
        bound: Address = (str(name[0]), int(name[1]))
        log.info(
            "receive %s: listening on %s (%s)",
            target,
            format_address(bound),
            f"TLS, {tls}" if tls else "insecure",
        )
        if on_listening is not None:
            on_listening(bound)
        desk = _JoinDesk()

        async def received(got: _Admitted, desk: _JoinDesk | None) -> ReceiveResult:
            try:
                return await receive_on(
                    got.channel.sock,
                    sim=target,
                    fmt=fmt if got.fmt == "wire" else got.fmt,
                    admitted_fmt=got.fmt,
                    peer=got.channel.peer,
                    desk=desk,
                    **opts,
                )
            finally:
                await got.aclose()

        async with _admitting(
            lsock,
            target=target,
            tls=tls,
            fmt=fmt,
            timeout=opts.get("handshake_timeout", HANDSHAKE_TIMEOUT),
            desk=desk,
        ) as won:
            try:
                async with asyncio.timeout(accept_timeout):
                    got = await won
            except TimeoutError:
                raise MigrationError(
                    f"no sender was admitted on {format_address(bound)} within "
                    f"{accept_timeout:g} s (ETIMEDOUT)",
                    errno=errno_mod.ETIMEDOUT,
                ) from None
            if got.fmt == "wire":  # the listener stays open for its channels' JOINs
                return await received(got, desk)
    finally:
        if owned:
            lsock.close()  # exactly one sender
    return await received(got, None)


async def receive_stdio(
    *,
    sim: str | os.PathLike[str],
    fmt: str,
    rfd: int = 0,
    wfd: int = 1,
    **opts: Unpack[ReceiveOptions],
) -> ReceiveResult:
    """Receive one migration over ``rfd``/``wfd`` (the far end of ``xcsave
    migrate --to ssh://...``: sshd's stdin and stdout, pipes or a socket).

    The handshake is read from ``rfd`` and written to ``wfd``; the helper
    reads the stream from ``rfd`` directly (no read-ahead here), so nothing
    else may write to ``wfd`` meanwhile.  A pipe cannot be peeked at:
    ``fmt`` is the format the sender announced (``--format``).  Who may
    connect is sshd's business (its keys); the bounds are as for
    :func:`receive_on`.
    """
    if fmt not in api.FORMATS:
        raise ValueError(f"receive over stdio needs the stream's format: one of {api.FORMATS}")
    client = os.environ.get("SSH_CLIENT", "").split()
    ep = Fds(rfd, wfd, f"ssh client {client[0]}" if client else "stdin/stdout")
    flags = {fd: os.get_blocking(fd) for fd in {rfd, wfd}}
    try:
        return await receive_on(ep, sim=sim, fmt=fmt, **opts)
    finally:
        for fd, blocking in flags.items():  # a terminal's O_NONBLOCK outlives us
            with contextlib.suppress(OSError):
                os.set_blocking(fd, blocking)


def __getattr__(name: str) -> Any:
    """``migrate_local`` moved to :mod:`xcsave.local`, which builds on this
    module: found there on first use (no import circle)."""
    if name == "migrate_local":
        from . import local

        return local.migrate_local
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
