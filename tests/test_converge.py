"""Auto-converge (issue 16, item 3): the policy wrapper on recorded curves,
the sim throttle in the domain's header, the actuators (sim; credit2 caps
through the helper's sched-cap mode under fakexen), and the throttle lifted
-- exactly what was there put back -- after success, failure (a policy that
aborts, a helper killed) and cancellation (a task cancelled, SIGINT)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import fake_env, helper_pids
from test_migrate import workload
from test_trust_net import listening as receiving

import xcsave
from xcsave import converge, migrate, policy, sim
from xcsave.converge import auto_converge, parse_auto_converge
from xcsave.events import Event, PolicyEvent, ThrottleEvent
from xcsave.policy import Curve, Decision, PrecopyStats, Verdict
from xcsave.throttle import Throttle, XenCapThrottle

MiB = 1 << 20
THROTTLE_OFF = 124  # docs/sim-format.md


def curve(*rounds: tuple[int, int, int, float]) -> list[PrecopyStats]:
    c = Curve()
    return [c.add(PrecopyStats(i, w, d), t) for i, w, d, t in rounds]


def hot_curve(n: int, sent: int = 1000, dirty: int = 900) -> list[PrecopyStats]:
    """n rounds, each sending ``sent`` pages while ``dirty`` got dirty."""
    return curve(*((i, sent * i, dirty, float(i)) for i in range(n)))


# ------------------------------------------------------------ the policy


def test_auto_converge_steps_up_after_two_hot_rounds() -> None:
    ac = auto_converge(policy.max_iterations(100), initial=20, increment=10, ceiling=45)
    got = [ac(st) for st in hot_curve(10)]
    # round 0 sent nothing: never hot; then hot, hot -> 20, hot, hot -> 30 ...
    assert [v.throttle for v in got] == [None, None, 20, None, 30, None, 40, None, 45, None]
    assert all(v.decision == Decision.CONTINUE for v in got)
    assert "dirtied 900 while sending 1000 pages (90%)" in (got[2].reason or "")
    assert got[2].reason.endswith("throttle 0% -> 20%")
    assert ac.throttle == 45


def test_auto_converge_a_cool_round_resets_the_count() -> None:
    ac = auto_converge(policy.max_iterations(100))
    rounds = curve(
        (0, 0, 4000, 0.0),
        (1, 4000, 3000, 1.0),  # hot (3000 > 50% of 4000)
        (2, 7000, 1000, 2.0),  # cool (1000 <= 50% of 3000): count back to 0
        (3, 8000, 900, 3.0),  # hot
        (4, 8900, 800, 4.0),  # hot: second in a row -> 20
    )
    assert [ac(st).throttle for st in rounds] == [None, None, None, None, 20]


def test_auto_converge_passes_the_inner_decision_through() -> None:
    ac = auto_converge(policy.xen_default(), rounds=1)
    rounds = hot_curve(7)
    verdicts = [ac(st) for st in rounds]
    assert verdicts[1] == Verdict(Decision.CONTINUE, verdicts[1].reason, 20)
    stop = verdicts[5]
    assert stop == Verdict(Decision.STOP_AND_COPY, "5 rounds done")  # no throttle added
    aborting = auto_converge(lambda st: Verdict(Decision.ABORT, "no"), rounds=1)
    assert [aborting(st) for st in rounds[:3]] == [Verdict(Decision.ABORT, "no")] * 3


def test_auto_converge_reads_no_clock() -> None:
    """Same curve, same answers: two instances agree, whatever the time."""
    rounds = hot_curve(12, sent=500, dirty=400)
    a = [v.throttle for v in map(auto_converge(policy.max_iterations(99)), rounds)]
    time.sleep(0.01)
    b = [v.throttle for v in map(auto_converge(policy.max_iterations(99)), rounds)]
    assert a == b and a[-2] is not None


@pytest.mark.parametrize(
    ("text", "want"),
    [("", converge.DEFAULTS), ("30:5", (30, 5, 99)), ("10:10:50", (10, 10, 50))],
)
def test_parse_auto_converge(text: str, want: tuple[int, int, int]) -> None:
    assert parse_auto_converge(text) == want


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("20", "INITIAL:INCREMENT"),
        ("a:b", "INITIAL:INCREMENT"),
        ("-1:10", "INITIAL:INCREMENT"),
        ("20:10:100", "ceiling must be a whole number from 1 to 99"),
        ("0:10", "initial must be a whole number from 1 to 99"),
        ("50:10:40", "initial must be a whole number from 1 to 40"),
        ("20:0", "increment must be"),
        ("9" * 400 + ":1", "from 1 to 99"),
    ],
)
def test_parse_auto_converge_refuses_garbage(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as e:
        parse_auto_converge(text)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------ the sim throttle


def test_old_sim_files_read_no_throttle(shm_dir: Path) -> None:
    dom = sim.create(shm_dir / "old.dom", 1 * MiB)
    with open(dom, "rb") as f:  # the field was "reserved", written 0
        assert f.read(128)[THROTTLE_OFF : THROTTLE_OFF + 4] == bytes(4)
    assert sim.info(dom)["throttle"] == 0 == sim.throttle(dom)


def test_sim_throttle_is_stored_and_garbage_is_refused(shm_dir: Path) -> None:
    dom = sim.create(shm_dir / "t.dom", 1 * MiB)
    sim.set_throttle(dom, 37)
    with open(dom, "rb") as f:
        assert struct.unpack_from("<I", f.read(128), THROTTLE_OFF)[0] == 37
    assert sim.throttle(dom) == 37
    for bad in (100, -1, 2**40):
        with pytest.raises(ValueError, match="throttle must be from 0 to 99") as e:
            sim.set_throttle(dom, bad)
        assert "\n" not in str(e.value)
    with pytest.raises(TypeError):
        sim.set_throttle(dom, "5")  # type: ignore[arg-type]
    # A damaged header (or one from a newer xcsave): refused, not obeyed.
    with open(dom, "r+b") as f:
        f.seek(THROTTLE_OFF)
        f.write(struct.pack("<I", 1000))
    with pytest.raises(ValueError, match="the header's throttle is 1000"):
        sim.throttle(dom)
    with pytest.raises(OSError, match="Invalid argument") as oe:
        sim.dirty(dom, 1000, 0.05)
    assert oe.value.errno == errno.EINVAL


def test_sim_dirty_honours_the_throttle(shm_dir: Path) -> None:
    dom = sim.create(shm_dir / "w.dom", 4 * MiB)
    free = sim.dirty(dom, 4000, 0.5)
    sim.set_throttle(dom, 90)
    paced = sim.dirty(dom, 4000, 0.5)
    unpaced = sim.dirty(dom, 0, 0.2)
    sim.set_throttle(dom, 0)
    unpaced_free = sim.dirty(dom, 0, 0.2)
    assert paced < 0.4 * free  # 10% of the rate (page counts, not time)
    assert unpaced < 0.5 * unpaced_free  # asleep 90% of each slice


# ------------------------------------------------------------ lifted after a save


class Asks:
    """A policy asking a throttle each round (from a list), recording the
    header's throttle it sees: the one asked before must be in force."""

    throttles = True  # like auto_converge: the save checks the domain first

    def __init__(self, dom: Path, asks: list[int], then: Decision = Decision.STOP_AND_COPY):
        self.dom, self.asks, self.then = dom, list(asks), then
        self.seen: list[int] = []

    def __call__(self, st: PrecopyStats) -> Verdict:
        self.seen.append(sim.throttle(self.dom))
        if self.asks:
            return Verdict(Decision.CONTINUE, "asked", self.asks.pop(0))
        return Verdict(self.then, "done")


async def test_throttle_applied_before_the_reply_and_lifted_after_success(
    shm_dir: Path,
) -> None:
    dom = sim.create(shm_dir / "src.dom", 4 * MiB, seed=1)
    pol = Asks(dom, [30, 30, 60, 10])
    events: list[Event] = []
    res = await xcsave.save(
        shm_dir / "out", sim=dom, live=True, policy=pol, on_event=events.append
    )
    assert pol.seen == [0, 30, 30, 60, 10]  # each round ran with what was asked before it
    assert sim.throttle(dom) == 0  # lifted
    assert res.throttle is not None
    assert (res.throttle.max_percent, res.throttle.restored) == (60, 0)
    assert 10 <= res.throttle.mean_percent <= 60
    assert res.throttle.seconds > 0
    thr = [e for e in events if isinstance(e, ThrottleEvent)]
    assert thr == [res.throttle]
    assert [e.throttle for e in events if isinstance(e, PolicyEvent)] == [30, 30, 60, 10, None]


async def test_lift_restores_exactly_what_was_there(shm_dir: Path) -> None:
    dom = sim.create(shm_dir / "src.dom", 4 * MiB, seed=2)
    sim.set_throttle(dom, 25)  # someone's own throttle
    pol = Asks(dom, [10, 50])
    res = await xcsave.save(shm_dir / "out", sim=dom, live=True, policy=pol)
    assert pol.seen == [25, 25, 50]  # never less than what the domain had
    assert sim.throttle(dom) == 25
    assert res.throttle is not None and res.throttle.restored == 25


async def test_no_throttle_asked_nothing_touched(shm_dir: Path) -> None:
    dom = sim.create(shm_dir / "src.dom", 4 * MiB, seed=2)
    res = await xcsave.save(shm_dir / "out", sim=dom, live=True, policy=policy.xen_default())
    assert res.throttle is None and sim.throttle(dom) == 0


async def test_lifted_after_a_policy_aborts(shm_dir: Path) -> None:
    dom = sim.create(shm_dir / "src.dom", 4 * MiB, seed=3)
    pol = Asks(dom, [40, 70], then=Decision.ABORT)
    with pytest.raises(xcsave.XcsaveError):
        await xcsave.save(shm_dir / "out", sim=dom, live=True, policy=pol)
    assert pol.seen[-1] == 70  # it was throttled when the save failed
    assert sim.throttle(dom) == 0
    assert sim.state(dom) == "running"


async def test_lifted_after_the_helper_is_killed(shm_dir: Path) -> None:
    dom = sim.create(shm_dir / "src.dom", 4 * MiB, seed=4)
    killed: list[int] = []

    def pol(st: PrecopyStats) -> Verdict:
        if st.iteration >= 2 and not killed:
            for pid in helper_pids(mode="save"):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        return Verdict(Decision.CONTINUE, "", 50)

    with pytest.raises(xcsave.HelperDied):
        await xcsave.save(shm_dir / "out", sim=dom, live=True, policy=pol)
    assert killed
    assert sim.throttle(dom) == 0
    assert sim.state(dom) == "running"


async def test_lifted_after_the_task_is_cancelled(shm_dir: Path) -> None:
    dom = sim.create(shm_dir / "src.dom", 4 * MiB, seed=5)
    throttled = asyncio.Event()

    async def pol(st: PrecopyStats) -> Verdict:
        if sim.throttle(dom) == 80:
            throttled.set()
            await asyncio.sleep(3600)  # cancelled here, with the guest throttled
        return Verdict(Decision.CONTINUE, "", 80)

    task = asyncio.create_task(
        xcsave.save(shm_dir / "out", sim=dom, live=True, policy=pol)  # type: ignore[arg-type]
    )
    await asyncio.wait_for(throttled.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sim.throttle(dom) == 0
    assert sim.state(dom) == "running"
    assert not (shm_dir / "out").exists()


async def test_a_cancel_during_the_lift_of_a_committed_save_is_a_success(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (CI, test_faults): a cancel that landed while the throttle
    was lifted after the commit raised CancelledError with the image in
    place.  The image is saved; the save says so, as the supervisor does."""
    dom = sim.create(shm_dir / "src.dom", 4 * MiB, seed=5)
    lifting = asyncio.Event()
    real_lift = Throttle.lift

    async def slow_lift(self: Throttle) -> ThrottleEvent | None:
        lifting.set()
        await asyncio.sleep(0.2)  # the cancel lands here
        return await real_lift(self)

    monkeypatch.setattr(Throttle, "lift", slow_lift)
    pol = Asks(dom, [30])
    task = asyncio.create_task(
        xcsave.save(shm_dir / "out", sim=dom, live=True, policy=pol)  # type: ignore[arg-type]
    )
    await asyncio.wait_for(lifting.wait(), 60)
    assert (shm_dir / "out").exists()  # committed before the lift
    task.cancel()
    res = await task
    assert res.throttle is not None and res.throttle.max_percent == 30
    assert sim.throttle(dom) == 0
    assert sim.state(dom) == "suspended"  # saved, as Xen leaves it


@pytest.fixture
def dirtier(shm_dir: Path) -> Iterator[Path]:
    """A running domain whose guest writes flat out (a thread) while the test runs."""
    dom = sim.create(shm_dir / "busy.dom", 8 * MiB, seed=6)
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            with_state = sim.state(dom)
            if with_state == "running":
                sim.dirty(dom, 0, 0.2)
            else:
                time.sleep(0.05)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield dom
    finally:
        stop.set()
        t.join()


def test_lifted_after_sigint(dirtier: Path, sim_env: dict[str, str]) -> None:
    """The CLI, interrupted while the guest is throttled: lifted, exit 130."""
    env = dict(sim_env, XCSAVE_SIM_DIR=str(dirtier.parent))
    cmd = [sys.executable, "-P", "-m", "xcsave", "save", "--sim", str(dirtier), "--live"]
    cmd += ["--policy", "max-iters:100000", "--auto-converge=30:10", "-"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as p:
        assert p.stdout is not None and p.stderr is not None
        try:
            deadline = time.monotonic() + 120
            while sim.throttle(dirtier) == 0:  # read the stream slowly meanwhile
                assert p.poll() is None, p.stderr.read().decode()
                assert time.monotonic() < deadline, "never throttled"
                p.stdout.read(4096)
                time.sleep(0.001)
            p.send_signal(signal.SIGINT)
            drain = threading.Thread(target=p.stdout.read)  # to the end
            drain.start()
            assert p.wait(60) == 130, p.stderr.read().decode()
            drain.join()
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert sim.throttle(dirtier) == 0


# ------------------------------------------------------------ xen: credit2 caps (fakexen)


def _xen_built() -> bool:
    out = subprocess.run(
        [str(xcsave.helper_path()), "--version"], capture_output=True, text=True, check=True
    ).stdout
    return "xen" in out.split("backends", 1)[1].split()[0]


@pytest.fixture
def fakexen(fakexen_lib: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """fakexen under every helper this test spawns; returns its cap file."""
    if not _xen_built():
        pytest.skip("xcsave-helper was built without the xen backend (libxen-dev missing)")
    cap = tmp_path / "credit2"
    env = fake_env(fakexen_lib, cap_file=cap, vcpus=4, pages=1024, dirty="900,900")
    for k, v in env.items():
        if k == "LD_PRELOAD" or k.startswith("FAKEXEN_"):
            monkeypatch.setenv(k, v)
    return cap


async def test_xen_cap_set_and_restored(fakexen: Path) -> None:
    fakexen.write_text("512 300\n")  # the domain's own weight and cap
    t = XenCapThrottle("save", 9)
    await t.prepare()
    assert (t.before, t.vcpus) == (300, 4)
    await t.set(20)  # 80% of 4 vCPUs = 320, but never looser than its own 300
    assert fakexen.read_text() == "512 300\n"
    await t.set(50)
    assert fakexen.read_text() == "512 200\n"  # (100 - 50) x 4
    ev = await t.lift()
    assert fakexen.read_text() == "512 300\n"
    assert ev is not None and (ev.actuator, ev.max_percent, ev.restored) == (
        "credit2 cap",
        50,
        300,
    )


async def test_xen_auto_converge_sets_and_lifts_the_cap(fakexen: Path) -> None:
    caps: list[str] = []

    def suspend() -> int:
        caps.append(fakexen.read_text() if fakexen.exists() else "none")
        return 1

    pol = auto_converge(policy.max_iterations(6), initial=40, increment=30, rounds=1)
    res = await xcsave.save(
        fakexen.parent / "x.img",
        domid=5,
        live=True,
        policy=pol,
        callbacks=xcsave.Callbacks(suspend=suspend, switch_qemu_logdirty=lambda d, e: 0),
    )
    assert caps == ["256 4\n"]  # the guest was capped at (100 - 99) x 4 when suspended
    assert fakexen.read_text() == "256 0\n"  # no cap again, as before
    assert res.throttle is not None and res.throttle.max_percent == 99


async def test_xen_cap_restored_after_a_failed_save(
    fakexen: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fakexen.write_text("128 150\n")
    monkeypatch.setenv("FAKEXEN_FAIL", "suspend")  # fails after the guest was capped
    seen: list[str] = []

    def suspend() -> int:
        seen.append(fakexen.read_text())
        return 1

    pol = auto_converge(policy.max_iterations(4), initial=60, rounds=1)
    with pytest.raises(xcsave.HelperFailed):
        await xcsave.save(
            fakexen.parent / "x.img",
            domid=5,
            live=True,
            policy=pol,
            callbacks=xcsave.Callbacks(suspend=suspend, switch_qemu_logdirty=lambda d, e: 0),
        )
    assert seen == ["128 80\n"]  # 60, 70, then 80%: (100 - 80) x 4, tighter than its 150
    assert fakexen.read_text() == "128 150\n"  # its own cap again


async def test_xen_cap_restored_after_a_cancelled_save(fakexen: Path) -> None:
    """Cancelled while the guest is capped: the lift runs another helper
    (sched-cap) inside the cancellation, to its end."""
    capped = asyncio.Event()

    async def pol(st: PrecopyStats) -> Verdict:
        if fakexen.exists() and fakexen.read_text() == "256 200\n":  # (100 - 50) x 4
            capped.set()
            await asyncio.sleep(3600)
        return Verdict(Decision.CONTINUE, "", 50)

    task = asyncio.create_task(
        xcsave.save(
            fakexen.parent / "x.img",
            domid=5,
            live=True,
            policy=pol,  # type: ignore[arg-type]
            callbacks=xcsave.Callbacks(suspend=lambda: 1, switch_qemu_logdirty=lambda d, e: 0),
        )
    )
    await asyncio.wait_for(capped.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fakexen.read_text() == "256 0\n"
    assert not (fakexen.parent / "x.img").exists()


async def test_xen_not_credit2_is_refused_before_the_save(
    fakexen: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FAKEXEN_SCHED", "credit")
    pol = auto_converge(policy.xen_default())
    with pytest.raises(xcsave.BackendUnavailable, match="credit scheduler, not credit2") as e:
        await xcsave.save(
            tmp_path / "x.img",
            domid=5,
            live=True,
            policy=pol,
            callbacks=xcsave.Callbacks(suspend=lambda: 1),
        )
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x.img").exists()
    assert not fakexen.exists()  # nothing was set


def test_sched_cap_mode_refuses_garbage_argv() -> None:
    helper = str(xcsave.helper_path())
    for argv in (
        ["--domid", "x"],
        ["--domid", "99999999999"],
        ["--domid", "1", "--cap", "70000"],
        ["--domid", "1", "--cap", "-1"],
        ["--cap", "5"],
        ["--domid", "1", "--backend", "sim"],
        ["--domid", "1", "--bogus"],
        ["--domid", "1", "extra\x1b[2J"],
    ):
        r = subprocess.run(
            [helper, "--xcsave-1", "sched-cap", *argv],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 255, argv
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("xcsave-helper: sched-cap:"), r.stderr
        assert "\x1b" not in r.stderr


# ------------------------------------------------------------ the headline: a busy guest converges

PAGES = 1024  # a 4 MiB guest, all of it random data (nothing skipped as zero)
LINK = 8 * MiB  # the wire pump's cap: 2048 pages/s
DIRTY_RATE = 20000  # pages/s: ten times what the link carries
TARGET_S = 0.05


async def _busy_migration(shm_dir: Path, pol: policy.Policy) -> migrate.MigrationResult:
    src = sim.create(shm_dir / "src.dom", PAGES * 4096, seed=61, force=True, fill="random")
    dst = shm_dir / "dst.dom"
    async with receiving(dst, insecure=True) as (addr, task):
        with workload(src, DIRTY_RATE):
            res = await migrate.migrate(
                sim=src, to=addr, insecure=True, policy=pol, max_bandwidth=LINK
            )
        await task
    assert sim.digest(dst) == sim.digest(src)
    assert sim.throttle(src) == 0  # lifted
    sim.remove(dst)
    return res


async def test_a_guest_dirtying_faster_than_the_link_converges(shm_dir: Path) -> None:
    """Xen's default policy stops after 5 rounds with the whole working set
    still dirty: the stop-and-copy round carries about all of it.  With
    auto-converge the guest is slowed until the dirty set fits the target:
    the last round is under TARGET_S at the link's rate (page counts from
    the stats, not wall time)."""
    link_pages = LINK / 4096
    plain = await _busy_migration(shm_dir, policy.xen_default())
    assert plain.save.throttle is None
    assert plain.pages_per_round[-1] >= 0.75 * PAGES, plain.pages_per_round

    pol = auto_converge(policy.downtime_target(TARGET_S, max_iters=60), initial=50, increment=20)
    conv = await _busy_migration(shm_dir, pol)
    last = conv.pages_per_round[-1]
    assert last / link_pages <= TARGET_S, conv.pages_per_round  # downtime under the target
    assert last < plain.pages_per_round[-1] / 5
    assert conv.save.throttle is not None and conv.save.throttle.max_percent >= 50


def test_cli_auto_converge_reports_the_throttle(dirtier: Path, sim_env: dict[str, str]) -> None:
    """``save --auto-converge --json`` into a slow reader: the guest is
    throttled, the JSON result says how much, and it is lifted after."""
    env = dict(sim_env, XCSAVE_SIM_DIR=str(dirtier.parent))
    cmd = [sys.executable, "-P", "-m", "xcsave", "save", "--sim", str(dirtier), "--live"]
    cmd += ["--policy", "max-iters:6", "--auto-converge=40:30", "--json", "-"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as p:
        assert p.stdout is not None and p.stderr is not None
        while p.stdout.read(16384):  # a slow link: every round finds the guest's pages dirty
            time.sleep(0.002)
        err = p.stderr.read().decode()
        assert p.wait(60) == 0, err
    doc = json.loads(err.strip().splitlines()[-1])
    thr = doc["throttle"]
    assert thr["actuator"] == "sim throttle" and thr["restored"] == 0
    assert thr["max_percent"] in (40, 70, 99)
    assert 40 <= thr["mean_percent"] <= thr["max_percent"]
    assert sim.throttle(dirtier) == 0


@pytest.mark.parametrize("value", ["x", "0:10", "20:10:100", "20", "50:10:40"])
def test_cli_auto_converge_garbage_is_a_usage_error(
    value: str, sim_env: dict[str, str], tmp_path: Path
) -> None:
    cmd = [sys.executable, "-P", "-m", "xcsave", "save", "--sim", "d", "--live"]
    r = subprocess.run(
        [*cmd, f"--auto-converge={value}", str(tmp_path / "o")],
        env=sim_env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2
    assert "--auto-converge" in r.stderr and "Traceback" not in r.stderr


def test_cli_sim_throttle(sim_env: dict[str, str]) -> None:
    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-P", "-m", "xcsave", "sim", *argv]
        return subprocess.run(cmd, env=sim_env, capture_output=True, text=True, check=False)

    assert run("create", "d", "--memory", "1M").returncode == 0
    assert run("throttle", "d").stdout == "throttle: 0%\n"
    assert run("throttle", "d", "35").stdout == "throttle: 35%\n"
    assert '"throttle": 35' in run("info", "d", "--json").stdout
    bad = run("throttle", "d", "100")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert run("throttle", "d", "0").stdout == "throttle: 0%\n"
