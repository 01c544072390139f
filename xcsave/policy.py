"""Precopy policies: what to do before each live-migration round.

The helper asks ``precopy_policy(iteration, total_written, dirty_count)``
once per round (never per batch), and the answer is one of
:class:`Decision`.  A policy is any callable ``(PrecopyStats) -> Decision``;
the ones here are the usual choices, and they compose with :func:`first_of`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from .defaults import PAGE_SIZE, XEN_DIRTY_THRESHOLD, XEN_MAX_ITERS

__all__ = [
    "Decision",
    "Policy",
    "PrecopyStats",
    "abort_if_not_converging",
    "downtime_target",
    "first_of",
    "max_iterations",
    "xen_default",
]


class Decision(IntEnum):
    """xenguest.h's XGS_POLICY_* values, as sent back to the helper."""

    ABORT = -1
    CONTINUE = 0
    STOP_AND_COPY = 1


@dataclass(frozen=True)
class _PrecopyFields:
    """The fields of :class:`PrecopyStats` and :class:`~xcsave.events.PolicyEvent`."""

    __slots__ = ()
    iteration: int  # round about to start (0 = the first, all pages)
    total_written: int  # pages written so far
    dirty_count: int  # pages dirty now; -1 if unknown


@dataclass(frozen=True, slots=True)
class PrecopyStats(_PrecopyFields):
    """What the helper knows before round ``iteration``."""


Policy = Callable[[PrecopyStats], Decision]


def xen_default(max_iters: int = XEN_MAX_ITERS, threshold: int = XEN_DIRTY_THRESHOLD) -> Policy:
    """libxc 4.17's built-in policy: stop when fewer than ``threshold`` pages
    are dirty or after ``max_iters`` rounds (Xen's 5 and 50, :mod:`xcsave.defaults`:
    the helper's own policy when none is given is the same)."""

    def policy(st: PrecopyStats) -> Decision:
        if (0 <= st.dirty_count < threshold) or st.iteration >= max_iters:
            return Decision.STOP_AND_COPY
        return Decision.CONTINUE

    return policy


def max_iterations(n: int) -> Policy:
    """Stop and copy after ``n`` precopy rounds, whatever is dirty."""

    def policy(st: PrecopyStats) -> Decision:
        return Decision.STOP_AND_COPY if st.iteration >= n else Decision.CONTINUE

    return policy


def downtime_target(
    max_downtime_s: float,
    *,
    page_size: int = PAGE_SIZE,
    max_iters: int = 30,
    clock: Callable[[], float] = time.monotonic,
) -> Policy:
    """Stop when the dirty set could be sent within ``max_downtime_s``.

    The transfer rate is measured from the rounds so far (pages written
    between two consecutive questions over the time between them), so the
    estimate tracks the real link, like a toolstack's downtime target.
    """
    last: list[tuple[float, int]] = []

    def policy(st: PrecopyStats) -> Decision:
        now = clock()
        rate = 0.0
        if last:
            t0, w0 = last[-1]
            if now > t0 and st.total_written > w0:
                rate = (st.total_written - w0) * page_size / (now - t0)
        last.append((now, st.total_written))
        if st.iteration >= max_iters or st.dirty_count == 0:
            return Decision.STOP_AND_COPY
        if (
            st.dirty_count >= 0
            and rate > 0
            and st.dirty_count * page_size / rate <= max_downtime_s
        ):
            return Decision.STOP_AND_COPY
        return Decision.CONTINUE

    return policy


def abort_if_not_converging(rounds: int = 3, min_shrink: float = 0.05) -> Policy:
    """Abort when the dirty set has not shrunk by ``min_shrink`` over ``rounds`` rounds."""
    history: list[int] = []

    def policy(st: PrecopyStats) -> Decision:
        if st.dirty_count >= 0:
            history.append(st.dirty_count)
        if len(history) > rounds:
            before, now = history[-rounds - 1], history[-1]
            if before > 0 and now > before * (1.0 - min_shrink):
                return Decision.ABORT
        return Decision.CONTINUE

    return policy


def first_of(*policies: Policy) -> Policy:
    """Ask each policy in turn; the first answer other than CONTINUE wins."""

    def policy(st: PrecopyStats) -> Decision:
        for p in policies:
            d = p(st)
            if d != Decision.CONTINUE:
                return d
        return Decision.CONTINUE

    return policy
