"""A QMP (QEMU Machine Protocol) client: what a toolstack asks a device model.

An HVM guest's devices live in QEMU (Debian's ``qemu-system-xen``), which
libxl starts with a QMP socket at ``/var/run/xen/qmp-libxl-<domid>``.  QMP
is newline-delimited JSON over that socket: QEMU greets (``{"QMP": ...}``),
the client enters command mode (``qmp_capabilities``), then each command
(``{"execute": NAME, "arguments": {...}, "id": N}``) gets one
``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}`` with the
same id; asynchronous ``{"event": ...}`` lines may come in between.

The socket's far end is trusted no more than any peer: every read has a
deadline (a device model that goes silent fails with ETIMEDOUT), a line is
at most :data:`MAX_LINE` bytes (EMSGSIZE), at most :data:`MAX_SKIPPED`
events are skipped while waiting for one reply, and anything that is not
the protocol (not JSON, not an object, a reply to another id) fails the
command with EPROTO.  Every failure is one :class:`QmpError` line naming
the socket and the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_mod
import itertools
import json
import logging
import os
import stat
from types import TracebackType
from typing import Any, Final, Self

from .errors import QmpError

log = logging.getLogger(__name__)

#: The longest line taken from a device model (a reply to any command we
#: send is a few hundred bytes; QEMU's greeting about one kilobyte).
MAX_LINE: Final = 1 << 20
#: Events skipped while waiting for one reply, before giving up (EPROTO).
MAX_SKIPPED: Final = 256
#: Each read's deadline, unless the caller gives one.
TIMEOUT: Final = 30.0


class Qmp:
    """One QMP session (an async context manager)::

    async with await Qmp.connect("/var/run/xen/qmp-libxl-5") as q:
        await q.execute("stop")
    """

    def __init__(
        self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self.path = path
        self.timeout = timeout
        self.greeting: dict[str, Any] = {}
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], *, timeout: float = TIMEOUT) -> Self:
        """Connect to ``path``, read the greeting and enter command mode.

        ``path`` must be a socket itself: a symlink (which could point
        anywhere) is refused with ELOOP, anything else with ENOTSOCK."""
        name = os.fspath(path)
        try:
            st = os.lstat(name)
        except OSError as e:
            raise QmpError(f"device model socket {name}", e.errno or errno_mod.EIO) from None
        if stat.S_ISLNK(st.st_mode):
            raise QmpError(f"device model socket {name} is a symlink", errno_mod.ELOOP)
        if not stat.S_ISSOCK(st.st_mode):
            raise QmpError(f"device model socket {name} is not a socket", errno_mod.ENOTSOCK)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(name, limit=MAX_LINE), timeout
            )
        except TimeoutError:
            raise QmpError(f"connecting to {name}", errno_mod.ETIMEDOUT) from None
        except OSError as e:
            raise QmpError(f"connecting to {name}", e.errno or errno_mod.EIO) from None
        q = cls(name, reader, writer, timeout)
        try:
            q.greeting = await q._read("the greeting")
            if "QMP" not in q.greeting:
                raise QmpError(f"{name}: the greeting is not QMP's", errno_mod.EPROTO)
            await q.execute("qmp_capabilities")
        except BaseException:
            await q.close()
            raise
        return q

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the socket (never raises: the session's outcome stands)."""
        self._writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self._writer.wait_closed(), self.timeout)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run ``command``; its ``return`` value, or :class:`QmpError`."""
        ident = next(self._ids)
        msg: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        log.debug("qmp %s: -> %s", self.path, msg)
        try:
            self._writer.write(json.dumps(msg).encode() + b"\n")
            await asyncio.wait_for(self._writer.drain(), self.timeout)
        except TimeoutError:
            raise QmpError(f"{self.path}: sending {command}", errno_mod.ETIMEDOUT) from None
        except OSError as e:
            raise QmpError(f"{self.path}: sending {command}", e.errno or errno_mod.EIO) from None
        for _ in range(MAX_SKIPPED + 1):
            reply = await self._read(command)
            if "event" in reply:
                log.debug("qmp %s: event %s", self.path, reply.get("event"))
                continue
            if reply.get("id") != ident:
                raise QmpError(
                    f"{self.path}: {command}: a reply to id {reply.get('id')!r}, expected {ident}",
                    errno_mod.EPROTO,
                )
            if "return" in reply:
                return reply["return"]
            err = reply.get("error")
            if isinstance(err, dict):
                cls_ = str(err.get("class", "GenericError"))
                raise QmpError(
                    f"{self.path}: {command} failed: {cls_}: {err.get('desc', '')}",
                    errno_mod.EREMOTEIO,
                    cls_,
                )
            raise QmpError(f"{self.path}: {command}: a reply with no return", errno_mod.EPROTO)
        raise QmpError(
            f"{self.path}: {command}: no reply among {MAX_SKIPPED} events", errno_mod.EPROTO
        )

    async def _read(self, what: str) -> dict[str, Any]:
        try:
            line = await asyncio.wait_for(self._reader.readline(), self.timeout)
        except TimeoutError:
            raise QmpError(
                f"{self.path}: {what}: no answer in {self.timeout:g} s", errno_mod.ETIMEDOUT
            ) from None
        except ValueError:  # StreamReader's "limit exceeded"
            raise QmpError(
                f"{self.path}: {what}: a line over {MAX_LINE} bytes", errno_mod.EMSGSIZE
            ) from None
        except OSError as e:
            raise QmpError(f"{self.path}: {what}", e.errno or errno_mod.EIO) from None
        if not line.endswith(b"\n"):
            raise QmpError(f"{self.path}: {what}: the device model closed", errno_mod.ECONNRESET)
        try:
            obj = json.loads(line)
        except ValueError:
            raise QmpError(f"{self.path}: {what}: not JSON", errno_mod.EPROTO) from None
        if not isinstance(obj, dict):
            raise QmpError(f"{self.path}: {what}: not a JSON object", errno_mod.EPROTO)
        log.debug("qmp %s: <- %s", self.path, line[:200])
        return obj


__all__ = ["MAX_LINE", "MAX_SKIPPED", "TIMEOUT", "Qmp", "QmpError"]
