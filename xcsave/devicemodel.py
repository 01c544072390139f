"""An HVM guest's device model (QEMU) in a save, as libxl drives it.

An HVM guest's image is two things: what libxc saves (memory, vCPUs, the
hypervisor's HVM context) and the state of its emulated devices, which only
QEMU holds.  libxl saves the second through QMP once the guest is suspended
(facts section 3.2) and carries it in its own records after the libxc image::

    libxl header | LIBXC_CONTEXT | <libxc image> | [EMULATOR_XENSTORE_DATA]
        | EMULATOR_CONTEXT | END

:func:`xcsave.api.save` does the same for ``device_model=``: QEMU's global
dirty log on and off through the ``switch_qemu_logdirty`` callback
(``xen-set-global-dirty-log``), and in the ``suspend`` callback, once the
guest is suspended, ``stop`` and ``xen-save-devices-state`` into a file in a
new private (0700) directory, read back (bounded, ``O_NOFOLLOW``) and
removed.  If the save then fails, ``cont`` gives QEMU its vCPUs back: the
device model is left as it was found, and resuming the guest itself stays
the toolstack's decision, as for every real domain.

EMULATOR_XENSTORE_DATA carries the device model's ``physmap`` keys in
xenstore (where QEMU mapped video RAM into the guest), relative to
``/local/domain/<dm domid>/device-model/<domid>/``; libxl writes the record
only when there are some (the lab's HVM guest, ``vga="none"``, has none).
:func:`read_physmap` reads them with xenstore-utils' commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_mod
import logging
import os
import re
import shutil
import signal
import stat
import tempfile
from dataclasses import dataclass
from typing import Final

from .errors import DeviceModelError, QmpError
from .qmp import TIMEOUT, Qmp

log = logging.getLogger(__name__)

#: The most device state taken from QEMU (EFBIG).  The state of a guest's
#: devices, RAM excluded (video RAM too: it is guest memory, mapped through
#: the physmap), is kilobytes: 6 KiB for the lab's HVM domU.
MAX_STATE: Final = 64 << 20
#: QEMU's savevm magic: how its device state file starts.
QEMU_MAGIC: Final = b"QEVM"
#: Where libxl starts a domain's device model's QMP socket.
QMP_PATH: Final = "/var/run/xen/qmp-libxl-{domid}"
#: The most physmap keys taken from xenstore, and bytes of their listing.
MAX_PHYSMAP_KEYS: Final = 1024
MAX_LISTING: Final = 1 << 20
#: After a failed xenstore-utils command is killed: how long its pipe may stay open.
KILL_DRAIN: Final = 1.0


@dataclass(frozen=True)
class DeviceModel:
    """Where an HVM guest's device model is, and what the save may take from it.

    ``qmp``: QEMU's QMP socket (:meth:`of_domain`: where libxl puts it).
    ``xenstore``: EMULATOR_XENSTORE_DATA pairs (relative keys, see
    :func:`read_physmap`); ``physmap_of``: a domid whose physmap keys are
    read from xenstore once its device state is saved, after those (as
    libxl; :meth:`of_domain` sets it).  No pairs at all: no such record, as
    libxl when there is no physmap.  ``timeout``: each QMP exchange's
    deadline (the device state's save included).  ``max_state``: the
    largest device state taken.
    ``workdir``: where the private directory QEMU writes into is made
    (default: the system's temporary directory).
    """

    qmp: str
    xenstore: tuple[tuple[str, str], ...] = ()
    physmap_of: int | None = None
    timeout: float = TIMEOUT
    max_state: int = MAX_STATE
    workdir: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.timeout <= 86400:
            raise ValueError(f"device model timeout must be in (0, 86400] s, not {self.timeout}")
        if not 0 < self.max_state <= 1 << 32:
            raise ValueError(f"max_state must be 1 byte to 4 GiB, not {self.max_state}")

    @classmethod
    def of_domain(cls, domid: int, *, qmp: str | None = None, **kw: object) -> DeviceModel:
        """The device model libxl started for ``domid`` (its QMP socket where
        libxl puts it unless ``qmp`` says), its physmap read from xenstore."""
        path = qmp or QMP_PATH.format(domid=domid)
        return cls(path, physmap_of=domid, **kw)  # type: ignore[arg-type]


class DeviceModelSave:
    """One save's dealings with the device model (:func:`xcsave.api.save`)."""

    def __init__(self, dm: DeviceModel, *, live: bool) -> None:
        self.dm = dm
        self.live = live
        self.state: bytes | None = None
        self.xenstore: list[tuple[bytes, bytes]] = [
            (k.encode(), v.encode()) for k, v in dm.xenstore
        ]
        self.stopped = False

    async def set_logdirty(self, domid: int, enable: int) -> int:
        """``switch_qemu_logdirty``: QEMU marks its own writes to guest memory
        in Xen's dirty log while the live rounds run.  Switching it on must
        work (a failure raises: the save stops, one line says why); switching
        it off at the end is logged when it fails and answered -1, as libxl
        does, so that it never hides the save's own outcome."""
        try:
            async with await Qmp.connect(self.dm.qmp, timeout=self.dm.timeout) as q:
                await q.execute("xen-set-global-dirty-log", {"enable": bool(enable)})
        except QmpError as e:
            if enable:
                raise
            log.error("domid %d: could not switch QEMU's dirty log off: %s", domid, e)
            return -1
        return 0

    async def save(self) -> None:
        """Stop QEMU's vCPUs and take its device state (the guest is suspended)."""
        async with await Qmp.connect(self.dm.qmp, timeout=self.dm.timeout) as q:
            self.stopped = True  # before the command: a stop that timed out may have stopped it
            await q.execute("stop")
            self.state = await self._devices_state(q)
        if self.dm.physmap_of is not None:
            physmap = await read_physmap(self.dm.physmap_of, timeout=self.dm.timeout)
            self.xenstore += [(k.encode(), v.encode()) for k, v in physmap]
        log.info(
            "device model state: %d bytes, %d xenstore keys", len(self.state), len(self.xenstore)
        )

    async def _devices_state(self, q: Qmp) -> bytes:
        # QEMU writes the file itself: into a directory only we (and root's
        # QEMU) can enter, made fresh, so nothing else can read the state,
        # plant a symlink at its name or swap the file.
        d = tempfile.mkdtemp(prefix="xcsave-dm-", dir=self.dm.workdir)
        path = os.path.join(d, "devices-state")
        try:
            await q.execute("xen-save-devices-state", {"filename": path, "live": self.live})
            return read_state(path, self.dm.max_state)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    async def undo(self) -> None:
        """After a failed save: ``cont`` if we stopped QEMU (logged, never
        raised: the save's own failure is the one to report)."""
        if not self.stopped:
            return
        try:
            async with await Qmp.connect(self.dm.qmp, timeout=self.dm.timeout) as q:
                await q.execute("cont")
            self.stopped = False
            log.info("device model running again (cont) after the failed save")
        except QmpError as e:
            log.error("could not restart the device model (QMP cont) after the failed save: %s", e)


def read_state(path: str, limit: int) -> bytes:
    """QEMU's device state file: a regular file (not a symlink), at most
    ``limit`` bytes, starting with QEMU's magic."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise DeviceModelError(
            f"reading the device model's state {path}", e.errno or errno_mod.EIO
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DeviceModelError(f"{path}: not a regular file", errno_mod.EINVAL)
        if st.st_size > limit:
            raise DeviceModelError(
                f"the device model's state is {st.st_size} bytes, over the {limit} taken",
                errno_mod.EFBIG,
            )
        chunks, n = [], 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - n)):
            chunks.append(chunk)
            n += len(chunk)
            if n > limit:  # grew after the fstat
                raise DeviceModelError(
                    f"the device model's state grew over the {limit} bytes taken", errno_mod.EFBIG
                )
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if not data.startswith(QEMU_MAGIC):
        raise DeviceModelError(
            f"the device model's state ({len(data)} bytes) does not start with QEMU's "
            f"magic {QEMU_MAGIC!r}",
            errno_mod.EINVAL,
        )
    return data


# ------------------------------------------------------------------ physmap

#: ``xenstore-ls -f``'s lines: ``/full/path = "value"``.
_LS_LINE = re.compile(r'^(/[^ ]+) = "(.*)"$')
_PHYSMAP_KEY = re.compile(r"^physmap/[0-9a-f]{1,16}/(start_addr|size|name)$")


async def read_physmap(
    domid: int, *, dm_domid: int = 0, timeout: float = TIMEOUT
) -> tuple[tuple[str, str], ...]:
    """The device model's physmap keys in xenstore, relative to
    ``/local/domain/<dm_domid>/device-model/<domid>/`` (EMULATOR_XENSTORE_DATA's
    pairs): ``()`` when it has none.  Read with ``xenstore-exists`` and
    ``xenstore-ls -f`` (xenstore-utils), each bounded in time and output."""
    base = f"/local/domain/{dm_domid}/device-model/{domid}"
    rc, _ = await _xenstore(["xenstore-exists", f"{base}/physmap"], timeout)
    if rc != 0:
        return ()
    rc, out = await _xenstore(["xenstore-ls", "-f", f"{base}/physmap"], timeout)
    if rc != 0:
        raise DeviceModelError(f"xenstore-ls {base}/physmap exited {rc}", errno_mod.EIO)
    pairs: list[tuple[str, str]] = []
    for line in out.splitlines():
        m = _LS_LINE.match(line)
        if m is None:
            raise DeviceModelError(
                f"xenstore-ls: an unexpected line {line[:80]!r}", errno_mod.EPROTO
            )
        key = m.group(1).removeprefix(base + "/")
        if _PHYSMAP_KEY.match(key) is None:
            continue  # a directory node (physmap/<id> = "") or a key libxl does not carry
        pairs.append((key, m.group(2)))
        if len(pairs) > MAX_PHYSMAP_KEYS:
            raise DeviceModelError(
                f"more than {MAX_PHYSMAP_KEYS} physmap keys under {base}", errno_mod.E2BIG
            )
    return tuple(pairs)


async def _xenstore(argv: list[str], timeout: float) -> tuple[int, str]:
    """Run one xenstore-utils command; its output bounded in size, the whole
    run in time.

    The command gets its own process group (``start_new_session``) so that a
    failure kills everything it started: a wrapper script's children would
    otherwise keep the pipe's write end open, and the read would never see
    end of file."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as e:
        raise DeviceModelError(f"running {argv[0]}", e.errno or errno_mod.EIO) from None
    assert proc.stdout is not None
    done = False
    try:
        async with asyncio.timeout(timeout):
            out = await _read_bounded(proc.stdout, MAX_LISTING, argv[0])
            rc = await proc.wait()
        done = True
    except TimeoutError:
        raise DeviceModelError(
            f"{argv[0]}: no answer in {timeout:g} s", errno_mod.ETIMEDOUT
        ) from None
    finally:
        if not done:
            await _kill_group(proc)
    return rc, out.decode(errors="replace")


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the command's process group, then reap it.

    asyncio (3.11) reports the exit only once the stdout pipe is closed too,
    and a reader we stopped reading (E2BIG) is paused on a full buffer: so
    the rest is read and dropped up to end of file, which comes at once
    with every writer dead.  Something outside the group holding the pipe
    (a daemon that left the session) gets KILL_DRAIN seconds; then the pipe
    is closed from our side."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group, not the pid: see _xenstore
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(KILL_DRAIN):
            while await proc.stdout.read(65536):
                pass
            await proc.wait()
    except TimeoutError:
        transport = getattr(proc, "_transport", None)  # no public close on Process
        if transport is not None:
            transport.close()
        await proc.wait()


async def _read_bounded(stream: asyncio.StreamReader, limit: int, what: str) -> bytes:
    """Everything up to end of file, refused (E2BIG) past ``limit`` bytes.
    (``StreamReader.read(n)`` returns what is buffered, not up to ``n``.)"""
    chunks: list[bytes] = []
    size = 0
    while chunk := await stream.read(65536):
        size += len(chunk)
        if size > limit:
            raise DeviceModelError(f"{what}: over {limit} bytes of output", errno_mod.E2BIG)
        chunks.append(chunk)
    return b"".join(chunks)


__all__ = [
    "MAX_STATE",
    "QMP_PATH",
    "DeviceModel",
    "DeviceModelError",
    "DeviceModelSave",
    "read_physmap",
    "read_state",
]
