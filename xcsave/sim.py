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
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from . import _ext, lock
from ._log import logger
from .defaults import MAX_SEED, PAGE_SIZE, SIM_DIR, SIM_FILLS, SIM_MAX_MEMORY, SIM_MAX_VCPUS
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
    if memory <= 0 or memory % PAGE_SIZE or memory > SIM_MAX_MEMORY:
        raise ValueError(
            f"memory must be a multiple of {PAGE_SIZE} bytes from {PAGE_SIZE} to "
            f"{SIM_MAX_MEMORY >> 30} GiB, not {memory}"
        )
    _check_int("vcpus", vcpus, 1, SIM_MAX_VCPUS)
    _check_int("seed", seed, 0, MAX_SEED)
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


#: The highest throttle a simulated domain takes (percent of its time taken away).
THROTTLE_MAX: Final = 99


def set_throttle(dom: str | os.PathLike[str], percent: int) -> None:
    """Keep the guest from running ``percent`` of its time (0..99; 0 lifts it):
    the workload (``sim dirty``) writes that much less.  Auto-converge's
    actuator for a simulated domain (:mod:`xcsave.throttle`)."""
    _check_int("throttle", percent, 0, THROTTLE_MAX)
    _ext.sim_set_throttle(str(resolve(dom)), percent)


def throttle(dom: str | os.PathLike[str]) -> int:
    """The throttle in force (percent); ValueError for a value no xcsave
    stores (a damaged header, or one from a newer xcsave)."""
    value = int(info(dom)["throttle"])
    if value > THROTTLE_MAX:
        raise ValueError(
            f"{os.fspath(dom)}: the header's throttle is {value}, not a percent from 0 to "
            f"{THROTTLE_MAX} (a damaged domain file?)"
        )
    return value


def _check_int(name: str, value: object, lo: int, hi: int | None) -> None:
    """ValueError naming ``name`` unless ``value`` is an int in [lo, hi]
    (TypeError for a non-int): never the extension's TypeError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        span = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
        raise ValueError(f"{name} must be {span}, not {value}")


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

    A guest writes only while it runs: a domain suspended when the workload
    starts is refused (EAGAIN) rather than written 0 pages for the whole
    duration; one suspended on the way (a migration's last round) stops it
    writing, as a real guest would."""
    if fill is not None:
        _check_fill(fill)
    _check_int("rate", rate, 0, None)  # 0: as fast as it can
    _check_int("seed", seed, 0, MAX_SEED)
    if not (isinstance(duration, int | float) and math.isfinite(duration) and duration > 0):
        raise ValueError(f"duration must be a finite number of seconds above 0, not {duration!r}")
    path = resolve(dom)
    if state(path) == "suspended":
        raise OSError(
            errno.EAGAIN,
            f"the domain is suspended: its guest writes nothing until it runs "
            f"(xcsave sim resume {os.fspath(dom)})",
            os.fspath(dom),
        )
    return int(_ext.sim_dirty(str(path), rate, duration, seed, fill=fill or ""))


def _check_fill(fill: str) -> None:
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {', '.join(FILLS)}, not {fill!r}")


def remove(dom: str | os.PathLike[str]) -> None:
    path = resolve(dom)
    with lock.domain_lock(sim=path, name=os.fspath(dom)):  # not in the middle of a save
        _ext.sim_remove(str(path))
