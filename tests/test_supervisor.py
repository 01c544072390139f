"""The supervisor driving real helpers: Debian's stock libxl-save-helper 4.17 and
xcsave-helper (xen backend, both dialects), over the fakexen hypervisor stand-in.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import stat
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import fake_env

import xcsave
import xcsave.sync
from xcsave import policy, proto
from xcsave.events import Event, LogEvent, PolicyEvent, ProgressEvent
from xcsave.policy import Decision, PrecopyStats
from xcsave.supervisor import Callbacks, HelperSpec, Supervisor, xen_save_args

EIO = 5


@dataclass(frozen=True)
class HelperCfg:
    name: str
    path: Path
    dialect: str


def _xen_backend_built() -> bool:
    return "xen" in xcsave.backends()


@pytest.fixture(params=["stock-417", "xcsave-1", "xcsave-as-417"])
def helper(request: pytest.FixtureRequest, stock_helper: Path) -> HelperCfg:
    if request.param == "stock-417":
        return HelperCfg(request.param, stock_helper, "xen-4.17")
    if not _xen_backend_built():
        msg = "xcsave-helper was built without the xen backend (libxen-dev missing)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    dialect = "xcsave-1" if request.param == "xcsave-1" else "xen-4.17"
    return HelperCfg(request.param, xcsave.helper_path(), dialect)


@pytest.fixture
def fake(fakexen_lib: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeXen]:
    f = FakeXen(fakexen_lib, monkeypatch)
    f.set()
    yield f


class FakeXen:
    """Preload fakexen under every helper this test spawns, with knobs."""

    def __init__(self, lib: Path, mp: pytest.MonkeyPatch) -> None:
        self.lib = lib
        self.mp = mp

    def set(self, **knobs: str | int | Path | None) -> None:
        env = fake_env(self.lib, **knobs)
        for k in [k for k in os.environ if k.startswith("FAKEXEN_")]:
            self.mp.delenv(k)
        for k, v in env.items():
            if k == "LD_PRELOAD" or k.startswith("FAKEXEN_"):
                self.mp.setenv(k, v)


def _save_cbs(calls: list[str] | None = None, suspend: int = 1) -> Callbacks:
    seen = calls if calls is not None else []

    def do_suspend() -> int:
        seen.append("suspend")
        return suspend

    def logdirty(domid: int, enable: int) -> int:
        seen.append(f"logdirty({domid},{enable})")
        return 0

    return Callbacks(suspend=do_suspend, switch_qemu_logdirty=logdirty)


def _restore_cbs(calls: list[str] | None = None, sdd: int = 0) -> Callbacks:
    seen = calls if calls is not None else []

    def static_data_done(missing: int) -> int:
        seen.append(f"sdd({missing})")
        return sdd

    return Callbacks(static_data_done=static_data_done)


# ---------------------------------------------------------------- save / restore


async def test_save_writes_the_backend_stream(
    helper: HelperCfg, fake: FakeXen, tmp_path: Path, xen_verify: object
) -> None:
    digest = tmp_path / "save.digest"
    fake.set(save_digest=digest)
    out = tmp_path / "dom.img"
    calls: list[str] = []
    events: list[Event] = []
    res = await xcsave.save(
        out,
        domid=7,
        live=True,
        dialect=helper.dialect,
        helper=helper.path,  # type: ignore[arg-type]
        callbacks=_save_cbs(calls),
        on_event=events.append,
    )
    assert res.retval == 0 and res.errno == 0 and res.returncode == 0
    assert calls == ["logdirty(7,1)", "suspend", "logdirty(7,0)"]
    assert any(isinstance(e, ProgressEvent) and e.doing_what.startswith("Frames") for e in events)
    assert digest.read_text().strip()
    v = xen_verify(out, "libxc")  # type: ignore[operator]
    assert v.returncode == 0, v.stdout + v.stderr


async def test_restore_reads_exactly_what_save_wrote(
    helper: HelperCfg, fake: FakeXen, tmp_path: Path
) -> None:
    saved, restored = tmp_path / "save.digest", tmp_path / "restore.digest"
    fake.set(save_digest=saved, restore_digest=restored, pages=300)
    img = tmp_path / "dom.img"
    await xcsave.save(
        img,
        domid=3,
        dialect=helper.dialect,
        helper=helper.path,  # type: ignore[arg-type]
        callbacks=_save_cbs(),
    )
    image_len = img.stat().st_size
    with img.open("ab") as f:  # what a toolstack writes after the image
        f.write(b"QemuDeviceModelRecord" + b"\xaa" * 100)
    calls: list[str] = []
    fd = os.open(img, os.O_RDONLY)
    try:
        res = await xcsave.restore(
            fd,
            domid=4,
            dialect=helper.dialect,
            helper=helper.path,  # type: ignore[arg-type]
            callbacks=_restore_cbs(calls),
        )
        assert os.lseek(fd, 0, os.SEEK_CUR) == image_len  # not one byte past END
    finally:
        os.close(fd)
    assert calls == ["sdd(0)"]
    assert restored.read_text() == saved.read_text()
    assert res.store_gfn is not None and res.store_gfn > 0
    assert res.console_gfn is not None and res.console_gfn > 0
    # A restore's own statistics (xcsave-1 only), never the save's.
    assert res.stats is None
    if helper.dialect == "xcsave-1":
        assert res.restore_stats is not None
        assert res.restore_stats.checkpoints == 0
        assert res.restore_stats.duration_ns > 0
    else:
        assert res.restore_stats is None


async def test_failing_save_names_errno_and_leaves_no_file(
    helper: HelperCfg, fake: FakeXen, tmp_path: Path
) -> None:
    fake.set(fail="memory", errno="EIO")
    out = tmp_path / "dom.img"
    with pytest.raises(xcsave.HelperFailed) as ei:
        await xcsave.save(
            out,
            domid=7,
            dialect=helper.dialect,
            helper=helper.path,  # type: ignore[arg-type]
            callbacks=_save_cbs(),
        )
    assert ei.value.retval == -1
    assert ei.value.errno == EIO
    assert "(EIO)" in str(ei.value)
    assert list(tmp_path.iterdir()) == []  # neither OUT nor its temporary


async def test_suspend_reply_reaches_the_helper(
    helper: HelperCfg, fake: FakeXen, tmp_path: Path
) -> None:
    # reply 0 = "not suspended": libxc must fail the save
    with pytest.raises(xcsave.HelperFailed) as ei:
        await xcsave.save(
            tmp_path / "o",
            domid=7,
            dialect=helper.dialect,
            helper=helper.path,  # type: ignore[arg-type]
            callbacks=_save_cbs(suspend=0),
        )
    assert ei.value.errno != 0


async def test_logdirty_reply_reaches_the_helper(
    helper: HelperCfg, fake: FakeXen, tmp_path: Path
) -> None:
    cbs = Callbacks(suspend=lambda: 1, switch_qemu_logdirty=lambda d, e: -1)
    with pytest.raises(xcsave.HelperFailed):
        await xcsave.save(
            tmp_path / "o",
            domid=7,
            live=True,
            dialect=helper.dialect,  # type: ignore[arg-type]
            helper=helper.path,
            callbacks=cbs,
        )


async def test_static_data_done_reply_reaches_the_helper(
    helper: HelperCfg, fake: FakeXen, tmp_path: Path
) -> None:
    img = tmp_path / "dom.img"
    await xcsave.save(
        img,
        domid=3,
        dialect=helper.dialect,
        helper=helper.path,  # type: ignore[arg-type]
        callbacks=_save_cbs(),
    )
    with pytest.raises(xcsave.HelperFailed):
        await xcsave.restore(
            img,
            domid=4,
            dialect=helper.dialect,
            helper=helper.path,  # type: ignore[arg-type]
            callbacks=_restore_cbs(sdd=1),
        )


async def test_async_callbacks_are_awaited(
    helper: HelperCfg, fake: FakeXen, tmp_path: Path
) -> None:
    async def suspend() -> bool:
        await asyncio.sleep(0.01)
        return True

    cbs = Callbacks(suspend=suspend, switch_qemu_logdirty=lambda d, e: 0)
    res = await xcsave.save(
        tmp_path / "o",
        domid=7,
        dialect=helper.dialect,  # type: ignore[arg-type]
        helper=helper.path,
        callbacks=cbs,
    )
    assert res.retval == 0


# ---------------------------------------------------------------- precopy policy


@pytest.mark.parametrize("guest", ["pv", "pvh", "hvm"])
async def test_guest_types_xcsave_saves_and_refuses(
    helper: HelperCfg, fake: FakeXen, tmp_path: Path, guest: str
) -> None:
    """xcsave's own supervisor (xcsave-1) saves and restores PV and PVH guests
    and refuses an HVM guest (a device model whose state only a toolstack
    that drives QEMU saves) in one line, before touching it; under libxl's
    dialect every type goes, since libxl saves the device model itself."""
    fake.set(guest=guest)
    img, calls = tmp_path / "dom.img", []
    refused = guest == "hvm" and helper.dialect == "xcsave-1"
    save = xcsave.save(
        img,
        domid=7,
        live=True,
        dialect=helper.dialect,
        helper=helper.path,  # type: ignore[arg-type]
        callbacks=_save_cbs(calls),
    )
    if refused:
        with pytest.raises(xcsave.HelperFailed) as e:
            await save
        assert e.value.errno == errno.EOPNOTSUPP
        assert "domid 7 is an HVM guest" in str(e.value) and "\n" not in str(e.value)
        assert calls == [] and not img.exists()  # never suspended, no image
        fake.set(guest="pvh")
        await xcsave.save(
            img, domid=7, dialect=helper.dialect, helper=helper.path, callbacks=_save_cbs()
        )  # an image to restore into the HVM target
        fake.set(guest="hvm")
    else:
        assert (await save).retval == 0
        assert calls[1:2] == ["suspend"]
    restore = xcsave.restore(
        img,
        domid=8,
        dialect=helper.dialect,
        helper=helper.path,  # type: ignore[arg-type]
        callbacks=_restore_cbs(),
    )
    if refused:
        with pytest.raises(xcsave.HelperFailed) as e:
            await restore
        assert e.value.errno == errno.EOPNOTSUPP
        assert "domid 8 is an HVM guest" in str(e.value)
    else:
        assert (await restore).retval == 0


@pytest.fixture
def ours() -> Path:
    if not _xen_backend_built():
        pytest.skip("xcsave-helper was built without the xen backend")
    return xcsave.helper_path()


async def _policy_save(ours: Path, out: Path, pol: policy.Policy, **kw: Any) -> xcsave.RunResult:
    """A live save of fakexen's domain 7 by xcsave-helper, asking ``pol``."""
    return await xcsave.save(
        out, domid=7, live=True, helper=ours, callbacks=_save_cbs(), policy=pol, **kw
    )


async def test_xcsave1_carries_precopy_policy(ours: Path, fake: FakeXen, tmp_path: Path) -> None:
    fake.set(dirty="400,300,200,150")
    asked: list[PrecopyStats] = []

    def policy(st: PrecopyStats) -> Decision:
        asked.append(st)
        return Decision.STOP_AND_COPY if st.iteration >= 3 else Decision.CONTINUE

    events: list[Event] = []
    res = await _policy_save(ours, tmp_path / "o", policy, on_event=events.append)
    assert res.retval == 0
    assert [s.iteration for s in asked][-1] == 3
    # libxc asks before each round with the dirty count, and after a batch with -1
    assert any(s.dirty_count > 0 for s in asked)
    assert all(s.dirty_count >= -1 for s in asked)
    assert [e.decision for e in events if isinstance(e, PolicyEvent)][-1] == Decision.STOP_AND_COPY


async def test_guarantee_decides_on_libxcs_counted_question(
    ours: Path, fake: FakeXen, tmp_path: Path
) -> None:
    """libxc asks twice a round (after a pass with dirty_count -1, then with
    the count): Xen's default stops on the first question of round 5, and the
    guarantee decides on the second, whose round was measured."""
    fake.set(dirty="400,300,200,150")
    events: list[Event] = []
    # 1e9 s: any measured prediction is within it
    res = await _policy_save(ours, tmp_path / "o", policy.guarantee(1e9), on_event=events.append)
    asked = [e for e in events if isinstance(e, PolicyEvent)]
    assert res.rounds == asked
    put_off, stop = asked[-2:]
    assert (put_off.iteration, put_off.dirty_count, put_off.decision) == (5, -1, Decision.CONTINUE)
    assert put_off.reason.startswith("5 rounds done, but no dirty count: the next question")
    assert (stop.iteration, stop.dirty_count, stop.decision) == (5, 150, Decision.STOP_AND_COPY)
    assert stop.sent == 150 and stop.send_rate > 0  # measured from round 4's counted question
    assert stop.predicted_downtime_s == pytest.approx(150 / stop.send_rate)

    # Nothing is ever within 0 ms: the same save aborts on that question, saying why.
    with pytest.raises(xcsave.HelperFailed, match=r"predicted downtime .* > guaranteed 0\.0 ms"):
        await _policy_save(ours, tmp_path / "o2", policy.guarantee(0.0))
    assert not (tmp_path / "o2").exists()


async def test_precopy_abort_fails_the_save(ours: Path, fake: FakeXen, tmp_path: Path) -> None:
    with pytest.raises(xcsave.HelperFailed):
        await _policy_save(ours, tmp_path / "o", lambda st: Decision.ABORT)
    assert not (tmp_path / "o").exists()


async def test_xen_417_dialect_refuses_a_policy(stock_helper: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="precopy_policy"):
        await xcsave.save(
            tmp_path / "o",
            domid=7,
            dialect="xen-4.17",
            helper=stock_helper,
            callbacks=_save_cbs(),
            policy=lambda st: Decision.CONTINUE,
        )


# ---------------------------------------------------------------- exit paths


async def test_callback_that_raises(helper: HelperCfg, fake: FakeXen, tmp_path: Path) -> None:
    def boom() -> int:
        raise RuntimeError("guest on fire")

    cbs = Callbacks(suspend=boom, switch_qemu_logdirty=lambda d, e: 0)
    with pytest.raises(xcsave.CallbackError) as ei:
        await xcsave.save(
            tmp_path / "o",
            domid=7,
            dialect=helper.dialect,  # type: ignore[arg-type]
            helper=helper.path,
            callbacks=cbs,
        )
    assert isinstance(ei.value.__cause__, RuntimeError)
    assert "guest on fire" in str(ei.value)
    assert ei.value.pid is not None
    _assert_reaped(ei.value.pid)
    assert list(tmp_path.iterdir()) == []


async def test_helper_killed_mid_save(helper: HelperCfg, fake: FakeXen, tmp_path: Path) -> None:
    sup = Supervisor()
    pids: list[int] = []

    def suspend() -> int:
        run = next(iter(sup._running))
        assert run.pid is not None
        pids.append(run.pid)
        os.kill(run.pid, signal.SIGKILL)
        return 1

    cbs = Callbacks(suspend=suspend, switch_qemu_logdirty=lambda d, e: 0)
    with pytest.raises(xcsave.HelperDied) as ei:
        await xcsave.save(
            tmp_path / "o",
            domid=7,
            dialect=helper.dialect,  # type: ignore[arg-type]
            helper=helper.path,
            callbacks=cbs,
            supervisor=sup,
        )
    assert ei.value.signal == signal.SIGKILL
    assert "SIGKILL" in str(ei.value)
    _assert_reaped(pids[0])


async def test_reply_pipe_eof_gives_254(helper: HelperCfg, fake: FakeXen, tmp_path: Path) -> None:
    sup = Supervisor()

    async def suspend() -> int:
        run = next(iter(sup._running))
        assert run.proc is not None
        run._close_pipes()  # the parent gives up on replying: EOF on the reply pipe
        await asyncio.sleep(0)
        return 1

    cbs = Callbacks(suspend=suspend, switch_qemu_logdirty=lambda d, e: 0)
    with pytest.raises(xcsave.HelperDied) as ei:
        await xcsave.save(
            tmp_path / "o",
            domid=7,
            dialect=helper.dialect,  # type: ignore[arg-type]
            helper=helper.path,
            callbacks=cbs,
            supervisor=sup,
        )
    assert ei.value.returncode == 254
    assert "reply pipe closed" in str(ei.value)


async def test_cancellation_stops_and_reaps(
    helper: HelperCfg, fake: FakeXen, tmp_path: Path
) -> None:
    sup = Supervisor()
    started = asyncio.Event()

    async def suspend() -> int:
        started.set()
        await asyncio.sleep(3600)
        return 1

    cbs = Callbacks(suspend=suspend, switch_qemu_logdirty=lambda d, e: 0)
    task = asyncio.create_task(
        xcsave.save(
            tmp_path / "o",
            domid=7,
            dialect=helper.dialect,  # type: ignore[arg-type]
            helper=helper.path,
            callbacks=cbs,
            supervisor=sup,
        )
    )
    await started.wait()
    run = next(iter(sup._running))
    pid = run.pid
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pid is not None
    _assert_reaped(pid)
    assert run.proc is not None and run.proc.returncode is not None
    assert list(tmp_path.iterdir()) == []


async def test_timeout(helper: HelperCfg, fake: FakeXen, tmp_path: Path) -> None:
    async def suspend() -> int:
        await asyncio.sleep(3600)
        return 1

    cbs = Callbacks(suspend=suspend, switch_qemu_logdirty=lambda d, e: 0)
    with pytest.raises(xcsave.HelperTimeout) as ei:
        await xcsave.save(
            tmp_path / "o",
            domid=7,
            dialect=helper.dialect,  # type: ignore[arg-type]
            helper=helper.path,
            callbacks=cbs,
            timeout=0.5,
        )
    assert ei.value.pid is not None
    _assert_reaped(ei.value.pid)


async def test_open_failure_exits_255(helper: HelperCfg, fake: FakeXen, tmp_path: Path) -> None:
    fake.set(open_errno="EACCES")
    with pytest.raises(xcsave.HelperDied) as ei:
        await xcsave.save(
            tmp_path / "o",
            domid=7,
            dialect=helper.dialect,  # type: ignore[arg-type]
            helper=helper.path,
            callbacks=_save_cbs(),
        )
    assert ei.value.returncode == 255
    assert "privileged command interface" in str(ei.value) or "xc_interface_open" in str(ei.value)


# ---------------------------------------------------------------- misbehaving helpers


def _fake_helper(tmp_path: Path, body: str) -> Path:
    """A Python script standing in for a helper that misbehaves on purpose."""
    script = tmp_path / "bad-helper"
    script.write_text(
        f"#!{sys.executable}\nimport os, struct, sys\nout = sys.stdout.buffer\n{body}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


async def test_malformed_frame_is_a_protocol_error(tmp_path: Path) -> None:
    bad = _fake_helper(
        tmp_path, "out.write(struct.pack('=HH', 2, 77)); out.flush(); sys.stdin.read()"
    )
    with pytest.raises(xcsave.ProtocolError, match="unknown message number 77"):
        await xcsave.save(
            tmp_path / "o", domid=7, dialect="xen-4.17", helper=bad, callbacks=_save_cbs()
        )


async def test_exit_without_complete(tmp_path: Path) -> None:
    bad = _fake_helper(tmp_path, "sys.exit(0)")
    with pytest.raises(xcsave.HelperDied, match="without signalling completion"):
        await xcsave.save(
            tmp_path / "o", domid=7, dialect="xen-4.17", helper=bad, callbacks=_save_cbs()
        )


async def test_restore_without_results(tmp_path: Path) -> None:
    complete = proto.encode(proto.XEN_417, "complete", 0, 0)
    bad = _fake_helper(tmp_path, f"out.write({complete!r}); out.flush(); sys.stdin.buffer.read(4)")
    src = tmp_path / "in"
    src.write_bytes(b"")
    with pytest.raises(xcsave.HelperDied, match="without providing results"):
        await xcsave.restore(src, domid=7, dialect="xen-4.17", helper=bad)


def _burst_helper(tmp_path: Path) -> Path:
    """A helper that sends suspend, a log line and complete in one write, then
    reads the two replies: frames queued behind a pending callback."""
    d = proto.XEN_417
    burst = (
        proto.encode(d, "suspend")
        + proto.encode(d, "log", 6, 0, "fake", "after suspend")
        + proto.encode(d, "complete", 0, 0)
    )
    return _fake_helper(
        tmp_path,
        f"out.write({burst!r}); out.flush()\n"
        "replies = sys.stdin.buffer.read(8)\n"
        "sys.exit(0 if struct.unpack('=ii', replies) == (1, 0) else 3)",
    )


async def _save_burst(
    tmp_path: Path, cbs: Callbacks, on_event: Callable[[Event], object] | None = None
) -> xcsave.RunResult:
    return await xcsave.save(
        tmp_path / "o",
        domid=7,
        dialect="xen-4.17",
        helper=_burst_helper(tmp_path),
        callbacks=cbs,
        on_event=on_event,
    )


async def test_frames_behind_an_async_callback_wait_for_it(tmp_path: Path) -> None:
    order: list[str] = []

    async def suspend() -> int:
        await asyncio.sleep(0.02)
        order.append("suspend answered")
        return 1

    def seen(ev: Event) -> None:
        if isinstance(ev, LogEvent):
            order.append(f"log: {ev.message}")

    assert (await _save_burst(tmp_path, Callbacks(suspend=suspend), seen)).retval == 0
    assert order == ["suspend answered", "log: after suspend"]


async def test_sync_callbacks_are_answered_from_the_reader(tmp_path: Path) -> None:
    """The control path costs no more than an asyncio Protocol: a sync callback
    runs straight from the loop's reader callback (no task, no StreamReader
    wake-up per frame) and its reply is written there."""
    tasks: list[asyncio.Task[object] | None] = []

    def suspend() -> int:
        tasks.append(asyncio.current_task())
        return 1

    assert (await _save_burst(tmp_path, Callbacks(suspend=suspend))).retval == 0
    assert tasks == [None]


async def test_truncated_frame_at_exit(tmp_path: Path) -> None:
    bad = _fake_helper(tmp_path, "out.write(struct.pack('=HH', 10, 10)); out.flush()")
    with pytest.raises(xcsave.ProtocolError, match="ended inside a frame"):
        await xcsave.save(
            tmp_path / "o", domid=7, dialect="xen-4.17", helper=bad, callbacks=_save_cbs()
        )


async def test_spawn_failure_is_the_exact_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await xcsave.save(
            tmp_path / "o",
            domid=7,
            dialect="xen-4.17",
            helper=tmp_path / "no-such-helper",
            callbacks=_save_cbs(),
        )
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- many at once


async def test_many_helpers_from_one_loop(
    helper: HelperCfg, fake: FakeXen, tmp_path: Path
) -> None:
    fake.set(delay_ms=2)
    async with Supervisor(max_parallel=8) as sup:
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(
                    xcsave.save(
                        tmp_path / f"d{i}.img",
                        domid=i + 1,
                        dialect=helper.dialect,  # type: ignore[arg-type]
                        helper=helper.path,
                        callbacks=_save_cbs(),
                        supervisor=sup,
                    )
                )
                for i in range(16)
            ]
    assert all(t.result().retval == 0 for t in tasks)
    assert len(list(tmp_path.glob("d*.img"))) == 16


async def test_one_failure_does_not_disturb_the_others(
    stock_helper: Path, fake: FakeXen, tmp_path: Path
) -> None:
    def cbs_for(i: int) -> Callbacks:
        return Callbacks(suspend=lambda: 0 if i == 3 else 1, switch_qemu_logdirty=lambda d, e: 0)

    async with Supervisor(max_parallel=4) as sup:
        results = await asyncio.gather(
            *(
                xcsave.save(
                    tmp_path / f"d{i}.img",
                    domid=i + 1,
                    dialect="xen-4.17",
                    helper=stock_helper,
                    callbacks=cbs_for(i),
                    supervisor=sup,
                )
                for i in range(8)
            ),
            return_exceptions=True,
        )
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [3]
    assert isinstance(results[3], xcsave.HelperFailed)


# ---------------------------------------------------------------- sync twins, lookup


def test_sync_twin(stock_helper: Path, fake: FakeXen, tmp_path: Path) -> None:
    res = xcsave.sync.save(
        tmp_path / "o", domid=7, dialect="xen-4.17", helper=stock_helper, callbacks=_save_cbs()
    )
    assert res.retval == 0
    res = xcsave.sync.restore(tmp_path / "o", domid=8, dialect="xen-4.17", helper=stock_helper)
    assert res.store_gfn


async def test_sync_twin_refuses_inside_a_loop(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="running event loop"):
        xcsave.sync.save(tmp_path / "o", domid=7, callbacks=_save_cbs())


def test_helper_path_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bundled = xcsave.helper_path()
    assert bundled.name == "xcsave-helper" and os.access(bundled, os.X_OK)
    assert bundled.parent == Path(xcsave.__file__).parent
    monkeypatch.setenv("XCSAVE_HELPER", str(tmp_path / "mine"))
    assert xcsave.helper_path() == tmp_path / "mine"


@pytest.mark.parametrize("pass_stream", [False, True])
def test_helper_gets_only_the_fds_it_needs(tmp_path: Path, pass_stream: bool) -> None:
    """The helper sees its pipes, stderr and the stream fd; nothing else of ours."""
    leak = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(leak, True)  # even an inheritable fd must not leak
    stream = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    report = tmp_path / "fds.json"
    try:
        script = _fake_helper(
            tmp_path,
            "import json\n"
            "mine = []\n"
            "for x in os.listdir('/proc/self/fd'):\n"
            "    try:\n"
            "        os.fstat(int(x))\n"
            "    except OSError:\n"
            "        continue  # the fd listdir itself used, closed by now\n"
            "    mine.append(int(x))\n"
            f"json.dump(sorted(mine), open({str(report)!r}, 'w'))\n"
            "sys.exit(3)",
        )
        spec = HelperSpec(
            "save",
            proto.XEN_417,
            xen_save_args(stream, 1, xcflags=0, cbflags=0),
            pass_fds=(stream,) if pass_stream else (),
            domain="t",
            helper=script,
        )

        async def go() -> None:
            with pytest.raises(xcsave.HelperDied):
                await Supervisor().run(spec)

        asyncio.run(go())
    finally:
        os.close(leak)
        os.close(stream)
    fds = set(json.loads(report.read_text()))
    extra = {stream} if pass_stream else set()
    assert fds == {0, 1, 2} | extra


def _assert_reaped(pid: int) -> None:
    """The helper is neither running nor a zombie of ours."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return
    state = next(line for line in status.splitlines() if line.startswith("State:"))
    ppid = int(next(line for line in status.splitlines() if line.startswith("PPid:")).split()[1])
    assert ppid != os.getpid(), f"helper {pid} still ours: {state}"


def test_struct_sizes_of_417_replies() -> None:
    assert struct.calcsize("=i") == proto.REPLY_SIZE == 4


# ------------------------------------------------- the commit (on_commit), sim


def _sim_save_spec(
    tmp_path: Path, on_commit: Callable[[], object]
) -> tuple[HelperSpec, Path, int]:
    """A live sim save into a file, with ``on_commit``: (spec, source, out fd)."""
    from xcsave import sim
    from xcsave.supervisor import xcs_args

    src = sim.create(tmp_path / "src.dom", 8 << 20, seed=2)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    args = xcs_args("save", "sim", fd, {"sim": str(src), "flags": 1})
    spec = HelperSpec(
        "save", proto.XCSAVE_1, args, (fd,), str(src), backend="sim", on_commit=on_commit
    )
    return spec, src, fd


async def test_on_commit_runs_while_the_helper_awaits_its_reply(tmp_path: Path) -> None:
    from xcsave import sim

    seen: list[tuple[str, bool]] = []
    run: list[object] = []

    def commit() -> None:
        proc = getattr(run[0], "proc", None)
        assert proc is not None
        seen.append((str(sim.info(src)["state"]), proc.returncode is None))

    spec, src, fd = _sim_save_spec(tmp_path, commit)
    try:
        from xcsave.supervisor import HelperRun

        hr = HelperRun(spec)
        run.append(hr)
        res = await hr.run()
    finally:
        os.close(fd)
    assert res.retval == 0 and res.returncode == 0
    assert seen == [("suspended", True)]  # saved, and the helper still waits for us
    assert sim.info(src)["state"] == "suspended"  # committed: as a save leaves it
    assert not sim.info(src)["logdirty"]


async def test_failed_on_commit_is_raised_and_the_helper_puts_the_source_back(
    tmp_path: Path,
) -> None:
    from xcsave import sim

    def commit() -> None:
        raise OSError(28, "No space left on device", "img")

    spec, src, fd = _sim_save_spec(tmp_path, commit)
    try:
        async with Supervisor(max_parallel=1) as sup:
            with pytest.raises(OSError, match="No space left") as ei:
                await sup.run(spec)
    finally:
        os.close(fd)
    assert ei.value.errno == 28  # the commit's own error, as it was raised
    info = sim.info(src)
    assert info["state"] == "running"  # the helper heard "not committed"
    assert not info["logdirty"]


async def test_a_cancel_after_the_commit_still_reports_success(tmp_path: Path) -> None:
    """A signal (the CLI cancels its task) right at the commit: the run has
    succeeded, its helper is reaped, the success is returned."""
    from xcsave import sim

    task = asyncio.current_task()
    assert task is not None

    def commit() -> None:
        task.cancel()  # as the CLI's SIGINT handler does

    spec, src, fd = _sim_save_spec(tmp_path, commit)
    try:
        async with Supervisor(max_parallel=1) as sup:
            res = await sup.run(spec)
    finally:
        os.close(fd)
    assert res.retval == 0
    assert sim.info(src)["state"] == "suspended"
    _assert_reaped(res.pid)
