"""One operation per domain, and nothing lost (issue 12, part 4 and 5).

- Two saves, two restores, a save and a restore at once on one domain (CLI
  and API): one succeeds, the other gets EBUSY in one line naming the holder,
  and every image that exists restores bit-exactly.  Overlap is made certain,
  not timed: the first operation is held in its suspend callback
  (``--suspend-cmd`` waits for a file) or by a stream fed only half-way.
- The guest's own writes (``sim dirty``) and read-only looks (``sim digest``,
  ``sim info``) run beside a save, neither blocking nor blocked.
- Replacing a domain needs ``--force`` (EEXIST before anything is read), and
  replaces it only when the restore succeeded.
- SIGINT/SIGTERM at seeded random instants of ``restore IN --sim EXISTING
  --force`` and of ``save``: the command either reports success and the new
  state is in place, or reports the failure and the old state is exactly as
  it was; never a partial or temporary file left.
- Saves into every kind of bad OUT: one line, no temporary, the source runs.
- A lock whose holder was SIGKILLed is free again -- unless the holder's
  helper still runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import errno
import os
import random
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import helper_pids

import xcsave
import xcsave.sync
from xcsave import api, lock, migrate, sim
from xcsave.supervisor import Callbacks

MiB = 1 << 20
SEED = int(os.environ.get("XCSAVE_FAULT_SEED", "20261202"))
SIGNAL_TRIALS = int(os.environ.get("XCSAVE_LOCK_TRIALS", "36"))


def xcsave_argv(*args: str | Path) -> list[str]:
    # -P: the installed package (extension + helper), not the source tree
    return [sys.executable, "-P", "-m", "xcsave", *map(str, args)]


def run(*args: str | Path, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        xcsave_argv(*args), capture_output=True, text=True, timeout=120, check=False, **kw
    )


def popen(*args: str | Path, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        xcsave_argv(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


@pytest.fixture
def shm() -> Iterator[Path]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    d = Path(tempfile.mkdtemp(prefix="xcsave-test-locks-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def leftovers(d: Path) -> list[str]:
    """Partial domains, temporary images and lock files: none may outlive an operation."""
    return sorted(
        p.name
        for p in d.iterdir()
        if ".partial." in p.name or ".xcsave-tmp." in p.name or p.name.endswith(".lock")
    )


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def interrupted_line(err: str) -> None:
    """One line -- or, for a SIGINT that came while the interpreter was still
    starting (before xcsave's code ran), Python's own KeyboardInterrupt."""
    ours = re.search(r", in (do_\w+|run_async)\b", err)
    if err.strip().endswith("KeyboardInterrupt") and not ours:
        return
    if err:
        one_line(err)


class Gate:
    """A ``--suspend-cmd`` that waits: the save holds its lock until :meth:`open`."""

    def __init__(self, d: Path, name: str = "gate") -> None:
        self.ready = d / f"{name}.ready"
        self.go = d / f"{name}.go"
        self.cmd = f"sh -c 'touch {self.ready}; while [ ! -e {self.go} ]; do sleep 0.01; done'"

    def wait(self, proc: subprocess.Popen[str]) -> None:
        while not self.ready.exists():
            if proc.poll() is not None:
                pytest.fail(f"the gated operation ended first: {proc.communicate()}")
            select.select([], [], [], 0.01)

    def open(self) -> None:
        self.go.touch()


@dataclasses.dataclass
class Held:
    """An operation held (by a :class:`Gate`) while the block runs."""

    proc: subprocess.Popen[str]
    err: str = ""


@contextlib.contextmanager
def save_held(shm: Path, dom: Path, out: Path, *extra: str) -> Iterator[Held]:
    """``xcsave save`` held in its suspend callback for the block, then let go
    and waited for (``.proc.returncode``, ``.err`` after the block)."""
    gate = Gate(shm)
    held = Held(popen("save", "--sim", dom, out, *extra, "--suspend-cmd", gate.cmd))
    try:
        gate.wait(held.proc)
        yield held
        gate.open()
        _out, held.err = held.proc.communicate(timeout=60)
    finally:
        if held.proc.poll() is None:
            held.proc.kill()
            held.proc.communicate()


def busy_line(err: str, dom: str, holder: int) -> None:
    line = one_line(err)
    assert line.startswith("xcsave: "), line
    assert f"domain {dom} is busy" in line, line
    assert f"(pid {holder})" in line, line
    assert "EBUSY" in line, line


def restores_to(image: Path, digest: str, d: Path, fmt: str = "libxc") -> None:
    """``image`` restores into a fresh domain with exactly ``digest``."""
    probe = d / f"probe-{image.name}"
    r = run("restore", image, "--sim", probe, "--format", fmt, "--progress", "none")
    assert r.returncode == 0, r.stderr
    assert sim.digest(probe) == digest
    sim.remove(probe)


def image_and_changed(d: Path, dom: Path, seed: int) -> tuple[Path, str, str]:
    """Save ``dom`` into ``d/img``, then let it run and write pages: returns
    the image, its digest and the (different) digest of the domain now."""
    image = d / "img"
    assert run("save", "--sim", dom, image).returncode == 0
    want = sim.digest(dom)
    return image, want, changed(dom, want, seed)


def changed(dom: Path, digest: str, seed: int) -> str:
    """Let ``dom`` run and write pages until its digest is not ``digest``; the new one."""
    sim.set_state(dom, "running")
    for n in range(100):
        sim.dirty(dom, 20000, 0.01, seed=seed * 100 + n)
        now = sim.digest(dom)
        if now != digest:
            return now
    raise AssertionError(f"{dom} stayed at {digest}")


@pytest.fixture
def dom(shm: Path) -> Path:
    return sim.create(shm / "vm1", 16 * MiB, vcpus=2, seed=3)


# ---------------------------------------------------------------- two at once, CLI


def test_two_saves_at_once(shm: Path, dom: Path) -> None:
    with save_held(shm, dom, shm / "a.img", "--live") as first:
        second = run("save", "--sim", dom, shm / "b.img")
        busy_line(second.stderr, str(dom), first.proc.pid)
        assert second.returncode == 1
        assert not (shm / "b.img").exists()
        # Read-only looks and the guest's own writes go on beside the save.
        assert run("sim", "digest", dom).returncode == 0
        assert run("sim", "info", dom).returncode == 0
        wrote = run("sim", "dirty", dom, "--rate", "20000", "--duration", "0.2")
        assert wrote.returncode == 0, wrote.stderr
        assert int(wrote.stdout.split()[0]) > 0  # it ran: the guest is not held
    assert first.proc.returncode == 0, first.err
    assert sim.info(dom)["state"] == "suspended"
    # The pages written beside the save are in the image (the dirty log saw them).
    restores_to(shm / "a.img", sim.digest(dom), shm)
    assert leftovers(shm) == []


def test_save_and_restore_at_once(shm: Path, dom: Path) -> None:
    image = shm / "old.img"
    assert run("save", "--sim", dom, image).returncode == 0
    sim.set_state(dom, "running")
    before = sim.digest(dom)
    with save_held(shm, dom, shm / "a.img") as first:
        second = run("restore", image, "--sim", dom, "--force")
        busy_line(second.stderr, str(dom), first.proc.pid)
        assert second.returncode == 1
    assert first.proc.returncode == 0, first.err
    assert sim.digest(dom) == before  # the restore never touched it
    restores_to(shm / "a.img", before, shm)
    assert leftovers(shm) == []


def _feed_half(proc: subprocess.Popen[str], data: bytes, partial_of: Path) -> None:
    """Write half the stream, then wait for the restore's partial domain to appear."""
    assert proc.stdin is not None
    os.write(proc.stdin.fileno(), data[: len(data) // 2])
    while not list(partial_of.parent.glob(f".{partial_of.name}.partial.*")):
        if proc.poll() is not None:
            pytest.fail(f"the restore ended first: {proc.communicate()}")
        select.select([], [], [], 0.01)


@pytest.mark.parametrize("second_op", ["restore", "save"])
def test_a_restore_holds_the_domain(shm: Path, dom: Path, second_op: str) -> None:
    image, want, old = image_and_changed(shm, dom, 9)
    data = image.read_bytes()
    first = subprocess.Popen(
        xcsave_argv("restore", "-", "--sim", dom, "--force", "--progress", "none"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        _feed_half(first, data, dom)  # type: ignore[arg-type]
        if second_op == "restore":
            second = run("restore", image, "--sim", dom, "--force")
        else:
            second = run("save", "--sim", dom, shm / "b.img")
            assert not (shm / "b.img").exists()
        busy_line(second.stderr, str(dom), first.pid)
        assert sim.digest(dom) == old  # still the old one, whole, while the new one builds
        assert first.stdin is not None
        first.stdin.write(data[len(data) // 2 :])
        _o, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, err
    assert sim.digest(dom) == want
    assert leftovers(shm) == []


# ---------------------------------------------------------------- two at once, API


async def test_api_second_operation_gets_ebusy(shm: Path, dom: Path) -> None:
    release = asyncio.Event()
    suspending = asyncio.Event()

    async def suspend() -> int:
        suspending.set()
        await release.wait()
        return 1

    image = shm / "old.img"
    await xcsave.save(image, sim=dom)
    sim.set_state(dom, "running")
    first = asyncio.create_task(
        xcsave.save(shm / "a.img", sim=dom, live=True, callbacks=Callbacks(suspend=suspend))
    )
    try:
        await suspending.wait()
        with pytest.raises(xcsave.DomainBusy) as e:
            await xcsave.save(shm / "b.img", sim=dom)
        assert e.value.errno == errno.EBUSY
        assert e.value.holder == os.getpid()
        with pytest.raises(xcsave.DomainBusy):
            await xcsave.restore(image, sim=dom, force=True)
        with pytest.raises(xcsave.DomainBusy):
            await migrate.migrate_local(dom, shm / "copy")
        assert not (shm / "copy").exists()
        assert not (shm / "b.img").exists()
    finally:
        release.set()
        await first
    restores_to(shm / "a.img", sim.digest(dom), shm)
    assert leftovers(shm) == []


def test_sync_twin_takes_force(shm: Path, dom: Path) -> None:
    image, want, _old = image_and_changed(shm, dom, 4)
    with pytest.raises(FileExistsError, match="force"):
        xcsave.sync.restore(image, sim=dom)
    xcsave.sync.restore(image, sim=dom, force=True)
    assert sim.digest(dom) == want


# ---------------------------------------------------------------- --force


def test_existing_domain_needs_force(shm: Path, dom: Path) -> None:
    before = sim.digest(dom)
    # IN does not even exist: EEXIST comes first, before anything is opened or read.
    r = run("restore", shm / "no-such-image", "--sim", dom)
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert "already exists; --force replaces it" in line and "EEXIST" in line, line
    r = run(
        "receive", "--listen", "127.0.0.1:0", "--insecure", "--sim", dom, "--accept-timeout", "5"
    )
    assert r.returncode == 1
    assert r.stdout == ""  # refused before listening
    warning, line = r.stderr.splitlines()  # --insecure always says what it means
    assert "--insecure: plain TCP" in warning
    assert "EEXIST" in line, line
    with pytest.raises(FileExistsError):
        xcsave.sync.restore(shm / "no-such-image", sim=dom)
    assert sim.digest(dom) == before
    assert leftovers(shm) == []


def test_force_replaces_only_on_success(shm: Path, dom: Path) -> None:
    image, want, old = image_and_changed(shm, dom, 5)
    bad = shm / "truncated"
    bad.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    r = run("restore", bad, "--sim", dom, "--force")
    assert r.returncode == 1
    one_line(r.stderr)
    assert sim.digest(dom) == old
    assert sim.info(dom)["state"] == "running"
    assert leftovers(shm) == []
    r = run("restore", image, "--sim", dom, "--force")
    assert r.returncode == 0, r.stderr
    assert sim.digest(dom) == want
    assert leftovers(shm) == []


async def test_receive_force_keeps_the_old_domain_until_its_copy_runs(
    shm: Path, dom: Path
) -> None:
    """A receive whose whole stream arrived but whose sender never said GO
    keeps the old domain exactly as it was, and leaves no partial."""
    src = sim.create(shm / "src", 16 * MiB, seed=8)
    image = shm / "src.img"
    await xcsave.save(image, sim=src, fmt="libxl")
    old = sim.digest(dom)
    a, b = socket.socketpair()
    with a, b:
        receiving = asyncio.create_task(
            migrate.receive_on(b, sim=dom, force=True, handshake_timeout=30)
        )
        reader, writer = await asyncio.open_connection(sock=a)
        assert await reader.readexactly(len(migrate.BANNER)) == migrate.BANNER
        writer.write(image.read_bytes())
        await writer.drain()
        assert await reader.readexactly(len(migrate.READY)) == migrate.READY
        assert sim.digest(dom) == old  # complete, not committed
        writer.close()  # and no GO
        with pytest.raises(migrate.MigrationError, match="nothing was kept here"):
            await receiving
    assert sim.digest(dom) == old
    assert leftovers(shm) == []


async def test_receive_force_replaces_once_it_runs(shm: Path, dom: Path) -> None:
    src = sim.create(shm / "src", 16 * MiB, seed=8)
    want = sim.digest(src)
    a, b = socket.socketpair()
    with a, b:
        _sent, got = await asyncio.gather(
            migrate.migrate_on(a, sim=src, live=False),
            migrate.receive_on(b, sim=dom, force=True),
        )
    assert got.domain == str(dom)
    assert sim.digest(dom) == want
    assert sim.info(dom)["state"] == "running"
    assert leftovers(shm) == []


# ---------------------------------------------------------------- signals at random instants


def _helper_started(proc: subprocess.Popen[str]) -> None:
    while not helper_pids(proc.pid) and proc.poll() is None:
        time.sleep(0.0005)


def command_span(*args: str | Path) -> float:
    """How long one command runs here once its helper started (the range of
    the signal instants; a quarter of them land earlier still, in start-up)."""
    proc = popen(*args, "--progress", "none")
    _helper_started(proc)
    t0 = time.monotonic()
    _o, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return time.monotonic() - t0


def signal_at_random(
    proc: subprocess.Popen[str], span: float, rng: random.Random, group: bool = False
) -> str:
    """SIGINT or SIGTERM to ``proc``: during start-up (a quarter of the
    trials), else at a random instant from its helper's start to a bit past
    the command's usual end.  With ``group`` (``proc`` leads its own process
    group) the signal goes to the whole group, helper included, as a
    terminal's Ctrl-C does.  Returns the signal's name."""
    sig = rng.choice((signal.SIGINT, signal.SIGTERM))
    if rng.random() < 0.25:
        time.sleep(rng.uniform(0.0, 0.3))
    else:
        _helper_started(proc)
        time.sleep(rng.uniform(0.0, span * 1.3))
    if group:
        # The command may have ended (and been reaped) before the signal:
        # then there is no group left, and its outcome is judged as it is.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    return sig.name + (" to the group" if group else "")


def restore_signal_trial(
    d: Path,
    dom: Path,
    image: Path,
    want: str,
    span: float,
    rng: random.Random,
    trial: int,
    group: bool = False,
) -> str:
    """SIGINT or SIGTERM at a random instant of ``restore IMAGE --sim DOM
    --force`` (DOM exists and differs from IMAGE, whose digest is ``want``):
    either the command reports success and DOM is the image, or DOM is
    exactly as it was.  Never a partial, temporary or lock file left."""
    old = changed(dom, want, trial)
    proc = popen(
        "restore", image, "--sim", dom, "--force", "--progress", "none", start_new_session=group
    )
    sig = signal_at_random(proc, span, rng, group)
    out, err = proc.communicate(timeout=60)
    now = sim.digest(dom)
    where = f"trial {trial} ({sig}): rc {proc.returncode}, {err!r}"
    assert leftovers(d) == [], where
    if proc.returncode == 0:
        assert "store_gfn=" in out, where  # it says so
        assert now == want, where
        return "restored"
    # Interrupted: exit 130 or 1 with one line, or killed before Python's
    # handlers were up (nothing had been touched then).
    interrupted_line(err)
    assert now == old, where
    return f"kept the old domain (rc {proc.returncode})"


def save_signal_trial(
    d: Path,
    dom: Path,
    out: Path,
    span: float,
    rng: random.Random,
    trial: int,
    group: bool = False,
) -> str:
    """SIGINT or SIGTERM at a random instant of ``save --live``: either it
    reports success, the image is in place (and restores bit-exactly) and DOM
    stays suspended, or there is no image and DOM runs with log-dirty off."""
    out.unlink(missing_ok=True)
    sim.set_state(dom, "running")
    proc = popen(
        "save", "--sim", dom, out, "--live", "--progress", "none", start_new_session=group
    )
    sig = signal_at_random(proc, span, rng, group)
    _o, err = proc.communicate(timeout=60)
    where = f"trial {trial} ({sig}): rc {proc.returncode}, {err!r}"
    info = sim.info(dom)
    assert not info["logdirty"], where
    assert leftovers(d) == [], where
    if proc.returncode == 0:
        assert out.exists(), where
        assert info["state"] == "suspended", where
        restores_to(out, sim.digest(dom), d)
        return "saved"
    assert not out.exists(), where  # a save that failed left no image
    assert info["state"] == "running", where  # and the source runs
    interrupted_line(err)
    return f"no image, source runs (rc {proc.returncode})"


# "command": the signal to the CLI alone; "group": to its whole process
# group, helper included, as a terminal's Ctrl-C is delivered.
TARGETS = ["command", "group"]


_CTRL_C_IN_LOOP_SETUP = """
import asyncio, asyncio.events, os, signal, sys
from xcsave import cli_run
real = asyncio.events.new_event_loop
def building():  # the signal lands while asyncio.run builds its loop
    os.kill(os.getpid(), signal.SIGINT)
    return real()
asyncio.events.new_event_loop = building
started = []
async def op():
    started.append(1)
    await asyncio.sleep(60)
try:
    cli_run.run_async(op)
except KeyboardInterrupt:
    sys.exit(130 if started else 3)
"""


def test_a_ctrl_c_while_the_event_loop_is_built_cancels_the_command() -> None:
    """Regression (CI): a SIGINT inside asyncio.run's loop constructor raised
    KeyboardInterrupt there: a traceback from the half-built loop's __del__
    and a coroutine never awaited.  It now waits for the loop's handler and
    cancels the command like any other Ctrl-C."""
    r = subprocess.run(
        [sys.executable, "-P", "-W", "error::RuntimeWarning", "-c", _CTRL_C_IN_LOOP_SETUP],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (r.returncode, r.stderr) == (130, "")


@pytest.mark.parametrize("to", TARGETS)
def test_signals_during_restore_over_an_existing_domain(shm: Path, dom: Path, to: str) -> None:
    image = shm / "img"
    assert run("save", "--sim", dom, image).returncode == 0
    want = sim.digest(dom)
    span = command_span("restore", image, "--sim", shm / "probe")
    sim.remove(shm / "probe")
    rng = random.Random(SEED)
    trials = SIGNAL_TRIALS if to == "command" else SIGNAL_TRIALS // 2
    outcomes = [
        restore_signal_trial(shm, dom, image, want, span, rng, i, group=to == "group")
        for i in range(trials)
    ]
    assert outcomes.count("restored") < len(outcomes)  # the signals did land


@pytest.mark.parametrize("to", TARGETS)
def test_signals_during_save(shm: Path, dom: Path, to: str) -> None:
    out = shm / "out.img"
    span = command_span("save", "--sim", dom, out, "--live")
    rng = random.Random(SEED + 1)
    outcomes = [
        save_signal_trial(shm, dom, out, span, rng, i, group=to == "group")
        for i in range(SIGNAL_TRIALS // 2)
    ]
    assert outcomes.count("saved") < len(outcomes)


def _wait_for_the_lock(dom: Path) -> None:
    """Until the domain's lock is free (the killed toolstack's helper has exited)."""
    for _ in range(30000):
        try:
            with lock.domain_lock(sim=dom):
                return
        except xcsave.DomainBusy:
            select.select([], [], [], 0.01)
    pytest.fail(f"{dom} stayed locked")


def killed_save_end_state(d: Path, dom: Path, out: Path, old: str, where: str) -> str:
    """After a save whose toolstack was SIGKILLed, once its helper has exited
    (the lock is free): exactly one of the two states a save may leave.

    - committed: the image is in place, the source stays suspended (as a
      save leaves it) and the image restores bit-exactly to what it holds;
    - not committed: no image, the source running with log-dirty off and
      unchanged.
    Never a temporary (the helper removes the dead toolstack's), never
    log-dirty on, never a suspended source without an image.
    """
    _wait_for_the_lock(dom)
    info = sim.info(dom)
    assert not info["logdirty"], where
    if out.exists():
        assert info["state"] == "suspended", where
        restores_to(out, sim.digest(dom), d)
        state = "committed"
    else:
        assert info["state"] == "running", where  # the helper put it back
        assert sim.digest(dom) == old, where
        state = "not committed"
    assert leftovers(d) == [], where  # the lock's name went with _wait_for_the_lock
    return state


@pytest.mark.parametrize("op", ["restore", "save"])
def test_toolstack_killed_at_random_instants(shm: Path, dom: Path, op: str) -> None:
    """SIGKILL of the toolstack itself: its helper (told by its parent-death
    signal) cleans up, holding the domain's lock until it has; then the domain
    is in one of exactly two states, and the next operation sweeps any leftover
    (a restore's partial that its helper finished: only the dead toolstack
    could have committed it)."""
    image, want, old = image_and_changed(shm, dom, 1)
    keep = shm / "old-copy"  # the old domain, to put back before each trial
    shutil.copyfile(dom, keep)
    out = shm / "out.img"
    args: tuple[str | Path, ...] = (
        ("restore", image, "--sim", dom, "--force")
        if op == "restore"
        else ("save", "--sim", dom, out, "--live")
    )
    span = command_span(*args)
    rng = random.Random(SEED + 2)
    for trial in range(SIGNAL_TRIALS // 6):
        shutil.copyfile(keep, dom)
        out.unlink(missing_ok=True)
        assert sim.digest(dom) == old
        proc = popen(*args, "--progress", "none")
        _helper_started(proc)
        time.sleep(rng.uniform(0.0, span * 1.3))
        proc.kill()
        proc.communicate()
        where = f"trial {trial}"
        if op == "restore":
            _wait_for_the_lock(dom)
            assert not sim.info(dom)["logdirty"], where
            assert sim.digest(dom) in (want, old), where
        else:
            killed_save_end_state(shm, dom, out, old, where)
        # The next operation on the name sweeps what the killed one could not.
        sim.set_state(dom, "running")
        r = run(*args, "--progress", "none")
        assert r.returncode == 0, r.stderr
        assert leftovers(shm) == [], where


#: A toolstack (the CLI) whose commit -- the rename of its temporary image
#: into place -- announces itself by creating the file argv[2] and then
#: waits to be SIGKILLed: before the rename (argv[1] == "before") or after
#: it (argv[1] == "after").  A test double for the instant, not for the code:
#: everything else is the real CLI.
_KILLED_AT_COMMIT = """
import os, sys, time
when, flag = sys.argv[1], sys.argv[2]
real_replace = os.replace
def replace(src, dst, *a, **kw):
    if ".xcsave-tmp." not in os.fspath(src):
        return real_replace(src, dst, *a, **kw)
    if when == "after":
        real_replace(src, dst, *a, **kw)
    os.close(os.open(flag, os.O_CREAT | os.O_WRONLY, 0o600))
    time.sleep(120)
os.replace = replace
from xcsave.__main__ import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_toolstack_killed_at_the_commit(shm: Path, dom: Path, when: str) -> None:
    """The toolstack SIGKILLed exactly at its commit, once its helper has
    finished the save (the source is suspended): just before the rename, the
    helper -- whose complete was never answered -- puts the source back and
    removes the temporary; just after it, the image is in place and the
    source stays suspended.  (The toolstack used to commit only after its
    helper had exited: killed in between, the source stayed suspended with
    no image anywhere.)"""
    old = sim.digest(dom)
    out = shm / "out.img"
    flag = shm / "at-commit"
    for trial in range(3):
        sim.set_state(dom, "running")
        out.unlink(missing_ok=True)
        flag.unlink(missing_ok=True)
        argv = [sys.executable, "-P", "-c", _KILLED_AT_COMMIT, when, str(flag)]
        argv += ["save", "--sim", str(dom), str(out), "--live", "--progress", "none"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not flag.exists():
            if proc.poll() is not None:
                pytest.fail(f"the save ended before its commit: {proc.communicate()}")
            select.select([], [], [], 0.005)
        assert sim.info(dom)["state"] == "suspended"  # the helper's save is done
        proc.kill()
        proc.communicate()
        flag.unlink()
        where = f"{when}, trial {trial}"
        state = killed_save_end_state(shm, dom, out, old, where)
        assert state == ("committed" if when == "after" else "not committed"), where


# ---------------------------------------------------------------- bad OUT

BAD_OUTS = ("directory", "missing-parent", "parent-is-a-file", "read-only-fs")


def save_into_bad_out(d: Path, dom: Path, kind: str) -> None:
    """``save`` into a bad OUT: one line naming OUT and the errno, no
    temporary, the source untouched and running with log-dirty off."""
    sim.set_state(dom, "running")
    before = sim.digest(dom)
    base = d / f"bad-{kind}"
    base.mkdir()
    if kind == "directory":
        out, want = base / "adir", "EISDIR"
        out.mkdir()
    elif kind == "missing-parent":
        out, want = base / "missing" / "img", "ENOENT"
    elif kind == "parent-is-a-file":
        (base / "afile").write_bytes(b"x")
        out, want = base / "afile" / "img", "ENOTDIR"
    else:
        out, want = base / "img", "EROFS"
    argv = xcsave_argv("save", "--sim", dom, out, "--live")
    if kind == "read-only-fs":
        # A private mount namespace with a read-only tmpfs over the directory.
        script = f"mount -t tmpfs -o ro none {base} || exit 77; exec {shlex.join(argv)}"
        argv = ["unshare", "-m", "sh", "-c", script]
        if shutil.which("unshare") is None:
            pytest.skip("needs unshare (util-linux)")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    if kind == "read-only-fs" and (r.returncode == 77 or "unshare:" in r.stderr):
        pytest.skip(f"cannot mount a read-only filesystem here: {r.stderr.strip()}")
    assert r.returncode == 1, r.stderr
    line = one_line(r.stderr)
    assert want in line and str(out) in line, line
    _check_source_untouched(dom, before)
    assert leftovers(d) == []
    assert leftovers(base) == []
    if kind == "directory":
        assert list(out.iterdir()) == []
    shutil.rmtree(base)


def _check_source_untouched(dom: Path, before: str) -> None:
    info = sim.info(dom)
    assert info["state"] == "running"
    assert not info["logdirty"]
    assert sim.digest(dom) == before


@pytest.mark.parametrize("kind", BAD_OUTS)
def test_save_into_a_bad_out(shm: Path, dom: Path, kind: str) -> None:
    save_into_bad_out(shm, dom, kind)


def test_out_becomes_a_directory_before_the_commit(shm: Path, dom: Path) -> None:
    """The commit (rename) itself fails: no temporary left, the source runs again."""
    before = sim.digest(dom)
    out = shm / "img"
    with save_held(shm, dom, out, "--live") as held:
        out.mkdir()
        (out / "keep").write_bytes(b"x")  # non-empty: no rename can replace it
    assert held.proc.returncode == 1
    line = one_line(held.err)
    assert str(out) in line and ("EISDIR" in line or "ENOTEMPTY" in line), line
    _check_source_untouched(dom, before)
    assert [p.name for p in out.iterdir()] == ["keep"]
    assert leftovers(shm) == []


# ---------------------------------------------------------------- the lock itself

_HOLDER = r"""
import os, subprocess, sys, time
from xcsave import lock
with lock.domain_lock(sim=sys.argv[1]) as fd:
    # The helper's trick: a child that inherits the lock fd keeps the lock.
    child = subprocess.Popen(["sleep", "600"], pass_fds=(fd,)) if sys.argv[2] == "1" else None
    print(child.pid if child else 0, flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("with_helper", [False, True], ids=["alone", "helper-lives-on"])
def test_lock_of_a_killed_holder(shm: Path, dom: Path, with_helper: bool) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-P", "-c", _HOLDER, str(dom), "1" if with_helper else "0"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    child = 0
    try:
        assert holder.stdout is not None
        child = int(holder.stdout.readline())
        r = run("save", "--sim", dom, shm / "img")
        busy_line(r.stderr, str(dom), holder.pid)
        holder.kill()
        holder.wait()
        if with_helper:
            # The toolstack died, its helper still runs (cleaning up): still busy.
            r = run("save", "--sim", dom, shm / "img")
            busy_line(r.stderr, str(dom), holder.pid)
            os.kill(child, signal.SIGKILL)
            while api._pid_alive(child):  # not ours to reap: wait for it to be gone
                select.select([], [], [], 0.01)
        with lock.domain_lock(sim=dom):
            pass  # free: the kernel dropped it with its last holder
        r = run("save", "--sim", dom, shm / "img")
        assert r.returncode == 0, r.stderr
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate()
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
    assert leftovers(shm) == []


def test_lock_file_symlink_is_refused(shm: Path, dom: Path) -> None:
    victim = shm / "victim"
    victim.write_bytes(b"precious\n")
    (shm / ".vm1.lock").symlink_to(victim)
    r = run("save", "--sim", dom, shm / "img")
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert "symlink" in line and "EPERM" in line, line
    assert victim.read_bytes() == b"precious\n"
    assert not (shm / "img").exists()


def test_lock_file_of_another_user_is_refused(shm: Path, dom: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another uid")
    planted = shm / ".vm1.lock"
    planted.write_bytes(b"")
    os.chown(planted, 65534, 65534)
    r = run("save", "--sim", dom, shm / "img")
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert "owned by uid 65534" in line and "EPERM" in line, line
    assert not (shm / "img").exists()


def test_domain_in_a_missing_directory_is_named(shm: Path) -> None:
    dom = shm / "missing" / "vm"
    r = run("save", "--sim", dom, shm / "img")
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert f"{dom}:" in line and "ENOENT" in line, line
    assert not (shm / "missing").exists()


def test_lock_is_reentrant_within_one_operation(shm: Path, dom: Path) -> None:
    with lock.domain_lock(sim=dom) as fd, lock.domain_lock(sim=dom) as again:
        assert fd == again
        r = run("sim", "digest", dom)  # a look never blocks
        assert r.returncode == 0
    assert lock.held_fd(sim=dom) is None


def test_xen_domain_locks_live_in_a_private_dir(
    shm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XCSAVE_LOCK_DIR", str(shm / "locks"))
    with lock.domain_lock(domid=7):
        assert (shm / "locks" / "domid-7.lock").exists()
        assert (shm / "locks").stat().st_mode & 0o777 == 0o700
        # Another task, not inside this operation: busy (re-entrant only within one).
        with pytest.raises(xcsave.DomainBusy, match="domain domid 7 is busy"):
            contextvars.Context().run(_lock_domid, 7)
    assert not (shm / "locks" / "domid-7.lock").exists()  # gone with its holder


def _lock_domid(domid: int) -> None:
    with lock.domain_lock(domid=domid):
        pass
