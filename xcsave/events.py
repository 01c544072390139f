"""Structured events a helper run emits (progress is not logging).

Consumers pass ``on_event=`` to the API; the CLI renders them as progress bars,
plain lines or JSON (``dataclasses.asdict(ev) | {"event": ev.kind}``).

The events that are one helper message each (``log``, ``stats``,
``restore_stats``, ``tls_peer``, ``tunnel_stats``) are generated from the
message table (``xcsave/_msgs.py``); the ones here add what the supervisor
knows (the time, the policy's decision, the end).
"""

from __future__ import annotations

from dataclasses import dataclass

from ._event import Event
from ._msgs import (
    LogdirtyOffEvent,
    LogdirtyOnEvent,
    LogdirtySampleEvent,
    LogEvent,
    RestoreStatsEvent,
    SchedCapEvent,
    StatsEvent,
    TlsPeerEvent,
    TunnelStatsEvent,
    WireLostEvent,
    WireStatsEvent,
)
from .policy import _PrecopyFields

__all__ = [
    "DoneEvent",
    "Event",
    "LogEvent",
    "LogdirtyOffEvent",
    "LogdirtyOnEvent",
    "LogdirtySampleEvent",
    "MigrationStatsEvent",
    "PolicyEvent",
    "ProgressEvent",
    "RestoreStatsEvent",
    "SchedCapEvent",
    "StatsEvent",
    "ThrottleEvent",
    "TlsPeerEvent",
    "TunnelStatsEvent",
    "WireLostEvent",
    "WireStatsEvent",
]


@dataclass(frozen=True, slots=True)
class ProgressEvent(Event, kind="progress"):
    """The helper's progress(context, doing_what, done, total)."""

    context: str
    doing_what: str
    done: int
    total: int
    elapsed: float  # seconds since the helper started

    @property
    def percent(self) -> float | None:
        return 100.0 * self.done / self.total if self.total else None


@dataclass(frozen=True, slots=True)
class PolicyEvent(_PrecopyFields, Event, kind="policy"):
    """A precopy_policy decision (one per round, asked before it): the
    :class:`~xcsave.policy.PrecopyStats` it was asked with (the helper's
    figures, then the supervisor's measurements), and the answer with its
    reason."""

    decision: int  # xcsave.policy.Decision
    reason: str = ""  # the policy's, when it gave one (xcsave.policy.Verdict)
    throttle: int | None = None  # auto-converge's throttle from now (percent); None: unchanged
    elapsed: float = 0.0  # the rest is PrecopyStats' measured figures (xcsave.policy.Curve)
    round_s: float = 0.0
    sent: int = 0
    send_rate: float = 0.0
    dirty_rate: float = 0.0
    predicted_downtime_s: float | None = None


@dataclass(frozen=True, slots=True)
class DoneEvent(Event, kind="done"):
    """The operation finished (ok or not)."""

    ok: bool
    error: str
    elapsed: float


@dataclass(frozen=True, slots=True)
class ThrottleEvent(Event, kind="throttle"):
    """Auto-converge's throttle was lifted (:mod:`xcsave.throttle`): what it
    cost the guest.  Also the save's ``RunResult.throttle``."""

    actuator: str  # "sim throttle" | "credit2 cap"
    seconds: float  # how long the guest ran throttled (until precopy ended or the lift)
    max_percent: int  # the hardest throttle (percent of its time taken away)
    mean_percent: float  # time-weighted over those seconds
    restored: int  # the actuator's value put back (sim: its throttle; xen: its cap, 0 none)


@dataclass(frozen=True, slots=True)
class MigrationStatsEvent(Event, kind="migration_stats"):
    """A live migration's figures, like QEMU's query-migrate (every 500 ms
    while the wire pump runs; see :class:`xcsave.wire.LiveStats`)."""

    bytes_sent: int  # on the wire, frame headers included
    stream_bytes: int  # of the plain stream, pumped so far
    bytes_remaining: int  # estimate: the last round's dirty pages x 4096
    dirty_rate: float  # pages/s in the last round
    throughput: float  # wire bytes/s since the previous figures
    compression_ratio: float  # stream bytes / wire bytes
    expected_downtime_ms: float  # bytes_remaining / throughput
    iteration: int  # the precopy round
    rate_limit: int  # the cap in force (bytes/s, 0: none)
    channel_bytes: tuple[int, ...]  # wire bytes per channel
