"""``xcsave plan``: sampling the dirty log (sim in-process, Xen through the
helper's logdirty mode under fakexen), and log-dirty off again after every
plan and every failure.  Count-based: no timing is asserted."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import fake_env

from xcsave import _ext, api, lock, sim, sync
from xcsave.errors import DomainBusy, HelperDied, HelperFailed
from xcsave.sample import sample_sim

CLI = [sys.executable, "-P", "-m", "xcsave"]


def _logdirty(dom: Path) -> bool:
    return bool(sim.info(dom)["logdirty"])


def _cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


# ----------------------------------------------------------------- sim: counts


def test_take_counts_what_was_written(tmp_path: Path) -> None:
    """Every page of a 64-page domain written flat out: the log names all 64,
    once; the union is them; the log is empty after a take."""
    dom = sim.create(tmp_path / "d", 64 * 4096)
    p = str(dom)
    union = bytearray(8)
    with pytest.raises(OSError, match="log-dirty is off"):
        _ext.sim_logdirty_take(p, union)
    _ext.sim_set_logdirty(p, True)
    try:
        written = _ext.sim_dirty(p, 0, 0.2, 3)
        assert written > 10000
        assert _ext.sim_logdirty_take(p, union) == 64
        assert int.from_bytes(union, "little").bit_count() == 64
        assert sim.info(dom)["dirty_count"] == 0
        assert _ext.sim_logdirty_take(p, union) == 0  # nothing written since
        with pytest.raises(ValueError, match="bitmap's size"):
            _ext.sim_logdirty_take(p, bytearray(16))
        with pytest.raises(BufferError):  # a union it could not write into
            _ext.sim_logdirty_take(p, bytes(8))
    finally:
        _ext.sim_set_logdirty(p, False)


def test_a_sample_of_a_workload(tmp_path: Path) -> None:
    """A writer runs through the whole sample: what the log named is at most
    what was written, the union at most that and at most the domain."""
    dom = sim.create(tmp_path / "d", 1 << 20)  # 256 pages
    before = sim.info(dom)["pages_written"]
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            _ext.sim_dirty(str(dom), 20000, 0.05, 5)

    t = threading.Thread(target=writer)
    t.start()
    try:
        prof = asyncio.run(sample_sim(dom, 0.5, 0.05))
    finally:
        stop.set()
        t.join()
    written = sim.info(dom)["pages_written"] - before
    assert len(prof.samples) == 10
    assert 0 < prof.union <= prof.dirtied <= written
    assert prof.union <= 256 == prof.memory_pages
    assert 0 < prof.working_set <= 256
    assert not _logdirty(dom)


def test_a_paused_domain_writes_nothing(tmp_path: Path) -> None:
    dom = sim.create(tmp_path / "d", 1 << 20)
    sim.set_state(dom, "paused")
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            _ext.sim_dirty(str(dom), 0, 0.05, 5)

    t = threading.Thread(target=writer)
    t.start()
    try:
        res = sync.plan(sim=dom, link=100 << 20, seconds=0.3, interval=0.1)
    finally:
        stop.set()
        t.join()
    assert res.profile.dirtied == 0 and res.profile.union == 0
    assert res.profile.dirty_rate == 0
    assert res.prediction is not None and res.prediction.go
    assert not _logdirty(dom)


def test_plan_without_a_link_is_the_profile_only(tmp_path: Path) -> None:
    dom = sim.create(tmp_path / "d", 1 << 20)
    res = sync.plan(sim=dom, seconds=0.2)
    assert res.prediction is None
    assert res.as_dict()["go"] is None
    assert "--link" in str(res.as_dict()["why"])


# ----------------------------------------------------------------- failures


def test_a_locked_domain_is_busy_and_untouched(tmp_path: Path) -> None:
    dom = sim.create(tmp_path / "d", 1 << 20)
    from concurrent.futures import ThreadPoolExecutor

    with lock.domain_lock(sim=dom), ThreadPoolExecutor(1) as ex:
        # Another thread: another operation (the lock is re-entrant within one).
        with pytest.raises(DomainBusy):
            ex.submit(sync.plan, sim=dom, seconds=0.2).result()
    assert not _logdirty(dom)


def test_a_missing_domain(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sync.plan(sim=tmp_path / "nope", seconds=0.2)


@pytest.mark.parametrize(
    "kw",
    [{"seconds": 0.0}, {"seconds": 1e9}, {"link": 0}, {"link": -5}, {"max_downtime": 0}],
)
def test_bad_arguments_touch_nothing(tmp_path: Path, kw: dict[str, float]) -> None:
    dom = sim.create(tmp_path / "d", 1 << 20)
    with pytest.raises(ValueError, match="must be"):
        sync.plan(sim=dom, **kw)  # type: ignore[arg-type]
    assert not _logdirty(dom)


def test_a_cancelled_plan_turns_log_dirty_off(tmp_path: Path) -> None:
    dom = sim.create(tmp_path / "d", 1 << 20)

    async def go() -> None:
        task = asyncio.create_task(api.plan(sim=dom, seconds=30))
        while not _logdirty(dom):  # noqa: ASYNC110 - another process's state
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert not _logdirty(dom)


# ----------------------------------------------------------------- the CLI


def test_cli_plan_json(tmp_path: Path, sim_env: dict[str, str]) -> None:
    r = _cli(sim_env, "sim", "create", "d", "--memory", "1M")
    assert r.returncode == 0, r.stderr
    r = _cli(sim_env, "plan", "--sim", "d", "--link", "1gbit", "--sample-seconds", "0.3", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["profile"]["memory_pages"] == 256
    assert doc["prediction"]["rounds"][0]["pages"] == 256
    assert doc["go"] is True and doc["why"].startswith("go:")
    assert doc["link_bytes_per_s"] == 125_000_000
    r = _cli(sim_env, "plan", "--sim", "d", "--sample-seconds", "0.3")
    assert r.returncode == 0, r.stderr
    assert "dirty rate" in r.stdout and "no --link" in r.stdout
    assert not _logdirty(Path(sim_env["XCSAVE_SIM_DIR"]) / "d")


@pytest.mark.parametrize(
    ("args", "what"),
    [
        (["--link", "fast"], "bad rate"),
        (["--link", "0"], "at least one page"),
        (["--sample-seconds", "0"], "more than 0"),
        (["--sample-seconds", "100000"], "from 0.2 to 600"),
        (["--policy", "nope"], "bad policy"),
        (["--max-downtime", "-1"], "must be from 1"),
    ],
)
def test_cli_garbage_options(sim_env: dict[str, str], args: list[str], what: str) -> None:
    assert _cli(sim_env, "sim", "create", "d", "--memory", "1M").returncode == 0
    r = _cli(sim_env, "plan", "--sim", "d", *args)
    assert r.returncode == 2 and what in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not _logdirty(Path(sim_env["XCSAVE_SIM_DIR"]) / "d")


def test_cli_missing_and_busy(sim_env: dict[str, str]) -> None:
    r = _cli(sim_env, "plan", "--sim", "nope", "--sample-seconds", "0.3")
    assert r.returncode == 1 and "ENOENT" in r.stderr, r.stderr
    assert _cli(sim_env, "sim", "create", "d", "--memory", "1M").returncode == 0
    dom = Path(sim_env["XCSAVE_SIM_DIR"]) / "d"
    with lock.domain_lock(sim=dom):
        r = _cli(sim_env, "plan", "--sim", "d", "--sample-seconds", "0.3")
    assert r.returncode == 1 and "EBUSY" in r.stderr, r.stderr
    assert not _logdirty(dom)


@pytest.mark.parametrize(("sig", "rc"), [(signal.SIGINT, 130), (signal.SIGTERM, 1)])
def test_cli_signal_mid_sample(sim_env: dict[str, str], sig: int, rc: int) -> None:
    assert _cli(sim_env, "sim", "create", "d", "--memory", "1M").returncode == 0
    dom = Path(sim_env["XCSAVE_SIM_DIR"]) / "d"
    proc = subprocess.Popen(
        [*CLI, "plan", "--sim", "d", "--sample-seconds", "60"],
        env=sim_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not _logdirty(dom) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        assert _logdirty(dom)
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == rc, err
    assert "Traceback" not in err
    assert not _logdirty(dom)


# ----------------------------------------------------------------- xen (fakexen)


@pytest.fixture
def fakexen(fakexen_lib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The helper runs under fakexen; its log-dirty state is the returned file."""
    state = tmp_path / "logdirty"
    env = fake_env(fakexen_lib, pages=4096, logdirty=state, logdirty_pages=200, wss=1000)
    for k, v in env.items():
        if k.startswith("FAKEXEN_") or k == "LD_PRELOAD":
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("XCSAVE_LOCK_DIR", str(tmp_path / "locks"))
    return state


def _xen_built() -> None:
    if "xen" not in _ext.BACKENDS:
        pytest.skip("the helper is built without the xen backend (no libxen-dev)")


def test_xen_counts(fakexen: Path) -> None:
    _xen_built()
    events: list[str] = []
    res = sync.plan(
        domid=3,
        link=100 << 20,
        seconds=1.0,
        interval=0.1,
        on_event=lambda e: events.append(e.kind),
    )
    p = res.profile
    assert p.memory_pages == 4096
    assert [n for _s, n in p.samples] == [200] * 10
    assert p.union == 1000 and p.dirtied == 2000
    assert events.count("logdirty_sample") == 10
    assert "logdirty_on" in events and "logdirty_off" in events
    assert fakexen.read_text().strip() == "0"


def test_xen_enable_refused_is_left_alone(fakexen: Path) -> None:
    """Log-dirty on already (another save): refused, and not turned off."""
    _xen_built()
    fakexen.write_text("1\n")
    with pytest.raises(HelperFailed, match="on already"):
        sync.plan(domid=3, seconds=0.3)
    assert fakexen.read_text().strip() == "1"


def test_xen_missing_domain(fakexen: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _xen_built()
    monkeypatch.setenv("FAKEXEN_LOGDIRTY_FAIL", "maxgpfn")
    monkeypatch.setenv("FAKEXEN_ERRNO", "ESRCH")
    with pytest.raises(HelperFailed) as e:
        sync.plan(domid=3, seconds=0.3)
    assert e.value.errno == 3  # ESRCH
    assert not fakexen.exists() or fakexen.read_text().strip() == "0"


def test_xen_a_failed_take_turns_it_off(fakexen: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _xen_built()
    monkeypatch.setenv("FAKEXEN_LOGDIRTY_FAIL", "clean")
    with pytest.raises(HelperFailed):
        sync.plan(domid=3, seconds=0.3)
    assert fakexen.read_text().strip() == "0"


def _helper_child() -> int:
    """The pid of this process's xcsave-helper child."""
    me = os.getpid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == me and b"xcsave-helper" in cmd:
            return int(d.name)
    raise AssertionError("no helper child")


def test_xen_helper_killed_the_supervisor_turns_it_off(
    fakexen: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _xen_built()
    monkeypatch.setenv("FAKEXEN_DELAY_MS", "200")

    def on_event(ev: object) -> None:
        if getattr(ev, "kind", "") == "logdirty_on":
            assert fakexen.read_text().strip() == "1"
            os.kill(_helper_child(), signal.SIGKILL)

    with pytest.raises(HelperDied):
        sync.plan(domid=3, seconds=5.0, on_event=on_event)
    assert fakexen.read_text().strip() == "0"


def test_xen_cancelled_the_helper_turns_it_off(
    fakexen: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancelled plan stops its helper (SIGTERM): the helper turns it off."""
    _xen_built()
    monkeypatch.setenv("FAKEXEN_DELAY_MS", "100")
    seen: list[str] = []

    async def go() -> None:
        task = asyncio.create_task(
            api.plan(domid=3, seconds=30, on_event=lambda e: seen.append(e.kind))
        )
        while "logdirty_sample" not in seen:  # noqa: ASYNC110 - a list the events fill
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert fakexen.read_text().strip() == "0"


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "EOF"])
def test_xen_helper_stopped_turns_it_off_itself(fakexen: Path, how: str) -> None:
    """Nobody to clean up after it: a stopped helper (a signal, or its
    parent gone: EOF on stdin) turns log-dirty off itself."""
    _xen_built()
    from xcsave.supervisor import helper_path

    proc = subprocess.Popen(
        [str(helper_path()), "--xcsave-1", "logdirty", "--domid", "3", "--samples", "600"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
            fakexen.exists() and fakexen.read_text().strip() == "1"
        ):
            time.sleep(0.01)
        assert fakexen.read_text().strip() == "1"
        if how != "EOF":
            proc.send_signal(getattr(signal, how))
        assert proc.stdin is not None
        proc.stdin.close()  # no reply to complete will come
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert fakexen.read_text().strip() == "0"


def test_xen_helper_argv_garbage(fakexen: Path) -> None:
    """The mode's own argv errors: one line, exit 255, log-dirty never on."""
    _xen_built()
    from xcsave.supervisor import helper_path

    for args in (
        ["--domid", "3", "--samples", "0"],
        ["--domid", "3", "--samples", "-1"],
        ["--domid", "3", "--samples", "600001"],
        ["--domid", "3", "--interval-ms", "x"],
        ["--domid", "3", "--interval-ms", " 5"],
        ["--domid", "3", "--bogus"],
        ["--domid", "3", "--off=1"],
        ["--domid", "3", "--backend", "sim"],
        ["--domid", "32752"],  # DOMID_FIRST_RESERVED and above: no guest's
        ["--domid", "+3"],
        ["--domid", "3", "extra\x1b[2J"],
        [],
    ):
        r = subprocess.run(
            [str(helper_path()), "--xcsave-1", "logdirty", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        assert r.returncode == 255, (args, r.stderr)
        # One line, before any message (stdout holds no hello), argv never echoed.
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("xcsave-helper: logdirty:"), r.stderr
        assert "\x1b" not in r.stderr and r.stdout == "", args
    assert not fakexen.exists()


# ----------------------------------------------------------------- bench planner


def test_bench_planner_json_shape(sim_env: dict[str, str], tmp_path: Path) -> None:
    """A tiny domain, short runs: the report's shape (no timing judged)."""
    r = _cli(
        sim_env,
        *("bench", "planner", "--json", "--memory", "2M", "--rates", "500"),
        *("--links", "16M", "--sample-seconds", "0.3", "--dir", str(tmp_path / "b")),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    (case,) = doc["cases"]
    for key in ("predicted_total_s", "total_s", "predicted_downtime_ms", "downtime_ms"):
        assert isinstance(case[key], float) and case[key] > 0, key
    assert case["dirty_rate"] == 500 and case["link"] == 16 << 20
    assert case["bit_exact"] is True
    assert case["pages_per_round"][0] == case["predicted_pages_per_round"][0] == 512
    cal = doc["calibration"][str(16 << 20)]
    assert cal["send_pages_per_s"] > 0 and cal["sent_fraction"] == 1.0
    assert len(cal["idle_downtime_ms"]) == len(cal["idle_total_s"]) == 3  # CALIBRATION_RUNS
    assert isinstance(doc["met"], bool)


def test_calibration_takes_the_median_of_idle_runs() -> None:
    """One idle stop in about four costs twice the others: the calibration's
    figures are each the median over its runs, never one run's outlier."""
    from xcsave.bench_planner import Measured, calibrate

    def idle(downtime_ms: float, round0_s: float, total_s: float) -> Measured:
        return Measured(total_s, downtime_ms / 1e3, [1000, 0], [round0_s, 0.0], True)

    runs = [idle(5.0, 1.0, 1.2), idle(13.0, 0.5, 2.0), idle(4.6, 1.25, 1.4)]
    link, costs = calibrate(runs, 1000)
    assert link == 1000 / 1.0  # median of 1000, 2000, 800 pages/s
    assert costs.downtime_s == pytest.approx(5.0e-3)  # not 13 ms, not the mean
    assert costs.setup_s == pytest.approx(0.195)  # of 0.195, 1.487 and 0.1454 s


def test_bench_planner_garbage(sim_env: dict[str, str]) -> None:
    for args, what in (
        (["--rates", "x"], "bad dirty rate"),
        (["--links", "1k"], "at least 1M"),
        (["--policy", "nope"], "bad policy"),
    ):
        r = _cli(sim_env, "bench", "planner", *args)
        assert r.returncode == 2 and what in r.stderr, r.stderr


def test_bench_planner_plot(sim_env: dict[str, str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (xcsave[plot])")
    out = tmp_path / "planner.png"
    r = _cli(
        sim_env,
        *("bench", "planner", "--memory", "1M", "--rates", "500,1000", "--links", "16M"),
        *("--sample-seconds", "0.3", "--plot", str(out), "--dir", str(tmp_path / "b")),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "MiB/s" in r.stdout and f"plot: {out}" in r.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
