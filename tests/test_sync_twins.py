"""Sync twins for everything async (issue 15, item 10): every public
coroutine of the API has a blocking twin of the same name in xcsave.sync,
and the twins work."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import pytest

import xcsave
import xcsave.sync
from xcsave import api, jobs, local, migrate, sim, ssh


def _public_coroutines() -> set[str]:
    names = set()
    for mod in (api, migrate, ssh, local, jobs):
        for name, fn in vars(mod).items():
            if name.startswith("_") or getattr(fn, "__module__", None) != mod.__name__:
                continue
            target = inspect.unwrap(fn) if callable(fn) else fn
            if inspect.iscoroutinefunction(target):
                names.add(name)
    return names


def test_every_public_coroutine_has_a_sync_twin() -> None:
    coros = _public_coroutines()
    assert {"save", "restore", "migrate", "receive", "run_many", "migrate_local"} <= coros
    missing = sorted(n for n in coros if not callable(getattr(xcsave.sync, n, None)))
    assert missing == [], f"no sync twin: {missing}"
    assert set(xcsave.sync.__all__) >= coros


def test_sync_run_many_and_migrate_local(tmp_path: Path) -> None:
    doms = [sim.create(tmp_path / f"d{i}", 4 << 20, seed=i) for i in range(2)]

    def job(dom: Path) -> jobs.Job[xcsave.RunResult]:
        return lambda sup: api.save(tmp_path / f"{dom.name}.img", sim=dom, supervisor=sup)

    summary = xcsave.sync.run_many([(d.name, job(d)) for d in doms], max_parallel=2)
    assert len(summary.ok) == 2 == len(summary.outcomes), summary.lines()
    sent, _received = xcsave.sync.migrate_local(doms[0], tmp_path / "copy", live=False)
    assert sent.domain == str(doms[0])
    assert sim.digest(tmp_path / "copy") == sim.digest(doms[0])


async def test_a_twin_refuses_a_running_loop(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"await xcsave\.run_many"):
        xcsave.sync.run_many([])
    await asyncio.sleep(0)
