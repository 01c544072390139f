"""The two-host fixture (xcsave.netlab): namespaces, a veth pair, tbf shaping,
cut and restore, and cleanup on every path, SIGTERM included.

The rate check is a check of the tbf setup, not of the machine: the shaped
link must not carry more than the configured rate (a broken qdisc would let
a veth run at GB/s), and with a generous floor it must carry about that much
(50 Mbit/s is a small fraction of what any machine's veth carries).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from xcsave import netlab
from xcsave.errors import UsageError

MiB = 1 << 20


@pytest.fixture
def link() -> Iterator[netlab.Link]:
    try:
        with netlab.two_hosts() as lk:
            yield lk
    except netlab.NetlabUnavailable as e:
        pytest.skip(str(e))


def namespaces() -> str:
    return subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=False
    ).stdout


@pytest.mark.parametrize(
    ("text", "want"),
    [("1gbit", 10**9), ("10gbit", 10**10), ("500mbit", 5 * 10**8), ("none", None), ("800", 800)],
)
def test_parse_rate(text: str, want: int | None) -> None:
    assert netlab.parse_rate(text) == want


@pytest.mark.parametrize("text", ["", "fast", "1gbps", "-1gbit", "0mbit", "1 gbit x"])
def test_parse_rate_refuses(text: str) -> None:
    with pytest.raises(UsageError, match="bad rate"):
        netlab.parse_rate(text)


def test_two_hosts_are_joined_then_gone(link: netlab.Link) -> None:
    assert link.sender_ns in namespaces() and link.receiver_ns in namespaces()
    before = link.tx_bytes("sender")
    assert link.probe(4 * MiB) > 0
    assert link.tx_bytes("sender") - before >= 4 * MiB  # the counter saw it cross
    # the block's end (the fixture) deletes them: checked in the next test's own block


def test_two_hosts_cleans_up_after_an_exception() -> None:
    names: list[str] = []
    try:
        with netlab.two_hosts() as lk:
            names += [lk.sender_ns, lk.receiver_ns]
            raise RuntimeError("boom")
    except netlab.NetlabUnavailable as e:
        pytest.skip(str(e))
    except RuntimeError:
        names.append("raised")
    now = namespaces()
    assert names[-1] == "raised" and not any(n in now for n in names)


def test_shaped_link_carries_about_its_rate(link: netlab.Link) -> None:
    rate = 50 * 10**6
    link.set_rate(rate)
    bps = link.probe(8 * MiB) * 8
    assert bps <= rate * 1.1, bps  # the shaper holds
    assert bps >= rate * 0.5, bps  # and lets the rate through
    link.set_rate(None)  # unshaped again: far faster than the cap was
    assert link.probe(32 * MiB) * 8 > rate * 2


def test_cut_and_restore(link: netlab.Link) -> None:
    assert link.is_up()
    link.cut()
    assert not link.is_up()
    with pytest.raises((OSError, subprocess.TimeoutExpired)):
        link.probe(MiB, timeout=10)
    link.restore()
    assert link.is_up()
    assert link.probe(MiB) > 0


def test_sigterm_deletes_the_namespaces() -> None:
    try:
        netlab.check_available()
    except netlab.NetlabUnavailable as e:
        pytest.skip(str(e))
    code = (
        "import sys, time\n"
        "from xcsave import netlab\n"
        "with netlab.two_hosts() as lk:\n"
        "    print(lk.sender_ns, lk.receiver_ns, flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-P", "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    names = proc.stdout.readline().split()
    assert len(names) == 2, proc.stderr.read() if proc.stderr else ""
    assert all(n in namespaces() for n in names)
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "Terminated" in err  # raised in the block: the cleanup ran
    now = namespaces()
    assert not any(n in now for n in names)
