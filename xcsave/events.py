"""Structured events a helper run emits (progress is not logging).

Consumers pass ``on_event=`` to the API; the CLI renders them as progress bars,
plain lines or JSON (``dataclasses.asdict(ev) | {"event": ev.kind}``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class Event:
    """Base: which operation it is about."""

    kind: ClassVar[str] = "event"
    op: str  # "save" | "restore" | "migrate" | "receive"
    domain: str  # "domid 7" or the sim domain path

    def asdict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"event": self.kind}


@dataclass(frozen=True, slots=True)
class ProgressEvent(Event):
    """The helper's progress(context, doing_what, done, total)."""

    kind: ClassVar[str] = "progress"
    context: str
    doing_what: str
    done: int
    total: int
    elapsed: float  # seconds since the helper started

    @property
    def percent(self) -> float | None:
        return 100.0 * self.done / self.total if self.total else None


@dataclass(frozen=True, slots=True)
class LogEvent(Event):
    """A helper log line (also sent to the ``xcsave.helper`` logger)."""

    kind: ClassVar[str] = "log"
    level: int  # xentoollog level 1..9
    errno: int  # -1 when none
    context: str
    message: str


@dataclass(frozen=True, slots=True)
class PolicyEvent(Event):
    """A precopy_policy decision (one per round, asked before it)."""

    kind: ClassVar[str] = "policy"
    iteration: int
    total_written: int
    dirty_count: int
    decision: int  # xcsave.policy.Decision


@dataclass(frozen=True, slots=True)
class StatsEvent(Event):
    """The helper's final statistics (xcsave-1 ``stats``)."""

    kind: ClassVar[str] = "stats"
    rounds: int
    pages_sent: int
    zero_pages: int
    bytes: int
    downtime_ns: int
    duration_ns: int
    pages_per_round: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DoneEvent(Event):
    """The operation finished (ok or not)."""

    kind: ClassVar[str] = "done"
    ok: bool
    error: str
    elapsed: float
