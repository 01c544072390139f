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
    op: str  # "save" | "restore" | "migrate" | "receive" | "tunnel"
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
class TlsPeerEvent(Event):
    """A TLS tunnel's handshake succeeded: the authenticated peer (``tls_peer``)."""

    kind: ClassVar[str] = "tls_peer"
    subject: str  # the peer certificate's subject, RFC 2253 ("CN=hostb")
    address: str  # "192.0.2.7:4000"
    version: str  # "TLSv1.3"
    cipher: str  # "TLS_AES_256_GCM_SHA384"


@dataclass(frozen=True, slots=True)
class TunnelStatsEvent(Event):
    """A TLS tunnel's byte counts at its end (``tunnel_stats``)."""

    kind: ClassVar[str] = "tunnel_stats"
    sent: int  # plaintext bytes we sent to the peer
    received: int  # plaintext bytes from the peer handed to our socket
    discarded: int  # bytes from the peer after our side had closed
    duration_ns: int


@dataclass(frozen=True, slots=True)
class DoneEvent(Event):
    """The operation finished (ok or not)."""

    kind: ClassVar[str] = "done"
    ok: bool
    error: str
    elapsed: float
