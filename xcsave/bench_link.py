"""``xcsave bench link``: live migration between two hosts over a shaped link.

Two network namespaces joined by a veth pair shaped with tbf
(:mod:`xcsave.netlab`) stand in for two hosts on a ``--rate`` link.  For
each combination of compression (off, zstd, adaptive) and channels (1 and
``--channels N``), in the same run: a fresh domain of ``--fill`` memory
(default mixed, :data:`xcsave.defaults.SIM_FILLS`), ``xcsave receive
--listen`` in the receiver's namespace, ``xcsave sim dirty`` as its guest
and ``xcsave migrate --live`` in the sender's namespace -- real processes,
as a user runs them.  Per run:

- ``total_s``: the sender's own figure, connect to the receiver's report;
- ``downtime_ms``: suspended here until running there (sender's clock);
- ``wire_bytes``: what the sender's veth end transmitted during the
  migration (``stats64.tx.bytes``: TCP/IP headers included), counted by the
  kernel, independent of xcsave;
- ``bit_exact``: the destination's ``sim digest`` equals the source's,
  which stays suspended (the workload cannot write) from the stop-and-copy on.

``--cap RATE`` adds one run more (compression off, one channel) under
``migrate --max-bandwidth RATE`` on a link faster than the cap: the bytes
the sender's veth end transmitted are sampled every 0.25 s, and the report
gives their rate over every 10 s window inside the transfer against the
cap (``cap``: the least and the most, and whether all are within 5%).  The
kernel counts TCP/IP headers, the cap does not; the run's own ratio of the
two (all bytes on the veth over all bytes the pump sent) is divided out.

Combinations the installed ``xcsave migrate`` has no flag for (``--compress``,
``--channels``) are listed under ``not_run`` with the reason, never faked;
``skipped`` (a string, as in every bench) says the whole bench could not run
here (not root, no iproute2).  The link runs
``--insecure`` TCP: a private link between two namespaces of one machine.
Nothing here judges a timing (the goals are in docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._argparse import integer, rate, seconds
from ._log import logger
from .cli import parse_size, self_argv
from .defaults import PAGE_SIZE, SIM_FILLS
from .errors import UsageError, XcsaveError
from .wire import MAX_CHANNELS, MAX_LEVEL

if TYPE_CHECKING:
    from .cmd_bench import Report
    from .events import Event
    from .netlab import Link

log = logger(__name__)

COMPRESSIONS = ("off", "zstd", "adaptive")
QUICK_MEMORY = "64M"
SEED = 14


#: The cap's promise is kept over any window this long (issue 14: +-5% over 10 s).
CAP_WINDOW_S = 10.0
CAP_TOLERANCE = 0.05
#: How often the sender's veth counter is read during the cap run.
CAP_SAMPLE_S = 0.25


#: ``bench link``'s options, as (flag, add_argument keywords) (cmd_bench.Bench).
OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    (
        "--rate",
        {
            "default": "1gbit",
            "help": "link rate in tc's units: 1gbit, 10gbit, 500mbit, or none (default 1gbit)",
        },
    ),
    ("--fill", {"choices": SIM_FILLS, "default": "mixed", "help": "guest memory (default mixed)"}),
    (
        "--memory",
        {"type": parse_size, "help": "sim domain size (default 1G; --quick: 64M)"},
    ),
    (
        "--channels",
        {
            "type": integer(2, MAX_CHANNELS),
            "default": 4,
            "metavar": "N",
            "help": "the parallel runs' channels (default 4)",
        },
    ),
    (
        "--dirty-rate",
        {
            "type": integer(1),
            "metavar": "PAGES_PER_S",
            "help": "the guest's workload during each migration (default 5000; --quick: 2000)",
        },
    ),
    (
        "--level",
        {
            "type": integer(1, MAX_LEVEL),
            "metavar": "N",
            "help": "the zstd and adaptive runs at zstd level N (migrate --compress-level; "
            "default: migrate's)",
        },
    ),
    ("--quick", {"action": "store_true", "help": f"a small run ({QUICK_MEMORY})"}),
    (
        "--timeout",
        {"type": seconds(), "default": 900.0, "metavar": "S", "help": "per migration"},
    ),
    ("--dir", {"help": "where the domains live (default: a temp dir in /dev/shm)"}),
    (
        "--cap",
        {
            "type": rate(1, "a cap of 0 is no cap"),
            "metavar": "RATE",
            "help": "one run more under migrate --max-bandwidth RATE: its rate over every "
            f"{CAP_WINDOW_S:.0f} s window against the cap (--max-bandwidth's grammar)",
        },
    ),
)


@dataclass
class Run:
    compression: str
    channels: int
    total_s: float = 0.0
    downtime_ms: float = 0.0
    wire_bytes: int = 0
    bit_exact: bool = False
    stream_bytes: int = 0
    pages: list[int] = field(default_factory=list)  # per precopy round
    seconds: list[float] = field(default_factory=list)
    pump_bytes: int = 0  # what the sender's pump put on the wire (frame headers included)
    samples: list[tuple[float, int]] = field(default_factory=list)  # (s, veth tx bytes)

    def json(self) -> dict[str, Any]:
        return {
            "compression": self.compression,
            "channels": self.channels,
            "total_s": round(self.total_s, 3),
            "downtime_ms": round(self.downtime_ms, 3),
            "wire_bytes": self.wire_bytes,
            "bit_exact": self.bit_exact,
        }


def migrate_flags() -> set[str]:
    """Which of --compress / --channels the installed ``xcsave migrate`` has."""
    r = subprocess.run(  # noqa: S603 - our own CLI
        self_argv("migrate", "--help"), capture_output=True, text=True, check=False
    )
    return {f for f in ("--compress", "--channels") if f in r.stdout}


def plan(channels: int, have: set[str]) -> tuple[list[tuple[str, int]], list[dict[str, Any]]]:
    """The runs to do, and the ones skipped (with why)."""
    runs: list[tuple[str, int]] = []
    skipped: list[dict[str, Any]] = []
    for comp in COMPRESSIONS:
        for n in sorted({1, channels}):
            missing = [
                flag
                for flag, needed in (("--compress", comp != "off"), ("--channels", n > 1))
                if needed and flag not in have
            ]
            if missing:
                why = f"xcsave migrate has no {' or '.join(missing)} yet"
                skipped.append({"compression": comp, "channels": n, "why": why})
            else:
                runs.append((comp, n))
    return runs, skipped


def run(args: argparse.Namespace, on_event: Callable[[Event], object] | None) -> Report:
    from . import netlab
    from .cmd_bench import Report, RoundSeries

    del on_event  # the runs are child processes; their figures are in the report
    bps = netlab.parse_rate(args.rate)
    memory = args.memory or parse_size(QUICK_MEMORY if args.quick else "1G")
    if memory <= 0 or memory % PAGE_SIZE:
        raise UsageError(f"--memory must be a positive multiple of {PAGE_SIZE} bytes")
    if args.channels < 1:
        raise UsageError("--channels must be at least 1")
    dirty_rate = args.dirty_rate if args.dirty_rate is not None else (2000 if args.quick else 5000)
    if dirty_rate < 0:
        raise UsageError("--dirty-rate must be 0 or more")
    head: dict[str, Any] = {"rate": args.rate, "fill": args.fill}
    if args.level:
        head["level"] = args.level
    todo, skipped = plan(args.channels, migrate_flags())
    try:
        netlab.check_available()
    except netlab.NetlabUnavailable as e:
        return Report(data={**head, "runs": [], "skipped": str(e)}, text=[f"link: skipped: {e}"])
    runs: list[Run] = []
    capped: dict[str, Any] | None = None
    with _workdir(args.dir) as d, netlab.two_hosts(bps) as link:
        setup = Setup(link, d, memory, args.fill, dirty_rate, args.timeout, args.level)
        for comp, n in todo:
            r = _one(setup, comp, n)
            log.info("link %s: %s x%d: %.2f s", args.rate, comp, n, r.total_s)
            runs.append(r)
        if args.cap:
            r = _one(setup, "off", 1, cap=args.cap)
            capped = cap_report(args.cap, r)
    data: dict[str, Any] = {**head, "runs": [r.json() for r in runs]}
    if skipped:
        data["not_run"] = skipped
    if capped is not None:
        data["cap"] = capped
    text = [
        f"link {args.rate}, {memory >> 20} MiB of {args.fill} memory, guest dirtying "
        f"{dirty_rate} pages/s; two namespaces, {'unshaped' if bps is None else 'tbf-shaped'} "
        "veth, --insecure TCP"
    ]
    base = runs[0].total_s if runs else 0.0  # off x1: the first run planned
    for r in runs:
        ratio = r.stream_bytes / r.wire_bytes if r.wire_bytes else 0.0
        speed = base / r.total_s if r.total_s else 0.0
        text.append(
            f"  {r.compression:8} x{r.channels}: {r.total_s:7.2f} s ({speed:.2f}x off x1), "
            f"downtime {r.downtime_ms:8.1f} ms, {r.wire_bytes / 2**20:8.1f} MiB on the wire "
            f"(stream/wire {ratio:.2f}), {'bit-exact' if r.bit_exact else 'DIGESTS DIFFER'}"
        )
    for s in skipped:
        text.append(f"  {s['compression']:8} x{s['channels']}: not run: {s['why']}")
    if capped is not None:
        text.append(
            f"  cap {capped['rate']:,} B/s: {capped['windows']} window(s) of "
            f"{capped['window_s']:.1f} s, {capped['least']:.3f}-{capped['most']:.3f} of the cap "
            f"(TCP/IP overhead {capped['tcp_overhead']:.3f} divided out): "
            + ("within" if capped["within"] else "NOT within")
            + f" {CAP_TOLERANCE:.0%}, {'bit-exact' if capped['bit_exact'] else 'DIGESTS DIFFER'}"
        )
    series = [RoundSeries(f"{r.compression} x{r.channels}", r.pages, r.seconds) for r in runs]
    ok = all(r.bit_exact for r in runs) and (capped is None or capped["bit_exact"])
    return Report(data=data, text=text, rounds=series, ok=ok)


def cap_windows(samples: list[tuple[float, int]], window: float) -> tuple[float, list[float]]:
    """Bytes/s over every ``window``-second span between two samples inside
    the transfer (from the first sample that moved to the last one that did).
    A transfer shorter than ``window`` is one window, itself.  Returns the
    window used and the rates."""
    moved = [i for i in range(1, len(samples)) if samples[i][1] > samples[i - 1][1]]
    if not moved:
        return window, []
    inside = samples[moved[0] - 1 : moved[-1] + 1]
    span = inside[-1][0] - inside[0][0]
    if span <= 0:
        return window, []
    if span < window:
        return span, [(inside[-1][1] - inside[0][1]) / span]
    rates = []
    j = 0
    for t0, b0 in inside:
        while j < len(inside) and inside[j][0] - t0 < window:
            j += 1
        if j == len(inside):
            break
        t1, b1 = inside[j]
        rates.append((b1 - b0) / (t1 - t0))
    return window, rates


def cap_report(cap: int, r: Run) -> dict[str, Any]:
    """The cap run's figures: its windows' rates against the cap, the veth's
    TCP/IP overhead (all its bytes over the pump's) divided out."""
    total = r.samples[-1][1] - r.samples[0][1] if r.samples else 0
    overhead = total / r.pump_bytes if r.pump_bytes and total else 1.0
    window, rates = cap_windows(r.samples, CAP_WINDOW_S)
    ratios = [x / overhead / cap for x in rates]
    return {
        "rate": cap,
        "window_s": round(window, 3),
        "windows": len(ratios),
        "least": round(min(ratios), 4) if ratios else 0.0,
        "most": round(max(ratios), 4) if ratios else 0.0,
        "within": bool(ratios) and all(abs(x - 1) <= CAP_TOLERANCE for x in ratios),
        "tcp_overhead": round(overhead, 4),
        "total_s": round(r.total_s, 3),
        "bit_exact": r.bit_exact,
    }


@contextmanager
def _workdir(given: str | None) -> Iterator[Path]:
    from .files import scratch_dir

    d = scratch_dir(given, "xcsave-bench-link-")
    try:
        yield d
    finally:
        if not given:
            shutil.rmtree(d, ignore_errors=True)


@dataclass(frozen=True)
class Setup:
    """What every run of one bench shares."""

    link: Link
    dir: Path
    memory: int
    fill: str
    dirty_rate: int
    timeout: float
    level: int | None = None


def _one(setup: Setup, comp: str, channels: int, cap: int | None = None) -> Run:
    """One migration over the link: fresh domain, receiver, workload, sender
    (under ``--max-bandwidth cap`` when given, the veth's counter sampled)."""
    from . import sim

    link, timeout = setup.link, setup.timeout
    src, dst = setup.dir / "source.dom", setup.dir / "target.dom"
    sim.create(src, setup.memory, vcpus=2, seed=SEED, force=True, fill=setup.fill)
    dst.unlink(missing_ok=True)
    res = Run(comp, channels)
    procs: list[subprocess.Popen[str]] = []
    try:
        receiver, port = _receiver(link, dst)
        procs.append(receiver)
        procs.append(_workload(src, setup.dirty_rate))
        flags = [] if comp == "off" else ["--compress", comp]
        flags += [] if comp == "off" or not setup.level else ["--compress-level", str(setup.level)]
        flags += [] if channels == 1 else ["--channels", str(channels)]
        flags += [] if cap is None else ["--max-bandwidth", str(cap)]
        tx0 = link.tx_bytes("sender")
        sender = subprocess.Popen(  # noqa: S603 - our own CLI
            link.sender(
                *self_argv(
                    "migrate", "--sim", str(src), "--to", f"{link.receiver_ip}:{port}",
                    "--insecure", "--live", "--progress", "json", *flags,
                )
            ),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        procs.append(sender)
        with _sampling(link, res.samples, cap is not None):
            out, err = sender.communicate(timeout=timeout)
        res.wire_bytes = link.tx_bytes("sender") - tx0
        if sender.returncode != 0:
            raise XcsaveError(f"migrate ({comp} x{channels}) failed: {_last(err)}")
        _, err = receiver.communicate(timeout=timeout)
        if receiver.returncode != 0:
            raise XcsaveError(f"receive ({comp} x{channels}) failed: {_last(err)}")
        _read_events(out, res)
        res.bit_exact = sim.digest(src) == sim.digest(dst)  # src: suspended since the copy
    finally:
        _stop(procs)
    return res


@contextmanager
def _sampling(link: Link, into: list[tuple[float, int]], on: bool) -> Iterator[None]:
    """Read the sender's veth counter every CAP_SAMPLE_S while the block runs."""
    if not on:
        yield
        return
    stop = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while True:
            into.append((time.monotonic() - t0, link.tx_bytes("sender")))
            if stop.wait(CAP_SAMPLE_S):
                into.append((time.monotonic() - t0, link.tx_bytes("sender")))
                return

    thread = threading.Thread(target=sample, name="bench-link-cap", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    """SIGTERM first (xcsave commands clean up: no partial domain, helper
    stopped, source put back), SIGKILL after 10 s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()


def _last(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip() and "warning: --insecure" not in ln]
    return lines[-1] if lines else "(nothing on stderr)"


def _receiver(link: Link, dst: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(  # noqa: S603 - our own CLI
        link.receiver(
            *self_argv(
                "receive", "--listen", f"{link.receiver_ip}:0", "--sim", str(dst),
                "--insecure", "--progress", "none",
            )
        ),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("listening on "):
        proc.kill()
        _, err = proc.communicate()
        raise XcsaveError(f"the receiver did not start listening: {_last(err)}")
    return proc, int(line.rsplit(":", 1)[1])


def _workload(src: Path, rate: int) -> subprocess.Popen[str]:
    """``sim dirty`` on the source (its guest), until killed; returns once it writes."""
    from . import sim

    proc = subprocess.Popen(  # noqa: S603 - our own CLI
        self_argv("sim", "dirty", str(src), "--rate", str(rate), "--duration", "3600"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while rate and sim.info(src)["pages_written"] == 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate()
            raise XcsaveError(f"the workload did not start: {_last(err)}")
        time.sleep(0.01)
    return proc


def _read_events(stdout: str, res: Run) -> None:
    """The sender's ``--progress json`` lines: rounds from progress events, the result last."""
    starts: dict[int, float] = {}
    ends: dict[int, tuple[float, int]] = {}
    result: dict[str, Any] | None = None
    for line in stdout.splitlines():
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        kind = ev.get("event")
        what = str(ev.get("doing_what", ""))
        if kind == "progress" and what.startswith("Frames iteration "):
            i = int(what.rsplit(" ", 1)[1])
            starts.setdefault(i, float(ev["elapsed"]))
            if ev["done"] == ev["total"]:
                ends[i] = (float(ev["elapsed"]), int(ev["total"]))
        elif kind == "migration_stats":
            res.pump_bytes = int(ev["bytes_sent"])
        elif kind == "migrated":
            result = ev
    if result is None:
        raise XcsaveError("migrate printed no result")
    res.total_s = float(result["seconds"])
    res.downtime_ms = float(result["downtime_ms"])
    res.stream_bytes = int(result["bytes"])
    res.pages = [int(p) for p in result["pages_per_round"]]
    res.seconds = [
        ends[i][0] - starts[i] if i in ends and i in starts else 0.0 for i in range(len(res.pages))
    ]
