"""Live migration over TCP: xl's handshake around the stream, no Python in the data path.

The sender's helper writes the migration stream straight to the connected
socket and the receiver's helper reads it straight from the accepted one
(the socket's fd is handed to :func:`xcsave.api.save` / :func:`~xcsave.api.restore`
by number).  Python only speaks the few fixed-size handshake messages
around the stream, byte for byte those of ``xl migrate`` (tools/xl/xl.h)::

    receiver -> sender   BANNER   "xl migration receiver ready, send binary domain data.\\n"
                                  (54 bytes, no NUL)
    sender -> receiver   the stream (xl, libxl or libxc format), written by the helper;
                         the receiver's helper reads exactly its records, up to END
    receiver -> sender   READY    "domain received, ready to unpause\\0"            (34 bytes)
    sender -> receiver   GO       "domain is yours, you are cleared to unpause\\0"  (44 bytes)
    receiver -> sender   REPORT   "my copy unpause results are as follows\\0"       (39 bytes)
                         + 1 status byte: 0 = the receiver's copy is running
    only if status != 0: the receiver removes its copy, then
    receiver -> sender   GO       (44 bytes): permission for the sender to resume

The domain runs in exactly one place at the end.  Until the sender has sent
GO, any failure (the receiver refusing, dying mid-stream, a broken or late
message, a failed restore) resumes the sender's copy and the receiver
removes whatever it built.  After GO, the sender resumes only when the
receiver says its copy failed *and* that it has removed it (the second GO).
If the connection breaks between GO and the report, nobody can know whether
the receiver started its copy: like xl, the sender then leaves its copy
suspended and raises :class:`MigrationInDoubt` instead of risking two
running copies.

No read-ahead: the helper's stream fd is shared with this process, so
Python must never consume a byte that belongs to the stream (or to a later
message).  Every handshake read is ``sock.recv(remaining)`` on the socket
itself (``loop.sock_recv``, no StreamReader, no buffer) for exactly the
fixed length of the message expected next; the receiver identifies the
stream's format with ``MSG_PEEK``, which consumes nothing.  The protocol
itself keeps the socket quiet at each hand-over: the receiver's helper gets
the fd right after BANNER was sent and before the sender (who waits for
BANNER) can have written anything but stream; the sender's helper only
writes; the peer's next message is sent only after the helper is done.
While a helper owns the fd the socket is switched to blocking mode (the
helper's reads and writes expect it) and this process does not touch it.

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
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Generic, Protocol, TypeVar

from . import api
from . import lock as _lock
from . import sim as simdom
from ._log import logger
from .errors import XcsaveError, errno_name
from .events import DoneEvent, Event, LogEvent, ProgressEvent
from .policy import Policy
from .supervisor import Callbacks, RunResult, Supervisor

__all__ = [
    "BANNER",
    "CHANNELS",
    "GO",
    "READY",
    "REPORT",
    "HandshakeError",
    "MigrationError",
    "MigrationInDoubt",
    "MigrationResult",
    "Outcome",
    "ReceiveResult",
    "Summary",
    "default_max_memory",
    "migrate",
    "migrate_local",
    "migrate_on",
    "receive",
    "receive_on",
    "receive_stdio",
    "resolve_tls",
    "run_many",
]

log = logger(__name__)

BANNER: Final = b"xl migration receiver ready, send binary domain data.\n"
READY: Final = b"domain received, ready to unpause\0"
GO: Final = b"domain is yours, you are cleared to unpause\0"
REPORT: Final = b"my copy unpause results are as follows\0"

#: How long to wait for each handshake message by default (seconds).
HANDSHAKE_TIMEOUT: Final = 60.0
#: Default idle timeout once the stream has started (seconds past the last byte).
IDLE_TIMEOUT: Final = 10.0
#: A listener admits at most this many unauthenticated peers at once.
MAX_CANDIDATES: Final = 8
PAGE_SIZE: Final = 4096

#: First bytes of each stream format (the receiver peeks at them).
_MAGIC: Final[tuple[tuple[bytes, str], ...]] = (
    (b"Xen save", "xl"),  # "Xen saved domain, xl format\n \0 \r"
    (b"LibxlFmt", "libxl"),  # libxl header ident, big-endian
    (b"\xff" * 8, "libxc"),  # libxc image header marker
)
_PEEK: Final = 8

Address = tuple[str, int]
EventSink = Callable[[Event], object]


@dataclass(frozen=True)
class _Fds:
    """A byte channel that is not a socket: read ``rfd``, write ``wfd`` (stdin/stdout
    under sshd, which may be pipes).  The helper reads the stream from ``rfd``."""

    rfd: int
    wfd: int
    name: str = "stdin/stdout"


#: What the handshake runs on: a connected socket, or a pair of fds.
Endpoint = socket.socket | _Fds


class MigrationError(XcsaveError):
    """A migration (either end) failed; the message says what state each copy is in."""

    __module__ = "xcsave"

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class HandshakeError(MigrationError):
    """The peer broke the handshake: closed early, sent the wrong bytes, or was late."""

    __module__ = "xcsave"


class MigrationInDoubt(MigrationError):
    """The connection broke after GO: the receiver may or may not run the domain.

    The sender's copy is left suspended (never two running copies); an
    operator must look at the receiver before resuming either copy.
    """

    __module__ = "xcsave"


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


def _oserror_text(e: OSError) -> str:
    if e.errno:
        return f"{e.strerror or os.strerror(e.errno)} ({errno_name(e.errno)})"
    return str(e) or type(e).__name__


def _same_kind(e: BaseException) -> type[MigrationError]:
    """The class to re-raise ``e`` as, with the migration's context in the message."""
    if isinstance(e, MigrationError) and not isinstance(e, MigrationInDoubt):
        return type(e)
    return MigrationError


def _cause(e: BaseException, idle_timeout: float | None = None) -> str:
    """``e`` as the middle of a one-line message; a helper's ETIMEDOUT with
    an idle timeout says which bound it was."""
    if (
        idle_timeout
        and getattr(e, "errno", None) == errno_mod.ETIMEDOUT
        and not isinstance(e, (HandshakeError, OSError))
    ):
        return f"{e} (no stream bytes moved for {idle_timeout:g} s: --idle-timeout)"
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename is not None else ""
        return where + _oserror_text(e)
    if isinstance(e, asyncio.CancelledError):
        return "cancelled"
    return str(e) or type(e).__name__


async def _fd_ready(fd: int, write: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, ready)
    try:
        await fut
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


async def _recv_some(ep: Endpoint, n: int) -> bytes:
    """At most ``n`` bytes, as soon as some are there (b"" at EOF)."""
    if isinstance(ep, socket.socket):
        return await asyncio.get_running_loop().sock_recv(ep, n)
    while True:
        try:
            return os.read(ep.rfd, n)
        except BlockingIOError:
            await _fd_ready(ep.rfd, write=False)


async def _send_all(ep: Endpoint, msg: bytes) -> None:
    if isinstance(ep, socket.socket):
        await asyncio.get_running_loop().sock_sendall(ep, msg)
        return
    view = memoryview(msg)
    while view:
        try:
            view = view[os.write(ep.wfd, view) :]
        except BlockingIOError:
            await _fd_ready(ep.wfd, write=True)


def _nonblocking(ep: Endpoint, on: bool = True) -> None:
    """asyncio mode (``on``) or the helper's blocking mode, for the handshake's fds."""
    if isinstance(ep, socket.socket):
        ep.setblocking(not on)
        return
    for fd in {ep.rfd, ep.wfd}:
        os.set_blocking(fd, not on)


async def _recv_exact(sock: Endpoint, n: int, what: str, timeout: float | None) -> bytes:
    """Exactly ``n`` bytes, read with the socket's own recv (never more: no read-ahead)."""
    buf = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while len(buf) < n:
                chunk = await _recv_some(sock, n - len(buf))
                if not chunk:
                    raise HandshakeError(
                        f"the peer closed the connection before {what} ({len(buf)} of {n} bytes)",
                        errno=errno_mod.ECONNRESET,
                    )
                buf += chunk
    except TimeoutError:
        raise HandshakeError(
            f"timed out after {timeout:g} s waiting for {what} "
            f"({len(buf)} of {n} bytes; ETIMEDOUT)",
            errno=errno_mod.ETIMEDOUT,
        ) from None
    except OSError as e:
        raise HandshakeError(f"reading {what}: {_oserror_text(e)}", errno=e.errno) from e
    return bytes(buf)


async def _expect(sock: Endpoint, msg: bytes, what: str, timeout: float | None) -> None:
    got = await _recv_exact(sock, len(msg), what, timeout)
    if got != msg:
        raise HandshakeError(f"expected {what} {msg!r}, got {got!r}", errno=errno_mod.EPROTO)


async def _send(sock: Endpoint, msg: bytes, what: str, timeout: float | None) -> None:
    try:
        async with asyncio.timeout(timeout):
            await _send_all(sock, msg)
    except TimeoutError:
        raise HandshakeError(
            f"could not send {what} within {timeout:g} s (ETIMEDOUT)", errno=errno_mod.ETIMEDOUT
        ) from None
    except OSError as e:
        raise HandshakeError(f"sending {what}: {_oserror_text(e)}", errno=e.errno) from e


async def _peek(sock: socket.socket, n: int, what: str, timeout: float | None) -> bytes:
    """The next ``n`` bytes without consuming them (``MSG_PEEK``), or fewer at EOF."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    data = sock.recv(n, socket.MSG_PEEK)
                except BlockingIOError:
                    await _fd_ready(sock.fileno(), write=False)
                    continue
                if len(data) >= n or not data:
                    return data
                # Part of it is here: the rest is a segment away.
                await asyncio.sleep(0.001)
    except TimeoutError:
        raise HandshakeError(
            f"timed out after {timeout:g} s waiting for {what} (ETIMEDOUT)",
            errno=errno_mod.ETIMEDOUT,
        ) from None
    except OSError as e:
        raise HandshakeError(f"reading {what}: {_oserror_text(e)}", errno=e.errno) from e


async def _stream_format(sock: socket.socket, fmt: str, timeout: float | None) -> str:
    """The format of the stream waiting on ``sock`` (peeked at, not consumed)."""
    head = await _peek(sock, _PEEK, "the sender's stream", timeout)
    if len(head) < _PEEK:
        raise HandshakeError(
            "the sender closed the connection before sending a stream",
            errno=errno_mod.ECONNRESET,
        )
    detected = _detect_format(head)
    if fmt not in ("auto", detected):
        raise HandshakeError(
            f"the sender sends a {detected} stream, not {fmt}", errno=errno_mod.EPROTO
        )
    return detected


def _detect_format(head: bytes) -> str:
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    raise HandshakeError(
        f"the sender's stream starts with {head!r}: not an xl, libxl or libxc stream",
        errno=errno_mod.EPROTO,
    )


@contextlib.contextmanager
def _lent_to_helper(sock: Endpoint, stream: int | None = None) -> Iterator[int]:
    """The fd the stream goes through, for a helper: ``stream`` when there is
    one (a pipe of :func:`migrate_local`'s, blocking and never read here),
    else the socket's, in blocking mode, non-blocking again afterwards.

    O_NONBLOCK belongs to the open file description, which the helper
    shares: its engine expects blocking reads and writes.  Nothing in this
    process touches the socket while the helper has it.
    """
    if stream is not None:
        yield stream
        return
    _nonblocking(sock, False)
    try:
        yield sock.fileno() if isinstance(sock, socket.socket) else sock.rfd
    finally:
        _nonblocking(sock)


def _tune(sock: Endpoint, timeout: float | None) -> None:
    """Small handshake messages go out at once; a dead peer fails a blocked helper."""
    if not isinstance(sock, socket.socket) or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
    if timeout and hasattr(socket, "TCP_USER_TIMEOUT"):
        # A helper blocked writing to a peer that vanished (no RST) gets
        # ETIMEDOUT instead of waiting for the kernel's ~15 minutes.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(timeout * 1000))


def _peer_name(sock: Endpoint) -> str:
    if isinstance(sock, _Fds):
        return sock.name
    try:
        addr = sock.getpeername()
    except OSError:
        return "?"
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = str(addr[0]), int(addr[1])
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(addr) or "local peer"


def format_address(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
        yield _Plain(sock, _peer_name(sock))
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


# ----------------------------------------------------------------- sender


def _state(path: Path) -> str:
    return str(simdom.info(path)["state"])


def _put_back(path: Path, state: str) -> str:
    """Set the source to ``state`` again (after a failure); returns the state it is in."""
    try:
        if _state(path) != state:
            simdom.set_state(path, state)
        return _state(path)
    except OSError as e:
        log.error("could not set %s %s again: %s", path, state, _oserror_text(e))
        return "unknown"


@_lock.holding("sim", resolve=simdom.resolve)
async def migrate_on(
    sock: socket.socket,
    *,
    sim: str | os.PathLike[str],
    live: bool = True,
    policy: Policy | None = None,
    fmt: str = "libxl",
    timeout: float | None = None,
    handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
    idle_timeout: float | None = IDLE_TIMEOUT,
    on_event: EventSink | None = None,
    supervisor: Supervisor | None = None,
    stream: int | None = None,
    peer: str | None = None,
) -> MigrationResult:
    """Migrate a simulated domain over ``sock``, a connected socket (the sender's side).

    ``sock`` stays the caller's (it is not closed).  See the module docstring
    for the handshake and what each failure leaves where.  ``stream``, if
    given, is a separate fd the stream is written to (the write end of a
    pipe to a local receiver); the handshake stays on ``sock``.
    ``idle_timeout``: a receiver that takes no stream bytes for that long
    fails the migration (ETIMEDOUT).  ``peer`` names the receiver in
    messages (default: the socket's peer address).
    """
    if fmt not in api.FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected one of {api.FORMATS}")
    src = simdom.resolve(sim)
    before = _state(src)  # also: FileNotFoundError for a domain that does not exist
    peer = peer or _peer_name(sock)
    ev = _Events("migrate", str(src), on_event)
    _nonblocking(sock)
    _tune(sock, handshake_timeout)
    t0 = time.monotonic()
    t_suspend: list[float] = []

    def suspended() -> bool:
        t_suspend.append(time.monotonic())
        return True  # the engine then marks the domain suspended

    committed = False  # GO sent: from here on, resuming could make two copies run
    try:
        await _expect(sock, BANNER, "the receiver's banner", handshake_timeout)
        ev.note(f"receiver {peer} ready; sending {'live ' if live else ''}{fmt} stream")
        with _lent_to_helper(sock, stream) as fd:
            saved = await api.save(
                fd,
                sim=src,
                live=live,
                fmt=fmt,
                policy=policy,
                callbacks=Callbacks(suspend=suspended),
                timeout=timeout,
                idle_timeout=idle_timeout,
                on_event=ev,
                supervisor=supervisor,
            )
        stream_done_at = time.monotonic()
        ev.note("stream sent; waiting for the receiver to confirm")
        await _expect(sock, READY, "the receiver's 'domain received'", handshake_timeout)
        committed = True  # set first: a failure while sending GO is in doubt too
        await _send(sock, GO, "'domain is yours'", handshake_timeout)
        await _expect(sock, REPORT, "the receiver's report", handshake_timeout)
        status = (await _recv_exact(sock, 1, "the receiver's status byte", handshake_timeout))[0]
        if status != 0:
            await _expect(sock, GO, "the receiver's permission to resume", handshake_timeout)
            committed = False
            raise MigrationError(
                f"the receiver could not start its copy (status {status})", errno=status
            )
    except BaseException as e:
        cause = _cause(e, idle_timeout)
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
        state = _put_back(src, before)
        ev.done(False, cause)
        if isinstance(e, Exception):
            raise _same_kind(e)(
                f"migrate {src} to {peer} failed: {cause}; {src} is {state} here again",
                errno=getattr(e, "errno", None),
            ) from e
        raise
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
    timeout: float | None = None,
    handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
    idle_timeout: float | None = IDLE_TIMEOUT,
    tls_dir: str | os.PathLike[str] | None = None,
    insecure: bool = False,
    on_event: EventSink | None = None,
    supervisor: Supervisor | None = None,
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
    """
    path = _resolve_existing(sim)
    tls = resolve_tls(tls_dir, insecure)
    sock = await _connect(to, handshake_timeout)
    with sock:
        _tune(sock, handshake_timeout)
        async with _secured(sock, tls, server_name=to[0], timeout=handshake_timeout) as ch:
            return await migrate_on(
                ch.sock,
                sim=path,
                live=live,
                policy=policy,
                fmt=fmt,
                timeout=timeout,
                handshake_timeout=handshake_timeout,
                idle_timeout=idle_timeout,
                on_event=on_event,
                supervisor=supervisor,
                peer=ch.peer,
            )


def _resolve_existing(dom: str | os.PathLike[str]) -> Path:
    path = simdom.resolve(dom)
    _state(path)  # FileNotFoundError (ENOENT) before we connect anywhere
    return path


# ----------------------------------------------------------------- receiver


@_lock.holding("sim", resolve=simdom.resolve)
async def receive_on(
    sock: Endpoint,
    *,
    sim: str | os.PathLike[str],
    fmt: str = "auto",
    timeout: float | None = None,
    handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
    idle_timeout: float | None = IDLE_TIMEOUT,
    max_memory: int | None = None,
    on_event: EventSink | None = None,
    supervisor: Supervisor | None = None,
    stream: int | None = None,
    force: bool = False,
    admitted_fmt: str | None = None,
    peer: str | None = None,
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
    if (stream is not None or isinstance(sock, _Fds)) and fmt == "auto" and not admitted_fmt:
        raise ValueError("a separate stream fd cannot be peeked at: give its format")
    target = simdom.resolve(sim)
    built = api.SimTarget.begin(target, force=force)  # EEXIST unless force
    peer = peer or _peer_name(sock)
    limit = default_max_memory(target) if max_memory is None else max_memory
    ev = _Events("receive", str(target), on_event)
    _nonblocking(sock)
    _tune(sock, handshake_timeout)
    t0 = time.monotonic()
    running = False
    try:
        if admitted_fmt is not None:
            detected = admitted_fmt
        else:
            await _send(sock, BANNER, "the banner", handshake_timeout)
            detected = (
                fmt
                if stream is not None or isinstance(sock, _Fds)
                else await _stream_format(sock, fmt, handshake_timeout)
            )
        ev.note(f"receiving a {detected} stream from {peer}")
        with _lent_to_helper(sock, stream) as fd:
            restored = await api.restore(
                fd,
                sim=built,
                fmt=detected,
                timeout=timeout,
                max_memory=limit,
                idle_timeout=idle_timeout,
                on_event=ev,
                supervisor=supervisor,
            )
        ev.note("stream received; asking for permission to start")
        await _send(sock, READY, "'domain received'", handshake_timeout)
        await _expect(sock, GO, "the sender's 'domain is yours'", handshake_timeout)
        try:
            simdom.set_state(built.partial, "running")
            built.commit()  # the old domain (with force) stays until here
            running = True
            status = 0
        except OSError as e:
            log.error("starting %s: %s", target, _oserror_text(e))
            status = (e.errno or errno_mod.EIO) & 0xFF or 1
        if status:
            # xl's order: report, remove our copy, then give the sender its domain back.
            await _send(sock, REPORT + bytes([status]), "the failure report", handshake_timeout)
            built.discard()
            await _send(sock, GO, "the permission to resume", handshake_timeout)
            raise MigrationError(
                f"could not start the received domain (status {status})", errno=status
            )
        report_lost = False
        try:
            await _send(sock, REPORT + b"\0", "the report", handshake_timeout)
        except HandshakeError as e:
            # Ours runs; the sender keeps its copy suspended (it is in doubt).
            report_lost = True
            log.warning("%s runs here, but the sender did not get the report: %s", target, e)
    except BaseException as e:
        if not running:
            built.discard()
        cause = _cause(e, idle_timeout)
        ev.done(False, cause)
        if isinstance(e, Exception) and not running:
            raise _same_kind(e)(
                f"receive of {target} from {peer} failed: {cause}; nothing was kept here",
                errno=getattr(e, "errno", None),
            ) from e
        raise
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
            await _send(ch.sock, BANNER, "the banner", None)
            detected = await _stream_format(ch.sock, fmt, None)
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


async def _first_admitted(
    lsock: socket.socket,
    *,
    target: Path,
    tls: Path | None,
    fmt: str,
    timeout: float | None,
) -> _Admitted:
    """Accept peers on ``lsock`` until one passes :func:`_admit`.

    Candidates are handled concurrently, at most :data:`MAX_CANDIDATES` at
    once (the rest wait in the kernel's backlog), so a silent or slow peer
    never blocks a good one; each refused peer is logged in one line and
    hung up on.  Nothing is created for a refused peer.
    """
    loop = asyncio.get_running_loop()
    won: asyncio.Future[_Admitted] = loop.create_future()
    slots = asyncio.Semaphore(MAX_CANDIDATES)
    pending: set[asyncio.Task[None]] = set()
    # Every accepted socket until it is handed over: a candidate task
    # cancelled before it ever ran cannot close its own.
    conns: set[socket.socket] = set()

    async def candidate(conn: socket.socket) -> None:
        peer = _peer_name(conn)
        stack = contextlib.AsyncExitStack()
        admitted: _Admitted | None = None
        try:
            with contextlib.suppress(OSError):
                _tune(conn, timeout)
            ch, detected = await _admit(conn, tls, fmt, timeout, stack)
            if not won.done():
                admitted = _Admitted(conn, ch, detected, stack)
                conns.discard(conn)
                won.set_result(admitted)
        except Exception as e:
            log.warning("receive %s: refused %s: %s", target, peer, _cause(e))
        finally:
            slots.release()
            if admitted is None:
                await stack.aclose()
                conn.close()

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
    try:
        return await won
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
    timeout: float | None = None,
    accept_timeout: float | None = None,
    handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
    idle_timeout: float | None = IDLE_TIMEOUT,
    max_memory: int | None = None,
    tls_dir: str | os.PathLike[str] | None = None,
    insecure: bool = False,
    on_listening: Callable[[Address], object] | None = None,
    on_event: EventSink | None = None,
    supervisor: Supervisor | None = None,
    force: bool = False,
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
    api.check_replace(target, force)  # EEXIST before listening, unless force
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
        try:
            async with asyncio.timeout(accept_timeout):
                got = await _first_admitted(
                    lsock, target=target, tls=tls, fmt=fmt, timeout=handshake_timeout
                )
        except TimeoutError:
            raise MigrationError(
                f"no sender was admitted on {format_address(bound)} within {accept_timeout:g} s "
                "(ETIMEDOUT)",
                errno=errno_mod.ETIMEDOUT,
            ) from None
    finally:
        if owned:
            lsock.close()  # exactly one sender
    async with got.stack:
        with got.conn:
            return await receive_on(
                got.channel.sock,
                sim=target,
                fmt=got.fmt,
                timeout=timeout,
                handshake_timeout=handshake_timeout,
                idle_timeout=idle_timeout,
                max_memory=max_memory,
                on_event=on_event,
                supervisor=supervisor,
                admitted_fmt=got.fmt,
                peer=got.channel.peer,
                force=force,
            )


async def receive_stdio(
    *,
    sim: str | os.PathLike[str],
    fmt: str,
    rfd: int = 0,
    wfd: int = 1,
    timeout: float | None = None,
    handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
    idle_timeout: float | None = IDLE_TIMEOUT,
    max_memory: int | None = None,
    on_event: EventSink | None = None,
    supervisor: Supervisor | None = None,
    force: bool = False,
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
    ep = _Fds(rfd, wfd, f"ssh client {client[0]}" if client else "stdin/stdout")
    flags = {fd: os.get_blocking(fd) for fd in {rfd, wfd}}
    try:
        return await receive_on(
            ep,
            sim=sim,
            fmt=fmt,
            timeout=timeout,
            handshake_timeout=handshake_timeout,
            idle_timeout=idle_timeout,
            max_memory=max_memory,
            on_event=on_event,
            supervisor=supervisor,
            force=force,
        )
    finally:
        for fd, blocking in flags.items():  # a terminal's O_NONBLOCK outlives us
            with contextlib.suppress(OSError):
                os.set_blocking(fd, blocking)


# ----------------------------------------------------------------- local pairs


#: How :func:`migrate_local` carries the stream.
CHANNELS: Final = ("pipe", "socket")


@contextlib.contextmanager
def _owned_fd(fd: int | None) -> Iterator[int | None]:
    """Close ``fd`` (if any) when the block ends, however it ends."""
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


@_lock.holding("src", "dst", resolve=simdom.resolve)
async def migrate_local(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    live: bool = True,
    policy: Policy | None = None,
    fmt: str = "libxl",
    timeout: float | None = None,
    handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
    on_event: EventSink | None = None,
    supervisor: Supervisor | None = None,
    channel: str = "pipe",
) -> tuple[MigrationResult, ReceiveResult]:
    """Both ends in this process: the same helpers and handshake as TCP.

    The handshake goes over a socketpair.  With ``channel="pipe"`` (the
    default) the stream goes over a pipe beside it: the sender's helper
    vmsplices its pages into the pipe and the receiver's splices page runs
    out of it into the target, so a byte is copied once, into the target.
    ``channel="socket"`` sends the stream over the socketpair itself,
    exactly as over TCP.

    Each side closes its ends when it fails, so the other side sees it and
    cleans up on its own (nothing is cancelled): a receiver whose sender is
    gone reads EOF, a sender whose receiver is gone gets EPIPE.  Raises the
    sender's error first (it says where the domain runs), else the
    receiver's.  Never in doubt: with both ends here, a failure or a
    cancellation after the sender's GO is settled by looking at the
    receiver's copy (see :func:`_settle_local`), so exactly one copy runs.
    With a shared ``supervisor``, its ``max_parallel`` must allow two
    helpers per pair in flight, or the pairs could starve each other.
    """
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}: expected one of {CHANNELS}")
    src_path, dst_path = simdom.resolve(src), simdom.resolve(dst)
    before = _state(src_path)  # also: FileNotFoundError for a domain that does not exist
    api.check_replace(dst_path, False)  # before either side starts: settling reads dst
    a, b = socket.socketpair()
    # Blocking, close-on-exec: the supervisor hands each helper its end alone.
    rfd, wfd = os.pipe() if channel == "pipe" else (None, None)

    async def send_side() -> MigrationResult:
        with a, _owned_fd(wfd):
            return await migrate_on(
                a,
                sim=src,
                live=live,
                policy=policy,
                fmt=fmt,
                timeout=timeout,
                handshake_timeout=handshake_timeout,
                on_event=on_event,
                supervisor=supervisor,
                stream=wfd,
            )

    async def receive_side() -> ReceiveResult:
        with b, _owned_fd(rfd):
            return await receive_on(
                b,
                sim=dst,
                fmt=fmt,
                timeout=timeout,
                handshake_timeout=handshake_timeout,
                on_event=on_event,
                supervisor=supervisor,
                stream=rfd,
            )

    sent: MigrationResult | BaseException | None = None
    received: ReceiveResult | BaseException | None = None
    try:
        sent, received = await asyncio.gather(send_side(), receive_side(), return_exceptions=True)
    finally:
        # On cancellation gather has cancelled both sides and waited for them.
        if not isinstance(sent, MigrationResult):
            settled = _settle_local(src_path, before, dst_path)
            if isinstance(sent, MigrationInDoubt):
                sent = MigrationError(f"{sent}; {settled}", errno=sent.errno)
    for r in (sent, received):
        if isinstance(r, BaseException):
            raise r
    assert isinstance(sent, MigrationResult)
    assert isinstance(received, ReceiveResult)
    return sent, received


def _settle_local(src: Path, before: str, dst: Path) -> str:
    """After a local migration that did not succeed: exactly one copy runs.

    Over TCP a sender that gave GO and then lost the link cannot know whether
    the receiver started its copy, so it leaves its own suspended (in doubt).
    Here both ends are in this process and have finished: if the receiver's
    copy runs it is the one, else the source is put back as it was.
    """
    try:
        runs = _state(dst) == "running"
    except OSError:
        runs = False  # removed by the receiver: it never ran
    if runs:
        log.warning("%s runs; %s stays suspended", dst, src)
        return f"settled here: {dst} runs, {src} stays suspended"
    state = _put_back(src, before)
    return f"settled here: {dst} never ran, so {src} is {state} here again"


# ----------------------------------------------------------------- many at once

T = TypeVar("T")


@dataclass
class Outcome(Generic[T]):
    """One job of :func:`run_many`: its result or its error."""

    name: str
    ok: bool
    seconds: float
    result: T | None = None
    error: BaseException | None = None

    @property
    def message(self) -> str:
        return "" if self.error is None else _cause(self.error)


@dataclass
class Summary(Generic[T]):
    """All outcomes of :func:`run_many`, in the order the jobs were given."""

    outcomes: list[Outcome[T]]
    seconds: float

    @property
    def ok(self) -> list[Outcome[T]]:
        return [o for o in self.outcomes if o.ok]

    @property
    def failed(self) -> list[Outcome[T]]:
        return [o for o in self.outcomes if not o.ok]

    def lines(self) -> list[str]:
        out = [
            f"{len(self.ok)} of {len(self.outcomes)} succeeded in {self.seconds:.2f} s"
            + (f", {len(self.failed)} failed" if self.failed else "")
        ]
        out += [
            f"  {o.name}: {'ok' if o.ok else 'FAILED: ' + o.message} ({o.seconds:.2f} s)"
            for o in self.outcomes
        ]
        return out


Job = Callable[[Supervisor], Awaitable[T]]


async def run_many(
    jobs: Sequence[tuple[str, Job[T]]],
    *,
    max_parallel: int = 8,
    helpers_per_job: int = 2,
) -> Summary[T]:
    """Run named jobs concurrently, ``max_parallel`` at a time, through one Supervisor.

    Each job is ``async def job(supervisor) -> T`` (e.g. a lambda around
    :func:`migrate_local`, :func:`migrate`, :func:`xcsave.save`).  A job's
    failure is recorded in its :class:`Outcome` and never cancels or
    disturbs the others; only cancelling ``run_many`` itself stops them all
    (every helper is stopped and reaped).  The limit applies to *jobs*; the
    Supervisor allows ``helpers_per_job`` helpers per job, so that both ends
    of an in-process migration always run together.
    """
    if max_parallel < 1:
        raise ValueError(f"max_parallel must be at least 1, not {max_parallel}")
    sem = asyncio.Semaphore(max_parallel)
    t0 = time.monotonic()

    async with Supervisor(max_parallel=max_parallel * helpers_per_job) as sup:

        async def one(name: str, job: Job[T]) -> Outcome[T]:
            async with sem:
                t = time.monotonic()
                try:
                    value = await job(sup)
                except Exception as e:
                    log.info("%s failed: %s", name, e)
                    return Outcome(name, False, time.monotonic() - t, error=e)
                return Outcome(name, True, time.monotonic() - t, result=value)

        outcomes = await asyncio.gather(*(one(n, j) for n, j in jobs))
    return Summary(list(outcomes), time.monotonic() - t0)
