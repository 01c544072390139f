"""CLI: ``xcsave sim ...`` (simulated domains) and ``xcsave demo``."""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from ._argparse import integer, seconds, size
from .cli import FORMATS, parse_policy, parse_size, self_argv
from .cli_run import Terminated, add_run_flags, renderer, run_async
from .defaults import DOM_HELP, MAX_SEED, PAGE_SIZE, SIM_FILLS, SIM_MAX_MEMORY, SIM_MAX_VCPUS
from .files import scratch_dir

#: A simulated domain's memory: whole pages, up to the simulator's limit.
SIM_MEMORY = size(PAGE_SIZE, SIM_MAX_MEMORY, multiple=PAGE_SIZE)
#: More pages a second than any memory bus writes: a typo, not a workload.
MAX_DIRTY_RATE = 1 << 30

# The extension, asyncio and the API load when a command runs, not at parse time.


FILL_HELP = (
    "page contents: classic (default: 25%% zero, 10%% repeated, 65%% random), random, "
    "zero, text, mixed (like a real guest, by page from the seed: 35%% zero, 40%% "
    "compressible -- text, page tables, kernel-like records -- 25%% random)"
)


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("sim", help="simulated domains (no Xen needed)")
    ss = p.add_subparsers(dest="sim_command", metavar="SIMCOMMAND", required=True)

    c = ss.add_parser("create", help="make a simulated domain")
    c.add_argument("dom", metavar="DOM", help=DOM_HELP)
    c.add_argument("--memory", type=SIM_MEMORY, required=True, help="e.g. 256M")
    c.add_argument("--vcpus", type=integer(1, SIM_MAX_VCPUS), default=1, help="virtual CPUs")
    c.add_argument(
        "--seed", type=integer(0, MAX_SEED), default=0, help="contents are a function of the seed"
    )
    c.add_argument(
        "--force", action="store_true", help="replace a domain of that name (else EEXIST)"
    )
    c.add_argument("--fill", choices=SIM_FILLS, default=SIM_FILLS[0], help=FILL_HELP)
    c.set_defaults(func=_create)

    d = ss.add_parser("digest", help="one hash of memory + vCPU state")
    d.add_argument("dom", metavar="DOM", help=DOM_HELP)
    d.set_defaults(func=_digest)

    i = ss.add_parser("info", help="size, state, dirty count")
    i.add_argument("dom", metavar="DOM", help=DOM_HELP)
    i.add_argument("--json", action="store_true", help="one JSON object")
    i.set_defaults(func=_info)

    w = ss.add_parser("dirty", help="a workload that writes pages through the dirty log")
    w.add_argument("dom", metavar="DOM", help=DOM_HELP)
    w.add_argument(
        "--rate",
        type=integer(0, MAX_DIRTY_RATE),
        required=True,
        metavar="PAGES_PER_S",
        help="pages written per second (0: as fast as it can)",
    )
    w.add_argument(
        "--duration", type=seconds(), required=True, metavar="SECONDS", help="how long to write"
    )
    w.add_argument(
        "--seed", type=integer(0, MAX_SEED), default=1, help="which pages, and what is written"
    )
    w.add_argument(
        "--fill",
        choices=SIM_FILLS,
        help="content to write (default: the kind the domain was created with)",
    )
    w.set_defaults(func=_dirty)

    t = ss.add_parser(
        "throttle", help="show or set the guest's throttle (auto-converge's, by hand)"
    )
    t.add_argument("dom", metavar="DOM", help=DOM_HELP)
    t.add_argument(
        "percent",
        nargs="?",
        type=integer(0, 99),
        metavar="PERCENT",
        help="percent of its time the guest is kept from running (0 lifts it)",
    )
    t.set_defaults(func=_throttle)

    for name, state in (("pause", "paused"), ("resume", "running"), ("suspend", "suspended")):
        s = ss.add_parser(name, help=f"set the domain {state}")
        s.add_argument("dom", metavar="DOM", help=DOM_HELP)
        s.set_defaults(func=_state, state=state)

    g = ss.add_parser(
        "legacy-image",
        help="write a pre-4.6 (legacy) HVM image to try `xcsave convert` and "
        "`restore --legacy` on",
    )
    g.add_argument("out", metavar="OUT", help="the file to write (0600, whole or not at all)")
    g.add_argument(
        "--memory", type=parse_size, default=parse_size("64M"), help="page data (default 64M)"
    )
    g.set_defaults(func=_legacy_image)

    r = ss.add_parser("remove", help="delete a simulated domain")
    r.add_argument("dom", metavar="DOM", help=DOM_HELP)
    r.set_defaults(func=_remove)

    demo = sub.add_parser(
        "demo",
        help="live-migrate a simulated domain under load through two helpers and check it",
    )
    demo.add_argument(
        "--memory",
        type=SIM_MEMORY,
        default=parse_size("256M"),
        help="the domain's memory (default 256M)",
    )
    demo.add_argument(
        "--rate",
        type=integer(0, MAX_DIRTY_RATE),
        default=20000,
        help="pages/s the workload dirties (0: none)",
    )
    demo.add_argument("--format", choices=FORMATS, default="libxl", help="stream framing")
    demo.add_argument(
        "--policy", type=parse_policy, default=None, help="precopy policy (default: xen)"
    )
    demo.add_argument("--dir", help="where the two domains live (default: a temp dir in /dev/shm)")
    demo.add_argument("--keep", action="store_true", help="keep the domains afterwards")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_run_flags(demo)
    demo.set_defaults(func=_demo)


def _create(args: argparse.Namespace) -> int:
    """``sim create``: SIGINT and SIGTERM stop it between steps (the native
    create asks between them), and it cleans up: nothing left, an old domain
    untouched.  Reported as every command reports them: "interrupted" (130),
    "terminated by SIGTERM" (1).  A signal that comes after the domain was
    renamed into place is too late to stop it: that create succeeded.

    Signal trick: the handlers only note the signal; once create has
    returned, SIGINT and SIGTERM are blocked for the rest of the process (a
    pending one dies with it).  Putting the old handlers back would reopen a
    window -- the last bytecodes of the command, and the interpreter's exit,
    which restores SIG_DFL -- where Ctrl-C prints "interrupted" or a signal
    kills the process after the domain was created: the command is over
    once create returns."""
    import signal

    from . import sim

    got: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        got.append(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_signal)
    try:
        path = sim.create(
            args.dom,
            args.memory,
            args.vcpus,
            args.seed,
            force=args.force,
            cancelled=lambda: bool(got),
            fill=args.fill,
        )
    except InterruptedError:
        if not got:
            raise
        if got[0] == signal.SIGTERM:
            raise Terminated("terminated by SIGTERM") from None
        raise KeyboardInterrupt from None
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.stdout.write(f"{path}\n")
    return 0


def _digest(args: argparse.Namespace) -> int:
    from . import sim

    sys.stdout.write(sim.digest(args.dom) + "\n")
    return 0


def _info(args: argparse.Namespace) -> int:
    from . import sim

    data = sim.info(args.dom)
    if args.json:
        sys.stdout.write(json.dumps(data, sort_keys=True) + "\n")
    else:
        for k in sorted(data):
            sys.stdout.write(f"{k}: {data[k]}\n")
    return 0


def _throttle(args: argparse.Namespace) -> int:
    from . import sim

    if args.percent is not None:
        sim.set_throttle(args.dom, args.percent)
    sys.stdout.write(f"throttle: {sim.throttle(args.dom)}%\n")
    return 0


def _dirty(args: argparse.Namespace) -> int:
    from . import sim

    n = sim.dirty(args.dom, args.rate, args.duration, args.seed, fill=args.fill)
    sys.stdout.write(f"{n} pages written\n")
    return 0


def _state(args: argparse.Namespace) -> int:
    from . import sim

    sim.set_state(args.dom, args.state)
    return 0


def _legacy_image(args: argparse.Namespace) -> int:
    """A 64-bit legacy HVM image (xcsave.corpus, written from the format's
    facts): synthetic pages, but written as every image is, private (0600)
    and whole or not at all (files.write_atomically, as convert writes)."""
    import os

    from . import corpus
    from .files import write_atomically

    def write(fd: int) -> int:
        with os.fdopen(fd, "wb", closefd=False) as f:
            return corpus.write_big_legacy(f, args.memory)

    pages = write_atomically(args.out, write)
    sys.stdout.write(
        f"{args.out}: a legacy 64-bit HVM image of {pages} pages; try "
        f"`xcsave convert {args.out} OUT --width 64 --guest hvm` or "
        f"`xcsave restore {args.out} --sim DOM --legacy --width 64 --guest hvm`\n"
    )
    return 0


def _remove(args: argparse.Namespace) -> int:
    from . import sim

    sim.remove(args.dom)
    return 0


# ----------------------------------------------------------------- demo


@dataclass
class DemoReport:
    memory: int
    rate: int
    format: str
    rounds: int
    pages_per_round: list[int]
    pages_sent: int
    bytes: int
    seconds: float
    gbps: float
    downtime_ms: float  # suspended there -> running here (MigrationResult.downtime_ns)
    stop_copy_ms: float  # suspended there -> end of the stream (the save's stats)
    source_digest: str
    target_digest: str
    match: bool
    source_state: str
    target_state: str


def _demo(args: argparse.Namespace) -> int:
    """``xcsave demo``: :func:`xcsave.local.migrate_local` (the library's one
    local migration) under a workload.  SIGTERM or Ctrl-C cancel it as they do
    every command (:func:`xcsave.cli_run.run_async`): the source runs again."""
    from . import policy, sim
    from .local import migrate_local

    base = scratch_dir(args.dir, "xcsave-demo-")
    src, dst = base / "source.dom", base / "target.dom"
    workload: subprocess.Popen[bytes] | None = None
    try:
        sim.create(src, args.memory, vcpus=2, seed=42)
        # The guest's workload runs in its own process, as a guest's vCPUs would.
        workload = subprocess.Popen(  # noqa: S603 - our own CLI, no shell
            self_argv("sim", "dirty", str(src), "--rate", str(args.rate), "--duration", "3600"),
            stdout=subprocess.DEVNULL,
        )
        time.sleep(0.2)  # let it start dirtying before the first round
        t0 = time.monotonic()
        with renderer(args, sys.stderr) as rend:
            on_event: Any = rend if rend.mode != "none" else None
            sent, _received = run_async(
                lambda: migrate_local(
                    src,
                    dst,
                    live=True,
                    policy=args.policy or policy.xen_default(),
                    fmt=args.format,
                    on_event=on_event,
                )
            )
        seconds = time.monotonic() - t0
        workload.terminate()
        workload.wait()
        workload = None
        # The target copy runs; the source stays suspended.
        st = sent.save.stats
        assert st is not None
        report = DemoReport(
            memory=args.memory,
            rate=args.rate,
            format=args.format,
            rounds=st.rounds,
            pages_per_round=list(st.pages_per_round),
            pages_sent=st.pages_sent,
            bytes=st.bytes,
            seconds=round(seconds, 3),
            gbps=round(st.bytes / (st.duration_ns / 1e9) / 1e9, 3) if st.duration_ns else 0.0,
            downtime_ms=round(sent.downtime_ns / 1e6, 3),
            stop_copy_ms=round(st.downtime_ns / 1e6, 3),
            source_digest=sim.digest(src),
            target_digest=sim.digest(dst),
            match=False,
            source_state=str(sim.info(src)["state"]),
            target_state=str(sim.info(dst)["state"]),
        )
        report.match = report.source_digest == report.target_digest
    finally:
        if workload is not None:
            workload.kill()
            workload.wait()
        if not args.keep:
            for p in (src, dst):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            with contextlib.suppress(OSError):
                base.rmdir()
    _print_report(report, args.json)
    return 0 if report.match else 1


def _print_report(r: DemoReport, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(r.__dict__) + "\n")
        return
    mib = r.memory >> 20
    lines = [
        f"live migration of a {mib} MiB simulated domain under a {r.rate} pages/s workload "
        f"({r.format} stream through two xcsave-helper processes)",
        f"  rounds: {r.rounds}  pages per round: {', '.join(map(str, r.pages_per_round))}",
        f"  sent {r.pages_sent} pages, {r.bytes / 2**20:.1f} MiB at {r.gbps:.2f} GB/s; "
        f"wall time {r.seconds:.2f} s",
        f"  downtime {r.downtime_ms:.1f} ms (suspended there until running here), of which "
        f"stop-and-copy {r.stop_copy_ms:.1f} ms (suspended until the stream's end)",
        f"  source: {r.source_state}, digest {r.source_digest[:16]}",
        f"  target: {r.target_state}, digest {r.target_digest[:16]}",
        "  digests match: the target is a bit-exact copy"
        if r.match
        else "  DIGESTS DIFFER: the migration lost data",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
