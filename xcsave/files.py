"""Private files and directories: where guest memory and device state may live.

Guest memory is a secret.  Every file xcsave creates that holds guest memory,
vCPU or device state (saved images, simulated domains, restore targets,
``--dm-out``, their temporaries) and every lock file is created here, or by
native code under the same rules (``csrc/core``):

- ``O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC``: never an existing file, never
  through a planted symlink, never inherited by a child by accident;
- mode 0600 *whatever the umask*: the mode is set with ``fchmod`` on the open
  fd after creation, so a umask of 0 cannot widen it and a umask of 0777
  cannot leave the owner without access.

Directories that hold such files (the sim directory, the lock directory) are
created 0700 and, whether new or old, refused when they are a symlink, owned
by someone else, or writable by group or others: whoever can write there can
plant names, and whoever owns it can read what we put in it.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final, TypeVar

from .defaults import shm_dir

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "check_private_dir",
    "create_private",
    "create_private_temp",
    "create_private_unnamed",
    "fsync_dir",
    "private_dir",
    "publish_unnamed",
    "rename_noreplace",
    "scratch_dir",
]

_T = TypeVar("_T")

PRIVATE_FILE_MODE: Final = 0o600
PRIVATE_DIR_MODE: Final = 0o700

_CREATE_FLAGS: Final = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@contextlib.contextmanager
def named_as(path: str | os.PathLike[str]) -> Iterator[None]:
    """An ``OSError`` raised inside names ``path`` (the file the user asked
    for), never the private temporary the work went through."""
    try:
        yield
    except OSError as e:
        raise type(e)(e.errno, e.strerror, os.fspath(path)) from None


def create_private(path: str | os.PathLike[str], flags: int = os.O_WRONLY) -> int:
    """A new file at ``path``, mode 0600, opened with ``flags``; returns its fd.

    Fails with ``FileExistsError`` (EEXIST) when anything is at ``path``
    already -- a file, a directory or a symlink, dangling or not (O_EXCL
    never follows one) -- so nobody can make us write into a file of theirs.
    """
    fd = os.open(path, flags | _CREATE_FLAGS, PRIVATE_FILE_MODE)
    try:
        # The umask may have removed bits from 0600 (e.g. 0277 -> 0400): set
        # the mode exactly, on the fd (no race with a rename of the path).
        os.fchmod(fd, PRIVATE_FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_private_temp(
    directory: str | os.PathLike[str], prefix: str, suffix: str = "", flags: int = os.O_WRONLY
) -> tuple[int, str]:
    """A new private file ``directory/prefix<random>suffix``: its fd and path.

    The random part comes from :mod:`secrets`, so nobody can plant the name
    first; a name that is taken anyway is drawn again (as native code does,
    ``xcs_create_private_temp``).
    """
    d = os.fspath(directory)
    fd, name = _at_fresh_name(
        d, prefix, suffix, lambda n: create_private(os.path.join(d, n), flags)
    )
    return fd, os.path.join(d, name)


def _at_fresh_name(
    directory: str, prefix: str, suffix: str, make: Callable[[str], _T]
) -> tuple[_T, str]:
    """``make(name)`` for a fresh ``prefix<random>suffix`` in ``directory``: its
    result and the name.  ``make`` must fail with FileExistsError when the name
    is taken; the random part (:mod:`secrets`) is then drawn again."""
    for _ in range(100):
        name = f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            return make(name), name
        except FileExistsError:
            continue
    raise FileExistsError(errno_mod.EEXIST, "no free temporary name", directory)


def create_private_unnamed(directory: str | os.PathLike[str]) -> int | None:
    """A new private file in ``directory`` that has no name yet (``O_TMPFILE``),
    opened read-write; ``None`` where the filesystem cannot make one.

    Until :func:`publish_unnamed` gives it one, no signal, crash or SIGKILL
    can leave it behind: the kernel frees an unnamed file with its last fd.
    Nobody can open it by a name either, so there is no name to race for.
    """
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    except OSError as e:
        # EOPNOTSUPP: the filesystem lacks O_TMPFILE; EISDIR/EINVAL: the kernel does.
        if e.errno in (errno_mod.EOPNOTSUPP, errno_mod.EISDIR, errno_mod.EINVAL):
            return None
        raise
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)  # exactly 0600, whatever the umask
    except BaseException:
        os.close(fd)
        raise
    return fd


def publish_unnamed(fd: int, path: str | os.PathLike[str]) -> None:
    """Give the unnamed file ``fd`` (:func:`create_private_unnamed`) the name
    ``path``, replacing whatever file is there, atomically.

    ``linkat`` cannot replace, so the file is linked at a fresh random name
    beside ``path`` (failing, like ``O_EXCL``, rather than taking one that
    exists) and renamed over it.  SIGINT, SIGTERM and SIGHUP are held off
    between the two, so a signal finds the old file at ``path`` or the new
    one, never the extra name.
    """
    import signal

    directory, name = os.path.split(os.path.abspath(path))
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        # /proc/self/fd/N names the open file, and linkat with AT_SYMLINK_FOLLOW
        # gives an O_TMPFILE file its first name (open(2)).  A dir fd makes
        # os.link call linkat, not link(2), which would link the /proc symlink
        # itself (EXDEV).
        _, tmp = _at_fresh_name(
            directory,
            ".xcsave-",
            ".tmp",
            lambda n: os.link(f"/proc/self/fd/{fd}", n, dst_dir_fd=dfd, follow_symlinks=True),
        )
        try:
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            os.unlink(tmp, dir_fd=dfd)
            raise
    finally:
        os.close(dfd)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def check_private_dir(path: str | os.PathLike[str]) -> None:
    """Refuse ``path`` unless it is a real directory, ours, not group/world-writable.

    Raises ``PermissionError`` (EPERM) naming what is wrong (a symlink is
    refused even when it points at a good directory), ``NotADirectoryError``
    for something else, ``FileNotFoundError`` when it is missing.
    """
    fd = _open_dir(path)
    os.close(fd)


def private_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a private directory: created 0700 (its missing parents get the
    usual mode) if it does not exist, then checked as :func:`check_private_dir`
    does.  Returns it as a Path."""
    p = Path(path)
    if p.parent != p and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(p, PRIVATE_DIR_MODE)
        created = True
    except FileExistsError:
        created = False
    # Checked (and, when new, chmod'ed) through one fd opened O_NOFOLLOW: a
    # directory swapped for a symlink after mkdir fails the open (ELOOP).
    fd = _open_dir(p, fix_mode=created)
    os.close(fd)
    return p


def _open_dir(path: str | os.PathLike[str], fix_mode: bool = False) -> int:
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno_mod.ELOOP or (e.errno == errno_mod.ENOTDIR and os.path.islink(name)):
            raise PermissionError(
                errno_mod.EPERM, "refusing a symlink as a private directory", name
            ) from None
        raise
    try:
        if fix_mode:
            # mkdir's mode is filtered by the umask too: 0700 exactly.
            os.fchmod(fd, PRIVATE_DIR_MODE)
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise PermissionError(
                errno_mod.EPERM,
                f"refusing a directory owned by uid {st.st_uid}, not by us (uid {os.geteuid()})",
                name,
            )
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise PermissionError(
                errno_mod.EPERM,
                "refusing a directory writable by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o})",
                name,
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def rename_noreplace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename ``src`` to ``dst`` atomically, failing with ``FileExistsError``
    (EEXIST) if ``dst`` exists: ``renameat2(RENAME_NOREPLACE)``, which Python's
    ``os`` lacks (``xcs_rename_noreplace`` in csrc/core/private_file.c, the
    one the native creators use; ``link`` then ``unlink`` where the kernel or
    the filesystem lacks the flag)."""
    from . import _ext

    _ext.rename_noreplace(os.fspath(src), os.fspath(dst))


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename (or create, unlink) in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def scratch_dir(given: str | os.PathLike[str] | None, prefix: str) -> Path:
    """Where a demo or a benchmark makes its domains: ``given`` (the user's
    choice, created 0700 if missing), else a new private temporary directory
    (memory-backed where /dev/shm exists, :func:`xcsave.defaults.shm_dir`)."""
    if given:
        d = Path(given)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        return d
    import tempfile

    return Path(tempfile.mkdtemp(prefix=prefix, dir=shm_dir()))


def write_atomically(path: str, write: Callable[[int], _T]) -> _T:
    """``write(fd)`` into a new private file in ``path``'s directory, fsync'd
    and put at ``path`` on success; on failure ``path`` is as it was.

    The file has no name until it is complete (``O_TMPFILE``), so a signal
    that kills the command mid-write leaves nothing behind; where the
    filesystem cannot do that, a named temporary is removed on failure.
    """
    directory = os.path.dirname(os.path.abspath(path))
    # The output is guest memory: private, whatever the umask.  Errors of
    # our own steps name ``path``, never the temporary (write's own name
    # what they read).
    with named_as(path):
        fd = create_private_unnamed(directory)
        tmp = ""
        if fd is None:
            fd, tmp = create_private_temp(directory, ".xcsave-", ".tmp", os.O_RDWR)
    try:
        result = write(fd)
        with named_as(path):
            os.fsync(fd)
            if tmp:
                os.replace(tmp, path)
                tmp = ""
            else:
                publish_unnamed(fd, path)
        with contextlib.suppress(OSError):
            fsync_dir(directory)
        return result
    finally:
        os.close(fd)
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
