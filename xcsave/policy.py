"""Precopy policies: what to do before each live-migration round.

The helper asks ``precopy_policy(iteration, total_written, dirty_count)``
once per round (never per batch).  The supervisor adds what its clock knows
(:class:`Curve`: when it was asked, how long the last round took, the send
and dirty rates it measured) and hands the policy a :class:`PrecopyStats`.
A policy is any callable ``(PrecopyStats) -> Decision | Verdict``: a bare
:class:`Decision`, or a :class:`Verdict` that also says why (and, for
auto-converge, how hard to throttle the guest).  The ones here are the usual
choices, and they compose with :func:`first_of`.

Policies read only the stats they are given, never a clock: the same policy
decides the same way on a recorded curve, in a test, and in the planner's
model (:mod:`xcsave.predict`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import IntEnum

from .defaults import XEN_DIRTY_THRESHOLD, XEN_MAX_ITERS

__all__ = [
    "Curve",
    "Decision",
    "Policy",
    "PrecopyStats",
    "Verdict",
    "abort_if_not_converging",
    "as_verdict",
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
    """What is known before round ``iteration``: the helper's three figures
    (the message's args), then what the supervisor measured (:class:`Curve`;
    0 where nothing has been measured yet)."""

    elapsed: float = 0.0  # seconds since the save began, when asked
    round_s: float = 0.0  # how long the previous round took (0 before round 1)
    sent: int = 0  # pages the previous round wrote
    send_rate: float = 0.0  # pages/s the previous round wrote (0: unknown)
    dirty_rate: float = 0.0  # pages/s dirtied while it ran (0: unknown)

    @property
    def predicted_downtime_s(self) -> float | None:
        """Stop and copy now: the dirty pages at the last round's send rate
        (None until a round has been measured)."""
        if self.dirty_count < 0 or self.send_rate <= 0:
            return None
        return self.dirty_count / self.send_rate


@dataclass(frozen=True, slots=True)
class Verdict:
    """A policy's answer with its reason (shown in the events and ``--json``).

    ``throttle``: how hard auto-converge wants the guest slowed from now on,
    in percent of its time taken away (0 lifts it); None leaves it as it is.
    """

    decision: Decision
    reason: str = ""
    throttle: int | None = None


Policy = Callable[[PrecopyStats], Decision | Verdict]


def as_verdict(answer: object) -> Verdict:
    """A policy's answer as a :class:`Verdict` (a bare Decision or int has no
    reason); TypeError or ValueError for anything that is neither."""
    if isinstance(answer, Verdict):
        return answer
    if isinstance(answer, int):  # Decision and bool included
        return Verdict(Decision(int(answer)))
    raise TypeError(f"a policy must return a Decision or a Verdict, not {answer!r}")


class Curve:
    """The precopy rounds so far, as figures a policy can read.

    :meth:`add` takes the helper's three figures and the time they were asked
    at, and returns the :class:`PrecopyStats` with the rates of the round that
    just ended: pages it wrote over its duration, and the pages dirty at its
    end over the same duration (log-dirty is cleared when a round starts, so
    that is the rate the guest dirtied while it ran, saturating at the
    working set).  The supervisor keeps one per save for the events; a
    stateful policy may keep its own.
    """

    def __init__(self) -> None:
        self.rounds: list[PrecopyStats] = []

    def add(self, st: PrecopyStats, elapsed: float) -> PrecopyStats:
        if not self.rounds:
            out = replace(st, elapsed=elapsed)
        else:
            prev = self.rounds[-1]
            dt = max(elapsed - prev.elapsed, 0.0)
            sent = max(st.total_written - prev.total_written, 0)
            out = replace(
                st,
                elapsed=elapsed,
                round_s=dt,
                sent=sent,
                send_rate=sent / dt if dt > 0 else 0.0,
                dirty_rate=st.dirty_count / dt if dt > 0 and st.dirty_count >= 0 else 0.0,
            )
        self.rounds.append(out)
        return out


def xen_default(max_iters: int = XEN_MAX_ITERS, threshold: int = XEN_DIRTY_THRESHOLD) -> Policy:
    """libxc 4.17's built-in policy: stop when fewer than ``threshold`` pages
    are dirty or after ``max_iters`` rounds (Xen's 5 and 50, :mod:`xcsave.defaults`:
    the helper's own policy when none is given is the same)."""

    def policy(st: PrecopyStats) -> Verdict:
        if 0 <= st.dirty_count < threshold:
            return Verdict(Decision.STOP_AND_COPY, f"{st.dirty_count} dirty < {threshold}")
        if st.iteration >= max_iters:
            return Verdict(Decision.STOP_AND_COPY, f"{max_iters} rounds done")
        return Verdict(Decision.CONTINUE)

    return policy


def max_iterations(n: int) -> Policy:
    """Stop and copy after ``n`` precopy rounds, whatever is dirty."""

    def policy(st: PrecopyStats) -> Verdict:
        if st.iteration >= n:
            return Verdict(Decision.STOP_AND_COPY, f"{n} rounds done")
        return Verdict(Decision.CONTINUE)

    return policy


def downtime_target(max_downtime_s: float, *, max_iters: int = 30) -> Policy:
    """Stop when the dirty set could be sent within ``max_downtime_s`` at the
    send rate the last round measured (:attr:`PrecopyStats.predicted_downtime_s`),
    like a toolstack's downtime target; after ``max_iters`` rounds, stop anyway."""

    def policy(st: PrecopyStats) -> Verdict:
        if st.dirty_count == 0:
            return Verdict(Decision.STOP_AND_COPY, "nothing is dirty")
        if st.iteration >= max_iters:
            return Verdict(Decision.STOP_AND_COPY, f"{max_iters} rounds done")
        downtime = st.predicted_downtime_s
        if downtime is not None and downtime <= max_downtime_s:
            return Verdict(
                Decision.STOP_AND_COPY,
                f"predicted downtime {downtime * 1e3:.0f} ms"
                f" <= target {max_downtime_s * 1e3:.0f} ms",
            )
        return Verdict(Decision.CONTINUE)

    return policy


def abort_if_not_converging(rounds: int = 3, min_shrink: float = 0.05) -> Policy:
    """Abort when the dirty set has not shrunk by ``min_shrink`` over ``rounds`` rounds."""
    history: list[int] = []

    def policy(st: PrecopyStats) -> Verdict:
        if st.dirty_count >= 0:
            history.append(st.dirty_count)
        if len(history) > rounds:
            before, now = history[-rounds - 1], history[-1]
            if before > 0 and now > before * (1.0 - min_shrink):
                return Verdict(
                    Decision.ABORT,
                    f"not converging: {now} dirty, {before} {rounds} rounds ago",
                )
        return Verdict(Decision.CONTINUE)

    return policy


def first_of(*policies: Policy) -> Policy:
    """Ask each policy in turn; the first answer other than CONTINUE wins.
    When all continue, the first throttle asked for (and its reason) stands."""

    def policy(st: PrecopyStats) -> Verdict:
        going = Verdict(Decision.CONTINUE)
        for p in policies:
            v = as_verdict(p(st))
            if v.decision != Decision.CONTINUE:
                return v
            if going.throttle is None and v.throttle is not None:
                going = v
        return going

    return policy
