"""xcsave's exceptions (psutil style: one small hierarchy, shown as ``xcsave.X``).

::

    XcsaveError
    ├── ProtocolError        malformed/unknown/oversized frame, hello mismatch
    ├── StreamError          an invalid migration stream (offset, record, reason)
    ├── HelperError          one helper run went wrong (.domid, .pid, .helper)
    │   ├── HelperFailed     complete(retval != 0, errno): .retval, .errno
    │   ├── HelperDied       exited without complete/results: .returncode, .signal
    │   ├── HelperTimeout    the operation's deadline passed; the helper was stopped
    │   └── CallbackError    a caller's callback raised (chained with ``from``)
    ├── BackendUnavailable   a backend that was not built or cannot be loaded
    └── TlsError             a TLS channel failed: handshake refused or timed out,
                             stream cut without close_notify (.errno)

Spawn failures stay the ``OSError`` that ``asyncio.create_subprocess_exec``
raises (CPython's errpipe makes it exact).
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "BackendUnavailable",
    "CallbackError",
    "HelperDied",
    "HelperError",
    "HelperFailed",
    "HelperTimeout",
    "ProtocolError",
    "StreamError",
    "TlsError",
    "XcsaveError",
    "errno_name",
]


def errno_name(err: int | None) -> str:
    """``EIO`` for 5; ``errno 999`` for numbers without a name."""
    if not err:
        return "0"
    return _errno.errorcode.get(err, f"errno {err}")


class XcsaveError(Exception):
    """Base class of everything xcsave raises on purpose."""

    __module__ = "xcsave"


class ProtocolError(XcsaveError):
    """The helper sent something the protocol does not allow."""

    __module__ = "xcsave"


class StreamError(XcsaveError):
    """An invalid migration stream: where (offset, record) and why."""

    __module__ = "xcsave"

    def __init__(self, message: str, offset: int | None = None, record: str | None = None) -> None:
        super().__init__(message)
        self.offset = offset
        self.record = record
        self.reason = message

    def __str__(self) -> str:
        where = []
        if self.offset is not None:
            where.append(f"offset {self.offset}")
        if self.record:
            where.append(f"record {self.record}")
        return (", ".join(where) + ": " if where else "") + self.reason


class HelperError(XcsaveError):
    """Something about one helper run."""

    __module__ = "xcsave"

    def __init__(
        self,
        message: str,
        *,
        domid: int | None = None,
        pid: int | None = None,
        helper: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.domid = domid
        self.pid = pid
        self.helper = helper

    def __str__(self) -> str:
        return self.message


class HelperFailed(HelperError):
    """The helper completed with ``retval != 0``; ``errno`` says why."""

    __module__ = "xcsave"

    def __init__(self, message: str, *, retval: int, errno: int, **kw: object) -> None:
        self.retval = retval
        self.errno = errno
        text = f"{message}: {os.strerror(errno)} ({errno_name(errno)})" if errno else message
        super().__init__(text, **kw)  # type: ignore[arg-type]


class HelperDied(HelperError):
    """The helper exited or was killed before finishing the protocol."""

    __module__ = "xcsave"

    def __init__(self, message: str, *, returncode: int | None, **kw: object) -> None:
        self.returncode = returncode
        self.signal: int | None = (
            -returncode if returncode is not None and returncode < 0 else None
        )
        if self.signal is not None:
            import signal as _signal  # here, not at import: it loads enum

            try:
                signame = _signal.Signals(self.signal).name
            except ValueError:
                signame = f"signal {self.signal}"
            message = f"{message} (killed by {signame})"
        elif returncode:
            message = f"{message} (exit status {returncode})"
        super().__init__(message, **kw)  # type: ignore[arg-type]


class HelperTimeout(HelperError):
    """The operation's deadline passed; the helper was stopped and reaped."""

    __module__ = "xcsave"


class CallbackError(HelperError):
    """A callback supplied by the caller raised; the original is ``__cause__``."""

    __module__ = "xcsave"


class BackendUnavailable(XcsaveError):
    """The requested backend was not built into this xcsave, or cannot load."""

    __module__ = "xcsave"


class TlsError(XcsaveError):
    """A TLS channel (:mod:`xcsave.tls`) failed; ``errno`` says how.

    EACCES: a certificate was refused (ours by the peer, or the peer's by
    us); ETIMEDOUT: no complete handshake within the deadline; ECONNRESET:
    the peer ended the stream without close_notify; EPROTO: the peer does
    not speak TLS 1.3; EPERM: our key.pem is readable by others.
    """

    __module__ = "xcsave"

    def __init__(self, message: str, *, errno: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno

    def __str__(self) -> str:
        return f"{self.message} ({errno_name(self.errno)})" if self.errno else self.message
