"""The base of every event a helper run emits (see :mod:`xcsave.events`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Self


@dataclass(frozen=True, slots=True)
class Event:
    """Base: which operation it is about."""

    kind: ClassVar[str] = "event"
    op: str  # "save" | "restore" | "migrate" | "receive" | "tunnel"
    domain: str  # "domid 7" or the sim domain path

    @classmethod
    def from_frame(cls, op: str, domain: str, a: tuple[Any, ...]) -> Self:
        """The event of a message's frame: its fields are the message's args in order."""
        return cls(op, domain, *a)

    def __init_subclass__(cls, /, kind: str | None = None, **kwargs: Any) -> None:
        """``class LogEvent(Event, kind="log")`` names the event (``asdict``'s "event")."""
        # Not the bare super(): slots=True rebuilds Event, and the bare form
        # would name the class it replaced.
        super(Event, cls).__init_subclass__(**kwargs)
        if kind is not None:
            cls.kind = kind

    def asdict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"event": self.kind}
