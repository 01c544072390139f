"""Two hosts on one machine: network namespaces joined by a shaped veth pair.

For the tests and ``xcsave bench link``: :func:`two_hosts` makes two fresh
network namespaces (the *sender* and the *receiver*), a veth pair between
them with an address on each end (169.254.10.1 and .2, /16), loopback up in
both, and deletes all of it when the block ends -- normally, on an
exception, on Ctrl-C, and on SIGTERM (while the block runs in the main
thread with SIGTERM at its default, SIGTERM raises
:class:`~xcsave.errors.Terminated` so that the cleanup runs).

The link is shaped with the kernel's token bucket filter (``sch_tbf``;
``netem`` is not assumed): :meth:`Link.set_rate` puts ``tbf rate R burst B
latency L`` on the egress of both ends, ``None`` takes it off.
:meth:`Link.cut` and :meth:`Link.restore` take the sender's end down and up
(``ip link set down/up``): connections stall, as when a cable is pulled.
Commands run in a namespace through ``ip netns exec`` (:meth:`Link.sender`,
:meth:`Link.receiver`); :meth:`Link.tx_bytes` reads an end's byte counter,
an independent measure of what crossed the link.

Needs root and iproute2 (``ip``, ``tc``): :class:`NetlabUnavailable` says
which is missing (the tests skip with that reason).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

from ._log import logger
from .errors import NetlabUnavailable, Terminated, UsageError

log = logger(__name__)

__all__ = ["Link", "NetlabUnavailable", "parse_rate", "two_hosts"]

SENDER_IP = "169.254.10.1"
RECEIVER_IP = "169.254.10.2"
_counter = itertools.count()
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit|tbit)?$")
_UNITS = {None: 1, "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}


def parse_rate(text: str) -> int | None:
    """``1gbit``, ``500mbit``, ``10gbit`` (tc's units, bits per second) -> bits/s;
    ``none`` -> None (unshaped).  Anything else: :class:`UsageError`."""
    t = text.strip().lower()
    if t == "none":
        return None
    m = _RATE.match(t)
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"bad rate {text!r}: give e.g. 1gbit, 500mbit or none")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603


@dataclass
class Link:
    """The two hosts: namespaces, veth ends and addresses."""

    sender_ns: str
    receiver_ns: str
    sender_dev: str
    receiver_dev: str
    sender_ip: str = SENDER_IP
    receiver_ip: str = RECEIVER_IP
    rate_bps: int | None = None

    def sender(self, *argv: str) -> list[str]:
        """argv running ``argv`` on the sender host."""
        return ["ip", "netns", "exec", self.sender_ns, *argv]

    def receiver(self, *argv: str) -> list[str]:
        """argv running ``argv`` on the receiver host."""
        return ["ip", "netns", "exec", self.receiver_ns, *argv]

    def _ends(self) -> tuple[tuple[str, str], tuple[str, str]]:
        return (self.sender_ns, self.sender_dev), (self.receiver_ns, self.receiver_dev)

    def set_rate(self, bps: int | None, *, latency: str = "100ms") -> None:
        """Shape both directions to ``bps`` bits/s with tbf (None: unshaped).

        burst is 10 ms at the rate (at least 64 KiB, so that one GSO packet
        of a veth always fits); latency bounds the queue.
        """
        for ns, dev in self._ends():
            if bps is None:
                r = _run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root")
                if (
                    r.returncode != 0
                    and "No such file" not in r.stderr
                    and "handle" not in r.stderr
                ):
                    raise OSError(f"tc qdisc del on {dev}: {r.stderr.strip()}")
                continue
            burst = max(64 << 10, bps // 8 // 100)
            r = _run(
                "tc", "-n", ns, "qdisc", "replace", "dev", dev, "root",
                "tbf", "rate", f"{bps}bit", "burst", str(burst), "latency", latency,
            )  # fmt: skip
            if r.returncode != 0:
                raise NetlabUnavailable(f"cannot shape the link with tbf: {r.stderr.strip()}")
        self.rate_bps = bps
        log.debug("link %s <-> %s: rate %s", self.sender_dev, self.receiver_dev, bps)

    def cut(self) -> None:
        """Take the sender's end down: nothing crosses until :meth:`restore`."""
        self._link("down")

    def restore(self) -> None:
        """Bring the sender's end up again (addresses and shaping stay)."""
        self._link("up")

    def _link(self, how: str) -> None:
        r = _run("ip", "-n", self.sender_ns, "link", "set", self.sender_dev, how)
        if r.returncode != 0:
            raise OSError(f"ip link set {self.sender_dev} {how}: {r.stderr.strip()}")

    def is_up(self) -> bool:
        """Whether the sender's end is administratively up."""
        r = _run("ip", "-j", "-n", self.sender_ns, "link", "show", "dev", self.sender_dev)
        if r.returncode != 0:
            return False
        flags = json.loads(r.stdout)[0].get("flags", [])
        return "UP" in flags

    def tx_bytes(self, side: str = "sender") -> int:
        """Bytes the ``sender`` (or ``receiver``) end has transmitted (headers included)."""
        ns, dev = self._ends()[0 if side == "sender" else 1]
        r = _run("ip", "-j", "-s", "-n", ns, "link", "show", "dev", dev)
        if r.returncode != 0:
            raise OSError(f"ip -s link show {dev}: {r.stderr.strip()}")
        return int(json.loads(r.stdout)[0]["stats64"]["tx"]["bytes"])

    def probe(self, nbytes: int, *, timeout: float = 60.0) -> float:
        """Send ``nbytes`` over the link (sender -> receiver, TCP); bytes per
        second as the receiver counted them, first byte to last."""
        with subprocess.Popen(  # noqa: S603 - our interpreter, fixed code
            self.receiver(sys.executable, "-c", _SINK, self.receiver_ip),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as sink:
            try:
                return self._probe_into(sink, nbytes, timeout)
            finally:
                if sink.poll() is None:
                    sink.kill()

    def _probe_into(self, sink: subprocess.Popen[str], nbytes: int, timeout: float) -> float:
        assert sink.stdout is not None
        port = sink.stdout.readline().strip()
        if not port.isdigit():
            why = sink.stderr.read()[-300:] if sink.stderr else ""
            raise OSError(f"the probe's sink did not start: {why}")
        src = _run_timeout(
            self.sender(sys.executable, "-c", _SOURCE, self.receiver_ip, port, str(nbytes)),
            timeout,
        )
        if src.returncode != 0:
            raise OSError(f"the probe's source failed: {src.stderr.strip()[-300:]}")
        out, err = sink.communicate(timeout=timeout)
        got, seconds = out.split()
        if int(got) != nbytes:
            raise OSError(f"the probe's sink got {got} of {nbytes} bytes: {err.strip()}")
        return nbytes / max(float(seconds), 1e-9)


def _run_timeout(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)  # noqa: S603


_SINK = """
import socket, sys, time
s = socket.create_server((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
n, t0 = 0, None
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    if t0 is None:
        t0 = time.monotonic()
    n += len(b)
print(n, time.monotonic() - (t0 or time.monotonic()))
"""

_SOURCE = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
left, buf = int(sys.argv[3]), bytes(1 << 20)
while left > 0:
    c.sendall(buf[: min(left, len(buf))])
    left -= min(left, len(buf))
c.close()
"""


def check_available() -> None:
    """:class:`NetlabUnavailable` unless this process can make the two hosts."""
    if os.geteuid() != 0:
        raise NetlabUnavailable(f"network namespaces need root (running as uid {os.geteuid()})")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetlabUnavailable(
                f"network namespaces need iproute2's '{tool}' (apt-get install iproute2)"
            )


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the block runs in the main thread with SIGTERM at its default,
    SIGTERM raises Terminated (so that finally blocks run); else nothing."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        raise Terminated("terminated by SIGTERM")

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def two_hosts(rate_bps: int | None = None) -> Iterator[Link]:
    """Two fresh namespaces and a veth pair between them (shaped to
    ``rate_bps`` when given); always deleted afterwards."""
    check_available()
    tag = f"{os.getpid() % 1000000}{next(_counter) % 100}"
    snd, rcv = f"xcs-snd-{tag}", f"xcs-rcv-{tag}"
    veth_s, veth_r = f"xcs{tag}s", f"xcs{tag}r"  # IFNAMSIZ: at most 15 characters
    made: list[str] = []
    with _sigterm_raises():
        for ns in (snd, rcv):  # left over by a crashed run that had our pid
            _run("ip", "netns", "del", ns)
        try:
            steps: list[tuple[str, ...]] = [
                ("netns", "add", snd),
                ("netns", "add", rcv),
                ("link", "add", veth_s, "type", "veth", "peer", "name", veth_r),
                ("link", "set", veth_s, "netns", snd),
                ("link", "set", veth_r, "netns", rcv),
                ("-n", snd, "addr", "add", f"{SENDER_IP}/16", "dev", veth_s),
                ("-n", rcv, "addr", "add", f"{RECEIVER_IP}/16", "dev", veth_r),
                ("-n", snd, "link", "set", "lo", "up"),
                ("-n", rcv, "link", "set", "lo", "up"),
                ("-n", snd, "link", "set", veth_s, "up"),
                ("-n", rcv, "link", "set", veth_r, "up"),
            ]
            for step in steps:
                r = _run("ip", *step)
                if r.returncode != 0:
                    raise NetlabUnavailable(
                        f"cannot make network namespaces: 'ip {' '.join(step)}': "
                        f"{r.stderr.strip()}"
                    )
                if step[:2] == ("netns", "add"):
                    made.append(step[2])
            link = Link(snd, rcv, veth_s, veth_r)
            if rate_bps is not None:
                link.set_rate(rate_bps)
            _wait_carrier(link)
            yield link
        finally:
            # Deleting a namespace deletes the veth end inside it (and so the pair).
            for ns in made:
                _run("ip", "netns", "del", ns)
            if _run("ip", "link", "show", veth_s).returncode == 0:
                _run("ip", "link", "del", veth_s)


def _wait_carrier(link: Link, timeout: float = 5.0) -> None:
    """Until both ends report carrier (a veth comes up at once; bounded anyway)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = _run("ip", "-j", "-n", link.sender_ns, "link", "show", "dev", link.sender_dev)
        if r.returncode == 0 and json.loads(r.stdout)[0].get("operstate") == "UP":
            return
        time.sleep(0.02)
