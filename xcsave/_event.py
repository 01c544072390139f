"""The base of every event a helper run emits (see :mod:`xcsave.events`)."""

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
