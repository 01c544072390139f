"""Synchronous twins of xcsave's async API (``asyncio.run`` underneath).

Same names, same arguments, same results and exceptions as :mod:`xcsave`'s
coroutines.  Like ``asyncio.run`` they raise ``RuntimeError`` when called
from a running event loop: use the async functions there.
"""

from __future__ import annotations

import asyncio
from typing import Any

from . import api
from .supervisor import RunResult

__all__ = ["restore", "save"]


def _no_running_loop(name: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"xcsave.sync.{name}() cannot be called from a running event loop; "
        f"await xcsave.{name}() instead"
    )


def save(out: api.StreamArg, **kwargs: Any) -> RunResult:
    """Blocking :func:`xcsave.save`."""
    _no_running_loop("save")
    return asyncio.run(api.save(out, **kwargs))


def restore(src: api.StreamArg, **kwargs: Any) -> RunResult:
    """Blocking :func:`xcsave.restore`."""
    _no_running_loop("restore")
    return asyncio.run(api.restore(src, **kwargs))
