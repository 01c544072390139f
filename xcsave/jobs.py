"""Many jobs at once through one :class:`~xcsave.supervisor.Supervisor`.

:func:`run_many` runs named jobs (each ``async def job(supervisor) -> T``)
``max_parallel`` at a time; each job's result or error lands in its
:class:`Outcome`, and a failure cancels nothing else.  Re-exported by
:mod:`xcsave.migrate`, where it was first.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from ._log import logger
from .errors import error_text
from .supervisor import Supervisor

__all__ = ["Job", "Outcome", "Summary", "run_many"]

log = logger(__name__)

T = TypeVar("T")


@dataclass
class Outcome(Generic[T]):
    """One job of :func:`run_many`: its result or its error."""

    name: str
    ok: bool
    seconds: float
    result: T | None = None
    error: BaseException | None = None

    @property
    def message(self) -> str:
        return "" if self.error is None else error_text(self.error)


@dataclass
class Summary(Generic[T]):
    """All outcomes of :func:`run_many`, in the order the jobs were given."""

    outcomes: list[Outcome[T]]
    seconds: float

    @property
    def ok(self) -> list[Outcome[T]]:
        return [o for o in self.outcomes if o.ok]

    @property
    def failed(self) -> list[Outcome[T]]:
        return [o for o in self.outcomes if not o.ok]

    def lines(self) -> list[str]:
        out = [
            f"{len(self.ok)} of {len(self.outcomes)} succeeded in {self.seconds:.2f} s"
            + (f", {len(self.failed)} failed" if self.failed else "")
        ]
        out += [
            f"  {o.name}: {'ok' if o.ok else 'FAILED: ' + o.message} ({o.seconds:.2f} s)"
            for o in self.outcomes
        ]
        return out


Job = Callable[[Supervisor], Awaitable[T]]


async def run_many(
    jobs: Sequence[tuple[str, Job[T]]],
    *,
    max_parallel: int = 8,
    helpers_per_job: int = 2,
) -> Summary[T]:
    """Run named jobs concurrently, ``max_parallel`` at a time, through one Supervisor.

    Each job is ``async def job(supervisor) -> T`` (e.g. a lambda around
    :func:`xcsave.local.migrate_local`, :func:`xcsave.migrate.migrate`,
    :func:`xcsave.save`).  A job's
    failure is recorded in its :class:`Outcome` and never cancels or
    disturbs the others; only cancelling ``run_many`` itself stops them all
    (every helper is stopped and reaped).  The limit applies to *jobs*; the
    Supervisor allows ``helpers_per_job`` helpers per job, so that both ends
    of an in-process migration always run together.
    """
    if max_parallel < 1:
        raise ValueError(f"max_parallel must be at least 1, not {max_parallel}")
    sem = asyncio.Semaphore(max_parallel)
    t0 = time.monotonic()

    async with Supervisor(max_parallel=max_parallel * helpers_per_job) as sup:

        async def one(name: str, job: Job[T]) -> Outcome[T]:
            async with sem:
                t = time.monotonic()
                try:
                    value = await job(sup)
                except Exception as e:
                    log.info("%s failed: %s", name, e)
                    return Outcome(name, False, time.monotonic() - t, error=e)
                return Outcome(name, True, time.monotonic() - t, result=value)

        outcomes = await asyncio.gather(*(one(n, j) for n, j in jobs))
    return Summary(list(outcomes), time.monotonic() - t0)
