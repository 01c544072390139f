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
    ├── TlsError             a TLS channel failed: handshake refused or timed out,
    │                        stream cut without close_notify (.errno)
    ├── MigrationError       a migration (either end) failed (.errno)
    │   ├── HandshakeError   the peer broke xl's handshake: closed, wrong bytes, late
    │   └── MigrationInDoubt the link broke after GO: the receiver may run the domain
    └── Terminated           a command was stopped by SIGTERM (after cleaning up)

    OSError
    └── DomainBusy           another operation holds the domain's lock (EBUSY)

    UsageError               the command line is wrong (the CLI exits 2)
    SshdUnavailable          no sshd here for the tests' private server (RuntimeError)

Every exception xcsave defines is here; the modules that raised them first
re-export them (``xcsave.migrate.MigrationError``, ``xcsave.lock.DomainBusy``,
``xcsave.cli.UsageError`` ...).  :func:`oserror_text` and :func:`errno_text`
are the one way an errno becomes text.

Spawn failures stay the ``OSError`` that ``asyncio.create_subprocess_exec``
raises (CPython's errpipe makes it exact).
"""

from __future__ import annotations

import errno as _errno
import os
import sys

__all__ = [
    "BackendUnavailable",
    "CallbackError",
    "DeviceModelError",
    "DomainBusy",
    "HandshakeError",
    "HelperDied",
    "HelperError",
    "HelperFailed",
    "HelperTimeout",
    "MigrationError",
    "MigrationInDoubt",
    "NetlabUnavailable",
    "ProtocolError",
    "QmpError",
    "SshdUnavailable",
    "StreamError",
    "Terminated",
    "TlsError",
    "UsageError",
    "XcsaveError",
    "errno_name",
    "errno_text",
    "error_text",
    "oserror_text",
    "with_errno",
]


def errno_name(err: int | None) -> str:
    """``EIO`` for 5; ``errno 999`` for numbers without a name."""
    if not err:
        return "0"
    return _errno.errorcode.get(err, f"errno {err}")


def errno_text(err: int, strerror: str | None = None) -> str:
    """``Input/output error (EIO)``: the errno's text (``strerror`` when the
    error carries its own) and its name."""
    return f"{strerror or os.strerror(err)} ({errno_name(err)})"


def with_errno(message: str, err: int) -> str:
    """``message`` with ``err`` said once: a message that already names it
    (``... (ENOSPC)``) stays; one that ends with its text gets the name;
    any other gets ``: text (ENAME)``.  Helpers' lines often carry the
    strerror already ("writing PAGE_DATA: No space left on device")."""
    name = errno_name(err)
    if message.endswith(f"({name})"):
        return message
    if message.endswith(os.strerror(err)):
        return f"{message} ({name})"
    return f"{message}: {errno_text(err)}"


def oserror_text(e: OSError, *, filename: bool = True) -> str:
    """One line for an ``OSError``: ``FILE: text (ENAME)`` (without ``FILE: ``
    when it has none, or ``filename`` is False); one without an errno is its
    own text."""
    where = f"{e.filename}: " if filename and e.filename is not None else ""
    if e.errno:
        return where + errno_text(e.errno, e.strerror)
    return where + (str(e) or type(e).__name__)


def error_text(e: BaseException) -> str:
    """``e`` as the middle of a one-line message: an ``OSError`` as
    :func:`oserror_text`, a cancellation as ``cancelled``, anything else as
    its own text (or its class's name when it has none)."""
    if isinstance(e, OSError):
        return oserror_text(e)
    aio = sys.modules.get("asyncio")  # not loaded: e cannot be its CancelledError
    if aio is not None and isinstance(e, aio.CancelledError):
        return "cancelled"
    return str(e) or type(e).__name__


class XcsaveError(Exception):
    """Base class of everything xcsave raises on purpose."""


class ProtocolError(XcsaveError):
    """The helper sent something the protocol does not allow."""


class StreamError(XcsaveError):
    """An invalid migration stream: where (offset, record) and why."""

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

    def __init__(self, message: str, *, retval: int, errno: int, **kw: object) -> None:
        self.retval = retval
        self.errno = errno
        text = with_errno(message, errno) if errno else message
        super().__init__(text, **kw)  # type: ignore[arg-type]


class HelperDied(HelperError):
    """The helper exited or was killed before finishing the protocol."""

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


class CallbackError(HelperError):
    """A callback supplied by the caller raised; the original is ``__cause__``."""


class BackendUnavailable(XcsaveError):
    """The requested backend was not built into this xcsave, or cannot load."""


class TlsError(XcsaveError):
    """A TLS channel (:mod:`xcsave.tls`) failed; ``errno`` says how.

    EACCES: a certificate was refused (ours by the peer, or the peer's by
    us); ETIMEDOUT: no complete handshake within the deadline; ECONNRESET:
    the peer ended the stream without close_notify; EPROTO: the peer does
    not speak TLS 1.3; EPERM: our key.pem is readable by others.
    """

    def __init__(self, message: str, *, errno: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.errno = errno

    def __str__(self) -> str:
        return f"{self.message} ({errno_name(self.errno)})" if self.errno else self.message


class QmpError(XcsaveError):
    """A device model's QMP socket (:mod:`xcsave.qmp`) failed us: ``errno``
    says how (ETIMEDOUT, EMSGSIZE, EPROTO, ECONNREFUSED...; EREMOTEIO for an
    ``error`` reply, whose QMP class is ``qmp_class``)."""

    def __init__(self, message: str, err: int, qmp_class: str | None = None) -> None:
        super().__init__(with_errno(message, err))
        self.errno = err
        self.qmp_class = qmp_class


class DeviceModelError(XcsaveError):
    """An HVM guest's device state could not be saved or read
    (:mod:`xcsave.devicemodel`); ``errno`` says why."""

    def __init__(self, message: str, err: int) -> None:
        super().__init__(with_errno(message, err))
        self.errno = err


class MigrationError(XcsaveError):
    """A migration (either end) failed; the message says what state each copy is in."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class HandshakeError(MigrationError):
    """The peer broke the handshake: closed early, sent the wrong bytes, or was late."""


class MigrationInDoubt(MigrationError):
    """The connection broke after GO: the receiver may or may not run the domain.

    The sender's copy is left suspended (never two running copies); an
    operator must look at the receiver before resuming either copy.
    """


class Terminated(XcsaveError):
    """The command was stopped by SIGTERM (after cleaning up)."""


class DomainBusy(OSError):
    """Another operation holds the domain's lock (``errno`` EBUSY)."""

    def __init__(self, domain: str, holder: int | None) -> None:
        who = f" (pid {holder})" if holder is not None else ""
        super().__init__(
            _errno.EBUSY,
            f"domain {domain} is busy: another xcsave operation{who} holds its lock",
        )
        self.domain = domain
        self.holder = holder

    def __str__(self) -> str:
        return errno_text(_errno.EBUSY, self.strerror)


class UsageError(Exception):
    """Bad arguments: the CLI exits 2 with the message."""


class SshdUnavailable(RuntimeError):
    """No sshd (or ssh, ssh-keygen) here, or it would not start: the reason."""


class NetlabUnavailable(XcsaveError):
    """xcsave.netlab cannot make its two hosts here (not root, no iproute2, no tbf): why."""


#: What xcsave exports names itself xcsave.<Name>, as users import it.
for _cls in (
    XcsaveError,
    ProtocolError,
    StreamError,
    HelperError,
    HelperFailed,
    HelperDied,
    HelperTimeout,
    CallbackError,
    BackendUnavailable,
    TlsError,
    MigrationError,
    HandshakeError,
    MigrationInDoubt,
    DomainBusy,
):
    _cls.__module__ = "xcsave"
