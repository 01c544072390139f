"""Auto-converge's actuators: how hard a guest is slowed down, and lifting it.

A :class:`Throttle` is built by the save for its domain (:func:`for_domain`)
and handed to the supervisor (:class:`~xcsave.supervisor.HelperSpec`'s
``throttle``), which applies a policy's :attr:`~xcsave.policy.Verdict.throttle`
before it answers the helper.  The save lifts it in a ``finally`` (success,
failure, cancellation, a helper that died): :meth:`Throttle.lift` puts back
exactly what was there before the first change, and reports the effect
(:class:`~xcsave.events.ThrottleEvent`: how long the guest ran throttled,
the highest and the time-weighted mean throttle).

A throttle is a percent of the guest's time taken away, 0..99.  We never
throttle less than the domain already was: a domain that had a throttle
(sim) or a cap (xen) keeps at least that.

* :class:`SimThrottle`: the sim domain's header field (``sim.set_throttle``;
  ``sim dirty`` honours it).
* :class:`XenCapThrottle`: credit2's cap (percent of one pCPU, for the whole
  domain), through a one-shot helper run (``--xcsave-1 sched-cap``: the
  helper does the libxenctrl calls; Python does not link it).  Throttle t%
  of a domain with n vCPUs is cap ``(100 - t) * n``.  A domain under another
  scheduler is refused in one line before the save starts.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final, TypeVar

from . import proto
from ._log import logger
from .errors import BackendUnavailable
from .events import Event, SchedCapEvent, ThrottleEvent
from .supervisor import HelperRun, HelperSpec

__all__ = [
    "CREDIT2",
    "SimThrottle",
    "Throttle",
    "XenCapThrottle",
    "for_domain",
    "uncancellable",
]

log = logger(__name__)

_T = TypeVar("_T")

#: xen/domctl.h's XEN_SCHEDULER_* numbers (what sched_cap reports).
SCHEDULERS: Final[dict[int, str]] = {
    5: "credit",
    6: "credit2",
    7: "arinc653",
    8: "rtds",
    9: "null",
}
CREDIT2: Final = 6


async def uncancellable(aw: Awaitable[_T]) -> _T:
    """Await ``aw`` to its end even if the awaiting task is cancelled (again):
    lifting a throttle must finish.  The cancellation goes on afterwards."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            # asyncio trick: the shield keeps the task running while we are
            # cancelled; we wait for it once more, then re-raise.
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


class Throttle:
    """An actuator: set a throttle, lift it, and account for its effect.

    Subclasses give :meth:`_read` (what is there now, as their own value),
    :meth:`_apply` (a percent) and :meth:`_put_back`.  Nothing is touched
    before the first :meth:`set` that changes something; :meth:`lift` then
    restores the value read at :meth:`prepare` (or at that first set).
    """

    kind = "throttle"

    def __init__(self, op: str, domain: str) -> None:
        self.op, self.domain = op, domain
        self.percent = 0  # in force (ours)
        self.before: int | None = None  # the actuator's value before we touched it
        self._touched = False
        self._since = 0.0  # when the percent in force was set
        self._weighted = 0.0  # sum of percent x seconds
        self._seconds = 0.0  # throttled seconds
        self._max = 0
        self._stopped = False
        self.on_event: Callable[[Event], object] | None = None

    async def prepare(self) -> None:
        """Read what is there, refusing a domain that cannot be throttled."""
        if self.before is None:
            self.before = await self._read()

    async def set(self, percent: int) -> None:
        """Throttle the guest ``percent`` (0 lifts ours) from now on."""
        if not 0 <= percent <= 99:
            raise ValueError(f"a throttle is a percent from 0 to 99, not {percent}")
        if percent == self.percent:
            return
        await self.prepare()
        self._touched = True
        await self._apply(percent)
        self._account()
        self.percent = percent
        self._max = max(self._max, percent)
        log.info("%s: throttled %d%% (%s)", self.domain, percent, self.describe(percent))

    def stopped(self) -> None:
        """The guest stops running (precopy is over): the throttle no longer
        costs it anything; the clock of its effect stops here."""
        self._account()
        self._stopped = True

    async def lift(self) -> ThrottleEvent | None:
        """Put back what was there before; the effect (None if never touched)."""
        self._account()
        self._stopped = True
        if not self._touched:
            return None
        assert self.before is not None
        await self._put_back()
        self._touched = False
        self.percent = 0
        ev = ThrottleEvent(
            self.op,
            self.domain,
            actuator=self.kind,
            seconds=self._seconds,
            max_percent=self._max,
            mean_percent=self._weighted / self._seconds if self._seconds > 0 else 0.0,
            restored=self.before,
        )
        log.info("%s: throttle lifted (%s %d restored)", self.domain, self.kind, self.before)
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception:  # the consumer's; the throttle is lifted all the same
                log.exception("%s: on_event raised on the throttle's report", self.domain)
        return ev

    def describe(self, percent: int) -> str:
        return f"{self.kind} {percent}"

    def _account(self) -> None:
        now = time.monotonic()
        if self.percent > 0 and not self._stopped:
            dt = now - self._since
            self._seconds += dt
            self._weighted += dt * self.percent
        self._since = now

    async def _read(self) -> int:
        raise NotImplementedError

    async def _apply(self, percent: int) -> None:
        raise NotImplementedError

    async def _put_back(self) -> None:
        raise NotImplementedError


class SimThrottle(Throttle):
    """A simulated domain's throttle (header offset 124, docs/sim-format.md)."""

    kind = "sim throttle"

    def __init__(self, op: str, path: str | os.PathLike[str]) -> None:
        super().__init__(op, os.fspath(path))
        self.path = path

    async def _read(self) -> int:
        from . import sim

        return sim.throttle(self.path)  # ValueError (one line) for a damaged value

    async def _apply(self, percent: int) -> None:
        from . import sim

        assert self.before is not None
        sim.set_throttle(self.path, max(percent, self.before))

    async def _put_back(self) -> None:
        from . import sim

        assert self.before is not None
        sim.set_throttle(self.path, self.before)


class XenCapThrottle(Throttle):
    """credit2's cap of a Xen domain, through ``--xcsave-1 sched-cap`` runs."""

    kind = "credit2 cap"

    def __init__(self, op: str, domid: int, helper: str | os.PathLike[str] | None = None) -> None:
        super().__init__(op, f"domid {domid}")
        self.domid = domid
        self.helper = Path(helper) if helper is not None else None
        self.vcpus = 0

    def cap_for(self, percent: int) -> int:
        """The cap that takes ``percent`` of every vCPU's time away (0: none),
        never looser than the domain's own cap."""
        assert self.before is not None
        if percent == 0:
            return self.before
        cap = max(1, (100 - percent) * self.vcpus)
        return min(cap, self.before) if self.before else cap

    def describe(self, percent: int) -> str:
        return f"cap {self.cap_for(percent)} for {self.vcpus} vCPU(s)"

    async def _read(self) -> int:
        got = await self._run(None)
        if got.sched_id != CREDIT2:
            name = SCHEDULERS.get(got.sched_id, f"scheduler {got.sched_id}")
            raise BackendUnavailable(
                f"domid {self.domid} runs under the {name} scheduler, not credit2: "
                "auto-converge sets credit2 caps only (EOPNOTSUPP)"
            )
        self.vcpus = max(1, got.vcpus)
        return got.cap

    async def _apply(self, percent: int) -> None:
        await self._run(self.cap_for(percent))

    async def _put_back(self) -> None:
        assert self.before is not None
        await self._run(self.before)

    async def _run(self, cap: int | None) -> SchedCapEvent:
        """One ``sched-cap`` run: the values before it changed anything."""
        args = ["--xcsave-1", "sched-cap", "--backend", "xen", "--domid", str(self.domid)]
        if cap is not None:
            args += ["--cap", str(cap)]
        spec = HelperSpec(
            mode="sched-cap",
            dialect=proto.XCSAVE_1,
            args=tuple(args),
            pass_fds=(),
            domain=self.domain,
            domid=self.domid,
            backend="xen",
            helper=self.helper,
        )
        seen: list[SchedCapEvent] = []

        def keep(ev: Event) -> None:
            if isinstance(ev, SchedCapEvent):
                seen.append(ev)

        await HelperRun(spec, on_event=keep).run(timeout=30.0)
        if not seen:
            raise BackendUnavailable(f"domid {self.domid}: the sched-cap helper reported nothing")
        return seen[0]


def for_domain(
    op: str,
    *,
    sim: str | os.PathLike[str] | None = None,
    domid: int | None = None,
    helper: str | os.PathLike[str] | None = None,
) -> Throttle:
    """The actuator for a domain (exactly one of ``sim`` and ``domid``)."""
    if sim is not None:
        return SimThrottle(op, sim)
    assert domid is not None
    return XenCapThrottle(op, domid, helper)
