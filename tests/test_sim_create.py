"""``sim create`` never loses or half-builds anything (issue 12).

It reserves the domain's memory first (fallocate): no space is ENOSPC in
one line, never a SIGBUS; a signal stops it and removes its temporary; it
never replaces a domain unless told to (--force), and an interrupted
--force leaves the old domain as it was.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xcsave import sim

XCSAVE = [sys.executable, "-P", "-m", "xcsave"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*XCSAVE, *args], capture_output=True, text=True, check=False, timeout=300
    )


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if ".creating." in p.name)


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs of our own (needs root: mount)."""
    d = tmp_path / "tmpfs"
    d.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8M,mode=0700", "xcsave-test", str(d)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.parametrize("memory", ["16M", "64G"])
def test_no_space_is_one_line_and_leaves_nothing(small_tmpfs: Path, memory: str) -> None:
    r = run("sim", "create", str(small_tmpfs / "vm"), "--memory", memory)
    assert r.returncode == 1
    line = one_line(r)
    assert line.startswith(f"xcsave: sim: {small_tmpfs / 'vm'}: no space for ")
    assert line.endswith("(ENOSPC)")
    assert list(small_tmpfs.iterdir()) == []
    assert os.statvfs(small_tmpfs).f_bfree == os.statvfs(small_tmpfs).f_blocks


def test_no_space_beside_another_domain(small_tmpfs: Path) -> None:
    """The whole domain is reserved: 6 MiB fits once, not twice, and the
    first is untouched by the second's failure."""
    assert run("sim", "create", str(small_tmpfs / "a"), "--memory", "5M").returncode == 0
    before = sim.digest(small_tmpfs / "a")
    r = run("sim", "create", str(small_tmpfs / "b"), "--memory", "5M")
    assert r.returncode == 1
    assert one_line(r).endswith("(ENOSPC)")
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["a"]
    assert sim.digest(small_tmpfs / "a") == before


def test_an_existing_domain_is_eexist_without_force(tmp_path: Path) -> None:
    dom = tmp_path / "vm"
    sim.create(dom, 64 << 10, seed=1)
    before = sim.digest(dom)
    r = run("sim", "create", str(dom), "--memory", "128K", "--seed", "2")
    assert r.returncode == 1
    assert one_line(r) == (
        f"xcsave: sim: {dom}: the domain already exists; --force replaces it (EEXIST)"
    )
    assert sim.digest(dom) == before
    assert leftovers(tmp_path) == []
    with pytest.raises(FileExistsError) as e:
        sim.create(dom, 64 << 10, seed=3)
    assert e.value.errno == errno.EEXIST
    assert sim.digest(dom) == before


def test_force_replaces(tmp_path: Path) -> None:
    dom, ref = tmp_path / "vm", tmp_path / "ref"
    sim.create(dom, 64 << 10, seed=1)
    sim.create(ref, 128 << 10, seed=2)
    r = run("sim", "create", str(dom), "--memory", "128K", "--seed", "2", "--force")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{dom}\n"
    assert sim.digest(dom) == sim.digest(ref)
    sim.create(dom, 64 << 10, seed=1, force=True)
    assert sim.info(dom)["memory"] == 64 << 10
    assert leftovers(tmp_path) == []


def test_a_planted_symlink_at_the_name(tmp_path: Path) -> None:
    """Not followed: EEXIST without --force; with it the link itself is replaced."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"not a domain")
    link = tmp_path / "vm"
    link.symlink_to(victim)
    r = run("sim", "create", str(link), "--memory", "64K")
    assert r.returncode == 1
    assert one_line(r).endswith("(EEXIST)")
    assert link.is_symlink()
    r = run("sim", "create", str(link), "--memory", "64K", "--force")
    assert r.returncode == 0, r.stderr
    assert not link.is_symlink()
    assert victim.read_bytes() == b"not a domain"
    assert leftovers(tmp_path) == []


def test_cancelled_by_the_caller(tmp_path: Path) -> None:
    dom = tmp_path / "vm"
    sim.create(dom, 64 << 10, seed=1)
    before = sim.digest(dom)
    asked: list[int] = []

    def cancelled() -> bool:
        asked.append(1)
        return len(asked) >= 3

    with pytest.raises(InterruptedError):
        sim.create(dom, 256 << 20, seed=2, force=True, cancelled=cancelled)
    assert len(asked) == 3
    assert sim.digest(dom) == before
    assert leftovers(tmp_path) == []


def test_an_exception_from_cancelled_stops_it(tmp_path: Path) -> None:
    def boom() -> bool:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        sim.create(tmp_path / "vm", 1 << 20, cancelled=boom)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_signals_at_random_instants(shm_dir: Path, sig: signal.Signals) -> None:
    """A signal while a --force create of 384 MiB runs: either it stopped
    (the old domain exactly as it was, "interrupted" / "terminated") or it
    had already renamed the new one into place (success, said so).  Never a
    temporary left, never a half domain, never "interrupted" after success."""
    rng = random.Random(int(sig))
    dom, ref = shm_dir / "vm", shm_dir / "ref.dom"
    sim.create(dom, 64 << 10, seed=1)
    old = sim.digest(dom)
    memory = 384 << 20
    outcomes = set()
    for _trial in range(5):
        p = subprocess.Popen(
            [*XCSAVE, "sim", "create", str(dom), "--memory", str(memory), "--seed=9", "--force"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Wait for the create to have begun (its temporary exists), then a
        # random instant within its run.
        deadline = time.monotonic() + 60
        while not leftovers(shm_dir) and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.6))
        p.send_signal(sig)
        out, err = p.communicate(timeout=120)
        assert "Traceback" not in err
        assert leftovers(shm_dir) == []
        if p.returncode == 0:
            outcomes.add("finished")
            assert err == ""
            assert out == f"{dom}\n"
            if not ref.exists():
                sim.create(ref, memory, seed=9)
            assert sim.digest(dom) == sim.digest(ref)
            sim.create(dom, 64 << 10, seed=1, force=True)  # the old one back
        else:
            outcomes.add("stopped")
            want = (
                (130, "xcsave: sim: interrupted")
                if sig == signal.SIGINT
                else (1, "xcsave: sim: terminated by SIGTERM")
            )
            assert (p.returncode, err.strip()) == want
            assert out == ""
        assert sim.digest(dom) == old
    assert "stopped" in outcomes
