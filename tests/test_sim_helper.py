"""Simulated domains saved and restored through xcsave-helper (sim backend):
every format accepted by Xen's verify-stream-v2, bit-exact restores, live
precopy under a dirtying workload, each policy outcome, refusals that leave
nothing behind."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import XenVerify

import xcsave
import xcsave.sync
from xcsave import policy, sim
from xcsave.events import Event, PolicyEvent
from xcsave.policy import Decision, PrecopyStats

MiB = 1 << 20


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-m", "xcsave", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


@pytest.fixture
def dom(tmp_path: Path) -> Path:
    return sim.create(tmp_path / "src.dom", 128 * MiB, vcpus=2, seed=7)


@pytest.mark.parametrize("fmt", ["libxc", "libxl", "xl"])
def test_each_format_verifies_and_restores_bit_exact(
    fmt: str, dom: Path, tmp_path: Path, xen_verify: XenVerify
) -> None:
    out = tmp_path / f"dom.{fmt}"
    r = cli("save", "--sim", dom, out, "--format", fmt)
    assert r.returncode == 0, r.stderr
    v = xen_verify(out, fmt)
    assert v.returncode == 0, v.stdout + v.stderr
    target = tmp_path / "dst.dom"
    r = cli("restore", out, "--sim", target, "--format", fmt)
    assert r.returncode == 0, r.stderr
    assert sim.digest(target) == sim.digest(dom)
    assert sim.info(target)["state"] == "paused"  # restored domains start paused, as in Xen


def test_non_live_save_resumes_nothing_and_suspends_the_source(dom: Path, tmp_path: Path) -> None:
    res = xcsave.sync.save(tmp_path / "o", sim=dom)
    assert res.stats is not None
    assert res.stats.rounds == 1
    assert sim.info(dom)["state"] == "suspended"


def test_restore_reports_its_own_stats(dom: Path, tmp_path: Path) -> None:
    """A restore ends with restore_stats, what it received; a save's stats never."""
    img = tmp_path / "o"
    saved = xcsave.sync.save(img, sim=dom)
    assert saved.stats is not None
    assert saved.restore_stats is None
    events: list[Event] = []
    res = xcsave.sync.restore(img, sim=tmp_path / "dst.dom", on_event=events.append)
    assert res.stats is None
    st = res.restore_stats
    assert st is not None
    assert st.pages_received == saved.stats.pages_sent > 0
    assert st.bytes == saved.stats.bytes == img.stat().st_size
    assert st.checkpoints == 0
    assert st.duration_ns > 0
    assert [e.kind for e in events if "stats" in e.kind] == ["restore_stats"]
    assert [e.asdict() for e in events if e.kind == "restore_stats"] == [
        {
            "event": "restore_stats",
            "op": "restore",
            "domain": str(tmp_path / "dst.dom"),
            "checkpoints": 0,
            "pages_received": st.pages_received,
            "bytes": st.bytes,
            "duration_ns": st.duration_ns,
        }
    ]


@pytest.mark.parametrize("progress", ["plain", "json"])
def test_restore_progress_shows_what_was_received(
    progress: str, dom: Path, tmp_path: Path
) -> None:
    img = tmp_path / "o"
    xcsave.sync.save(img, sim=dom)
    size = img.stat().st_size
    r = cli("restore", img, "--sim", tmp_path / "dst.dom", "--progress", progress)
    assert r.returncode == 0, r.stderr
    if progress == "json":
        events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        stats = [e for e in events if "stats" in e["event"]]
        assert [e["event"] for e in stats] == ["restore_stats"]
        assert stats[0]["bytes"] == size
        assert stats[0]["pages_received"] > 0
    else:
        assert f" {size} bytes received" in r.stderr
        assert "round(s)" not in r.stderr


def test_a_remus_restore_counts_its_checkpoints(dom: Path, tmp_path: Path) -> None:
    img = tmp_path / "remus.img"
    xcsave.sync.save(img, sim=dom, fmt="libxl", stream_type="remus", checkpoints=3)
    res = xcsave.sync.restore(img, sim=tmp_path / "dst.dom", fmt="libxl", stream_type="remus")
    assert res.restore_stats is not None
    assert res.restore_stats.checkpoints == 3
    assert res.restore_stats.bytes == img.stat().st_size


def test_save_to_stdout_and_restore_from_stdin(dom: Path, tmp_path: Path) -> None:
    img = tmp_path / "piped.img"
    with img.open("wb") as f:
        r = subprocess.run(
            [
                sys.executable,
                "-P",
                "-m",
                "xcsave",
                "save",
                "--sim",
                str(dom),
                "-",
                "--format",
                "xl",
            ],
            stdout=f,
            stderr=subprocess.PIPE,
            check=False,
        )
    assert r.returncode == 0, r.stderr
    with img.open("rb") as f:
        r = subprocess.run(
            [sys.executable, "-P", "-m", "xcsave", "restore", "-", "--sim",
             str(tmp_path / "d.dom"), "--format", "xl"],
            stdin=f, capture_output=True, text=True, check=False,
        )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sim.digest(tmp_path / "d.dom") == sim.digest(dom)


async def _live_save_under_load(
    src: Path, out: Path, live_policy: policy.Policy, rate: int = 20000
) -> tuple[xcsave.RunResult, list[Event]]:
    workload = await asyncio.create_subprocess_exec(
        sys.executable, "-P", "-m", "xcsave", "sim", "dirty", str(src),
        "--rate", str(rate), "--duration", "120",
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # wait until the guest is really writing, so round 0 leaves pages dirty
        for _ in range(500):
            if sim.info(src)["pages_written"] > 0:
                break
            await asyncio.sleep(0.01)
        events: list[Event] = []
        res = await xcsave.save(
            out, sim=src, live=True, fmt="libxl", policy=live_policy, on_event=events.append
        )
        return res, events
    finally:
        workload.kill()
        await workload.wait()


@pytest.mark.slow
async def test_live_save_under_20k_dirty_pages_per_second(
    tmp_path: Path, xen_verify: XenVerify
) -> None:
    src = sim.create(tmp_path / "live.dom", 256 * MiB, vcpus=2, seed=3)
    out = tmp_path / "live.img"
    res, events = await _live_save_under_load(src, out, policy.xen_default())
    assert res.stats is not None
    assert res.stats.rounds >= 2  # the workload dirtied pages during round 0
    assert res.stats.pages_per_round[1] > 0
    assert res.stats.downtime_ns > 0
    assert [e for e in events if isinstance(e, PolicyEvent)]
    assert sim.info(src)["state"] == "suspended"  # the workload stopped with it
    v = xen_verify(out, "libxl")
    assert v.returncode == 0, v.stdout + v.stderr
    dst = tmp_path / "live-copy.dom"
    await xcsave.restore(out, sim=dst, fmt="libxl")
    assert sim.digest(dst) == sim.digest(src)  # the source's suspended state


@pytest.mark.parametrize(
    ("name", "pol", "rounds"),
    [
        ("stop-at-once", lambda st: Decision.STOP_AND_COPY, 2),
        ("max-iters-3", policy.max_iterations(3), 4),
        # round 1 has no measured rate yet; by round 2 anything fits in 10 s
        ("downtime", policy.downtime_target(10.0), 3),
    ],
)
async def test_policy_outcomes(name: str, pol: policy.Policy, rounds: int, tmp_path: Path) -> None:
    src = sim.create(tmp_path / "p.dom", 32 * MiB, seed=1)
    res, _ = await _live_save_under_load(src, tmp_path / "o", pol, rate=5000)
    assert res.stats is not None
    assert res.stats.rounds == rounds, name
    dst = tmp_path / "copy.dom"
    await xcsave.restore(tmp_path / "o", sim=dst, fmt="libxl")
    assert sim.digest(dst) == sim.digest(src)


async def test_policy_abort_fails_and_resumes_the_source(tmp_path: Path) -> None:
    src = sim.create(tmp_path / "a.dom", 32 * MiB, seed=1)
    asked: list[PrecopyStats] = []

    def abort_at_2(st: PrecopyStats) -> Decision:
        asked.append(st)
        return Decision.ABORT if st.iteration >= 2 else Decision.CONTINUE

    with pytest.raises(xcsave.HelperFailed) as ei:
        await _live_save_under_load(src, tmp_path / "o", abort_at_2, rate=5000)
    assert ei.value.errno != 0
    assert [s.iteration for s in asked] == [1, 2]
    assert sim.info(src)["state"] == "running"
    assert not (tmp_path / "o").exists()


async def test_policy_abort_if_not_converging(tmp_path: Path) -> None:
    # a workload far faster than it can be copied never converges
    src = sim.create(tmp_path / "n.dom", 16 * MiB, seed=1)
    never = policy.abort_if_not_converging(rounds=2, min_shrink=0.5)
    with pytest.raises(xcsave.HelperFailed):
        await _live_save_under_load(src, tmp_path / "o", never, rate=200000)
    assert sim.info(src)["state"] == "running"


# ---------------------------------------------------------------- refusals


def _records(img: bytes) -> list[tuple[int, int, int]]:
    """(offset, type, length) of each libxc record after the 40 header bytes."""
    out, off = [], 40
    while off + 8 <= len(img):
        rtype, length = struct.unpack_from("<II", img, off)
        out.append((off, rtype, length))
        off += 8 + ((length + 7) & ~7)
        if rtype == 0:
            break
    return out


@pytest.fixture
def small_image(tmp_path: Path) -> bytes:
    src = sim.create(tmp_path / "small.dom", 4 * MiB, seed=2)
    out = tmp_path / "small.img"
    xcsave.sync.save(out, sim=src)
    return out.read_bytes()


def _refused(tmp_path: Path, image: bytes, *extra: str) -> str:
    bad = tmp_path / "bad.img"
    bad.write_bytes(image)
    target = tmp_path / "target.dom"
    r = cli("restore", bad, "--sim", target, *extra)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    leftovers = [
        p.name for p in tmp_path.iterdir() if p.name not in ("bad.img", "small.dom", "small.img")
    ]
    assert leftovers == []  # no domain, no partial file
    return lines[0]


def test_restore_refuses_more_pages_than_the_domain(small_image: bytes, tmp_path: Path) -> None:
    msg = _refused(tmp_path, small_image, "--max-pages", "512")  # the image has 1024
    assert "pfn" in msg


def test_restore_refuses_a_record_over_the_cap(small_image: bytes, tmp_path: Path) -> None:
    img = bytearray(small_image)
    off, _, _ = next(r for r in _records(small_image) if r[1] == 1)
    struct.pack_into("<I", img, off + 4, 200 << 20)  # 200 MiB record
    msg = _refused(tmp_path, bytes(img))
    assert "134217728" in msg or "exceeds" in msg


def test_restore_refuses_an_oversized_batch(small_image: bytes, tmp_path: Path) -> None:
    img = bytearray(small_image)
    off, _, _ = next(r for r in _records(small_image) if r[1] == 1)
    struct.pack_into("<I", img, off + 8, 1025)  # PAGE_DATA count
    msg = _refused(tmp_path, bytes(img))
    assert "1025" in msg or "batch" in msg


def test_restore_refuses_a_pfn_out_of_range(small_image: bytes, tmp_path: Path) -> None:
    img = bytearray(small_image)
    off, _, _ = next(r for r in _records(small_image) if r[1] == 1)
    struct.pack_into("<Q", img, off + 16, 1 << 40)  # first pfn of the first batch
    msg = _refused(tmp_path, bytes(img))
    assert "pfn" in msg


def test_restore_refuses_a_truncated_stream(small_image: bytes, tmp_path: Path) -> None:
    msg = _refused(tmp_path, small_image[: len(small_image) // 2])
    assert msg.startswith("xcsave: restore: ")


def test_killed_restore_leaves_no_partial_domain(small_image: bytes, tmp_path: Path) -> None:
    """SIGKILL mid-restore: the supervisor removes what the helper could not."""
    rfd, wfd = os.pipe()
    target = tmp_path / "k.dom"

    async def go() -> None:
        sup = xcsave.Supervisor()
        task = asyncio.create_task(xcsave.restore(rfd, sim=target, supervisor=sup))
        os.write(wfd, small_image[: 48 << 10])  # part of a batch; fits the pipe buffer
        for _ in range(200):
            await asyncio.sleep(0.01)
            if sup.running and next(iter(sup._running)).pid:
                break
        await asyncio.sleep(0.2)
        run = next(iter(sup._running))
        assert run.pid is not None
        os.kill(run.pid, 9)
        with pytest.raises(xcsave.HelperDied):
            await task

    try:
        asyncio.run(go())
    finally:
        os.close(rfd)
        os.close(wfd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.dom", "small.img"]


def _helpers_for(path: Path) -> list[int]:
    """pids of live processes whose argv mentions ``path`` (our helpers)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            state = next(
                ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State:")
            )
        except (OSError, StopIteration):
            continue
        if str(path).encode() in argv and " Z " not in state and argv[0].endswith(b"-helper"):
            pids.append(int(d.name))
    return pids


@pytest.mark.parametrize("when", ["waiting-for-a-reply", "copying"])
def test_toolstack_killed_mid_save_resumes_the_source(when: str, tmp_path: Path) -> None:
    """The toolstack dies (SIGKILL) mid live save: the helper aborts as on SIGTERM
    (PR_SET_PDEATHSIG, or EOF on its reply pipe), the backend resumes the source
    and turns log-dirty off, and the helper exits instead of lingering."""
    import time

    src = sim.create(tmp_path / "s.dom", 64 * MiB, seed=5)
    rfd, wfd = os.pipe()  # the stream: read by nobody, so "copying" blocks
    out = wfd if when == "copying" else os.open(tmp_path / "o", os.O_WRONLY | os.O_CREAT)
    script = (
        "import asyncio, sys, time, xcsave\n"
        "def policy(st):\n"
        "    print('ASKED', flush=True)\n"
        "    time.sleep(3600)  # the toolstack hangs, then dies\n"
        "def event(ev):\n"
        "    if ev.kind == 'progress':\n"
        "        print('COPYING', flush=True)\n"
        f"asyncio.run(xcsave.save({out}, sim={str(src)!r}, live=True, policy=policy,\n"
        "                        on_event=event))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-P", "-c", script], stdout=subprocess.PIPE, pass_fds=(out,), text=True
    )
    try:
        assert proc.stdout is not None
        want = "ASKED" if when == "waiting-for-a-reply" else "COPYING"
        for line in proc.stdout:
            if line.strip() == want:
                break
        time.sleep(0.2)
        assert sim.info(src)["logdirty"]  # mid-save
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            info = sim.info(src)
            if info["state"] == "running" and not info["logdirty"] and not _helpers_for(src):
                break
            time.sleep(0.05)
        info = sim.info(src)
        assert info["state"] == "running"
        assert not info["logdirty"]
        assert _helpers_for(src) == []
    finally:
        os.close(rfd)
        os.close(wfd)
        if out not in (rfd, wfd):
            os.close(out)


def _signal_pending(pid: int, signo: int) -> bool:
    """Whether ``signo`` is pending for ``pid`` (not yet delivered to a handler)."""
    bit = 1 << (signo - 1)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("SigPnd", "ShdPnd") and int(value.strip(), 16) & bit:
            return True
    return False


def _fill_pipe(wfd: int) -> None:
    """Fill the pipe whose write end is ``wfd`` to the brim, through an open
    file of our own (O_NONBLOCK on the shared one would reach the helper's)."""
    fd = os.open(f"/proc/self/fd/{wfd}", os.O_WRONLY | os.O_NONBLOCK)
    try:
        while True:
            try:
                os.write(fd, b"\0" * 4096)
            except BlockingIOError:
                try:
                    os.write(fd, b"\0")
                except BlockingIOError:
                    return
    finally:
        os.close(fd)


def test_a_second_sigterm_during_the_cleanup_is_absorbed(tmp_path: Path) -> None:
    """The parent's death can deliver SIGTERM twice (PR_SET_PDEATHSIG fires
    for each thread of a multi-threaded parent the helper is passed to, as
    CPython 3.11's asyncio has a child-watcher thread); a stop() followed by
    the parent's death is two as well.  The second must not kill the helper
    before its cleanup: it once did (the handler re-armed SIG_DFL), and a
    toolstack SIGKILLed mid-save left its domain running with log-dirty on.

    Made certain, not timed: the helper is blocked writing a page into a
    stream nobody reads; its control pipe is full, so after the first SIGTERM
    it blocks again on the failure's log frame, before the engine's cleanup;
    the second SIGTERM comes only once the first has been delivered."""
    src = sim.create(tmp_path / "s.dom", 64 * MiB, seed=5)
    proc, stream_r, stream_w, reply_w, frames_r, frames_w = _start_save_into_nobody(src)
    try:
        _until_blocked_in_the_stream(proc, src, stream_w, frames_r)
        _fill_pipe(frames_w)
        os.close(frames_w)  # the helper's is the last: EOF when it exits
        frames_w = -1
        proc.send_signal(signal.SIGTERM)  # the first: the abort
        while _signal_pending(proc.pid, signal.SIGTERM):
            select.select([], [], [], 0.001)
        assert sim.info(src)["logdirty"]  # blocked on its log frame, before the cleanup
        proc.send_signal(signal.SIGTERM)  # the second: absorbed
        while proc.poll() is None and _signal_pending(proc.pid, signal.SIGTERM):
            select.select([], [], [], 0.001)
        # Let it go on: read its frames, and answer nothing (EOF).
        os.close(reply_w)
        reply_w = -1
        while os.read(frames_r, 1 << 16):
            pass
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for fd in (stream_r, stream_w, frames_r, frames_w, reply_w):
            if fd >= 0:
                os.close(fd)
    assert proc.returncode != -signal.SIGTERM  # not killed: it exited by itself
    info = sim.info(src)
    assert info["state"] == "running"
    assert not info["logdirty"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_a_terminal_signal_aborts_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    """A terminal's Ctrl-C (SIGINT) or hangup (SIGHUP) reaches the whole
    foreground process group, helper included: it aborts the way SIGTERM
    does -- the engine's own cleanup runs (source running, log-dirty off) --
    instead of dying mid-copy by the signal's default action, which for a
    real Xen domain would leave log-dirty on in the hypervisor.  Certain,
    not timed: the helper is blocked writing into a stream nobody reads."""
    src = sim.create(tmp_path / "s.dom", 64 * MiB, seed=6)
    proc, stream_r, stream_w, reply_w, frames_r, frames_w = _start_save_into_nobody(src)
    os.close(frames_w)
    try:
        _until_blocked_in_the_stream(proc, src, stream_w, frames_r)
        proc.send_signal(sig)
        os.close(reply_w)  # and no replies: EOF
        reply_w = -1
        while os.read(frames_r, 1 << 16):
            pass
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for fd in (stream_r, stream_w, frames_r, reply_w):
            if fd >= 0:
                os.close(fd)
    assert proc.returncode != -sig  # not killed: it exited by itself (complete said it failed)
    info = sim.info(src)
    assert info["state"] == "running"
    assert not info["logdirty"]


def _start_save_into_nobody(src: Path) -> tuple[subprocess.Popen[bytes], int, int, int, int, int]:
    """A live save of ``src`` by the helper, run directly, into a pipe read by
    nobody.  Returns (proc, stream_r, stream_w, reply_w, frames_r, frames_w):
    the caller answers (or not) on reply_w and reads the frames."""
    from xcsave.supervisor import helper_path, xcs_args

    stream_r, stream_w = os.pipe()  # read by nobody: the save blocks in it
    reply_r, reply_w = os.pipe()
    frames_r, frames_w = os.pipe()
    argv = [str(helper_path()), *xcs_args("save", "sim", stream_w, {"sim": src, "flags": 1})]
    proc = subprocess.Popen(
        argv, stdin=reply_r, stdout=frames_w, pass_fds=(stream_w,), stderr=subprocess.DEVNULL
    )
    os.close(reply_r)
    return proc, stream_r, stream_w, reply_w, frames_r, frames_w


def _until_blocked_in_the_stream(
    proc: subprocess.Popen[bytes], src: Path, stream_w: int, frames_r: int
) -> None:
    """Until the stream is full and the helper blocked in it, mid-save (log-dirty on)."""
    while not (sim.info(src)["logdirty"] and _pipe_full(stream_w)):
        assert proc.poll() is None
        if select.select([frames_r], [], [], 0.005)[0]:
            os.read(frames_r, 1 << 16)  # its frames, meanwhile


def _pipe_full(wfd: int) -> bool:
    import fcntl
    import termios

    # Full: a record no longer fits (pages go in page-sized slots).
    unread = struct.unpack("i", fcntl.ioctl(wfd, termios.FIONREAD, b"\0\0\0\0"))[0]
    return bool(unread > fcntl.fcntl(wfd, 1032) // 2)  # F_GETPIPE_SZ
