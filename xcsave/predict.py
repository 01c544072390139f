"""The planner's model: how a live migration of a measured guest will go.

A :class:`Profile` is what ``xcsave plan`` measured with log-dirty on for a
few seconds: the pages taken from the dirty log at each interval and the
union of them (the pages written at least once).  From it come the two
figures the model runs on: the guest's **dirty rate** (page writes per
second) and its **working set** (how many pages those writes land in).

:func:`predict` then plays the precopy rounds on model time, against a link
that carries ``link`` pages/s, under the REAL policy (a fresh instance from
the caller's factory, asked with :class:`~xcsave.policy.PrecopyStats` built
through :class:`~xcsave.policy.Curve`, exactly as the supervisor asks it):

- round 0 sends every page (less the zero pages a save skips:
  :attr:`Costs.sent_fraction`) and lasts ``pages / link``;
- the pages dirty after a round of ``t`` seconds are the working set's
  coverage by ``r * t`` uniformly random writes, ``W * (1 - exp(-r t / W))``
  (the writes of ``xcsave sim dirty`` are uniform over the whole domain;
  a real guest's hot set is what the measured ``W`` stands for);
- the policy decides before each further round; a Verdict's ``throttle``
  scales the dirty rate by ``(100 - throttle) / 100`` from the next round on;
- the stop-and-copy sends what is dirty then: the downtime is that at the
  link's rate plus the fixed cost of stopping (:attr:`Costs.downtime_s`).

Nothing here reads a clock: the same inputs give the same prediction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

from .defaults import PAGE_SIZE
from .policy import Curve, Decision, Policy, PrecopyStats, as_verdict

__all__ = [
    "DEFAULT_MAX_DOWNTIME_S",
    "PAGE_STREAM_BYTES",
    "Costs",
    "Plan",
    "Prediction",
    "Profile",
    "Round",
    "coverage",
    "pages_per_s",
    "predict",
    "working_set",
]

#: The go / no-go downtime target when none is given (QEMU's default limit).
DEFAULT_MAX_DOWNTIME_S = 0.3
#: The model gives up on a policy that never stops after this many rounds.
MAX_MODEL_ROUNDS = 10000


def coverage(working_set: float, writes: float) -> float:
    """Distinct pages hit by ``writes`` uniformly random writes over
    ``working_set`` pages (the expected occupancy)."""
    if working_set <= 0 or writes <= 0:
        return 0.0
    return working_set * -math.expm1(-writes / working_set)


def _writes(working_set: float, distinct: float) -> float:
    """The writes it takes to hit ``distinct`` pages of ``working_set`` (inverse of
    :func:`coverage`; infinite at or past the whole set)."""
    if distinct >= working_set:
        return math.inf
    return -working_set * math.log1p(-distinct / working_set)


def working_set(samples: Sequence[int], union: int, memory_pages: int) -> tuple[float, int]:
    """The page writes and working set that explain the samples.

    ``samples`` are the pages taken from the dirty log at each interval,
    ``union`` the distinct pages among all of them.  Writes within one
    interval that hit a page twice count once, and so do pages written in
    several intervals: the working set ``W`` is the one for which the
    writes that explain each interval's count (:func:`_writes`) cover
    exactly ``union`` pages.  Returns ``(writes, W)``; when the sample shows
    no overlap to speak of (a set too large to tell within the sample), ``W``
    is the whole memory, the honest upper bound.
    """
    counts = [c for c in samples if c > 0]
    if not counts or union <= 0:
        return 0.0, 0
    lo, hi = float(max(union, *counts)), float(memory_pages)

    def writes(w: float) -> float:
        return sum(_writes(w, c) for c in counts)

    def excess(w: float) -> float:  # covered - union: < 0 at lo, rises with w
        return coverage(w, writes(w)) - union

    if hi <= lo or excess(hi) <= 0:
        w = max(hi, lo)
        return writes(w), round(w)
    if excess(lo) >= 0:
        return writes(lo), round(lo)
    for _ in range(100):  # bisection: excess() is monotone in w
        mid = (lo + hi) / 2
        if excess(mid) < 0:
            lo = mid
        else:
            hi = mid
        if hi - lo < 0.5:
            break
    w = (lo + hi) / 2
    return writes(w), round(w)


@dataclass(frozen=True)
class Profile:
    """What sampling the dirty log measured.

    ``samples``: (seconds, pages taken) per interval; ``union``: distinct
    pages over the whole sample; ``memory_pages``: the domain's size.
    """

    memory_pages: int
    samples: tuple[tuple[float, int], ...]
    union: int

    @property
    def seconds(self) -> float:
        return sum(s for s, _ in self.samples)

    @property
    def dirtied(self) -> int:
        """Pages taken from the dirty log, summed over the intervals."""
        return sum(n for _, n in self.samples)

    def _fit(self) -> tuple[float, int]:
        return working_set([n for _, n in self.samples], self.union, self.memory_pages)

    @property
    def working_set(self) -> int:
        """The pages the guest's writes land in (estimated; see :func:`working_set`)."""
        return self._fit()[1]

    @property
    def dirty_rate(self) -> float:
        """Page writes per second (pages re-written within an interval included)."""
        s = self.seconds
        return self._fit()[0] / s if s > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "memory_pages": self.memory_pages,
            "seconds": round(self.seconds, 6),
            "intervals": len(self.samples),
            "dirtied": self.dirtied,
            "union_pages": self.union,
            "dirty_rate": round(self.dirty_rate, 1),
            "working_set": self.working_set,
            "samples": [[round(s, 6), n] for s, n in self.samples],
        }


@dataclass(frozen=True)
class Costs:
    """What a migration costs besides sending pages (measured, see
    ``xcsave bench planner``): the time before round 0 starts (helpers,
    handshake), the fixed part of the downtime (suspend, the last records,
    the receiver's commit and report), and the fraction of round 0's pages
    that are sent (a save skips all-zero pages)."""

    setup_s: float = 0.0
    downtime_s: float = 0.0
    sent_fraction: float = 1.0


@dataclass(frozen=True)
class Round:
    """One round of the model: pages sent, how long it took, and what the
    policy said before it (round 0 is never asked; the last is the stop-and-copy)."""

    iteration: int
    pages: int
    seconds: float
    decision: str = "CONTINUE"
    reason: str = ""
    throttle: int | None = None


@dataclass(frozen=True)
class Prediction:
    """The model's run: its rounds (the last one is the stop-and-copy,
    absent when the policy aborts), total time and downtime, and the verdict."""

    rounds: tuple[Round, ...]
    total_s: float
    downtime_s: float | None  # None: the policy aborts
    outcome: str  # "stop" | "abort" | "endless"
    reason: str  # the policy's last reason
    go: bool
    why: str
    link: float  # pages/s
    throttled_s: float = 0.0  # model time the guest ran throttled
    max_throttle: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def precopy_rounds(self) -> int:
        return sum(1 for r in self.rounds if r.decision != "STOP_AND_COPY")

    def as_dict(self) -> dict[str, object]:
        return {
            "link_pages_per_s": round(self.link, 1),
            "rounds": [
                {
                    "iteration": r.iteration,
                    "pages": r.pages,
                    "seconds": round(r.seconds, 6),
                    "decision": r.decision,
                    "reason": r.reason,
                    "throttle": r.throttle,
                }
                for r in self.rounds
            ],
            "precopy_rounds": self.precopy_rounds,
            "total_s": round(self.total_s, 6),
            "downtime_ms": None if self.downtime_s is None else round(self.downtime_s * 1e3, 3),
            "outcome": self.outcome,
            "reason": self.reason,
            "throttled_s": round(self.throttled_s, 6),
            "max_throttle": self.max_throttle,
            "go": self.go,
            "why": self.why,
        }


def predict(
    profile: Profile,
    link: float,
    make_policy: Callable[[], Policy],
    *,
    memory_pages: int | None = None,
    costs: Costs = Costs(),
    max_downtime_s: float = DEFAULT_MAX_DOWNTIME_S,
    max_rounds: int = MAX_MODEL_ROUNDS,
) -> Prediction:
    """Play the migration of ``profile``'s guest over a ``link`` pages/s link
    under a fresh policy from ``make_policy``; see the module docstring.

    ``memory_pages``: the domain's size (default the profile's).  The
    verdict is go when the policy stops and the predicted downtime is within
    ``max_downtime_s``; no-go, with the reason, otherwise.
    """
    if not link > 0 or not math.isfinite(link):
        raise ValueError(f"the link rate must be a positive number of pages/s, not {link!r}")
    if not 0 < costs.sent_fraction <= 1:
        raise ValueError(f"sent_fraction must be in (0, 1], not {costs.sent_fraction}")
    pages = memory_pages if memory_pages is not None else profile.memory_pages
    if pages <= 0:
        raise ValueError(f"memory_pages must be positive, not {pages}")
    wss = min(float(profile.working_set), float(pages))
    rate = profile.dirty_rate
    policy = make_policy()
    curve = Curve()

    t = costs.setup_s
    first = max(1, round(pages * costs.sent_fraction))
    dt = first / link
    t += dt
    written = first
    rounds = [Round(0, first, dt)]
    throttle = 0
    throttled_s = 0.0
    most = 0
    dirty = coverage(wss, rate * dt)
    it = 1
    downtime: float | None = None
    outcome, reason = "endless", f"the policy did not stop in {max_rounds} rounds"
    while it <= max_rounds:
        st = curve.add(PrecopyStats(it, written, round(dirty)), t)
        v = as_verdict(policy(st))
        if v.throttle is not None:
            throttle = max(0, min(100, int(v.throttle)))
            most = max(most, throttle)
        if v.decision == Decision.ABORT:
            outcome, reason = "abort", v.reason or "the policy aborts"
            rounds.append(Round(it, 0, 0.0, "ABORT", v.reason, v.throttle))
            break
        if v.decision == Decision.STOP_AND_COPY:
            outcome, reason = "stop", v.reason
            final = round(dirty)
            downtime = costs.downtime_s + final / link
            rounds.append(Round(it, final, final / link, "STOP_AND_COPY", v.reason, v.throttle))
            t += downtime
            break
        sent = round(dirty)
        dt = sent / link
        rounds.append(Round(it, sent, dt, "CONTINUE", v.reason, v.throttle))
        t += dt
        written += sent
        if throttle:
            throttled_s += dt
        dirty = coverage(wss, rate * (100 - throttle) / 100 * dt)
        it += 1
    go, why = _verdict(rounds, downtime, outcome, reason, max_downtime_s)
    return Prediction(
        tuple(rounds), t, downtime, outcome, reason, go, why, link, throttled_s, most
    )


def _verdict(
    rounds: list[Round],
    downtime: float | None,
    outcome: str,
    reason: str,
    max_downtime_s: float,
) -> tuple[bool, str]:
    """Go or no-go for the model's run, and why."""
    if outcome == "abort":
        return False, f"no-go: the policy would abort ({reason})"
    if outcome == "endless" or downtime is None:
        return False, f"no-go: {reason}"
    if downtime > max_downtime_s:
        return (
            False,
            f"no-go: downtime {downtime * 1e3:.0f} ms over the {max_downtime_s * 1e3:.0f} ms "
            f"target ({rounds[-1].pages} pages still dirty when the policy stops"
            + (f": {reason})" if reason else ")"),
        )
    return (
        True,
        f"go: {len(rounds) - 1} precopy round(s), downtime {downtime * 1e3:.0f} ms "
        f"<= {max_downtime_s * 1e3:.0f} ms" + (f" ({reason})" if reason else ""),
    )


#: Stream bytes per page sent: the page and its PAGE_DATA pfn entry (the
#: record's own header is 8 bytes per up to 1024 pages: left out).
PAGE_STREAM_BYTES: Final = PAGE_SIZE + 8


def pages_per_s(bytes_per_s: float) -> float:
    """A link's rate in bytes/s as the pages/s it carries in a stream."""
    return bytes_per_s / PAGE_STREAM_BYTES


@dataclass(frozen=True)
class Plan:
    """``xcsave plan``'s answer: the domain's profile, and for a link rate
    the prediction (None when no link rate was given)."""

    domain: str
    profile: Profile
    link_bytes_per_s: float | None
    policy: str
    prediction: Prediction | None

    def as_dict(self) -> dict[str, object]:
        return {
            "domain": self.domain,
            "profile": self.profile.as_dict(),
            "link_bytes_per_s": self.link_bytes_per_s,
            "policy": self.policy,
            "prediction": None if self.prediction is None else self.prediction.as_dict(),
            "go": None if self.prediction is None else self.prediction.go,
            "why": (
                "no link rate given: nothing to predict (--link RATE)"
                if self.prediction is None
                else self.prediction.why
            ),
        }
