"""Domain locks: one operation per domain at a time.

Save, restore, migrate (the sender), receive, ``sim create`` and ``sim
remove`` each hold
their domain's lock from before they touch it until they have finished with
it; a second such operation on the same domain fails at once with EBUSY
(:class:`DomainBusy`), naming the domain and the holder's pid when known.

What does *not* take the lock: the guest's own work (``xcsave sim dirty``,
a workload writing pages runs beside a save, as a guest does) and read-only
looks (``sim digest``, ``sim info``): they never block and are never blocked.

The lock is an ``flock`` on a lock file beside the domain, which exists
while an operation runs (its holder removes the name before it unlocks, and
whoever wins a lock on an inode no longer at that name tries again: so two
processes never hold two different lock files of one name):

- a simulated domain ``DIR/NAME`` is locked through ``DIR/.NAME.lock``, a
  name of its own beside it (restore replaces the domain's inode, so the
  domain file itself cannot carry the lock);
- a Xen domain ``domid N`` through ``domid-N.lock`` in a private runtime
  directory (``$XCSAVE_LOCK_DIR``, else ``/run/xcsave`` for root, else
  ``$XDG_RUNTIME_DIR/xcsave``), created 0700 and checked by
  :func:`xcsave.files.private_dir`.

The kernel releases an ``flock`` when the last fd of its open file
description closes, so a holder that dies (even by SIGKILL) frees the lock.
The holder hands the same fd to its helper (``pass_fds``): a toolstack
killed while its helper still cleans up (the helper gets SIGTERM from its
parent-death signal, then removes its partial domain or resumes the source)
keeps the domain locked until that helper has exited too.

Within one operation the lock is re-entrant: an operation that holds a
domain's lock (``migrate`` around its save, ``migrate_local`` around both
ends) runs the inner operation under the same lock (a context variable says
which locks the current task holds), and the inner one hands the same fd on
to its helper.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno as errno_mod
import fcntl
import functools
import inspect
import os
import stat
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, Final, ParamSpec, TypeVar

from . import files
from ._log import logger
from .errors import DomainBusy

__all__ = [
    "DomainBusy",
    "domain_lock",
    "holding",
    "lock_dir",
    "lock_path",
]

log = logger("xcsave.lock")

P = ParamSpec("P")
T = TypeVar("T")

#: Locks held by the current task (or thread): lock file path -> its fd.
_HELD: Final[contextvars.ContextVar[dict[str, int] | None]] = contextvars.ContextVar(
    "xcsave_held_domain_locks", default=None
)
_ABOUT_THE_DOMAIN: Final = frozenset(
    (errno_mod.ENOENT, errno_mod.ENOTDIR, errno_mod.EROFS, errno_mod.EACCES)
)
_PID_BYTES: Final = 32  # the holder's pid, as text, at the start of the lock file


def lock_dir() -> Path:
    """The private directory for Xen domains' lock files (created 0700 if missing)."""
    explicit = os.environ.get("XCSAVE_LOCK_DIR")
    if explicit:
        return files.private_dir(explicit)
    if os.geteuid() == 0:
        return files.private_dir("/run/xcsave")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return files.private_dir(Path(runtime) / "xcsave")
    return files.private_dir(f"/tmp/xcsave-locks-{os.geteuid()}")  # checked: ours, 0700


def lock_path(*, sim: str | os.PathLike[str] | None = None, domid: int | None = None) -> Path:
    """The lock file of a simulated domain (``sim``, a resolved path) or a Xen ``domid``."""
    if (sim is None) == (domid is None):
        raise ValueError("give exactly one of sim= or domid=")
    if sim is not None:
        p = Path(sim)
        # The directory's real path: two spellings of one domain share one lock.
        return Path(os.path.realpath(p.parent)) / f".{p.name}.lock"
    return lock_dir() / f"domid-{domid}.lock"


def _open_lock_file(path: Path) -> int:
    """The lock file, opened read-write, never through a symlink; created 0600 if missing."""
    for _ in range(8):
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            try:
                fd = files.create_private(path, os.O_RDWR)
            except FileExistsError:
                continue  # someone created it between our two opens: open theirs
        except OSError as e:
            if e.errno == errno_mod.ELOOP:
                raise PermissionError(
                    errno_mod.EPERM, "refusing a symlink as a lock file", str(path)
                ) from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise PermissionError(
                    errno_mod.EPERM, "lock file is not a regular file", str(path)
                )
            if st.st_uid != os.geteuid():
                # Whoever owns it could hold it forever, or read our pids.
                raise PermissionError(
                    errno_mod.EPERM, f"lock file is owned by uid {st.st_uid}, not by us", str(path)
                )
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise FileExistsError(errno_mod.EEXIST, "lock file keeps appearing and vanishing", str(path))


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, _PID_BYTES, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


@contextlib.contextmanager
def domain_lock(
    *,
    sim: str | os.PathLike[str] | None = None,
    domid: int | None = None,
    name: str | None = None,
) -> Iterator[int]:
    """Hold the domain's lock for the block; yields the lock fd (hand it to the helper).

    Raises :class:`DomainBusy` (EBUSY) at once when another operation holds
    it.  Re-entrant within the current task: an inner block on a lock the
    task already holds yields the same fd and releases nothing.
    """
    path = lock_path(sim=sim, domid=domid)
    key = str(path)
    held = _HELD.get() or {}
    if key in held:
        yield held[key]
        return
    what = name or (os.fspath(sim) if sim is not None else f"domid {domid}")
    try:
        fd = _acquire(path, what)
    except OSError as e:
        if sim is None or e.errno not in _ABOUT_THE_DOMAIN:
            raise
        # Where the domain's directory is missing or read-only: say so of the domain.
        raise type(e)(e.errno, e.strerror, os.fspath(sim)) from None
    try:
        # Who holds it, for the next one's message; the lock itself is the flock.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        token = _HELD.set({**held, key: fd})
        log.debug("locked %s (%s)", what, key)
        try:
            yield fd
        finally:
            _HELD.reset(token)
            log.debug("unlocking %s", what)
            # Our helpers are reaped: nobody else may hold this description.
            # The name goes first, still locked (see _acquire), so no lock
            # files pile up beside the domains.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        # Closing our fd drops the lock -- unless a helper that got it still
        # runs (its toolstack was killed): then the lock file stays, locked.
        os.close(fd)


def _acquire(path: Path, what: str) -> int:
    """Open and ``flock`` the lock file at ``path``; DomainBusy if someone holds it.

    A holder unlinks the name before it unlocks, so a lock won on an inode
    that is no longer (or not) the one at ``path`` is stale: try again on
    the file that is there now.
    """
    for _ in range(64):
        fd = _open_lock_file(path)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DomainBusy(what, _holder(fd)) from None
            st = os.fstat(fd)
            try:
                now = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise DomainBusy(what, None)


def held_fd(*, sim: str | os.PathLike[str] | None = None, domid: int | None = None) -> int | None:
    """The fd of this domain's lock if the current task holds it, else None."""
    return (_HELD.get() or {}).get(str(lock_path(sim=sim, domid=domid)))


def holding(
    *params: str, resolve: Callable[[Any], str | os.PathLike[str]] | None = None
) -> Callable[[Callable[P, Coroutine[Any, Any, T]]], Callable[P, Coroutine[Any, Any, T]]]:
    """Decorate a coroutine function to hold the locks of the simulated domains
    named by its arguments ``params`` while it runs (e.g. ``@holding("sim")``).

    ``resolve`` turns an argument into the domain's path (default: as given).
    """

    def wrap(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        async def locked(*args: P.args, **kwargs: P.kwargs) -> T:
            bound = sig.bind(*args, **kwargs)
            with contextlib.ExitStack() as stack:
                for name in params:
                    dom = bound.arguments[name]
                    path = resolve(dom) if resolve is not None else dom
                    stack.enter_context(domain_lock(sim=path))
                return await fn(*args, **kwargs)

        return locked

    return wrap
