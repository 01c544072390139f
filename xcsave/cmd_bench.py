"""CLI: ``xcsave bench BENCH ...``: benchmarks, each a sub-subcommand.

Every benchmark gets ``--json`` (print its report as one JSON object),
``--plot FILE.png`` (throughput and pages per precopy round, with the
optional ``plot`` extra: matplotlib) and ``--progress``.  To add one, write
``run(args, on_event) -> Report`` and an ``add_arguments(parser)``, and
append a :class:`Bench` to :data:`BENCHES`::

    BENCHES.append(Bench("mine", "what it measures", _mine_args, _mine_run))

Benchmarks report what they measured; they never judge timings (nor do the
tests that run them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cli import FORMATS, UsageError, parse_policy, parse_size
from .cmd_migrate import add_logging_flags, add_progress_flag
from .errors import XcsaveError

if TYPE_CHECKING:
    from .events import Event
    from .migrate import MigrationResult, Outcome

# asyncio, the API and the extension load when a benchmark runs, not at parse time.

PAGE_SIZE = 4096
EventSink = Callable[["Event"], object]


@dataclass
class RoundSeries:
    """One run's precopy rounds, for ``--plot``."""

    label: str
    pages: list[int]  # pages sent in each round
    seconds: list[float]  # each round's duration

    @property
    def gbps(self) -> list[float]:
        """Each round's throughput; NaN (not drawn) for an empty or untimed round."""
        return [
            p * PAGE_SIZE / s / 1e9 if s > 0 and p > 0 else float("nan")
            for p, s in zip(self.pages, self.seconds, strict=False)
        ]


@dataclass
class Report:
    """What a benchmark measured: JSON data, lines for people, round series to plot."""

    data: dict[str, Any]
    text: list[str]
    rounds: list[RoundSeries] = field(default_factory=list)
    ok: bool = True


@dataclass(frozen=True)
class Bench:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, EventSink | None], Report]


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmarks (xcsave bench BENCH --help)")
    bs = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    for bench in BENCHES:
        bp = bs.add_parser(bench.name, help=bench.help, description=bench.help)
        bench.add_arguments(bp)
        bp.add_argument("--json", action="store_true", help="print the report as JSON")
        bp.add_argument(
            "--plot",
            metavar="FILE.png",
            help="draw throughput and pages per round (needs matplotlib: xcsave[plot])",
        )
        add_progress_flag(bp)
        add_logging_flags(bp)
        bp.set_defaults(func=_runner(bench))


def _runner(bench: Bench) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from .cmd_migrate import renderer

        if args.plot:
            _need_matplotlib()
        with renderer(args) as rend:  # events: stderr, or stdout for --progress json
            report = bench.run(args, rend if rend.mode != "none" else None)
        if args.json:
            sys.stdout.write(json.dumps(report.data) + "\n")
        else:
            sys.stdout.write("\n".join(report.text) + "\n")
        if args.plot:
            plot_rounds(report.rounds, Path(args.plot), title=f"xcsave bench {bench.name}")
            if not args.json:
                sys.stdout.write(f"plot: {args.plot}\n")
        return 0 if report.ok else 1

    return run


# ----------------------------------------------------------------- plotting


def _need_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise XcsaveError("--plot needs matplotlib: pip install 'xcsave[plot]'") from None


def plot_rounds(series: list[RoundSeries], out: Path, *, title: str) -> None:
    """Throughput (GB/s) and pages sent, per precopy round, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6), constrained_layout=True)
    for s in series:
        rounds = list(range(len(s.pages)))
        style = {"linewidth": 2.5, "color": "black"} if s.label == "single" else {"alpha": 0.8}
        top.plot(rounds, s.gbps, marker="o", label=s.label, **style)
        bottom.plot(rounds, s.pages, marker="o", label=s.label, **style)
    top.set_ylabel("throughput (GB/s)")
    bottom.set_ylabel("pages sent (dirty after round 0)")
    bottom.set_yscale("symlog")
    bottom.set_xlabel("precopy round")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_title(title)
    if series:
        top.legend(fontsize="small", ncol=2)
    fig.savefig(out, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------- concurrent


def _concurrent_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--domains", type=int, default=4, metavar="N", help="migrations at once")
    p.add_argument(
        "--memory", type=parse_size, default=parse_size("64M"), help="each domain (e.g. 256M)"
    )
    p.add_argument(
        "--max-parallel", type=int, metavar="M", help="at most M migrations at once (default N)"
    )
    p.add_argument(
        "--rate", type=int, default=0, metavar="PAGES_PER_S", help="a dirtying workload per domain"
    )
    p.add_argument("--format", choices=FORMATS, default="libxl", help="stream framing")
    p.add_argument("--policy", type=parse_policy, metavar="POLICY", help="precopy policy")
    p.add_argument("--dir", help="where the domains live (default: a temp dir in /dev/shm)")


@contextmanager
def _workloads(paths: list[Path], rate: int) -> Iterator[None]:
    """One ``xcsave sim dirty`` per domain (a guest's vCPUs), killed afterwards."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if rate > 0:
            for p in paths:
                procs.append(
                    subprocess.Popen(  # noqa: S603 - our own CLI, no shell
                        [
                            *(sys.executable, "-m", "xcsave", "sim", "dirty", str(p)),
                            *("--rate", str(rate), "--duration", "3600"),
                        ],
                        stdout=subprocess.DEVNULL,
                    )
                )
            from . import sim

            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(
                sim.info(p)["pages_written"] == 0 for p in paths
            ):
                time.sleep(0.01)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _series(label: str, res: MigrationResult) -> RoundSeries:
    pages = list(res.pages_per_round)
    secs = list(res.round_seconds[: len(pages)])
    secs += [0.0] * (len(pages) - len(secs))
    return RoundSeries(label, pages, secs)


def _domain_json(name: str, o: Outcome[Any], digest_ok: bool | None) -> dict[str, Any]:
    if not o.ok or o.result is None:
        return {"name": name, "ok": False, "error": o.message, "seconds": round(o.seconds, 3)}
    res: MigrationResult = o.result[0]
    st = res.save.stats
    return {
        "name": name,
        "ok": True,
        "gbps": round(res.gbps, 3),
        "bytes": res.bytes,
        "rounds": st.rounds if st else None,
        "pages_per_round": list(res.pages_per_round),
        "downtime_ms": round(res.downtime_ns / 1e6, 3),
        "seconds": round(o.seconds, 3),
        "match": digest_ok,
    }


def _window_gbps(results: list[MigrationResult]) -> float:
    """Total bytes over the span from the first save's start to the last save's end."""
    if not results:
        return 0.0
    ends = [r.stream_done_at for r in results]
    starts = [
        r.stream_done_at - (r.save.stats.duration_ns / 1e9 if r.save.stats else 0.0)
        for r in results
    ]
    span = max(ends) - min(starts)
    return sum(r.bytes for r in results) / span / 1e9 if span > 0 else 0.0


def _concurrent_run(args: argparse.Namespace, on_event: EventSink | None) -> Report:
    from . import migrate, sim
    from .cmd_migrate import run_async

    n = args.domains
    if n < 1:
        raise UsageError("--domains must be at least 1")
    if args.memory <= 0 or args.memory % PAGE_SIZE:
        raise UsageError(f"--memory must be a positive multiple of {PAGE_SIZE} bytes")
    parallel = args.max_parallel or n
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="xcsave-bench-", dir=shm))
    base.mkdir(parents=True, exist_ok=True)
    created: list[Path] = []

    def pair(name: str, seed: int) -> tuple[Path, Path]:
        src, dst = base / f"{name}.dom", base / f"{name}-copy.dom"
        for p in (src, dst):
            with suppress(FileNotFoundError):
                sim.remove(p)
        created.extend((src, dst))
        sim.create(src, args.memory, vcpus=2, seed=seed)
        return src, dst

    def job(src: Path, dst: Path) -> Callable[[Any], Any]:
        async def run(sup: Any) -> tuple[MigrationResult, Any]:
            return await migrate.migrate_local(
                src,
                dst,
                live=True,
                policy=args.policy,
                fmt=args.format,
                on_event=on_event,
                supervisor=sup,
            )

        return run

    try:
        # 1. one alone
        src1, dst1 = pair("single", 1)
        with _workloads([src1], args.rate):
            single = run_async(
                lambda: migrate.run_many([("single", job(src1, dst1))], max_parallel=1)
            )
        single_o = single.outcomes[0]
        if not single_o.ok or single_o.result is None:
            raise XcsaveError(f"the single migration failed: {single_o.message}")
        single_res: MigrationResult = single_o.result[0]
        single_match = sim.digest(src1) == sim.digest(dst1)

        # 2. n at once
        names = [f"dom{i}" for i in range(n)]
        pairs = {name: pair(name, 100 + i) for i, name in enumerate(names)}
        with _workloads([s for s, _d in pairs.values()], args.rate):
            many = run_async(
                lambda: migrate.run_many(
                    [(name, job(s, d)) for name, (s, d) in pairs.items()],
                    max_parallel=parallel,
                )
            )
        domains = []
        ok_results: list[MigrationResult] = []
        series = [_series("single", single_res)]
        for name, o in zip(names, many.outcomes, strict=True):
            src, dst = pairs[name]
            match = sim.digest(src) == sim.digest(dst) if o.ok else None
            domains.append(_domain_json(name, o, match))
            if o.ok and o.result is not None:
                ok_results.append(o.result[0])
                series.append(_series(name, o.result[0]))
    finally:
        for p in created:
            with suppress(FileNotFoundError):
                sim.remove(p)
        if not args.dir:
            with suppress(OSError):
                base.rmdir()

    single_gbps = single_res.gbps
    aggregate = _window_gbps(ok_results)
    all_ok = single_match and all(dom["ok"] and dom["match"] for dom in domains)
    data = {
        "domains": domains,
        "aggregate_gbps": round(aggregate, 3),
        "single_gbps": round(single_gbps, 3),
        "speedup": round(aggregate / single_gbps, 2) if single_gbps else None,
        "single": {
            "gbps": round(single_gbps, 3),
            "downtime_ms": round(single_res.downtime_ns / 1e6, 3),
            "pages_per_round": list(single_res.pages_per_round),
            "match": single_match,
        },
        "memory": args.memory,
        "rate": args.rate,
        "format": args.format,
        "max_parallel": parallel,
        "cpus": os.cpu_count(),
        "seconds": round(many.seconds, 3),
    }
    mib = args.memory >> 20
    text = [
        f"{n} simultaneous local live migrations of {mib} MiB domains "
        f"({args.format} over socketpairs, workload {args.rate} pages/s, "
        f"at most {parallel} at once, {os.cpu_count()} CPUs)",
        f"  single alone: {single_gbps:.2f} GB/s, downtime {single_res.downtime_ns / 1e6:.1f} ms",
        f"  aggregate:    {aggregate:.2f} GB/s ({data['speedup']}x the single one)",
    ]
    for dom in domains:
        if dom["ok"]:
            text.append(
                f"  {dom['name']}: {dom['gbps']:.2f} GB/s, {dom['rounds']} round(s), downtime "
                f"{dom['downtime_ms']:.1f} ms, "
                + ("bit-exact" if dom["match"] else "DIGESTS DIFFER")
            )
        else:
            text.append(f"  {dom['name']}: FAILED: {dom['error']}")
    text += many.lines()[:1]
    return Report(data=data, text=text, rounds=series, ok=all_ok)


BENCHES: list[Bench] = [
    Bench(
        "concurrent",
        "N simultaneous local live migrations against one alone, in the same run",
        _concurrent_args,
        _concurrent_run,
    ),
]
