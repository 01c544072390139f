"""xl's migration handshake: the fixed messages around the stream, and the I/O for them.

Byte for byte those of ``xl migrate`` (tools/xl/xl.h)::

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

What each failure leaves where is :mod:`xcsave.migrate`'s business (the
network ends) and :mod:`xcsave.local`'s (both ends in one process); this
module only moves the messages, peeks at the stream's first bytes, and
lends the fd to a helper.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_mod
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from . import _ext, formats
from .defaults import HANDSHAKE_TIMEOUT
from .errors import HandshakeError, oserror_text

__all__ = [
    "BANNER",
    "GO",
    "HANDSHAKE_TIMEOUT",
    "READY",
    "REPORT",
    "Address",
    "Endpoint",
    "Fds",
    "expect",
    "format_address",
    "lent_to_helper",
    "nonblocking",
    "peek",
    "peer_name",
    "recv_exact",
    "send",
    "stream_format",
    "tune",
]

BANNER: Final = b"xl migration receiver ready, send binary domain data.\n"
READY: Final = b"domain received, ready to unpause\0"
GO: Final = b"domain is yours, you are cleared to unpause\0"
REPORT: Final = b"my copy unpause results are as follows\0"

#: First bytes of each stream format (the receiver peeks at them).
_PEEK: Final = 8  # what the native detection needs to tell the formats apart

Address = tuple[str, int]


@dataclass(frozen=True)
class Fds:
    """A byte channel that is not a socket: read ``rfd``, write ``wfd`` (stdin/stdout
    under sshd, which may be pipes).  The helper reads the stream from ``rfd``."""

    rfd: int
    wfd: int
    name: str = "stdin/stdout"


#: What the handshake runs on: a connected socket, or a pair of fds.
Endpoint = socket.socket | Fds


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


def nonblocking(ep: Endpoint, on: bool = True) -> None:
    """asyncio mode (``on``) or the helper's blocking mode, for the handshake's fds."""
    if isinstance(ep, socket.socket):
        ep.setblocking(not on)
        return
    for fd in {ep.rfd, ep.wfd}:
        os.set_blocking(fd, not on)


@contextlib.asynccontextmanager
async def _bounded(
    timeout: float | None, doing: str, late: Callable[[], str]
) -> AsyncIterator[None]:
    """The block within ``timeout``: past it, ``HandshakeError(late())``
    (ETIMEDOUT); a socket error, ``HandshakeError`` saying what we were
    ``doing`` ("reading the banner") with the errno's text and name."""
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError:
        raise HandshakeError(late(), errno=errno_mod.ETIMEDOUT) from None
    except OSError as e:
        raise HandshakeError(f"{doing}: {oserror_text(e, filename=False)}", errno=e.errno) from e


async def recv_exact(sock: Endpoint, n: int, what: str, timeout: float | None) -> bytes:
    """Exactly ``n`` bytes, read with the socket's own recv (never more: no read-ahead)."""
    buf = bytearray()

    def late() -> str:
        got = f"{len(buf)} of {n} bytes"
        return f"timed out after {timeout:g} s waiting for {what} ({got}; ETIMEDOUT)"

    async with _bounded(timeout, f"reading {what}", late):
        while len(buf) < n:
            chunk = await _recv_some(sock, n - len(buf))
            if not chunk:
                raise HandshakeError(
                    f"the peer closed the connection before {what} ({len(buf)} of {n} bytes)",
                    errno=errno_mod.ECONNRESET,
                )
            buf += chunk
    return bytes(buf)


async def recv_drop(sock: socket.socket, n: int, what: str, timeout: float | None) -> None:
    """Exactly ``n`` bytes read and dropped, into one reused buffer of at
    most a MiB (a timed link probe: no allocation per chunk)."""
    buf = memoryview(bytearray(min(n, 1 << 20) or 1))
    left = n

    def late() -> str:
        got = f"{n - left} of {n} bytes"
        return f"timed out after {timeout:g} s waiting for {what} ({got}; ETIMEDOUT)"

    loop = asyncio.get_running_loop()
    async with _bounded(timeout, f"reading {what}", late):
        while left:
            got = await loop.sock_recv_into(sock, buf[: min(left, len(buf))])
            if not got:
                raise HandshakeError(
                    f"the peer closed the connection in {what} "
                    f"({n - left} of {n} bytes; ECONNRESET)",
                    errno=errno_mod.ECONNRESET,
                )
            left -= got


async def expect(sock: Endpoint, msg: bytes, what: str, timeout: float | None) -> None:
    got = await recv_exact(sock, len(msg), what, timeout)
    if got != msg:
        raise HandshakeError(f"expected {what} {msg!r}, got {got!r}", errno=errno_mod.EPROTO)


async def send(sock: Endpoint, msg: bytes, what: str, timeout: float | None) -> None:
    async with _bounded(
        timeout,
        f"sending {what}",
        lambda: f"could not send {what} within {timeout:g} s (ETIMEDOUT)",
    ):
        await _send_all(sock, msg)


async def peek(sock: socket.socket, n: int, what: str, timeout: float | None) -> bytes:
    """The next ``n`` bytes without consuming them (``MSG_PEEK``), or fewer at EOF."""
    async with _bounded(
        timeout,
        f"reading {what}",
        lambda: f"timed out after {timeout:g} s waiting for {what} (ETIMEDOUT)",
    ):
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
    raise AssertionError("unreachable")  # the loop returns or raises


async def stream_format(
    sock: socket.socket, fmt: str, timeout: float | None, magics: Mapping[bytes, str] = {}
) -> str:
    """The format of the stream waiting on ``sock`` (peeked at, not consumed);
    or, when its first 8 bytes are one of ``magics``, that one's name (the
    wire's OFFER and JOIN, see :mod:`xcsave.wire`)."""
    head = await peek(sock, _PEEK, "the sender's stream", timeout)
    if len(head) < _PEEK:
        raise HandshakeError(
            "the sender closed the connection before sending a stream",
            errno=errno_mod.ECONNRESET,
        )
    if head in magics:
        return magics[head]
    detected = _detect_format(head)
    if fmt not in ("auto", detected):
        raise HandshakeError(
            f"the sender sends a {detected} stream, not {fmt}", errno=errno_mod.EPROTO
        )
    return detected


def _detect_format(head: bytes) -> str:
    """The format of a stream starting with head: the verifier's own detection
    (codec.c), so that a receiver and ``xcsave verify`` cannot disagree."""
    fmt = _ext.sniff_format(head)
    if fmt in formats.STREAM:
        return fmt
    raise HandshakeError(
        f"the sender's stream starts with {head!r}: not an xl, libxl or libxc stream",
        errno=errno_mod.EPROTO,
    )


@contextlib.contextmanager
def lent_to_helper(sock: Endpoint, stream: int | None = None) -> Iterator[int]:
    """The fd the stream goes through, for a helper: ``stream`` when there is
    one (a pipe of :func:`xcsave.local.migrate_local`'s, blocking and never read here),
    else the socket's, in blocking mode, non-blocking again afterwards.

    O_NONBLOCK belongs to the open file description, which the helper
    shares: its engine expects blocking reads and writes.  Nothing in this
    process touches the socket while the helper has it.
    """
    if stream is not None:
        yield stream
        return
    nonblocking(sock, False)
    try:
        yield sock.fileno() if isinstance(sock, socket.socket) else sock.rfd
    finally:
        nonblocking(sock)


def tune(sock: Endpoint, timeout: float | None) -> None:
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


def peer_name(sock: Endpoint) -> str:
    if isinstance(sock, Fds):
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
