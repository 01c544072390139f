"""The public operations: save and restore (asyncio; sync twins in xcsave.sync).

A domain is either a real Xen domain (``domid=N``: the ``xen`` backend, or
Xen 4.17's stock ``libxl-save-helper`` with ``dialect="xen-4.17"``) or a
simulated one (``sim=PATH``: the ``sim`` backend, xcsave-1 only).

The stream is an open fd (handed to the helper by number, never read here)
or a path: a save to a path writes a temporary file in the same directory,
fsyncs it and renames it into place only on success, so a failed save never
leaves a file under the final name.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Final, Literal

from . import proto
from .errors import BackendUnavailable
from .events import Event
from .policy import Policy
from .supervisor import (
    Callbacks,
    HelperSpec,
    RunResult,
    Supervisor,
    high_fd,
    xcs_args,
    xen_restore_args,
    xen_save_args,
)

__all__ = ["FORMATS", "STREAM_TYPES", "restore", "save"]

FORMATS: Final = ("libxc", "libxl", "xl")
STREAM_TYPES: Final[dict[str, int]] = {"plain": 0, "remus": 1, "colo": 2}
PAGE_SIZE: Final = 4096
XCFLAGS_LIVE: Final = 1
XCFLAGS_DEBUG: Final = 2

Dialect = Literal["xen-4.17", "xcsave-1"]
StreamArg = int | str | os.PathLike[str]


@contextlib.asynccontextmanager
async def _open_out(out: StreamArg) -> AsyncIterator[int]:
    """An fd to write the stream to; for a path, atomic create-fsync-rename."""
    if isinstance(out, int):
        yield out
        return
    final = Path(out)
    tmp = final.with_name(f".{final.name}.xcsave-tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    ok = False
    try:
        yield fd
        os.fsync(fd)
        ok = True
    finally:
        os.close(fd)
        if ok:
            os.replace(tmp, final)
            dfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


@contextlib.asynccontextmanager
async def _open_in(src: StreamArg) -> AsyncIterator[int]:
    if isinstance(src, int):
        yield src
        return
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _sim_arg(sim: str | os.PathLike[str] | None) -> str | None:
    if sim is None:
        return None
    from .sim import resolve

    return str(resolve(sim))


def _sim_save_undo(path: str) -> Callable[[int], None]:
    """After a failed save, put the source back as it was: running, log-dirty off.

    The helper does this itself when it fails; a helper that was killed
    (SIGKILL, a crash) mid-precopy cannot, and would leave the source's
    log-dirty on (writers paying for a dirty log nobody reads).
    """
    from .sim import info, set_logdirty, set_state

    before = info(path)

    def undo(pid: int) -> None:
        now = info(path)
        if now["logdirty"] and not before["logdirty"]:
            set_logdirty(path, False)
        if str(now["state"]) != str(before["state"]):
            set_state(path, str(before["state"]))

    return undo


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _sim_restore_undo(path: str) -> Callable[[int], None]:
    """After a failed restore, remove what a killed helper left: its partial
    domain, or the finished domain it had renamed into place just before it
    died (the run still failed: the caller must not find a domain there)."""
    target = Path(path)
    before = _file_id(target)

    def undo(pid: int) -> None:
        for partial in target.parent.glob(f".{target.name}.partial.{pid}.*"):
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
        if _file_id(target) not in (None, before):
            with contextlib.suppress(FileNotFoundError):
                target.unlink()

    return undo


def _check_dialect(dialect: str, *, sim: object, fmt: str) -> proto.Dialect:
    try:
        d = proto.DIALECTS[dialect]
    except KeyError:
        raise ValueError(
            f"unknown dialect {dialect!r}: expected one of {list(proto.DIALECTS)}"
        ) from None
    if d is proto.XEN_417 and sim is not None:
        raise ValueError("simulated domains need the xcsave-1 dialect (xcsave-helper)")
    if d is proto.XEN_417 and fmt != "libxc":
        raise ValueError(
            "the xen-4.17 helper writes and reads only bare libxc images (--format libxc)"
        )
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected one of {FORMATS}")
    return d


MAX_COPY_THREADS: Final = 64  # XCS_MAX_COPY_THREADS in csrc/core/xcs_engine.h


def _check_copy_threads(copy_threads: int, *, sim: object) -> None:
    if isinstance(copy_threads, bool) or not isinstance(copy_threads, int):
        raise TypeError(f"copy_threads must be an int, not {type(copy_threads).__name__}")
    if not 1 <= copy_threads <= MAX_COPY_THREADS:
        raise ValueError(f"copy_threads must be from 1 to {MAX_COPY_THREADS}, not {copy_threads}")
    if copy_threads != 1 and sim is None:
        raise ValueError(
            "copy_threads is a feature of xcsave's own engine: simulated domains "
            "(sim=...) only; libxc saves a Xen domain with one thread"
        )


def page_limit(max_pages: int, max_memory: int) -> int:
    """The helper's ``--max-pages`` for both limits (0: none given)."""
    if max_pages < 0 or max_memory < 0:
        raise ValueError("max_pages and max_memory must not be negative")
    by_memory = max_memory // PAGE_SIZE if max_memory else 0
    if max_memory and by_memory == 0:
        raise ValueError(f"max_memory={max_memory} is less than one page ({PAGE_SIZE} bytes)")
    limits = [n for n in (max_pages, by_memory) if n]
    return min(limits) if limits else 0


def _idle_ms(idle_timeout: float | None) -> int | None:
    """The helper's ``--idle-timeout-ms`` (None: no timeout)."""
    if idle_timeout is None:
        return None
    if not 0 < idle_timeout <= 86400:
        raise ValueError(f"idle_timeout must be in (0, 86400] seconds, not {idle_timeout}")
    return max(1, round(idle_timeout * 1000))


async def _run(
    spec: HelperSpec,
    callbacks: Callbacks,
    supervisor: Supervisor | None,
    on_event: Callable[[Event], object] | None,
    timeout: float | None,
) -> RunResult:
    if supervisor is not None:
        return await supervisor.run(spec, callbacks, on_event=on_event, timeout=timeout)
    async with Supervisor(max_parallel=1) as sup:
        return await sup.run(spec, callbacks, on_event=on_event, timeout=timeout)


async def save(
    out: StreamArg,
    *,
    domid: int | None = None,
    sim: str | os.PathLike[str] | None = None,
    live: bool = False,
    fmt: str = "libxc",
    dialect: Dialect = "xcsave-1",
    helper: str | os.PathLike[str] | None = None,
    callbacks: Callbacks | None = None,
    policy: Policy | None = None,
    stream_type: str = "plain",
    checkpoints: int = 0,
    interval_ms: int = 0,
    xl_config: str | os.PathLike[str] | None = None,
    debug: bool = False,
    timeout: float | None = None,
    on_event: Callable[[Event], object] | None = None,
    supervisor: Supervisor | None = None,
    copy_threads: int = 1,
    idle_timeout: float | None = None,
) -> RunResult:
    """Save a domain into ``out`` (fd or path) through a helper.

    ``policy`` decides each live round (xcsave-1 only); without it the helper
    uses Xen's default (5 rounds / 50 dirty pages).  ``copy_threads`` > 1
    (simulated domains, xcsave-1) writes page data with that many threads
    when ``out`` is a regular file (a path, or a file fd without O_APPEND);
    into a pipe or socket it changes nothing.  ``idle_timeout`` (seconds,
    xcsave-1): a pipe or socket ``out`` whose reader takes nothing for that
    long fails the save with ETIMEDOUT (see :func:`restore`).  Raises
    :class:`~xcsave.HelperFailed` (with ``.errno``) when the save fails,
    :class:`~xcsave.HelperDied` when the helper does not finish the protocol.
    """
    if (domid is None) == (sim is None):
        raise ValueError("give exactly one of domid= or sim=")
    d = _check_dialect(dialect, sim=sim, fmt=fmt)
    _check_copy_threads(copy_threads, sim=sim)
    cbs = replace(callbacks) if callbacks is not None else Callbacks()
    if policy is not None:
        if d is proto.XEN_417:
            raise ValueError("the xen-4.17 dialect has no precopy_policy message")
        cbs.precopy_policy = policy
    if domid is not None and cbs.suspend is None:
        raise ValueError(
            "saving a Xen domain needs a suspend callback (something that suspends the guest)"
        )
    if stream_type not in STREAM_TYPES:
        raise ValueError(f"unknown stream type {stream_type!r}")
    cbflags = proto.cbflags_for(d, cbs.installed() - {"restore_results"})
    xcflags = (XCFLAGS_LIVE if live else 0) | (XCFLAGS_DEBUG if debug else 0)
    st = STREAM_TYPES[stream_type]
    helper_p = Path(helper) if helper is not None else None
    sim_path = _sim_arg(sim)
    async with _open_out(out) as fd:
        io_fd, owned = high_fd(fd)
        try:
            if d is proto.XEN_417:
                assert domid is not None
                args = xen_save_args(
                    io_fd, domid, xcflags=xcflags, cbflags=cbflags, stream_type=st
                )
                backend = None
            else:
                backend = "sim" if sim is not None else "xen"
                args = xcs_args(
                    "save",
                    backend,
                    io_fd,
                    {
                        "domid": domid,
                        "sim": _sim_arg(sim),
                        "flags": xcflags,
                        "cbflags": cbflags,
                        "stream_type": st,
                        "format": fmt,
                        "checkpoints": checkpoints or None,
                        "interval_ms": interval_ms or None,
                        "xl_config": os.fspath(xl_config) if xl_config is not None else None,
                        "copy_threads": copy_threads if copy_threads != 1 else None,
                        "idle_timeout_ms": _idle_ms(idle_timeout),
                    },
                )
            spec = HelperSpec(
                mode="save",
                dialect=d,
                args=args,
                pass_fds=(io_fd,),
                domain=f"domid {domid}" if domid is not None else str(sim_path),
                domid=domid,
                backend=backend,
                helper=helper_p,
                on_failure=_sim_save_undo(sim_path) if sim_path else None,
            )
            return await _run(spec, cbs, supervisor, on_event, timeout)
        finally:
            if owned:
                os.close(io_fd)


async def restore(
    src: StreamArg,
    *,
    domid: int | None = None,
    sim: str | os.PathLike[str] | None = None,
    fmt: str = "libxc",
    dialect: Dialect = "xcsave-1",
    helper: str | os.PathLike[str] | None = None,
    callbacks: Callbacks | None = None,
    stream_type: str = "plain",
    store_evtchn: int = 0,
    store_domid: int = 0,
    console_evtchn: int = 0,
    console_domid: int = 0,
    max_pages: int = 0,
    max_memory: int = 0,
    idle_timeout: float | None = None,
    legacy_width: int | None = None,
    legacy_guest: str | None = None,
    dm_out: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
    on_event: Callable[[Event], object] | None = None,
    supervisor: Supervisor | None = None,
) -> RunResult:
    """Restore a domain from ``src`` (fd or path); ``.store_gfn``/``.console_gfn`` in the result.

    A restore reads exactly its stream and nothing after it, so a caller may
    go on reading the same fd (as libxl does with its own records).  For a
    simulated domain the target file is created, and removed again if the
    restore fails: no half-built domain is left behind.

    Bounds on what the stream can make us do (xcsave-1): ``max_memory``
    (bytes) and ``max_pages`` refuse, in one line and before anything is
    allocated, a stream whose domain is larger (ERANGE); the smaller of the
    two wins, 0 means the helper's own cap (64 GiB for a simulated domain).
    ``idle_timeout`` (seconds): once the stream has started, a pipe or
    socket ``src`` that stays silent that long fails the restore with
    ETIMEDOUT (a regular file never waits).
    """
    if (domid is None) == (sim is None):
        raise ValueError("give exactly one of domid= or sim=")
    d = _check_dialect(dialect, sim=sim, fmt=fmt)
    if stream_type not in STREAM_TYPES:
        raise ValueError(f"unknown stream type {stream_type!r}")
    if legacy_width is not None and sim is None:
        raise BackendUnavailable("legacy streams restore into simulated domains only")
    cbs = replace(callbacks) if callbacks is not None else Callbacks()
    cbflags = proto.cbflags_for(d, cbs.installed() | {"restore_results"})
    st = STREAM_TYPES[stream_type]
    helper_p = Path(helper) if helper is not None else None
    sim_path = _sim_arg(sim)
    async with _open_in(src) as fd:
        io_fd, owned = high_fd(fd)
        try:
            if d is proto.XEN_417:
                assert domid is not None
                args = xen_restore_args(
                    io_fd,
                    domid,
                    cbflags=cbflags,
                    store_evtchn=store_evtchn,
                    store_domid=store_domid,
                    console_evtchn=console_evtchn,
                    console_domid=console_domid,
                    stream_type=st,
                )
                backend = None
            else:
                backend = "sim" if sim is not None else "xen"
                args = xcs_args(
                    "restore",
                    backend,
                    io_fd,
                    {
                        "domid": domid,
                        "sim": _sim_arg(sim),
                        "cbflags": cbflags,
                        "stream_type": st,
                        "format": fmt,
                        "store_evtchn": store_evtchn,
                        "store_domid": store_domid,
                        "console_evtchn": console_evtchn,
                        "console_domid": console_domid,
                        "max_pages": page_limit(max_pages, max_memory) or None,
                        "idle_timeout_ms": _idle_ms(idle_timeout),
                        "legacy_width": legacy_width,
                        "legacy_guest": legacy_guest,
                        "dm_out": os.fspath(dm_out) if dm_out is not None else None,
                    },
                )
            spec = HelperSpec(
                mode="restore",
                dialect=d,
                args=args,
                pass_fds=(io_fd,),
                domain=f"domid {domid}" if domid is not None else str(sim_path),
                domid=domid,
                backend=backend,
                helper=helper_p,
                on_failure=_sim_restore_undo(sim_path) if sim_path else None,
            )
            return await _run(spec, cbs, supervisor, on_event, timeout)
        finally:
            if owned:
                os.close(io_fd)
