"""Synchronous twins of xcsave's async API (``asyncio.run`` underneath).

Same names, same arguments, same results and exceptions as :mod:`xcsave`'s
coroutines.  Like ``asyncio.run`` they raise ``RuntimeError`` when called
from a running event loop: use the async functions there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from . import api
from .supervisor import RunResult

if TYPE_CHECKING:
    from .migrate import MigrationResult, ReceiveResult

__all__ = ["migrate", "receive", "restore", "save"]


def _no_running_loop(name: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"xcsave.sync.{name}() cannot be called from a running event loop; "
        f"await xcsave.{name}() instead"
    )


def _blocking(name: str, make: Any, *args: Any, **kwargs: Any) -> Any:
    """``make(*args, **kwargs)`` run to its end in a new event loop."""
    _no_running_loop(name)
    coro: Coroutine[Any, Any, Any] = make(*args, **kwargs)
    return asyncio.run(coro)


def save(out: api.StreamArg, **kwargs: Any) -> RunResult:
    """Blocking :func:`xcsave.save`."""
    result: RunResult = _blocking("save", api.save, out, **kwargs)
    return result


def restore(src: api.StreamArg, **kwargs: Any) -> RunResult:
    """Blocking :func:`xcsave.restore`."""
    result: RunResult = _blocking("restore", api.restore, src, **kwargs)
    return result


def migrate(**kwargs: Any) -> MigrationResult:
    """Blocking :func:`xcsave.migrate.migrate` (the sender, TCP or TLS; with its
    :class:`~xcsave.migrate.SendOptions`: compress, channels, max_bandwidth, ...)."""
    from . import migrate as mig

    result: MigrationResult = _blocking("migrate", mig.migrate, **kwargs)
    return result


def receive(**kwargs: Any) -> ReceiveResult:
    """Blocking :func:`xcsave.migrate.receive` (one migration on a listener)."""
    from . import migrate as mig

    result: ReceiveResult = _blocking("receive", mig.receive, **kwargs)
    return result
