"""The link cut between two hosts (issue 14): two network namespaces joined
by a tbf-shaped veth (xcsave.netlab), a real receiver and a real sender
(`xcsave receive` / `xcsave migrate --resume`, one in each namespace), the
guest dirtying pages; the sender's end goes down (`ip link set down`) in the
middle of a live round for longer than the idle timeout, then comes up.
The migration completes, the copy is bit-exact, and the bytes sent in all
are fewer than a fresh start would have sent (what went before the cut,
then the whole stream again).  (The in-process twin, a relay that goes
silent: tests/test_wire_migrate.py::test_resume_after_the_link_goes_silent.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from xcsave import netlab, sim
from xcsave.errors import XcsaveError

MiB = 1 << 20


def xcsave_argv(*args: str | Path) -> list[str]:
    return [sys.executable, "-P", "-m", "xcsave", *map(str, args)]


@pytest.fixture
def link() -> Iterator[netlab.Link]:
    try:
        with netlab.two_hosts(rate_bps=200_000_000) as ln:
            yield ln
    except XcsaveError as e:  # NetlabUnavailable: not root, no ip/tc
        pytest.skip(str(e))


def test_link_cut_mid_round_resumes(link: netlab.Link, tmp_path: Path) -> None:
    sims = tmp_path / "sim"
    env = dict(os.environ, XCSAVE_SIM_DIR=str(sims), XCSAVE_LOCK_DIR=str(tmp_path / "locks"))
    src = sim.create(tmp_path / "src.dom", 256 * MiB, seed=91)
    dst = tmp_path / "dst.dom"
    receiver = subprocess.Popen(
        link.receiver(
            *xcsave_argv(
                "receive", "--listen", f"{link.receiver_ip}:0", "--insecure", "--sim", dst,
                "--idle-timeout", "2", "-v",
            )
        ),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    dirty = subprocess.Popen(
        xcsave_argv("sim", "dirty", src, "--rate", "3000", "--duration", "600"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    events: list[dict[str, Any]] = []
    cut_at: list[float] = []
    try:
        assert receiver.stdout is not None
        port = int(receiver.stdout.readline().rsplit(":", 1)[1])
        sender = subprocess.Popen(
            link.sender(
                *xcsave_argv(
                    "migrate", "--sim", src, "--to", f"{link.receiver_ip}:{port}",
                    "--insecure", "--live", "--resume", "--idle-timeout", "2", "-v",
                    "--progress", "json",
                )
            ),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        assert sender.stdout is not None

        def cutter() -> None:  # 4 s down: past both idle timeouts, within the retries
            link.cut()
            cut_at.append(time.monotonic())
            time.sleep(4)
            link.restore()

        cut = threading.Thread(target=cutter)
        for line in sender.stdout:
            if not line.startswith("{"):
                continue
            ev = json.loads(line)
            events.append(ev)
            well_into_round_0 = ev.get("stream_bytes", 0) > 8 * MiB
            stats = ev.get("event") == "migration_stats"
            if stats and well_into_round_0 and not cut_at and not cut.is_alive():
                cut.start()
        cut.join()
        _, err = sender.communicate(timeout=300)  # closes its pipes
        if sender.returncode != 0:
            receiver.kill()
            _, rerr = receiver.communicate(timeout=60)
            pytest.fail(f"the sender failed:\n{err}\nthe receiver:\n{rerr}")
        _, rerr = receiver.communicate(timeout=120)
        assert receiver.returncode == 0, rerr
    finally:
        for p in (dirty, receiver):
            if p.poll() is None:
                p.kill()
            p.wait()
        if not link.is_up():
            link.restore()
    assert cut_at, "the migration ended before the cut"
    lost = [e for e in events if e.get("event") == "wire_lost"]
    assert lost, "the cut was not noticed"
    stats = [e for e in events if e.get("event") == "migration_stats"]
    assert sim.digest(dst) == sim.digest(src)
    assert sim.info(dst)["state"] == "running"
    at_cut = next(s for s in stats if s["stream_bytes"] > 8 * MiB)
    final = stats[-1]
    # a fresh start sends what went before the cut, then the whole stream
    assert final["bytes_sent"] < at_cut["bytes_sent"] + final["stream_bytes"], (at_cut, final)
