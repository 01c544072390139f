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

import asyncio
import contextlib
import errno as errno_mod
import inspect
import os
import secrets
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Literal

from . import files, formats, libxlframe, lock, proto
from ._log import logger
from .defaults import MAX_COPY_THREADS, PAGE_SIZE
from .devicemodel import DeviceModel, DeviceModelSave
from .errors import BackendUnavailable, DeviceModelError, StreamError
from .events import Event, ThrottleEvent
from .policy import Policy
from .predict import Costs, Plan
from .supervisor import (
    Callbacks,
    HelperSpec,
    Reply,
    RunResult,
    Supervisor,
    high_fd,
    xcs_args,
    xen_restore_args,
    xen_save_args,
)
from .throttle import Throttle, for_domain, uncancellable

__all__ = ["FORMATS", "STREAM_TYPES", "SimTarget", "plan", "restore", "save"]

log = logger("xcsave.api")

FORMATS: Final = formats.STREAM
STREAM_TYPES: Final[dict[str, int]] = {name: n for n, name in enumerate(formats.STREAM_TYPES)}
XCFLAGS_LIVE: Final = 1
XCFLAGS_DEBUG: Final = 2

Dialect = Literal["xen-4.17", "xcsave-1"]
StreamArg = int | str | os.PathLike[str]


def _check_out(out: StreamArg) -> None:
    """Refuse an ``out`` path we could never rename an image onto, before the
    domain is touched: a directory (EISDIR)."""
    if not isinstance(out, int) and os.path.isdir(out):
        raise IsADirectoryError(
            errno_mod.EISDIR, "the output is a directory, not a file", os.fspath(out)
        )


def _sync_committed(final: Path, done: str) -> None:
    """Make the rename of ``final`` into place durable.  It is in place, so
    the operation (``done``: "saved", "restored") succeeded whatever the
    fsync says: a failure is only a warning."""
    try:
        files.fsync_dir(final.parent)
    except OSError as e:
        log.warning("%s %s, but could not fsync its directory: %s", done, final, e)


class _Out:
    """Where a save writes: ``fd``, and for a path the commit of the image.

    :meth:`commit` fsyncs the private temporary file and renames it into
    place: the commit point.  The save passes it to the supervisor as
    ``on_commit``, which runs it when the helper reports success and only
    then answers the helper (see :class:`~xcsave.supervisor.HelperSpec`).
    """

    def __init__(self, fd: int, final: Path | None = None, tmp: Path | None = None) -> None:
        self.fd = fd
        self.final = final
        self.tmp = tmp
        self.committed = False

    @property
    def on_commit(self) -> Callable[[], None] | None:
        return self.commit if self.final is not None else None

    def commit(self) -> None:
        """fsync + rename into place (no await: see :func:`_open_out`)."""
        assert self.final is not None
        assert self.tmp is not None
        if self.committed:
            return
        with files.named_as(self.final):
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            os.replace(self.tmp, self.final)
        self.committed = True
        _sync_committed(self.final, "saved")


@contextlib.asynccontextmanager
async def _open_out(out: StreamArg, undo: Callable[[], None] | None = None) -> AsyncIterator[_Out]:
    """Where to write the stream; for a path, a private temporary file
    beside it that :meth:`_Out.commit` renames into place.

    The commit normally runs inside the helper run (``on_commit``), between
    the helper's ``complete`` and our reply to it; if the block ends without
    error and nothing committed yet, it commits here.  If the block fails,
    or that late commit does, the temporary file is removed and ``undo`` (if
    given, called only when the failure is the late commit's own: a failed
    helper run has undone its work already) puts the source back; the
    exception goes on.  Nothing awaits between a commit and the block's
    end, so a cancellation either lands before it (no image) or not at all
    (the image is in place; the supervisor reports a committed run as a
    success, see :meth:`~xcsave.supervisor.HelperRun.run`).
    """
    if isinstance(out, int):
        yield _Out(out)
        return
    final = Path(out)
    _sweep_dead(final, "xcsave-tmp", "a save")  # a SIGKILLed save's temporary
    tmp = final.with_name(f".{final.name}.xcsave-tmp.{os.getpid()}.{secrets.token_hex(4)}")
    with files.named_as(out):  # the temporary is ours: name the caller's path
        fd = files.create_private(tmp, os.O_WRONLY)
    o = _Out(fd, final, tmp)
    try:
        yield o
        if not o.committed:
            try:
                o.commit()
            except BaseException:
                if undo is not None:
                    try:
                        undo()
                    except Exception:  # the commit's own error is the one to report
                        log.exception(
                            "putting the source back after the failed commit of %s", final
                        )
                raise
    finally:
        if o.fd >= 0:
            os.close(o.fd)
        if not o.committed:
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


def _stream_name(src: StreamArg) -> str:
    if isinstance(src, int):
        return "<stdin>" if src == 0 else f"fd {src}"
    return os.fspath(src)


def restore_format(fd: int, fmt: str, *, legacy: bool, name: str) -> str:
    """The format a restore reads from ``fd``: ``fmt``, or for ``auto`` the
    one the stream's first 8 bytes announce (``xcsave._ext.sniff_format``,
    the verifier's own detection).  Only a regular file is looked at (a
    ``pread`` that moves nothing); a pipe or socket cannot be peeked at
    without taking its bytes, so ``auto`` reads it as ``libxc``, save's
    default.  Refused in one line that says which flags to use
    (``StreamError``): a file that is another known format than ``fmt``
    says; for ``auto``, a file with no magic (a pre-4.6 image?) or too
    short for one.  Anything else is the helper's to judge."""
    if legacy:
        return "libxc"  # the legacy reader's input; the format flag does not apply
    from . import _ext  # here: the API imports light until a helper runs

    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return "libxc" if fmt == "auto" else fmt
    head = os.pread(fd, 8, os.lseek(fd, 0, os.SEEK_CUR))
    found = _ext.sniff_format(head)
    if found in FORMATS and fmt not in ("auto", found):
        raise StreamError(
            f"{name}: {'an' if found == 'xl' else 'a'} {found} stream, not {fmt}: "
            f"restore it with --format {found} (or --format auto)"
        )
    if fmt != "auto":
        return fmt
    if found == "legacy":
        raise StreamError(
            f"{name}: not an xl, libxl or libxc stream; if it is a pre-4.6 (legacy) image, "
            "restore it with --legacy --width 32|64 --guest pv|hvm"
        )
    if found is None:
        raise StreamError(f"{name}: {len(head)} bytes: too short for a stream")
    return found


def _sim_arg(sim: str | os.PathLike[str] | None) -> str | None:
    return None if sim is None else str(_resolve_sim(sim))


def _resolve_sim(sim: str | os.PathLike[str]) -> Path:
    from .sim import resolve

    return resolve(sim)


def _lock(
    sim: str | os.PathLike[str] | None, domid: int | None
) -> contextlib.AbstractContextManager[int]:
    """The domain's lock (see :mod:`xcsave.lock`), named as the caller named it."""
    if sim is not None:
        return lock.domain_lock(sim=_sim_arg(sim), name=os.fspath(sim))
    return lock.domain_lock(domid=domid)


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


class SimTarget:
    """A simulated domain being restored: built beside its final name, renamed
    into place (committed) only by the toolstack, after it judged the run.

    :meth:`begin` (with the domain's lock held) refuses an existing domain
    unless ``force`` (EEXIST) and picks the partial's name,
    ``.NAME.partial.PID.RANDOM`` beside the target (PID is ours, so a
    partial whose owner died can be swept; see :func:`sweep_stale_partials`).
    The helper creates exactly that file (``--build-only``) and leaves it
    there when it succeeds.  :meth:`commit` renames it over the final name
    (without ``force``: ``renameat2(RENAME_NOREPLACE)``, EEXIST if a domain
    appeared meanwhile); :meth:`discard` removes it.  Until the commit, an
    old domain under the final name is untouched; after it, the new one is
    there whole.  There is no instant with neither, and never a partial at
    the final name.
    """

    def __init__(self, final: Path, partial: Path, force: bool) -> None:
        self.final = final
        self.partial = partial
        self.force = force
        self.committed = False

    @classmethod
    def begin(cls, final: str | os.PathLike[str], *, force: bool = False) -> SimTarget:
        target = Path(final)
        check_replace(target, force)
        sweep_stale_partials(target)
        partial = target.with_name(f".{target.name}.partial.{os.getpid()}.{secrets.token_hex(4)}")
        return cls(target, partial, force)

    def commit(self) -> None:
        """Rename the finished partial over the final name; fsync the directory."""
        if self.force:
            os.rename(self.partial, self.final)
        else:
            files.rename_noreplace(self.partial, self.final)
        self.committed = True
        _sync_committed(self.final, "restored")

    def discard(self) -> None:
        """Remove the partial (if any is left); the final name is never touched."""
        if not self.committed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.partial)


def check_replace(target: Path, force: bool) -> None:
    """EEXIST for an existing domain ``target`` unless ``force``."""
    if not force and os.path.lexists(target):
        raise FileExistsError(
            errno_mod.EEXIST, "the domain already exists; --force replaces it", str(target)
        )


def sweep_stale_partials(target: Path) -> None:
    """Remove ``.NAME.partial.PID.*`` files whose PID is gone.

    A restore's partial domain carries its toolstack's pid (or, from a helper
    run on its own, the helper's).  Its owner removes it on every failure
    it sees; one killed with SIGKILL cannot.  Called with the domain's lock
    held, so no live restore of this name is building one.
    """
    _sweep_dead(target, "partial", "a restore")


def _sweep_dead(final: Path, kind: str, what: str) -> None:
    """Remove ``.NAME.KIND.PID.*`` beside ``final`` whose PID is gone (killed)."""
    for left in final.parent.glob(f".{final.name}.{kind}.*.*"):
        try:
            pid = int(left.name.split(f".{kind}.", 1)[1].split(".", 1)[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            log.info("removing %s, left by %s that was killed", left, what)
            with contextlib.suppress(FileNotFoundError):
                left.unlink()


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (killed, not yet reaped) does not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return state not in (b"Z", b"X")


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


@dataclass(frozen=True)
class _Job:
    """What a save or a restore hands the supervisor, fixed before anything is opened."""

    mode: str
    d: proto.Dialect
    helper: str | os.PathLike[str] | None
    callbacks: Callbacks
    domid: int | None
    supervisor: Supervisor | None
    on_event: Callable[[Event], object] | None
    timeout: float | None

    @property
    def backend(self) -> str | None:
        """xcsave-1's ``--backend`` (None: a xen-4.17 helper has none)."""
        if self.d is proto.XEN_417:
            return None
        return "xen" if self.domid is not None else "sim"

    def xcs_args(self, io_fd: int, options: dict[str, object]) -> tuple[str, ...]:
        """The xcsave-1 argv: mode, backend, io fd and domid, then ``options``."""
        assert self.backend is not None
        return xcs_args(self.mode, self.backend, io_fd, {"domid": self.domid, **options})

    async def run(
        self,
        args: tuple[str, ...],
        pass_fds: tuple[int, ...],
        *,
        sim: str | os.PathLike[str] | None,
        on_failure: Callable[[int], object] | None = None,
        on_commit: Callable[[], None] | None = None,
        throttle: Throttle | None = None,
    ) -> RunResult:
        """Run the helper with ``args`` (its fds ``pass_fds``) to its end."""
        spec = HelperSpec(
            mode=self.mode,
            dialect=self.d,
            args=args,
            pass_fds=pass_fds,
            domain=f"domid {self.domid}" if self.domid is not None else os.fspath(sim or ""),
            domid=self.domid,
            backend=self.backend,
            helper=Path(self.helper) if self.helper is not None else None,
            on_failure=on_failure,
            on_commit=on_commit,
            throttle=throttle,
        )
        async with contextlib.AsyncExitStack() as stack:
            sup = self.supervisor
            if sup is None:  # one of its own, for this run only
                sup = await stack.enter_async_context(Supervisor(max_parallel=1))
            return await sup.run(
                spec, self.callbacks, on_event=self.on_event, timeout=self.timeout
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


#: The largest xl config taken for an xl savefile's header (as the sim's).
XL_CONFIG_MAX: Final = 1 << 20


def _frame_head(fmt: str, xl_config: str | os.PathLike[str] | None) -> bytes:
    """A Xen domain's save framed here: what comes before the libxc image
    (:func:`xcsave.libxlframe.head`).  An xl savefile needs the domain's
    config: read (at most :data:`XL_CONFIG_MAX` bytes) and checked to be a
    JSON object now, before the domain is touched."""
    if fmt != "xl":
        return libxlframe.head(None)
    if xl_config is None:
        raise ValueError(
            "an xl savefile of a Xen domain needs xl_config= (the domain's libxl config "
            "as JSON, `xl list -l`'s config)"
        )
    import json

    name = os.fspath(xl_config)
    with files.named_as(name), open(name, "rb") as f:
        cfg = f.read(XL_CONFIG_MAX + 1)
    if len(cfg) > XL_CONFIG_MAX:
        raise ValueError(f"xl config {name} is larger than {XL_CONFIG_MAX} bytes")
    try:
        ok = isinstance(json.loads(cfg), dict)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"xl config {name} is not a JSON object (a libxl domain config)")
    return libxlframe.head(cfg.rstrip(b"\0\n"))


def _device_model_save(dm: DeviceModel, cbs: Callbacks, *, live: bool) -> DeviceModelSave:
    """Hook the device model into the save's callbacks: its device state
    taken in ``suspend`` once the caller's suspend succeeded, its dirty log
    switched through ``switch_qemu_logdirty`` unless the caller answers that."""
    run = DeviceModelSave(dm, live=live)
    guest_suspend = cbs.suspend
    assert guest_suspend is not None

    async def suspend() -> Reply:
        ok = guest_suspend()
        if inspect.isawaitable(ok):
            ok = await ok
        if ok:  # libxl: the device model once the guest is suspended
            await run.save()
        return ok

    cbs.suspend = suspend
    if cbs.switch_qemu_logdirty is None:
        cbs.switch_qemu_logdirty = run.set_logdirty
    return run


def _write_frame(fd: int, data: bytes, what: str) -> None:
    """Write a frame of ours (headers, the device model's records) into the
    save's output, all of it; one line naming ``what`` if it fails."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:  # a non-blocking pipe or socket the caller gave
            import select

            if not select.select([], [fd], [], 30.0)[1]:
                raise TimeoutError(
                    errno_mod.ETIMEDOUT, f"writing {what}: the output took nothing for 30 s"
                ) from None
            continue
        except OSError as e:
            raise OSError(e.errno, f"writing {what}: {e.strerror}") from None
        view = view[n:]


def _with_tail(o: _Out, dm: DeviceModelSave | None) -> Callable[[], None]:
    """The save's commit, after what comes after the libxc image: the device
    model's records (with ``dm``) and libxl's END, written between the
    helper's ``complete`` and our reply, so the image is whole when it
    commits and a failure here is the save's."""

    def commit() -> None:
        if dm is not None and dm.state is None:
            raise DeviceModelError(
                "the save completed without the device model's state (was the guest suspended?)",
                errno_mod.ENODATA,
            )
        tail = libxlframe.tail(
            dm.state if dm is not None else None, dm.xenstore if dm is not None else ()
        )
        _write_frame(o.fd, tail, "the libxl records after the image")
        if o.on_commit is not None:
            o.on_commit()

    return commit


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
    device_model: DeviceModel | None = None,
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
    A Xen domain in the xcsave-1 dialect must be one of
    :data:`~xcsave.formats.SUPERVISOR_GUESTS` (PV, PVH), or an HVM guest
    whose ``device_model=`` (:class:`~xcsave.devicemodel.DeviceModel`) is
    given: an HVM guest without one fails with EOPNOTSUPP before it is
    touched.  With ``device_model=`` the save drives QEMU through QMP as
    libxl does (its dirty log during the live rounds; ``stop`` and its device
    state once the guest is suspended; ``cont`` if the save then fails) and
    writes the state in libxl's EMULATOR_CONTEXT record, so ``fmt`` must be
    ``libxl`` or ``xl``.  For a Xen domain those frames are written here
    around the helper's libxc image (either dialect); ``xl`` needs
    ``xl_config=``, the domain's libxl config as JSON (what ``xl save``
    puts in its header: ``xl list -l``'s ``config``).
    """
    if (domid is None) == (sim is None):
        raise ValueError("give exactly one of domid= or sim=")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected one of {FORMATS}")
    # A Xen domain's libxl and xl frames are written here, around the
    # helper's libxc image (the helpers' xen backends write only that).
    framed = domid is not None and fmt != "libxc"
    if device_model is not None:
        if domid is None:
            raise ValueError("device_model= is a Xen domain's (a sim domain has no QEMU)")
        if not framed:
            raise ValueError(
                "device_model= needs fmt='libxl' or 'xl': the device model's state "
                "travels in libxl's EMULATOR_CONTEXT record"
            )
        if stream_type != "plain":
            raise ValueError("device_model= saves a plain stream (not remus or colo)")
    d = _check_dialect(dialect, sim=sim, fmt="libxc" if framed else fmt)
    head = _frame_head(fmt, xl_config) if framed else None
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
    dm = _device_model_save(device_model, cbs, live=live) if device_model else None
    if stream_type not in STREAM_TYPES:
        raise ValueError(f"unknown stream type {stream_type!r}")
    cbflags = proto.cbflags_for(d, cbs.installed() - {"restore_results"})
    xcflags = (XCFLAGS_LIVE if live else 0) | (XCFLAGS_DEBUG if debug else 0)
    st = STREAM_TYPES[stream_type]
    job = _Job("save", d, helper, cbs, domid, supervisor, on_event, timeout)
    idle_ms = _idle_ms(idle_timeout)  # a bad value is refused before anything is touched
    sim_path = _sim_arg(sim)
    _check_out(out)
    with _lock(sim, domid) as lock_fd:
        # The source's state before we touch it, for the undo after a failure.
        undo = _sim_save_undo(sim_path) if sim_path else None
        # Auto-converge's actuator (a policy may answer with a throttle): set
        # through the supervisor before its reply, lifted here whatever
        # happens (success, failure, cancellation, a helper that died).  A
        # policy that says it throttles has the domain checked first.
        throttle = None
        res: RunResult | None = None
        if policy is not None:
            throttle = for_domain("save", sim=sim_path, domid=domid, helper=helper)
            throttle.on_event = on_event
            if getattr(policy, "throttles", False):
                await throttle.prepare()
        try:
            xl = os.fspath(xl_config) if xl_config is not None and not framed else None
            async with _open_out(out, (lambda: undo(0)) if undo else None) as o:
                io_fd, owned = high_fd(o.fd)
                on_commit = o.on_commit
                if head is not None:
                    _write_frame(o.fd, head, "the libxl header")
                    on_commit = _with_tail(o, dm)
                try:
                    if d is proto.XEN_417:
                        assert domid is not None
                        args = xen_save_args(
                            io_fd, domid, xcflags=xcflags, cbflags=cbflags, stream_type=st
                        )
                    else:
                        args = job.xcs_args(
                            io_fd,
                            {
                                "sim": sim_path,
                                "flags": xcflags,
                                "cbflags": cbflags,
                                "stream_type": st,
                                "format": "libxc" if framed else fmt,
                                "device_model": dm is not None,
                                "checkpoints": checkpoints or None,
                                "interval_ms": interval_ms or None,
                                "xl_config": xl,
                                "copy_threads": copy_threads if copy_threads != 1 else None,
                                "idle_timeout_ms": idle_ms,
                                # The helper removes it if the save is not
                                # committed: even when we were SIGKILLed.
                                "out_tmp": os.fspath(o.tmp) if o.tmp is not None else None,
                            },
                        )
                    # The image is committed by the supervisor between the
                    # helper's complete and its reply (on_commit): a toolstack
                    # killed before the commit leaves a helper that puts the
                    # source back, never a suspended source without an image.
                    res = await job.run(
                        args,
                        (io_fd, lock_fd),
                        sim=sim_path,
                        on_failure=undo,
                        on_commit=on_commit,
                        throttle=throttle,
                    )
                finally:
                    if owned:
                        os.close(io_fd)
        finally:
            if dm is not None and res is None:
                await uncancellable(asyncio.ensure_future(dm.undo()))
            lifted = await _lift(throttle, committed=res is not None)
        assert res is not None
        res.throttle = lifted
        return res


async def _lift(throttle: Throttle | None, *, committed: bool) -> ThrottleEvent | None:
    """Lift auto-converge's throttle, to its end even when cancelled.  A
    lift that fails is logged (the guest stays throttled: the one line says
    what to put back), never raised over the save's own outcome.  After a
    ``committed`` save (the image is in place) a cancellation that lands
    during the lift is logged and the success stands, as the supervisor
    does after its commit: raising would report a saved image as no save."""
    if throttle is None:
        return None
    lift = asyncio.ensure_future(throttle.lift())
    try:
        return await uncancellable(lift)
    except asyncio.CancelledError:
        if not committed or not lift.done() or lift.cancelled():
            raise
        log.info(
            "%s: saved; a cancellation during the throttle's lift is ignored", throttle.domain
        )
        return lift.result()
    except Exception as e:
        log.error(
            "%s: could not lift auto-converge's throttle (%s %s was there before): %s",
            throttle.domain,
            throttle.kind,
            throttle.before,
            e,
        )
        return None


async def restore(
    src: StreamArg,
    *,
    domid: int | None = None,
    sim: str | os.PathLike[str] | SimTarget | None = None,
    force: bool = False,
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
    foreign: bool = False,
    timeout: float | None = None,
    on_event: Callable[[Event], object] | None = None,
    supervisor: Supervisor | None = None,
) -> RunResult:
    """Restore a domain from ``src`` (fd or path); ``.store_gfn``/``.console_gfn`` in the result.

    A restore reads exactly its stream and nothing after it, so a caller may
    go on reading the same fd (as libxl does with its own records).

    ``fmt``: ``libxc``, ``libxl`` or ``xl``, or ``auto`` to take what a
    regular file's first bytes announce (:func:`restore_format`; the CLI's
    default).  A file that announces another format is refused first.

    A simulated domain is built beside its final name and renamed into place
    only once the run succeeded (see :class:`SimTarget`): whatever fails or
    interrupts the restore, at any instant, nothing is left but what was
    there before.  An existing domain is replaced only with ``force=True``
    (else ``FileExistsError``, EEXIST, before ``src`` is opened).  ``sim``
    may also be a :class:`SimTarget` the caller commits itself (a receiver
    does, once its peer let it start the domain).  The domain's lock is held
    throughout (:class:`~xcsave.DomainBusy`, EBUSY, if another operation
    holds it).

    Bounds on what the stream can make us do (xcsave-1): ``max_memory``
    (bytes) and ``max_pages`` refuse, in one line and before anything is
    allocated, a stream whose domain is larger (ERANGE); the smaller of the
    two wins, 0 means the helper's own cap (64 GiB for a simulated domain).
    ``idle_timeout`` (seconds): once the stream has started, a pipe or
    socket ``src`` that stays silent that long fails the restore with
    ETIMEDOUT (a regular file never waits).

    A Xen target domain (``domid``) in the xcsave-1 dialect must be one of
    :data:`~xcsave.formats.SUPERVISOR_GUESTS` (PV, PVH): an HVM one fails
    with EOPNOTSUPP before anything is read.

    ``foreign=True`` (a simulated domain) takes a stream the simulator did
    not write, such as real Xen's save of a PVH or HVM guest: without the
    sim's own record the domain is sized by its highest pfn (bounded as
    above) and vCPU 0's state is the first 512 bytes of HVM_CONTEXT, as for
    a converted legacy stream (docs/sim-format.md).  Without it such a
    stream is refused at HVM_CONTEXT, deliberately.
    """
    if (domid is None) == (sim is None):
        raise ValueError("give exactly one of domid= or sim=")
    if foreign and (sim is None or legacy_width is not None):
        raise ValueError(
            "foreign= restores into a simulated domain (a legacy stream is converted "
            "as foreign already)"
        )
    d = _check_dialect(dialect, sim=sim, fmt="libxc" if fmt == "auto" else fmt)
    if stream_type not in STREAM_TYPES:
        raise ValueError(f"unknown stream type {stream_type!r}")
    if legacy_width is not None and sim is None:
        raise BackendUnavailable("legacy streams restore into simulated domains only")
    cbs = replace(callbacks) if callbacks is not None else Callbacks()
    cbflags = proto.cbflags_for(d, cbs.installed() | {"restore_results"})
    st = STREAM_TYPES[stream_type]
    # The new domain's xenstore and console channels: the same options in both dialects.
    channels = {
        "store_evtchn": store_evtchn,
        "store_domid": store_domid,
        "console_evtchn": console_evtchn,
        "console_domid": console_domid,
    }
    job = _Job("restore", d, helper, cbs, domid, supervisor, on_event, timeout)
    limit, idle_ms = page_limit(max_pages, max_memory), _idle_ms(idle_timeout)  # refused early
    given = sim.final if isinstance(sim, SimTarget) else sim
    final = _resolve_sim(given) if given is not None else None
    if final is not None and not isinstance(sim, SimTarget):
        check_replace(final, force)  # before anything is opened or read
    with _lock(given, domid) as lock_fd:
        own = not isinstance(sim, SimTarget)
        built = sim if isinstance(sim, SimTarget) else None
        if final is not None and own:
            built = SimTarget.begin(final, force=force)  # again, with the lock held
        try:
            async with _open_in(src) as fd:
                fmt = restore_format(
                    fd,
                    fmt,
                    legacy=legacy_width is not None,
                    name=_stream_name(src),
                )
                _check_dialect(dialect, sim=sim, fmt=fmt)
                io_fd, owned = high_fd(fd)
                try:
                    if d is proto.XEN_417:
                        assert domid is not None
                        args = xen_restore_args(
                            io_fd, domid, cbflags=cbflags, stream_type=st, **channels
                        )
                    else:
                        args = job.xcs_args(
                            io_fd,
                            {
                                "sim": str(built.partial) if built else None,
                                "build_only": built is not None,
                                "cbflags": cbflags,
                                "stream_type": st,
                                "format": fmt,
                                **channels,
                                "max_pages": limit or None,
                                "idle_timeout_ms": idle_ms,
                                "legacy_width": legacy_width,
                                "legacy_guest": legacy_guest,
                                "dm_out": os.fspath(dm_out) if dm_out is not None else None,
                                "foreign": foreign,
                            },
                        )
                    res = await job.run(args, (io_fd, lock_fd), sim=final)
                    # Judged a success: commit now, with no await in between.
                    if built is not None and own:
                        built.commit()
                    return res
                finally:
                    if owned:
                        os.close(io_fd)
        finally:
            if built is not None and own:
                built.discard()  # on every failure path: nothing left but the old domain


async def plan(
    *,
    domid: int | None = None,
    sim: str | os.PathLike[str] | None = None,
    link: float | None = None,
    make_policy: Callable[[], Policy] | None = None,
    policy_name: str = "xen",
    seconds: float = 3.0,
    interval: float = 0.1,
    max_downtime: float = 0.3,
    costs: Costs | None = None,
    helper: str | os.PathLike[str] | None = None,
    on_event: Callable[[Event], object] | None = None,
) -> Plan:
    """Measure a running domain's dirty log for ``seconds``, then predict its
    live migration over a ``link`` bytes/s link (:mod:`xcsave.predict`).

    Log-dirty is on only while sampling, and off again afterwards whatever
    happens (:mod:`xcsave.sample`).  The domain's lock is held throughout
    (:class:`~xcsave.DomainBusy`, EBUSY, while a save or another plan runs):
    a save uses log-dirty too.  ``make_policy`` makes the precopy policy the
    migration would run (default: Xen's, :func:`xcsave.policy.xen_default`),
    a fresh one for the model; ``policy_name`` is how the result names it.
    ``link`` None: the profile only (``Plan.prediction`` is None).  The
    verdict is go when the policy stops with a predicted downtime within
    ``max_downtime`` seconds.
    """
    from .policy import xen_default
    from .predict import pages_per_s, predict
    from .sample import sample_sim, sample_xen

    if (domid is None) == (sim is None):
        raise ValueError("give exactly one of domid= or sim=")
    if link is not None and not (0 < link < float("inf")):
        raise ValueError(f"link must be a positive number of bytes/s, not {link!r}")
    if not 0 < max_downtime <= 3600:
        raise ValueError(f"max_downtime must be in (0, 3600] seconds, not {max_downtime}")
    factory = make_policy if make_policy is not None else xen_default
    sim_path = _sim_arg(sim)
    with _lock(sim, domid) as lock_fd:
        if sim_path is not None:
            if not Path(sim_path).exists():  # noqa: ASYNC240 - one stat, under our lock
                raise FileNotFoundError(errno_mod.ENOENT, "no such domain", os.fspath(sim or ""))
            profile = await sample_sim(sim_path, seconds, interval)
        else:
            assert domid is not None
            profile = await sample_xen(
                domid, seconds, interval, helper=helper, lock_fd=lock_fd, on_event=on_event
            )
    prediction = None
    if link is not None:
        prediction = predict(
            profile,
            pages_per_s(link),
            factory,
            costs=costs or Costs(),
            max_downtime_s=max_downtime,
        )
    name = os.fspath(sim) if sim is not None else f"domid {domid}"
    return Plan(name, profile, link, policy_name, prediction)
