"""Simulated domains: typed access to the native sim backend (``xcsave._ext``).

A simulated domain is one file (format: ``docs/sim-format.md``): a header,
vCPU state, guest pages and a log-dirty bitmap that any writer sets as it
writes pages, the way a hypervisor would.  ``DOM`` on the command line is a
path, or a bare name that lives in ``$XCSAVE_SIM_DIR`` (default
``/dev/shm/xcsave``, memory-backed and fast).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

from . import _ext, lock

__all__ = [
    "PAGE_SIZE",
    "SIM_DIR",
    "create",
    "digest",
    "info",
    "remove",
    "resolve",
    "set_logdirty",
    "set_state",
]

PAGE_SIZE: Final = 4096
SIM_DIR: Final = "/dev/shm/xcsave"


def resolve(dom: str | os.PathLike[str]) -> Path:
    """A bare name ``vm1`` lives in ``$XCSAVE_SIM_DIR``; anything with a ``/`` is a path."""
    text = os.fspath(dom)
    if "/" in text:
        return Path(text)
    base = Path(os.environ.get("XCSAVE_SIM_DIR", SIM_DIR))
    base.mkdir(parents=True, exist_ok=True)
    return base / text


def create(dom: str | os.PathLike[str], memory: int, vcpus: int = 1, seed: int = 0) -> Path:
    """Create a domain of ``memory`` bytes (a whole number of pages) with seeded contents."""
    if memory <= 0 or memory % PAGE_SIZE:
        raise ValueError(f"memory must be a positive multiple of {PAGE_SIZE} bytes, not {memory}")
    path = resolve(dom)
    with lock.domain_lock(sim=path, name=os.fspath(dom)):  # one operation per domain
        _ext.sim_create(str(path), memory // PAGE_SIZE, vcpus, seed)
    return path


def info(dom: str | os.PathLike[str]) -> dict[str, Any]:
    return dict(_ext.sim_info(str(resolve(dom))))


def digest(dom: str | os.PathLike[str]) -> str:
    """One hash over memory and vCPU state (hex)."""
    return str(_ext.sim_digest(str(resolve(dom))))


def set_state(dom: str | os.PathLike[str], state: str) -> None:
    """``running``, ``paused`` or ``suspended``."""
    _ext.sim_set_state(str(resolve(dom)), state)


def set_logdirty(dom: str | os.PathLike[str], enable: bool) -> None:
    """Log-dirty on (clears the bitmap) or off, as the hypervisor's switch."""
    _ext.sim_set_logdirty(str(resolve(dom)), enable)


def dirty(dom: str | os.PathLike[str], rate: int, duration: float, seed: int = 0) -> int:
    """Write ``rate`` pages/s for ``duration`` s through the dirty log; returns pages written."""
    return int(_ext.sim_dirty(str(resolve(dom)), rate, duration, seed))


def remove(dom: str | os.PathLike[str]) -> None:
    path = resolve(dom)
    with lock.domain_lock(sim=path, name=os.fspath(dom)):  # not in the middle of a save
        _ext.sim_remove(str(path))
