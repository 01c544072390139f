"""Precopy policies: what to do before each live-migration round.

The helper asks ``precopy_policy(iteration, total_written, dirty_count)``
once per round (never per batch).  The supervisor adds what its clock knows
(:class:`Curve`: when it was asked, how long the last round took, the send
and dirty rates it measured) and hands the policy a :class:`PrecopyStats`.
A policy is any callable ``(PrecopyStats) -> Decision | Verdict``: a bare
:class:`Decision`, or a :class:`Verdict` that also says why (and, for
auto-converge, how hard to throttle the guest).  The ones here are the usual
choices, and they compose: :func:`first_of` asks several in turn,
:func:`guarantee` (and :func:`xcsave.converge.auto_converge`) wraps one.
Every answer says why, CONTINUE included: the reasons are what ``--progress
plain`` and ``--json`` show for each round.

The policies that read the curve:

* :func:`stall`: stop and copy once the dirty count has stopped setting new
  lows for K rounds, instead of after a fixed count;
* :func:`downtime_ramp`: a downtime target that starts tight and is raised
  in steps up to a ceiling, then the migration is aborted;
* :func:`guarantee`: suspend only if the predicted downtime is under D,
  otherwise abort.

:func:`parse` reads the command line's grammar (``--policy``) into a
:class:`PolicySpec`, a factory: a policy keeps its history in closures, so
each save (and each run of the planner's model) gets a fresh one.

Policies read only the stats they are given, never a clock: the same policy
decides the same way on a recorded curve, in a test, and in the planner's
model (:mod:`xcsave.predict`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import IntEnum

from .defaults import XEN_DIRTY_THRESHOLD, XEN_MAX_ITERS

__all__ = [
    "Curve",
    "Decision",
    "Policy",
    "PolicySpec",
    "PrecopyStats",
    "Verdict",
    "abort_if_not_converging",
    "as_verdict",
    "downtime_ramp",
    "downtime_target",
    "first_of",
    "guarantee",
    "max_iterations",
    "parse",
    "stall",
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

    A round is measured from the last question that carried a dirty count:
    libxc (the xen backend) asks twice a round, once when a pass has been
    sent, with dirty_count -1, and again a moment later with the count it
    has just read; measured against the first, the second would see a
    round of microseconds that sent nothing (no rate, no prediction).  The
    sim engine asks once a round, always with the count.
    """

    def __init__(self) -> None:
        self.rounds: list[PrecopyStats] = []

    def add(self, st: PrecopyStats, elapsed: float) -> PrecopyStats:
        if not self.rounds:
            out = replace(st, elapsed=elapsed)
        else:
            prev = next((r for r in reversed(self.rounds) if r.dirty_count >= 0), self.rounds[-1])
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


def ms_text(seconds: float) -> str:
    """A downtime for a reason: whole milliseconds, a tenth below 10 ms."""
    ms = seconds * 1e3
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.1f} ms"


def _predicted(st: PrecopyStats) -> str:
    d = st.predicted_downtime_s
    if d is not None:
        return f"predicted downtime {ms_text(d)}"
    return "dirty count unknown" if st.dirty_count < 0 else "no round measured yet"


def xen_default(max_iters: int = XEN_MAX_ITERS, threshold: int = XEN_DIRTY_THRESHOLD) -> Policy:
    """libxc 4.17's built-in policy: stop when fewer than ``threshold`` pages
    are dirty or after ``max_iters`` rounds (Xen's 5 and 50, :mod:`xcsave.defaults`:
    the helper's own policy when none is given is the same)."""

    def policy(st: PrecopyStats) -> Verdict:
        if 0 <= st.dirty_count < threshold:
            return Verdict(Decision.STOP_AND_COPY, f"{st.dirty_count} dirty < {threshold}")
        if st.iteration >= max_iters:
            return Verdict(Decision.STOP_AND_COPY, f"{max_iters} rounds done")
        dirty = (
            f"{st.dirty_count} dirty >= {threshold}" if st.dirty_count >= 0 else "dirty unknown"
        )
        return Verdict(Decision.CONTINUE, f"{dirty}, round {st.iteration} of {max_iters}")

    return policy


def max_iterations(n: int) -> Policy:
    """Stop and copy after ``n`` precopy rounds, whatever is dirty."""

    def policy(st: PrecopyStats) -> Verdict:
        if st.iteration >= n:
            return Verdict(Decision.STOP_AND_COPY, f"{n} rounds done")
        return Verdict(Decision.CONTINUE, f"round {st.iteration} of {n}")

    return policy


def _target(st: PrecopyStats, target_s: float) -> Verdict:
    """Stop and copy when the predicted downtime is within ``target_s``, else
    go on (nothing dirty stops at once, even before a rate is measured)."""
    if st.dirty_count == 0:
        return Verdict(Decision.STOP_AND_COPY, "nothing is dirty")
    downtime = st.predicted_downtime_s
    if downtime is not None and downtime <= target_s:
        return Verdict(
            Decision.STOP_AND_COPY,
            f"predicted downtime {ms_text(downtime)} <= target {ms_text(target_s)}",
        )
    over = " >" if downtime is not None else ": not yet within"
    return Verdict(Decision.CONTINUE, f"{_predicted(st)}{over} target {ms_text(target_s)}")


def downtime_target(max_downtime_s: float, *, max_iters: int = 30) -> Policy:
    """Stop when the dirty set could be sent within ``max_downtime_s`` at the
    send rate the last round measured (:attr:`PrecopyStats.predicted_downtime_s`),
    like a toolstack's downtime target; after ``max_iters`` rounds, stop anyway."""

    def policy(st: PrecopyStats) -> Verdict:
        v = _target(st, max_downtime_s)
        if v.decision == Decision.CONTINUE and st.iteration >= max_iters:
            return Verdict(Decision.STOP_AND_COPY, f"{max_iters} rounds done")
        return v

    return policy


def stall(rounds: int = 3, *, max_iters: int = 30) -> Policy:
    """Stop and copy at the low point: go on while the dirty count keeps
    falling (each round a new low); once it has set no new low for ``rounds``
    rounds in a row, stop at once, instead of running out a fixed count.

    "At the low point" is as near as a policy can get: it is asked before a
    round, and cannot go back to the round where the count was lowest, so the
    copy stops ``rounds`` rounds after it, with whatever is dirty then (on a
    stalled curve, about as much).  A tie is not a new low.  A round whose
    dirty count is unknown (-1) counts neither way; nothing dirty stops at
    once; after ``max_iters`` rounds, stop anyway (the backstop for a count
    that falls a little every round forever)."""
    if rounds < 1:
        raise ValueError("stall needs at least 1 round")
    low = -1  # the lowest dirty count seen (-1: none yet)
    low_at = 0  # the round it was seen before
    since = 0  # rounds since then without a new low

    def policy(st: PrecopyStats) -> Verdict:
        nonlocal low, low_at, since
        d = st.dirty_count
        if d == 0:
            return Verdict(Decision.STOP_AND_COPY, "nothing is dirty")
        if d > 0 and (low < 0 or d < low):
            low, low_at, since = d, st.iteration, 0
        elif d > 0:
            since += 1
        if since >= rounds:
            return Verdict(
                Decision.STOP_AND_COPY,
                f"stalled: {d} dirty, no new low for {since} rounds (low {low} at round {low_at})",
            )
        if st.iteration >= max_iters:
            return Verdict(Decision.STOP_AND_COPY, f"{max_iters} rounds done")
        if d < 0:
            return Verdict(Decision.CONTINUE, "dirty count unknown: not counted")
        if since == 0:
            return Verdict(Decision.CONTINUE, f"{d} dirty: a new low")
        return Verdict(
            Decision.CONTINUE, f"{d} dirty, no new low for {since} of {rounds} rounds (low {low})"
        )

    return policy


def downtime_ramp(start_s: float, step_s: float, every: int, ceiling_s: float) -> Policy:
    """A downtime target that starts tight and is raised in steps: ``start_s``
    for the first ``every`` rounds, then ``step_s`` more every ``every`` rounds,
    up to ``ceiling_s`` (the last step is cut to it).  Stop and copy as soon as
    the predicted downtime is within the target of the round; once the
    ceiling has had its ``every`` rounds, abort: the guest dirties faster than
    the link can ever catch up within the ceiling.

    The step is read from the round number, not counted: the answer for a
    round does not depend on which rounds the policy was asked about.  An
    unknown dirty count (libxc asks once a round without it) never aborts,
    until a further ``every`` rounds past the ceiling have brought none."""
    if not (0 <= start_s <= ceiling_s) or step_s <= 0 or every < 1:
        raise ValueError("a ramp needs 0 <= START <= CEILING, STEP > 0 and EVERY >= 1")
    # Raises until the ceiling (less a hair: 0.3 / 0.1 is 3.0000000000000004).
    steps = max(math.ceil((ceiling_s - start_s) / step_s - 1e-9), 0)

    def policy(st: PrecopyStats) -> Verdict:
        k = max(st.iteration - 1, 0) // every  # round 1 is the first one asked about
        v = _target(st, min(start_s + k * step_s, ceiling_s))
        if st.dirty_count < 0 and k <= steps + 1:
            return v  # libxc's question after a pass: the count comes with the next one
        if v.decision == Decision.CONTINUE and k > steps:
            return Verdict(
                Decision.ABORT,
                f"{_predicted(st)}, not within the ceiling {ms_text(ceiling_s)}"
                f" after {every} rounds at it: not converging",
            )
        return v

    return policy


def guarantee(max_downtime_s: float, inner: Policy | None = None) -> Policy:
    """Suspend only if the predicted downtime is at most ``max_downtime_s``,
    otherwise abort: ``inner`` (Xen's default if None) decides when to stop,
    and its STOP_AND_COPY stands only when the dirty set could be sent within
    ``max_downtime_s`` at the measured send rate
    (:attr:`PrecopyStats.predicted_downtime_s`).  Its CONTINUE and ABORT,
    and any throttle, pass through.

    When the prediction is unknown: nothing dirty is nothing to copy (the
    stop stands).  Before any round has been measured (the first question:
    no send rate yet) the guarantee cannot be checked, so it runs one more
    round to measure it, once.  Without a dirty count (libxc asks once a
    round without it, and again with it) the stop waits for the next
    question, unless the one before had no count either.  Otherwise an
    unknown prediction (no count twice in a row, or the last round sent
    nothing) cannot be guaranteed: abort.

    The prediction covers the pages, not the device state or the
    destination's resume.  libxc sends one more live pass after a stop, so
    its downtime is what that pass leaves dirty: within the prediction while
    the guest dirties slower than the link sends."""
    pol = inner if inner is not None else xen_default()
    measuring = False  # the one round run to measure has been asked for
    counting = False  # the last question had no dirty count and a stop was put off

    def policy(st: PrecopyStats) -> Verdict:
        nonlocal measuring, counting
        v = as_verdict(pol(st))
        put_off, counting = counting, False
        if v.decision != Decision.STOP_AND_COPY or st.dirty_count == 0:
            return v
        wanted = f"{v.reason}, but " if v.reason else ""
        bound = ms_text(max_downtime_s)
        downtime = st.predicted_downtime_s
        if downtime is None and st.dirty_count < 0 and not put_off:
            counting = True
            return Verdict(
                Decision.CONTINUE,
                f"{wanted}no dirty count: the next question has it (downtime <= {bound}?)",
                v.throttle,
            )
        if downtime is None and st.dirty_count > 0 and st.round_s == 0 and not measuring:
            measuring = True
            return Verdict(
                Decision.CONTINUE,
                f"{wanted}no round measured yet: one more to check the downtime <= {bound}",
                v.throttle,
            )
        if downtime is None:
            unknown = "dirty count" if st.dirty_count < 0 else "send rate"
            return Verdict(
                Decision.ABORT,
                f"{wanted}the {unknown} is unknown: a downtime <= {bound} cannot be guaranteed",
            )
        if downtime > max_downtime_s:
            return Verdict(
                Decision.ABORT,
                f"{wanted}{_predicted(st)} > guaranteed {bound}",
            )
        return v

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
    When all continue, the first throttle asked for (and its reason) stands;
    without one, the first reason given."""

    def policy(st: PrecopyStats) -> Verdict:
        going = Verdict(Decision.CONTINUE)
        for p in policies:
            v = as_verdict(p(st))
            if v.decision != Decision.CONTINUE:
                return v
            if going.throttle is None and (v.throttle is not None or not going.reason):
                going = v
        return going

    return policy


# ----------------------------------------------------------------- the grammar

#: The ``--policy`` grammar (help texts and error messages say it so).
GRAMMAR = (
    "[guarantee:MS+]TERM[+TERM...] where TERM is xen[:ITERS[:THRESHOLD]], max-iters:N, "
    "downtime:MS, stall:K[:MAX_ITERS], ramp:START_MS:STEP_MS:EVERY:CEILING_MS, converge "
    "or abort"
)
MAX_SPEC = 512  # characters: a policy is a few terms, not a document


@dataclass(frozen=True)
class PolicySpec:
    """A parsed ``--policy``: its text, and a factory of fresh policies (a
    policy keeps its history: one per save, one per run of the model)."""

    text: str
    factory: Callable[[], Policy]

    def make(self) -> Policy:
        return self.factory()


def _count(arg: str, what: str) -> int:
    """A whole number of rounds or pages: decimal digits only (int() would
    also take a sign, spaces, underscores and other scripts' digits)."""
    if not re.fullmatch(r"[0-9]{1,18}", arg):
        raise ValueError(f"{what} must be a whole number, not {arg!r}")
    return int(arg)


def _millis(arg: str, what: str) -> float:
    """Milliseconds, in seconds: digits with an optional fraction (no sign,
    no exponent, no nan or inf)."""
    if not re.fullmatch(r"[0-9]{1,12}(\.[0-9]{1,6})?", arg):
        raise ValueError(f"{what} must be milliseconds (e.g. 300 or 2.5), not {arg!r}")
    return float(arg) / 1000.0


def _args(name: str, args: list[str], usage: str, least: int, most: int) -> list[str]:
    if not least <= len(args) <= most:
        raise ValueError(f"{name!r} is {usage}")
    return args


def _xen(args: list[str]) -> Callable[[], Policy]:
    a = _args("xen", args, "xen[:ITERS[:THRESHOLD]]", 0, 2)
    nums = [_count(x, w) for x, w in zip(a, ("ITERS", "THRESHOLD"), strict=False)]
    return lambda: xen_default(*nums)


def _max_iters(args: list[str]) -> Callable[[], Policy]:
    n = _count(_args("max-iters", args, "max-iters:N", 1, 1)[0], "N")
    return lambda: max_iterations(n)


def _downtime(args: list[str]) -> Callable[[], Policy]:
    ms = _millis(_args("downtime", args, "downtime:MS", 1, 1)[0], "MS")
    return lambda: downtime_target(ms)


def _stall(args: list[str]) -> Callable[[], Policy]:
    a = _args("stall", args, "stall:K[:MAX_ITERS]", 1, 2)
    k = _count(a[0], "K")
    if k < 1:
        raise ValueError("stall's K must be at least 1")
    most = _count(a[1], "MAX_ITERS") if len(a) > 1 else 30
    return lambda: stall(k, max_iters=most)


def _ramp(args: list[str]) -> Callable[[], Policy]:
    a = _args("ramp", args, "ramp:START_MS:STEP_MS:EVERY:CEILING_MS", 4, 4)
    start, step = _millis(a[0], "START_MS"), _millis(a[1], "STEP_MS")
    every, ceiling = _count(a[2], "EVERY"), _millis(a[3], "CEILING_MS")
    downtime_ramp(start, step, every, ceiling)  # its checks, now rather than at the first round
    return lambda: downtime_ramp(start, step, every, ceiling)


def _fixed(name: str, make: Callable[[], Policy]) -> Callable[[list[str]], Callable[[], Policy]]:
    def form(args: list[str]) -> Callable[[], Policy]:
        _args(name, args, f"{name}, without arguments", 0, 0)
        return make

    return form


def _guarantee(args: list[str]) -> Callable[[Policy], Policy]:
    ms = _millis(_args("guarantee", args, "guarantee:MS", 1, 1)[0], "MS")
    return lambda inner: guarantee(ms, inner)


def _abort() -> Policy:
    return lambda st: Verdict(Decision.ABORT, "always abort")


def _converge() -> Policy:
    return first_of(abort_if_not_converging(), xen_default())


#: TERM name -> its arguments (after the name, split at ':') -> a factory.
TERMS: dict[str, Callable[[list[str]], Callable[[], Policy]]] = {
    "xen": _xen,
    "max-iters": _max_iters,
    "downtime": _downtime,
    "stall": _stall,
    "ramp": _ramp,
    "converge": _fixed("converge", _converge),
    "abort": _fixed("abort", _abort),
}

#: Wrappers (before the terms): name -> its arguments -> wrap(inner policy).
WRAPPERS: dict[str, Callable[[list[str]], Callable[[Policy], Policy]]] = {
    "guarantee": _guarantee,
}


def parse(text: str) -> PolicySpec:
    """Read a policy in the :data:`GRAMMAR`: terms joined by ``+`` are asked
    in turn (:func:`first_of`); wrappers, written first, wrap what follows,
    the first written outermost (a wrapper alone wraps ``xen``).
    ValueError, saying which part is wrong, for anything else."""
    if len(text) > MAX_SPEC:
        raise ValueError(f"longer than {MAX_SPEC} characters")
    wrappers: list[Callable[[Policy], Policy]] = []
    terms: list[Callable[[], Policy]] = []
    for part in text.split("+"):
        name, *args = part.split(":")
        if name in WRAPPERS:
            if terms:
                raise ValueError(f"{name} must come before the policies it wraps")
            wrappers.append(WRAPPERS[name](args))
        elif name in TERMS:
            terms.append(TERMS[name](args))
        else:
            raise ValueError(f"unknown term {name!r}" if name else "an empty term")

    def make() -> Policy:
        made = [term() for term in terms] or [xen_default()]
        pol = made[0] if len(made) == 1 else first_of(*made)
        for wrap in reversed(wrappers):
            pol = wrap(pol)
        return pol

    return PolicySpec(text, make)
