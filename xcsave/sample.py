"""Sampling a running guest's dirty log: what ``xcsave plan`` measures.

Log-dirty goes on for a few seconds; every ``interval`` the dirty log is
taken (read and cleared, as a save's round takes it) and the pages it
named are added to a union.  The result is a :class:`~xcsave.predict.Profile`:
the pages taken at each interval (and how long each interval really was),
and the union, from which the model gets the dirty rate and working set.

Log-dirty is off again afterwards whatever happens: an error, a
cancellation (SIGINT/SIGTERM cancel the CLI's task), or a helper that dies.

- A simulated domain is sampled here, through ``xcsave._ext``
  (``sim_set_logdirty``, ``sim_logdirty_take``); the ``finally`` turns it off.
- A Xen domain is sampled by a one-shot helper (``--xcsave-1 logdirty``,
  csrc/logdirty.c: libxenctrl's shadow-control ENABLE_LOGDIRTY, CLEAN, OFF)
  that reports each sample in a ``logdirty_sample`` message.  The helper
  turns log-dirty off itself when it ends or is stopped (SIGTERM, its
  parent's death); if it dies without saying ``logdirty_off`` after it said
  ``logdirty_on``, :func:`sample_xen` runs ``--xcsave-1 logdirty --off``.

The caller holds the domain's lock (:func:`xcsave.api.plan` does): a save
also uses log-dirty, and the two must never overlap.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

from ._log import logger
from .events import Event, LogdirtyOffEvent, LogdirtyOnEvent, LogdirtySampleEvent
from .predict import Profile

# asyncio and the supervisor load when a sample runs: the CLI's parsers import
# this module (xcsave/cmd_plan.py) for every command.

__all__ = ["DEFAULT_INTERVAL_S", "DEFAULT_SECONDS", "sample_sim", "sample_xen"]

log = logger(__name__)

#: How long a plan samples by default, and how often it takes the log.
DEFAULT_SECONDS: Final = 3.0
DEFAULT_INTERVAL_S: Final = 0.1
#: The bounds of ``--sample-seconds``.
MIN_SECONDS: Final = 0.2
MAX_SECONDS: Final = 600.0
#: A log-dirty helper's time bound beyond its sampling (start, hypercalls, off).
HELPER_SLACK_S: Final = 30.0


def _intervals(seconds: float, interval: float) -> int:
    if not MIN_SECONDS <= seconds <= MAX_SECONDS:
        raise ValueError(
            f"sample seconds must be from {MIN_SECONDS:g} to {MAX_SECONDS:g}, not {seconds}"
        )
    if not 0.01 <= interval <= seconds:
        raise ValueError(f"interval must be from 0.01 s to the sample's length, not {interval}")
    return max(1, round(seconds / interval))


async def sample_sim(
    path: str | os.PathLike[str],
    seconds: float = DEFAULT_SECONDS,
    interval: float = DEFAULT_INTERVAL_S,
) -> Profile:
    """Sample the dirty log of the simulated domain at ``path`` (resolved, locked)."""
    import asyncio

    from . import _ext, sim

    n = _intervals(seconds, interval)
    p = str(path)
    meta = sim.info(p)
    pages = int(meta["pages"])
    union = bytearray((pages + 63) // 64 * 8)
    samples: list[tuple[float, int]] = []
    _ext.sim_set_logdirty(p, True)
    try:
        start = last = time.monotonic()
        for i in range(1, n + 1):
            await asyncio.sleep(max(0.0, start + i * interval - time.monotonic()))
            taken = int(_ext.sim_logdirty_take(p, union))
            now = time.monotonic()
            samples.append((now - last, taken))
            last = now
    finally:
        # Whatever happened (a cancellation lands in the sleep): off again.
        _ext.sim_set_logdirty(p, False)
    return Profile(pages, tuple(samples), int.from_bytes(union, "little").bit_count())


async def sample_xen(
    domid: int,
    seconds: float = DEFAULT_SECONDS,
    interval: float = DEFAULT_INTERVAL_S,
    *,
    helper: str | os.PathLike[str] | None = None,
    lock_fd: int | None = None,
    on_event: Callable[[Event], object] | None = None,
) -> Profile:
    """Sample the dirty log of Xen domain ``domid`` through a one-shot helper."""
    n = _intervals(seconds, interval)
    state: dict[str, object] = {"on": False, "off": False, "pages": 0}
    samples: list[tuple[float, int]] = []
    union = [0]

    def seen(ev: Event) -> None:
        if isinstance(ev, LogdirtyOnEvent):
            state["on"] = True
            state["pages"] = ev.nr_pages
        elif isinstance(ev, LogdirtyOffEvent):
            state["off"] = True
        elif isinstance(ev, LogdirtySampleEvent):
            samples.append((ev.interval_ns / 1e9, ev.dirty))
            union[0] = ev.union_pages
        if on_event is not None:
            on_event(ev)

    args = (
        "--xcsave-1",
        "logdirty",
        "--domid",
        str(domid),
        "--interval-ms",
        str(max(1, round(interval * 1000))),
        "--samples",
        str(n),
    )
    try:
        await _run_logdirty(
            domid, args, helper, lock_fd, seen, timeout=n * interval + HELPER_SLACK_S
        )
    finally:
        if state["on"] and not state["off"]:
            # The helper said it turned log-dirty on and never that it
            # turned it off (killed, crashed): do it for it.  Shielded: a
            # cancellation must not stop the clean-up half-way.
            import asyncio

            log.warning("the log-dirty helper of domid %d ended with log-dirty on: off", domid)
            await asyncio.shield(logdirty_off(domid, helper=helper, lock_fd=lock_fd))
    return Profile(int(str(state["pages"])), tuple(samples), union[0])


async def logdirty_off(
    domid: int,
    *,
    helper: str | os.PathLike[str] | None = None,
    lock_fd: int | None = None,
) -> None:
    """Turn Xen domain ``domid``'s log-dirty off (a one-shot helper ``--off``)."""
    args = ("--xcsave-1", "logdirty", "--domid", str(domid), "--off")
    await _run_logdirty(domid, args, helper, lock_fd, None, timeout=HELPER_SLACK_S)


async def _run_logdirty(
    domid: int,
    args: tuple[str, ...],
    helper: str | os.PathLike[str] | None,
    lock_fd: int | None,
    on_event: Callable[[Event], object] | None,
    *,
    timeout: float,
) -> None:
    from . import proto
    from .supervisor import Callbacks, HelperRun, HelperSpec

    spec = HelperSpec(
        mode="logdirty",
        dialect=proto.XCSAVE_1,
        args=args,
        pass_fds=(lock_fd,) if lock_fd is not None else (),
        domain=f"domid {domid}",
        domid=domid,
        backend="xen",
        helper=Path(helper) if helper is not None else None,
    )
    await HelperRun(spec, Callbacks(), on_event).run(timeout)
