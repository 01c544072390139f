"""Simulated domains: typed access to the native sim backend (``xcsave._ext``).

A simulated domain is one file (format: ``docs/sim-format.md``): a header,
vCPU state, guest pages and a log-dirty bitmap that any writer sets as it
writes pages, the way a hypervisor would.  ``DOM`` on the command line is a
path, or a bare name that lives in ``$XCSAVE_SIM_DIR`` (default
``/dev/shm/xcsave``, memory-backed and fast).

The sim directory holds guest memory: it is created 0700 and refused when it
is a symlink, another user's, or writable by group or others
(:func:`xcsave.files.private_dir`).  A ``DOM`` given as a path is the user's
choice of directory; the files we create there are private all the same.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import _ext, lock
from ._log import logger
from .defaults import PAGE_SIZE, SIM_DIR, SIM_FILLS
from .errors import oserror_text
from .files import private_dir

__all__ = [
    "FILLS",
    "PAGE_SIZE",
    "SIM_DIR",
    "create",
    "digest",
    "info",
    "put_back",
    "remove",
    "resolve",
    "set_logdirty",
    "set_state",
    "state",
]

log = logger(__name__)

FILLS = SIM_FILLS


def resolve(dom: str | os.PathLike[str]) -> Path:
    """A bare name ``vm1`` lives in ``$XCSAVE_SIM_DIR``; anything with a ``/`` is a path."""
    text = os.fspath(dom)
    if "/" in text:
        return Path(text)
    return private_dir(os.environ.get("XCSAVE_SIM_DIR", SIM_DIR)) / text


def create(
    dom: str | os.PathLike[str],
    memory: int,
    vcpus: int = 1,
    seed: int = 0,
    *,
    force: bool = False,
    cancelled: Callable[[], bool] | None = None,
    fill: str = "classic",
) -> Path:
    """Create a domain of ``memory`` bytes (a whole number of pages) with seeded contents
    of the kind ``fill`` says (one of :data:`FILLS`; ValueError otherwise).

    All of its memory is reserved first (fallocate): no space is
    ``OSError(ENOSPC)`` before anything is written.  A domain already at
    that name is ``FileExistsError`` (EEXIST) unless ``force`` (then it is
    replaced, atomically).  Signal handlers run between steps (Ctrl-C's
    KeyboardInterrupt stops the create), and ``cancelled()``, if given, is
    asked there too: True stops it with ``InterruptedError`` (EINTR).
    Stopped or failed, it leaves nothing behind and an old domain untouched.
    """
    if memory <= 0 or memory % PAGE_SIZE:
        raise ValueError(f"memory must be a positive multiple of {PAGE_SIZE} bytes, not {memory}")
    _check_fill(fill)
    path = resolve(dom)
    try:
        with lock.domain_lock(sim=path, name=os.fspath(dom)):  # one operation per domain
            _ext.sim_create(
                str(path),
                memory // PAGE_SIZE,
                vcpus,
                seed,
                replace=force,
                cancelled=cancelled,
                fill=fill,
            )
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise FileExistsError(
                errno.EEXIST, "the domain already exists; --force replaces it", str(path)
            ) from None
        if e.errno == errno.ENOSPC:
            raise OSError(
                errno.ENOSPC,
                f"no space for {memory / 2**30:.2f} GiB of guest memory",
                str(path),
            ) from None
        raise
    return path


def info(dom: str | os.PathLike[str]) -> dict[str, Any]:
    return dict(_ext.sim_info(str(resolve(dom))))


def digest(dom: str | os.PathLike[str]) -> str:
    """One hash over memory and vCPU state (hex)."""
    return str(_ext.sim_digest(str(resolve(dom))))


def set_state(dom: str | os.PathLike[str], state: str) -> None:
    """``running``, ``paused`` or ``suspended``."""
    _ext.sim_set_state(str(resolve(dom)), state)


def state(dom: str | os.PathLike[str]) -> str:
    """``running``, ``paused`` or ``suspended`` (``FileNotFoundError`` for no such domain)."""
    return str(info(dom)["state"])


def put_back(dom: str | os.PathLike[str], was: str) -> str:
    """After a failed operation: set the domain ``was`` again (if it is not);
    returns the state it is in now (``unknown`` when that failed: logged)."""
    try:
        if state(dom) != was:
            set_state(dom, was)
        return state(dom)
    except OSError as e:
        log.error("could not set %s %s again: %s", dom, was, oserror_text(e, filename=False))
        return "unknown"


def set_logdirty(dom: str | os.PathLike[str], enable: bool) -> None:
    """Log-dirty on (clears the bitmap) or off, as the hypervisor's switch."""
    _ext.sim_set_logdirty(str(resolve(dom)), enable)


def dirty(
    dom: str | os.PathLike[str],
    rate: int,
    duration: float,
    seed: int = 0,
    *,
    fill: str | None = None,
) -> int:
    """Write ``rate`` pages/s for ``duration`` s through the dirty log; returns pages written.

    Each page gets fresh content of the kind ``fill`` says; None (the
    default) follows the fill the domain was created with (a ``mixed``
    page keeps its class: zero, text, page table, records or random).
    """
    if fill is not None:
        _check_fill(fill)
    return int(_ext.sim_dirty(str(resolve(dom)), rate, duration, seed, fill=fill or ""))


def _check_fill(fill: str) -> None:
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {', '.join(FILLS)}, not {fill!r}")


def remove(dom: str | os.PathLike[str]) -> None:
    path = resolve(dom)
    with lock.domain_lock(sim=path, name=os.fspath(dom)):  # not in the middle of a save
        _ext.sim_remove(str(path))
