"""TLS 1.3 channels with mutual certificate authentication, the libvirt way.

A channel wraps a connected TCP socket.  The TLS record layer runs in the
helper (``xcsave-helper --xcsave-1 tunnel``, csrc/tunnel_tls.c, OpenSSL), not
here: this process gets the plaintext end of an ``AF_UNIX`` socketpair
(:attr:`TlsChannel.sock`) and uses it exactly as it would the TCP socket;
the helper encrypts what we write, decrypts what the peer sends, and the
pages never cross into Python on their way through it::

    channel = await tls_client(tcp_sock, server_name="hostb")   # or tls_server
    await loop.sock_sendall(channel.sock, data)                 # plaintext
    await channel.aclose()                                      # close_notify

Trust (docs/security.md, "Network: TLS"): a directory holds ``ca-cert.pem``
(the only CA trusted), ``cert.pem`` and ``key.pem`` (this host's; 0600, or it
is refused).  Both sides must present a certificate the CA signed; the client
checks that the server's names the host it dialled (``server_name``: a DNS
name or an IP address, matched against the certificate's SAN); the server
accepts any client certificate the CA signed -- the CA is the trust boundary,
as in libvirt, so give each trust domain its own CA.  The directory is
``--tls-dir``/``tls_dir=``, else ``$XCSAVE_TLS_DIR``, else
:data:`DEFAULT_TLS_DIR`.  ``xcsave tls init`` makes one (xcsave.tlsinit).

End of stream: shutting down or closing :attr:`~TlsChannel.sock` sends TLS
close_notify; the peer's close_notify is a clean EOF on it.  A connection cut
without close_notify also shows as EOF on ``sock``, but the channel has
failed: :meth:`TlsChannel.aclose` raises :class:`TlsError` (ECONNRESET), and
:attr:`TlsChannel.error` is set before that EOF can be read.  So an EOF is a
clean end only if ``aclose()`` returns.

The helper is a supervised run (:class:`~xcsave.supervisor.HelperRun`):
cancelled, it is stopped (SIGTERM, grace, SIGKILL) and reaped like any other.
There is no blocking twin in :mod:`xcsave.sync`: a channel lives in an event
loop.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ._log import logger
from .errors import HelperDied, TlsError, XcsaveError
from .events import Event, LogEvent, TlsPeerEvent, TunnelStatsEvent
from .proto import XCSAVE_1
from .supervisor import HelperRun, HelperSpec, RunResult, high_fd

__all__ = [
    "CLOSE_TIMEOUT",
    "DEFAULT_TLS_DIR",
    "TLS_DIR_ENV",
    "TlsChannel",
    "TlsError",
    "default_tls_dir",
    "tls_client",
    "tls_server",
]

log = logger(__name__)

#: Where the CA, certificate and key live unless told otherwise.
DEFAULT_TLS_DIR: Final = "/etc/xcsave/tls"
#: The environment variable that overrides :data:`DEFAULT_TLS_DIR`.
TLS_DIR_ENV: Final = "XCSAVE_TLS_DIR"
#: How long :meth:`TlsChannel.aclose` waits for the peer's close_notify.
CLOSE_TIMEOUT: Final = 10.0
#: How long :func:`tls_client` and :func:`tls_server` wait for a handshake by default.
HANDSHAKE_TIMEOUT: Final = 10.0
#: The helper's own handshake deadline for ``handshake_timeout=None``: an hour.
_MAX_HANDSHAKE_MS: Final = 3600 * 1000
#: SO_SNDBUF of both ends of the plaintext socketpair.
_PLAIN_SNDBUF: Final = 1 << 20
#: How much longer than the helper's deadline we wait before stopping it.
_BACKSTOP_S: Final = 5.0


def default_tls_dir() -> Path:
    """``$XCSAVE_TLS_DIR`` if set and not empty, else :data:`DEFAULT_TLS_DIR`."""
    return Path(os.environ.get(TLS_DIR_ENV) or DEFAULT_TLS_DIR)


class _Watch:
    """What the tunnel run has told us: the peer, its stats, its last error."""

    def __init__(self, up: asyncio.Future[TlsPeerEvent]) -> None:
        self.up = up
        self.stats: TunnelStatsEvent | None = None
        self.last_error: LogEvent | None = None

    def __call__(self, ev: Event) -> None:
        if isinstance(ev, TlsPeerEvent):
            if not self.up.done():
                self.up.set_result(ev)
        elif isinstance(ev, TunnelStatsEvent):
            self.stats = ev
        elif isinstance(ev, LogEvent) and ev.level >= 8:  # ERROR or worse
            self.last_error = ev

    def error(self, exc: BaseException | None, fallback: str) -> TlsError:
        """One TlsError for a failed run: the helper's own line if it sent one
        (and, if the helper then died abnormally, how: a crash is no refusal)."""
        if self.last_error is not None:
            err = self.last_error.errno if self.last_error.errno > 0 else errno_mod.EIO
            text = self.last_error.message
            if isinstance(exc, HelperDied):
                status = f"signal {exc.signal}" if exc.signal else f"exit status {exc.returncode}"
                text += f" [the tunnel helper then died: {status}]"
            return TlsError(text, errno=err)
        err = getattr(exc, "errno", None) or errno_mod.EIO
        text = str(exc) if exc is not None else fallback
        return TlsError(text, errno=err)


@dataclass
class TlsChannel:
    """An authenticated, encrypted channel to one peer.

    ``sock`` is our end of the plaintext socketpair: non-blocking, use it like
    a connected TCP socket (``loop.sock_recv``/``sock_sendall``; ``MSG_PEEK``
    works, it is ``AF_UNIX``/``SOCK_STREAM``).  ``peer`` names the
    authenticated peer, e.g. ``"CN=hostb (192.0.2.7:4000)"``.
    """

    sock: socket.socket
    peer: str
    subject: str = ""  # the peer certificate's subject (RFC 2253)
    address: str = ""  # the peer's address:port
    version: str = ""  # "TLSv1.3"
    cipher: str = ""  # e.g. "TLS_AES_256_GCM_SHA384"
    _task: asyncio.Task[RunResult] | None = field(default=None, repr=False)
    _watch: _Watch | None = field(default=None, repr=False)
    _closed: bool = field(default=False, repr=False)

    @property
    def error(self) -> TlsError | None:
        """The tunnel's failure, as soon as the helper has reported it (else None)."""
        if self._watch is None or self._watch.last_error is None:
            return None
        return self._watch.error(None, "")

    @property
    def stats(self) -> TunnelStatsEvent | None:
        """Bytes each way, once the tunnel has ended."""
        return self._watch.stats if self._watch else None

    async def aclose(self) -> None:
        """Close ``sock``; let the tunnel flush, send close_notify, await the
        peer's (up to :data:`CLOSE_TIMEOUT` s) and be reaped.  Idempotent.

        Raises :class:`TlsError` if the tunnel failed after the handshake
        (e.g. ECONNRESET: the peer cut the stream without close_notify).
        """
        if self._closed:
            return
        self._closed = True
        self.sock.close()
        task, watch = self._task, self._watch
        if task is None or watch is None:
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await asyncio.shield(task)
        except TimeoutError:
            await _reap(task)
            raise TlsError(
                f"TLS channel with {self.peer}: the peer did not close it within "
                f"{CLOSE_TIMEOUT:g} s; tunnel stopped",
                errno=errno_mod.ETIMEDOUT,
            ) from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and not (current is not None and current.cancelling()):
                # Not us: the tunnel's run was cancelled (e.g. the loop's teardown).
                raise TlsError(
                    f"TLS channel with {self.peer}: the tunnel was stopped before it closed",
                    errno=errno_mod.ECANCELED,
                ) from None
            await _reap(task)
            raise
        except XcsaveError as e:
            raise watch.error(e, f"TLS channel with {self.peer} failed") from None

    async def __aenter__(self) -> TlsChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _reap(task: asyncio.Task[RunResult]) -> None:
    """Cancel the tunnel's run (it stops and reaps the helper) and wait for it."""
    task.cancel()
    await asyncio.wait({task})


def _retrieve(task: asyncio.Task[RunResult]) -> None:
    # The error reaches the caller through _Watch / aclose(), not the task.
    if not task.cancelled():
        task.exception()


async def tls_client(
    sock: socket.socket,
    *,
    tls_dir: str | os.PathLike[str] | None = None,
    server_name: str,
    handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
) -> TlsChannel:
    """TLS 1.3 client over the connected TCP socket ``sock``.

    ``server_name`` is the host the user named (a DNS name or an address):
    the server's certificate must carry it.  Raises :class:`TlsError` in one
    line when the handshake fails or times out (nothing is left running).
    The tunnel keeps its own copy of ``sock``: the caller may close its own.
    """
    if not server_name:
        raise ValueError("server_name must name the host the server's certificate is for")
    return await _start(sock, "client", tls_dir, server_name, handshake_timeout)


async def tls_server(
    sock: socket.socket,
    *,
    tls_dir: str | os.PathLike[str] | None = None,
    handshake_timeout: float | None = HANDSHAKE_TIMEOUT,
) -> TlsChannel:
    """TLS 1.3 server over the accepted TCP socket ``sock``: the client must
    present a certificate signed by the CA.  As :func:`tls_client` otherwise."""
    return await _start(sock, "server", tls_dir, None, handshake_timeout)


def _peer_label(sock: socket.socket) -> str:
    try:
        addr = sock.getpeername()
    except OSError:
        return "?"
    if sock.family == socket.AF_INET6:
        return f"[{addr[0]}]:{addr[1]}"
    if isinstance(addr, tuple):
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


async def _start(
    sock: socket.socket,
    role: str,
    tls_dir: str | os.PathLike[str] | None,
    server_name: str | None,
    handshake_timeout: float | None,
) -> TlsChannel:
    if handshake_timeout is not None and handshake_timeout <= 0:
        raise ValueError(f"handshake_timeout must be positive, not {handshake_timeout}")
    directory = Path(tls_dir) if tls_dir is not None else default_tls_dir()
    deadline_ms = (
        _MAX_HANDSHAKE_MS
        if handshake_timeout is None
        else max(1, min(_MAX_HANDSHAKE_MS, round(handshake_timeout * 1000)))
    )
    label = _peer_label(sock)
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    io_fd, io_owned = high_fd(sock.fileno())
    task: asyncio.Task[RunResult] | None = None
    try:
        ours.setblocking(False)
        for end in (ours, theirs):
            # A unix stream socket's writer may have SO_SNDBUF bytes in
            # flight (default ~208 KiB): room for a few of the tunnel's 256
            # KiB reads means fewer wake-ups on both sides.  Capped by
            # net.core.wmem_max; smaller is only slower.
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _PLAIN_SNDBUF)
        args = [
            "--xcsave-1",
            "tunnel",
            "--io-fd",
            str(io_fd),
            "--plain-fd",
            str(theirs.fileno()),
            "--role",
            role,
            "--tls-dir",
            os.fspath(directory),
            "--handshake-timeout-ms",
            str(deadline_ms),
        ]
        if server_name is not None:
            args += ["--peer-name", server_name]
        spec = HelperSpec(
            mode="tunnel",
            dialect=XCSAVE_1,
            args=tuple(args),
            pass_fds=(io_fd, theirs.fileno()),
            domain=f"tls {role} {label}",
        )
        up: asyncio.Future[TlsPeerEvent] = loop.create_future()
        watch = _Watch(up)
        task = asyncio.create_task(HelperRun(spec, on_event=watch).run())
        task.add_done_callback(_retrieve)
        backstop = None if handshake_timeout is None else handshake_timeout + _BACKSTOP_S
        waiting: set[asyncio.Future[Any]] = {up, task}
        done, _ = await asyncio.wait(waiting, timeout=backstop, return_when="FIRST_COMPLETED")
        if not up.done():
            if not done:  # the helper kept neither its deadline nor quiet
                await _reap(task)
                raise TlsError(
                    f"TLS handshake with {label} failed: no answer within {backstop:g} s",
                    errno=errno_mod.ETIMEDOUT,
                )
            exc = None if task.cancelled() else task.exception()
            raise watch.error(exc, f"TLS handshake with {label} failed") from None
        peer = up.result()
    except BaseException:
        if task is not None and not task.done():
            await _reap(task)
        ours.close()
        raise
    finally:
        # The helper has its copies now (or never will): without closing
        # ours, its EOF on the socketpair would never reach the parent side.
        theirs.close()
        if io_owned:
            os.close(io_fd)
    log.info("TLS with %s (%s): %s %s", peer.address, peer.subject, peer.version, peer.cipher)
    return TlsChannel(
        sock=ours,
        peer=f"{peer.subject} ({peer.address})",
        subject=peer.subject,
        address=peer.address,
        version=peer.version,
        cipher=peer.cipher,
        _task=task,
        _watch=watch,
    )
