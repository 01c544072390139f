"""The command line on a terminal: rich progress bars in a pseudo-terminal.

Each command runs with a pty (os.openpty) as its stdin, stdout and stderr
and COLUMNS=100, so it believes a person is watching: the bars must render
(ANSI cursor control, bar glyphs), log lines must print above them, and the
last frame must say the operation is done.  Off a terminal every command
prints only its result unless asked: plain lines, or one JSON object per
event.  No timing is asserted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xcsave import sim

MiB = 1 << 20
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")
BAR = "\u2501"  # the heavy horizontal line rich draws bars with


def xcsave_argv(*args: str | Path) -> list[str]:
    return [sys.executable, "-P", "-m", "xcsave", *map(str, args)]


def tty_env() -> dict[str, str]:
    env = dict(os.environ, COLUMNS="100", LINES="40", TERM="xterm-256color")
    for var in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(var, None)
    return env


def run_in_pty(argv: list[str], timeout: float = 120) -> tuple[int, bytes]:
    """Run ``argv`` on a fresh 100x40 pseudo-terminal; returns (exit status, all output)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    try:
        proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=tty_env(), start_new_session=True
        )
    finally:
        os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; output so far: {bytes(out[-2000:])!r}"
            ready, _, _ = select.select([master], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(master, 1 << 16)
            except OSError as e:  # EIO: every writer of the pty has gone
                if e.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            out += chunk
        return proc.wait(timeout=30), bytes(out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def frames(raw: bytes) -> list[str]:
    """The screen lines the output drew, in order, without escape sequences."""
    text = ANSI.sub(b"", raw).decode("utf-8", errors="replace")
    return [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]


@pytest.fixture
def shm() -> Iterator[Path]:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    d = Path(tempfile.mkdtemp(prefix="xcsave-test-tty-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def workload(dom: Path, rate: int = 20000) -> Iterator[None]:
    proc = subprocess.Popen(
        xcsave_argv("sim", "dirty", dom, "--rate", str(rate), "--duration", "300"),
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(1000):
            if sim.info(dom)["pages_written"] > 0:
                break
            time.sleep(0.01)
        yield
    finally:
        proc.kill()
        proc.wait()


def assert_bars_drawn_and_done(raw: bytes, label: str) -> list[str]:
    assert b"\x1b[" in raw  # ANSI at all
    # rich's live display: cursor hidden while drawing, shown again at the end,
    # and each refresh goes back over the lines it drew (erase line / cursor up).
    assert b"\x1b[?25l" in raw
    assert b"\x1b[?25h" in raw
    assert b"\x1b[2K" in raw or b"\x1b[1A" in raw
    lines = frames(raw)
    drawn = [line for line in lines if line.startswith(label)]
    assert drawn, lines[-10:]
    assert any(BAR in line for line in drawn)
    final = drawn[-1]  # the last frame of this bar
    assert " done " in f" {final} ", final
    done, total = map(int, re.findall(r"(\d+)/(\d+)", final)[-1])
    assert done == total  # a full bar
    return lines


def test_save_draws_bars_that_finish(shm: Path) -> None:
    dom = sim.create(shm / "tty.dom", 128 * MiB, vcpus=2, seed=5)
    with workload(dom):
        rc, raw = run_in_pty(
            xcsave_argv("save", "--sim", dom, shm / "out.img", "--live", "--progress", "auto")
        )
    assert rc == 0, frames(raw)[-5:]
    lines = assert_bars_drawn_and_done(raw, "save tty.dom")
    assert any("Frames iteration 1" in line for line in lines)  # a live round after round 0


def test_migrate_bars_with_logs_above_them(shm: Path) -> None:
    src = sim.create(shm / "src.dom", 64 * MiB, vcpus=2, seed=6)
    dst = shm / "dst.dom"
    receiver = subprocess.Popen(
        xcsave_argv(
            "receive", "--listen", "127.0.0.1:0", "--insecure", "--sim", dst, "--progress", "none"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        line = receiver.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        with workload(src):
            argv = xcsave_argv(
                "migrate", "--sim", src, "--to", f"127.0.0.1:{port}", "--insecure", "--live", "-v"
            )
            rc, raw = run_in_pty(argv)
        receiver.communicate(timeout=60)
    finally:
        if receiver.poll() is None:
            receiver.kill()
        receiver.communicate()
    assert rc == 0, frames(raw)[-5:]
    assert receiver.returncode == 0
    lines = assert_bars_drawn_and_done(raw, "migrate src.dom")
    # -v: log records go through rich on the bars' console (level column, logger name)
    logs = [ln for ln in lines if "INFO" in ln and "xcsave.migrate" in ln]
    assert logs, lines
    assert any("migrated " in ln and "it runs there" in ln for ln in lines)  # the summary
    assert sim.info(dst)["state"] == "running"


def test_off_a_terminal_progress_is_plain_lines_when_asked(shm: Path) -> None:
    """Off a terminal, --progress auto (every command alike) prints nothing but
    the result; plain lines are asked for."""
    src = sim.create(shm / "src.dom", 16 * MiB, seed=7)
    receiver = subprocess.Popen(
        xcsave_argv(
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--insecure",
            "--sim",
            shm / "dst.dom",
            "--progress",
            "plain",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert receiver.stdout is not None
    port = int(receiver.stdout.readline().rsplit(":", 1)[1])
    r = subprocess.run(
        xcsave_argv(
            "migrate",
            "--sim",
            src,
            "--to",
            f"127.0.0.1:{port}",
            "--insecure",
            "--progress",
            "plain",
        ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    _out, rerr = receiver.communicate(timeout=60)
    assert r.returncode == 0, r.stderr
    assert "\x1b[" not in r.stderr
    assert f"migrate {src}: done in " in r.stderr
    assert f"receive {shm / 'dst.dom'}: done in " in rerr
    assert r.stdout.startswith(f"migrated {src} to 127.0.0.1:{port}")


def test_progress_json_is_one_event_per_line(shm: Path) -> None:
    dom = sim.create(shm / "j.dom", 16 * MiB, seed=8)
    r = subprocess.run(
        xcsave_argv(
            "bench",
            "concurrent",
            "--domains",
            "2",
            "--memory",
            "8M",
            "--progress",
            "json",
            "--dir",
            shm,
        ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    objects = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    events = [o for o in objects if "event" in o]
    kinds = {e["event"] for e in events}
    assert {"progress", "done", "stats"} <= kinds
    assert {e["op"] for e in events} == {"migrate", "receive"}
    assert dom.exists()  # --dir: the bench's own domains came and went, others stay
