"""Synchronous twins of xcsave's async API (``asyncio.run`` underneath).

Same names, same arguments, same results and exceptions as the coroutines
they run: :func:`xcsave.save`/:func:`xcsave.restore`/``xcsave.api.plan``, the migration's
``migrate``/``migrate_on``/``receive``/``receive_on``/``receive_stdio``
(:mod:`xcsave.migrate`), ``migrate_ssh`` (:mod:`xcsave.ssh`),
``migrate_local`` (:mod:`xcsave.local`) and ``run_many`` (:mod:`xcsave.jobs`;
its jobs stay coroutines, run concurrently in the one loop).  Like
``asyncio.run`` they raise ``RuntimeError`` when called from a running event
loop: await the coroutines there.  tests/test_sync_twins.py checks that
every public coroutine of those modules has its twin here.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from . import api, jobs, local, ssh
from . import migrate as _migrate

__all__ = [
    "migrate",
    "migrate_local",
    "migrate_on",
    "migrate_ssh",
    "plan",
    "receive",
    "receive_on",
    "receive_stdio",
    "restore",
    "run_many",
    "save",
]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _no_running_loop(name: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        f"xcsave.sync.{name}() cannot be called from a running event loop; "
        f"await xcsave.{name}() instead"
    )


def _twin(coro: Callable[_P, Coroutine[Any, Any, _R]]) -> Callable[_P, _R]:
    """The blocking twin of ``coro``: its signature and result, run to its
    end in a new event loop."""
    name = coro.__name__

    @functools.wraps(coro)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        _no_running_loop(name)
        return asyncio.run(coro(*args, **kwargs))

    run.__doc__ = f"Blocking :func:`{coro.__module__}.{name}`.\n\n{coro.__doc__ or ''}"
    return run


save = _twin(api.save)
restore = _twin(api.restore)
plan = _twin(api.plan)
migrate = _twin(_migrate.migrate)
migrate_on = _twin(_migrate.migrate_on)
receive = _twin(_migrate.receive)
receive_on = _twin(_migrate.receive_on)
receive_stdio = _twin(_migrate.receive_stdio)
migrate_ssh = _twin(ssh.migrate_ssh)
migrate_local = _twin(local.migrate_local)
run_many = _twin(jobs.run_many)
