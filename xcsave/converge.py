"""Auto-converge: slow a busy guest down while precopy runs (QEMU's shape).

:func:`auto_converge` wraps a precopy policy.  The inner policy still
decides when to stop (or abort); auto-converge only adds a throttle to its
CONTINUE verdicts (:attr:`~xcsave.policy.Verdict.throttle`), which the
supervisor applies through the domain's actuator (:mod:`xcsave.throttle`)
before it lets the next round start, and which the save lifts at its end
whatever happens.

When to throttle harder.  QEMU's test, on figures every round has: a round
is *hot* when the guest dirtied more than ``threshold`` (50%) of what the
round sent, i.e. ``dirty_count > threshold * sent``.  Both counts cover the
same round (log-dirty is cleared when a round starts), so this is the same
as ``dirty_rate > threshold * send_rate``, without a division by a round
time that may be 0.  After ``rounds`` (2) hot rounds in a row the throttle
goes up: first to ``initial`` (20%), then by ``increment`` (10) each time,
up to ``ceiling`` (99%); a cool round resets the count.  It never goes down
during a save: the guest has shown it dirties faster than the link.  The
first round (nothing sent before it) is never hot.

Pure: it reads only the :class:`~xcsave.policy.PrecopyStats` it is given,
never a clock, so it decides the same on a recorded curve, in a test and in
the planner's model.  One instance per save (it counts hot rounds).

What a round sent is counted from ``total_written`` between the questions
that carry a dirty count: libxc (the xen backend) asks twice a round, once
after sending with ``dirty_count`` -1 (not counted: nothing is known of the
guest) and once with the count; the sim engine asks once.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Final

from .policy import Decision, Policy, PrecopyStats, Verdict, as_verdict

__all__ = ["DEFAULTS", "AutoConverge", "auto_converge", "parse_auto_converge"]

#: QEMU's cpu-throttle-initial / -increment, and the highest throttle (percent).
DEFAULTS: Final = (20, 10, 99)
MAX_THROTTLE: Final = 99


class AutoConverge:
    """The policy :func:`auto_converge` returns (callable like any policy).

    ``throttles`` tells the save that it will ask for a throttle: the save
    builds the domain's actuator before it starts, so a domain that cannot
    be throttled is refused then, not in the middle of a migration.
    """

    throttles: Final = True

    def __init__(
        self,
        inner: Policy,
        *,
        initial: int,
        increment: int,
        ceiling: int,
        rounds: int,
        threshold: float,
    ) -> None:
        self.inner = inner
        self.initial, self.increment, self.ceiling = initial, increment, ceiling
        self.rounds, self.threshold = rounds, threshold
        self.throttle = 0  # what it asked for last (percent)
        self._hot = 0  # hot rounds in a row
        self._written: int | None = None  # total_written at the last counted question

    def __call__(self, st: PrecopyStats) -> Verdict:
        v = as_verdict(self.inner(st))
        if st.dirty_count < 0:
            return v  # libxc's second question of a round (see the module docstring)
        sent = st.total_written - self._written if self._written is not None else 0
        self._written = st.total_written
        hot = sent > 0 and st.dirty_count > self.threshold * sent
        self._hot = self._hot + 1 if hot else 0
        if v.decision != Decision.CONTINUE:
            return v  # the guest stops (or the save ends): the save lifts the throttle
        if self._hot < self.rounds or self.throttle >= self.ceiling:
            return v
        self._hot = 0
        before = self.throttle
        self.throttle = self.initial if before == 0 else min(before + self.increment, self.ceiling)
        why = (
            f"dirtied {st.dirty_count} while sending {sent} pages"
            f" ({st.dirty_count / sent:.0%}), {self.rounds} round(s) running:"
            f" throttle {before}% -> {self.throttle}%"
        )
        return replace(v, reason=f"{v.reason}; {why}" if v.reason else why, throttle=self.throttle)


def _check(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(
            f"auto-converge {name} must be a whole number from {lo} to {hi}, not {value!r}"
        )
    return value


def auto_converge(
    inner: Policy,
    *,
    initial: int = DEFAULTS[0],
    increment: int = DEFAULTS[1],
    ceiling: int = DEFAULTS[2],
    rounds: int = 2,
    threshold: float = 0.5,
) -> AutoConverge:
    """``inner``, plus a throttle raised in steps while the guest dirties
    faster than the link sends (see the module docstring); ValueError for
    a bad setting, in one line."""
    _check("ceiling", ceiling, 1, MAX_THROTTLE)
    _check("initial", initial, 1, ceiling)
    _check("increment", increment, 1, MAX_THROTTLE)
    _check("rounds", rounds, 1, 1000)
    if not (isinstance(threshold, int | float) and 0 < threshold <= 100):
        raise ValueError(f"auto-converge threshold must be above 0, not {threshold!r}")
    return AutoConverge(
        inner,
        initial=initial,
        increment=increment,
        ceiling=ceiling,
        rounds=rounds,
        threshold=float(threshold),
    )


def parse_auto_converge(text: str) -> tuple[int, int, int]:
    """``--auto-converge``'s value, ``INITIAL:INCREMENT[:CEILING]`` ("" for
    the defaults) -> (initial, increment, ceiling); ValueError in one line."""
    if text == "":
        return DEFAULTS
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(p.strip().isdigit() for p in parts):
        raise ValueError(
            f"bad --auto-converge {text!r}: expected INITIAL:INCREMENT[:CEILING], "
            "whole percents (e.g. 20:10 or 20:10:99)"
        )
    initial, increment = int(parts[0]), int(parts[1])
    ceiling = int(parts[2]) if len(parts) == 3 else DEFAULTS[2]
    auto_converge(
        lambda st: Decision.CONTINUE, initial=initial, increment=increment, ceiling=ceiling
    )  # the same checks, the same messages
    return initial, increment, ceiling
