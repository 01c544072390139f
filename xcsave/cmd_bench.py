"""CLI: ``xcsave bench BENCH ...``: benchmarks, each a sub-subcommand.

Every benchmark gets ``--json`` (print its report as one JSON object),
``--plot FILE.png`` (throughput and pages per precopy round, with the
optional ``plot`` extra: matplotlib) and ``--progress``.  To add one, write
``run(args, on_event) -> Report``, list its options as data (flag,
``add_argument`` keywords; :func:`_sized_options` gives the common
--memory/--repeat/--dir), and append a :class:`Bench` to :data:`BENCHES`::

    BENCHES.append(Bench("mine", "what it measures", _sized_options("256M"), _mine_run))

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
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from . import bench_link, bench_planner, benchmarks
from ._log import logger
from .cli import FORMATS, parse_policy_spec, parse_size, self_argv
from .cli_run import add_run_flags, renderer, run_async
from .defaults import CHANNELS, PAGE_SIZE, shm_dir
from .errors import UsageError, XcsaveError
from .files import create_private, scratch_dir

log = logger(__name__)

if TYPE_CHECKING:
    from .events import Event
    from .jobs import Outcome
    from .migrate import MigrationResult

# asyncio, the API and the extension load when a benchmark runs, not at parse time.

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
    #: draws the bench's own ``--plot`` (None: :func:`plot_rounds` of ``rounds``)
    plot: Callable[[Path], None] | None = None


#: A bench option as data: its flag and ``add_argument``'s keywords.
Option = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class Bench:
    name: str
    help: str
    options: tuple[Option, ...]
    run: Callable[[argparse.Namespace, EventSink | None], Report]


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmarks (xcsave bench BENCH --help)")
    bs = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    for bench in BENCHES:
        bp = bs.add_parser(bench.name, help=bench.help, description=bench.help)
        for flag, kwargs in bench.options:
            bp.add_argument(flag, **kwargs)
        bp.add_argument("--json", action="store_true", help="print the report as JSON")
        bp.add_argument(
            "--plot",
            metavar="FILE.png",
            help="draw throughput and pages per round (planner: dirty pages per round, "
            "measured beside predicted; needs matplotlib: xcsave[plot])",
        )
        add_run_flags(bp)
        bp.set_defaults(func=_runner(bench))


def _runner(bench: Bench) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        if args.plot:
            _need_matplotlib()
        with renderer(args) as rend:  # events: stderr, or stdout for --progress json
            report = bench.run(args, rend if rend.mode != "none" else None)
        if args.json:
            sys.stdout.write(json.dumps(report.data) + "\n")
        else:
            sys.stdout.write("\n".join(report.text) + "\n")
        if args.plot:
            if report.plot is not None:
                report.plot(Path(args.plot))
            else:
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


_CONCURRENT_OPTIONS: tuple[Option, ...] = (
    ("--domains", {"type": int, "default": 4, "metavar": "N", "help": "migrations at once"}),
    (
        "--memory",
        {"type": parse_size, "default": parse_size("64M"), "help": "each domain (e.g. 256M)"},
    ),
    (
        "--max-parallel",
        {"type": int, "metavar": "M", "help": "at most M migrations at once (default N)"},
    ),
    (
        "--rate",
        {
            "type": int,
            "default": 0,
            "metavar": "PAGES_PER_S",
            "help": "a dirtying workload per domain",
        },
    ),
    ("--format", {"choices": FORMATS, "default": "libxl", "help": "stream framing"}),
    (
        "--channel",
        {
            "choices": CHANNELS,
            "default": CHANNELS[0],
            "help": "what carries each stream (default: %(default)s; the handshake always "
            "goes over a socketpair)",
        },
    ),
    ("--policy", {"type": parse_policy_spec, "metavar": "POLICY", "help": "precopy policy"}),
    (
        "--repeat",
        {
            "type": int,
            "default": 3,
            "metavar": "R",
            "help": "best of R for each side, the single and the N-at-once runs interleaved",
        },
    ),
    ("--dir", {"help": "where the domains live (default: a temp dir in /dev/shm)"}),
)


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
                            *self_argv("sim", "dirty", str(p)),
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
    from . import jobs, local, sim

    n = args.domains
    if n < 1:
        raise UsageError("--domains must be at least 1")
    _check_memory(args)
    parallel = args.max_parallel or n
    base = scratch_dir(args.dir, "xcsave-bench-")
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
            return await local.migrate_local(
                src,
                dst,
                live=True,
                # A policy keeps its history: one of its own per migration.
                policy=args.policy.make() if args.policy else None,
                fmt=args.format,
                on_event=on_event,
                supervisor=sup,
                channel=args.channel,
            )

        return run

    def reset(pairs: list[tuple[Path, Path]]) -> None:
        """The targets gone and the sources running: ready for the next repetition."""
        for src, dst in pairs:
            with suppress(FileNotFoundError):
                sim.remove(dst)
            sim.set_state(src, "running")

    names = [f"dom{i}" for i in range(n)]
    best_single: tuple[float, MigrationResult, bool] | None = None
    best_many: tuple[float, Any, list[dict[str, Any]], list[MigrationResult]] | None = None
    try:
        src1, dst1 = pair("single", 1)
        pairs = {name: pair(name, 100 + i) for i, name in enumerate(names)}
        for rep in range(max(1, args.repeat)):
            # 1. one alone
            reset([(src1, dst1)])
            with _workloads([src1], args.rate):
                single = run_async(
                    lambda: jobs.run_many([("single", job(src1, dst1))], max_parallel=1)
                )
            single_o = single.outcomes[0]
            if not single_o.ok or single_o.result is None:
                raise XcsaveError(f"the single migration failed: {single_o.message}")
            one: MigrationResult = single_o.result[0]
            if best_single is None or one.gbps > best_single[0]:
                best_single = (one.gbps, one, sim.digest(src1) == sim.digest(dst1))

            # 2. n at once
            reset(list(pairs.values()))
            with _workloads([s for s, _d in pairs.values()], args.rate):
                many = run_async(
                    lambda: jobs.run_many(
                        [(name, job(s, d)) for name, (s, d) in pairs.items()],
                        max_parallel=parallel,
                    )
                )
            doms = []
            ok_res: list[MigrationResult] = []
            for name, o in zip(names, many.outcomes, strict=True):
                src, dst = pairs[name]
                match = sim.digest(src) == sim.digest(dst) if o.ok else None
                doms.append(_domain_json(name, o, match))
                if o.ok and o.result is not None:
                    ok_res.append(o.result[0])
            agg = _window_gbps(ok_res)
            failed = any(not d["ok"] or not d["match"] for d in doms)
            log.info(
                "repetition %d: single %.3f GB/s, %d at once %.3f GB/s", rep, one.gbps, n, agg
            )
            # A repetition with a failure is the one reported, whatever its speed.
            if best_many is None or failed or agg > best_many[0]:
                best_many = (agg, many, doms, ok_res)
            if failed:
                break
    finally:
        for p in created:
            with suppress(FileNotFoundError):
                sim.remove(p)
        if not args.dir:
            with suppress(OSError):
                base.rmdir()

    assert best_single is not None
    assert best_many is not None
    _g, single_res, single_match = best_single
    aggregate, many, domains, ok_results = best_many
    series = [_series("single", single_res)]
    oks = [d for d in domains if d["ok"]]
    series += [_series(d["name"], r) for d, r in zip(oks, ok_results, strict=True)]
    single_gbps = single_res.gbps
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
        "channel": args.channel,
        "max_parallel": parallel,
        "repeat": max(1, args.repeat),
        "cpus": os.cpu_count(),
        "seconds": round(many.seconds, 3),
    }
    mib = args.memory >> 20
    text = [
        f"{n} simultaneous local live migrations of {mib} MiB domains "
        f"({args.format} over {args.channel}s, workload {args.rate} pages/s, "
        f"at most {parallel} at once, {os.cpu_count()} CPUs, best of {max(1, args.repeat)})",
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


# ----------------------------------------------------------------- save/restore/...
#
# Each reports a headline {"bench", "measured", "baseline", "ratio", "unit"}
# plus its details; "ratio" is always "how many times better than the
# baseline" (>1 = xcsave ahead), the baseline measured in the same run,
# best of --repeat, the two sides interleaved so load hits both alike.


_REPEAT: Option = ("--repeat", {"type": int, "default": 3, "metavar": "N", "help": "best of N"})


def _sized_options(default: str, *more: Option) -> tuple[Option, ...]:
    """--memory (default `default`), --repeat and --dir, then `more`."""
    memory: Option = (
        "--memory",
        {
            "type": parse_size,
            "default": parse_size(default),
            "help": f"sim domain size (default {default}; 1G for the real figure)",
        },
    )
    where: Option = ("--dir", {"help": "where domains and streams live (default: /dev/shm)"})
    return (memory, _REPEAT, where, *more)


@contextmanager
def _workdir(args: argparse.Namespace) -> Iterator[Path]:

    if args.dir:
        d = Path(args.dir)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)  # the user's choice
        yield d
        return
    with tempfile.TemporaryDirectory(prefix="xcsave-bench-", dir=shm_dir()) as t:
        yield Path(t)


@contextmanager
def _bench_domain(d: Path, name: str, memory: int, *, seed: int) -> Iterator[tuple[Path, Path]]:
    """A sim domain ``d/NAME-src.dom`` (2 vCPUs, its pages from ``seed``) and
    the path ``d/NAME.stream`` for its stream; both removed after the block."""
    from . import sim

    src, stream = d / f"{name}-src.dom", d / f"{name}.stream"
    sim.create(src, memory, vcpus=2, seed=seed)
    try:
        yield src, stream
    finally:
        with suppress(FileNotFoundError):
            sim.remove(src)
        with suppress(FileNotFoundError):
            stream.unlink()


def _check_memory(args: argparse.Namespace) -> None:
    if args.memory <= 0 or args.memory % PAGE_SIZE:
        raise UsageError(f"--memory must be a positive multiple of {PAGE_SIZE} bytes")


def _headline(
    bench: str, measured: float, baseline: float, unit: str, **more: Any
) -> dict[str, Any]:
    ratio = measured / baseline if unit.endswith("/s") else baseline / measured
    return {
        "bench": bench,
        "measured": round(measured, 4),
        "baseline": round(baseline, 4),
        "unit": unit,
        "ratio": round(ratio, 3),
        **more,
    }


def _headline_of(
    bench: str,
    r: dict[str, Any],
    measured: str,
    baseline: str,
    unit: str,
    *,
    drop: tuple[str, ...] = (),
    **bars: float,
) -> dict[str, Any]:
    """:func:`_headline` of a :mod:`~xcsave.benchmarks` result ``r``: its
    ``measured`` figure against its ``baseline``, then the rest of ``r``
    (but ``measured`` and the keys in ``drop``), then the ``bars``."""
    rest = {k: v for k, v in r.items() if k != measured and k not in drop}
    return _headline(bench, r[measured], r[baseline], unit, **rest, **bars)


@dataclass(frozen=True)
class _Bars:
    """What a throughput bench is judged by: ``ours`` against ``baseline``
    (the ratio: bar 1.0, ``goal``), and against a second reference ``ref``
    (its GB/s, and ours' ratio to it under the key ``ref_ratio``)."""

    ours: str
    baseline: str
    goal: float
    ref: str
    ref_ratio: str


_BARS = {
    "save": _Bars("vmsplice", "cat", 2.5, "writev", "vmsplice_vs_writev"),
    "restore": _Bars("restore", "memcpy", 1.5, "dd", "ratio_vs_dd"),
}


def _throughput(
    bench: str, args: argparse.Namespace, nbytes: int, seconds: dict[str, float], **more: Any
) -> dict[str, Any]:
    """A GB/s headline over nbytes from the best ``seconds`` of each, judged
    by the bench's :data:`_BARS`."""
    gb = nbytes / 1e9
    b = _BARS[bench]
    return _headline(
        bench,
        gb / seconds[b.ours],
        gb / seconds[b.baseline],
        "GB/s",
        seconds=seconds,
        **{
            f"{b.ref}_gbps": round(gb / seconds[b.ref], 4),
            b.ref_ratio: round(seconds[b.ref] / seconds[b.ours], 3),
        },
        **more,
        bytes=nbytes,
        memory=args.memory,
        repeat=args.repeat,
        bar=1.0,
        goal=b.goal,
    )


def _best_of(repeat: int, runs: dict[str, Callable[[], float]], *, first: str) -> dict[str, float]:
    """The least seconds of each of ``runs`` over ``repeat`` rounds (at least
    one), in the order given; in each round ``first`` (the baseline) runs
    first, the others in turn."""
    order = [first, *(k for k in runs if k != first)]
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(max(1, repeat)):
        for k in order:
            best[k] = min(best[k], runs[k]())
    return best


def _rate(label: str, seconds: float, nbytes: int) -> str:
    """One text line: ``label`` then the seconds and the GB/s of nbytes in them."""
    return f"{label} {seconds:.3f} s  {nbytes / 1e9 / seconds:.2f} GB/s"


def _save_stream(src: Path, out: Path, wrap: str = "libxc") -> dict[str, Any]:
    from . import _ext, sim

    with suppress(FileNotFoundError):
        out.unlink()
    fd = create_private(out)
    try:
        return dict(_ext.engine_save(fd, str(src), wrap=wrap))
    finally:
        os.close(fd)
        sim.set_state(src, "running")


def _save_run(args: argparse.Namespace, on_event: EventSink | None) -> Report:
    """Sim save into a pipe read by ``cat >/dev/null`` (vmsplice, and writev
    with XCSAVE_NO_VMSPLICE=1) vs ``cat STREAM | cat >/dev/null``."""
    from . import _ext, sim

    _check_memory(args)
    with _workdir(args) as d, _bench_domain(d, "save", args.memory, seed=5) as (src, stream):
        nbytes = _save_stream(src, stream)["bytes_written"]
        spliced = 0

        def ours(vmsplice: bool) -> float:
            nonlocal spliced
            old = os.environ.pop("XCSAVE_NO_VMSPLICE", None)
            if not vmsplice:
                os.environ["XCSAVE_NO_VMSPLICE"] = "1"
            try:
                t0 = time.perf_counter()
                cat = subprocess.Popen(
                    ["cat"],  # noqa: S607 - the baseline's own tool, from PATH
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                )
                assert cat.stdin is not None
                st = _ext.engine_save(cat.stdin.fileno(), str(src))
                cat.stdin.close()
                cat.wait()
                dt = time.perf_counter() - t0
            finally:
                os.environ.pop("XCSAVE_NO_VMSPLICE", None)
                if old is not None:
                    os.environ["XCSAVE_NO_VMSPLICE"] = old
            sim.set_state(src, "running")  # untimed
            if vmsplice:
                spliced = st["spliced_bytes"]
            return dt

        def base() -> float:
            t0 = time.perf_counter()
            a = subprocess.Popen(["cat", str(stream)], stdout=subprocess.PIPE)  # noqa: S603,S607
            b = subprocess.Popen(["cat"], stdin=a.stdout, stdout=subprocess.DEVNULL)  # noqa: S607
            assert a.stdout is not None
            a.stdout.close()
            a.wait()
            b.wait()
            return time.perf_counter() - t0

        t = _best_of(
            args.repeat,
            {"vmsplice": partial(ours, True), "writev": partial(ours, False), "cat": base},
            first="cat",
        )
    data = _throughput("save", args, nbytes, t, spliced_bytes=spliced)
    text = [
        f"save of a {args.memory >> 20} MiB sim domain ({nbytes / 2**20:.0f} MiB stream) "
        f"into a pipe read by `cat >/dev/null`, best of {args.repeat}",
        _rate("  xcsave vmsplice:", t["vmsplice"], nbytes)
        + f" ({spliced / 2**20:.0f} MiB vmspliced)",
        _rate("  xcsave writev:  ", t["writev"], nbytes),
        _rate("  baseline `cat STREAM | cat >/dev/null`:", t["cat"], nbytes),
        f"  ratio vs cat: {data['ratio']:.2f}x (bar 1.0x, goal 2.5x); "
        f"vmsplice vs writev {data['vmsplice_vs_writev']:.2f}x",
    ]
    return Report(data=data, text=text)


_SAVE_FILE_OPTIONS = _sized_options(
    "256M",
    (
        "--copy-threads",
        {
            "type": int,
            "default": max(2, os.cpu_count() or 2),
            "metavar": "N",
            "help": "threads to compare with one (default: the CPU count, at least 2)",
        },
    ),
)


def _save_file_run(args: argparse.Namespace, on_event: EventSink | None) -> Report:
    """Sim save into a fresh regular file (tmpfs by default): copy_threads=1
    vs copy_threads=N, interleaved, best of --repeat."""
    from . import _ext, sim
    from .defaults import MAX_COPY_THREADS

    _check_memory(args)
    n = args.copy_threads
    if not 2 <= n <= MAX_COPY_THREADS:
        raise UsageError(f"--copy-threads must be from 2 to {MAX_COPY_THREADS}")
    load0 = os.getloadavg()[0]
    with _workdir(args) as d, _bench_domain(d, "save-file", args.memory, seed=5) as (src, stream):
        nbytes, threaded = 0, 0

        def ours(threads: int) -> float:
            nonlocal nbytes, threaded
            with suppress(FileNotFoundError):
                stream.unlink()  # a fresh file each time: tmpfs allocates anew
            fd = create_private(stream)
            try:
                t0 = time.perf_counter()
                st = _ext.engine_save(fd, str(src), copy_threads=threads)
                dt = time.perf_counter() - t0
            finally:
                os.close(fd)
            sim.set_state(src, "running")  # untimed
            nbytes = st["bytes_written"]
            if threads > 1:
                threaded = st["threaded_bytes"]
            return dt

        t1 = tn = float("inf")
        for _ in range(max(1, args.repeat)):
            t1 = min(t1, ours(1))
            tn = min(tn, ours(n))
    load1 = os.getloadavg()[0]
    gb = nbytes / 1e9
    data = _headline(
        "save-file",
        gb / tn,
        gb / t1,
        "GB/s",
        seconds={"1": t1, str(n): tn},
        copy_threads=n,
        threaded_bytes=threaded,
        bytes=nbytes,
        memory=args.memory,
        repeat=args.repeat,
        cpus=os.cpu_count(),
        load_average=[round(load0, 2), round(load1, 2)],
    )
    text = [
        f"save of a {args.memory >> 20} MiB sim domain ({nbytes / 2**20:.0f} MiB stream) "
        f"into a fresh file in {args.dir or 'a /dev/shm temp dir'}, best of {args.repeat}",
        f"  1 thread:   {t1:.3f} s  {gb / t1:.2f} GB/s",
        f"  {n} threads: {tn:.3f} s  {gb / tn:.2f} GB/s "
        f"({threaded / 2**20:.0f} MiB written by the threads)",
        f"  ratio {n} threads vs 1: {data['ratio']:.2f}x "
        f"({os.cpu_count()} CPUs, load average {load0:.2f} -> {load1:.2f})",
    ]
    return Report(data=data, text=text)


def _restore_run(args: argparse.Namespace, on_event: EventSink | None) -> Report:
    """Restore a stream file into a fresh domain vs memcpy of the same bytes
    into fresh memory (the mapped stream copied into a new anonymous mapping
    by one C-level memcpy: mmap slice assignment) and vs ``dd`` of the file
    into a fresh tmpfs file."""
    import mmap

    from . import _ext, sim

    _check_memory(args)
    with _workdir(args) as d, _bench_domain(d, "restore", args.memory, seed=6) as (src, stream):
        dst = d / "restore-dst.dom"
        try:
            nbytes = _save_stream(src, stream)["bytes_written"]
            match = None

            def ours() -> float:
                nonlocal match
                with suppress(FileNotFoundError):
                    sim.remove(dst)
                fd = os.open(stream, os.O_RDONLY)
                try:
                    t0 = time.perf_counter()
                    _ext.engine_restore(fd, str(dst))
                    dt = time.perf_counter() - t0
                finally:
                    os.close(fd)
                match = sim.digest(dst) == sim.digest(src)
                return dt

            with open(stream, "rb") as f:
                smap = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
            try:

                def memcpy() -> float:
                    dmap = mmap.mmap(-1, nbytes)
                    try:
                        t0 = time.perf_counter()
                        dmap[:] = smap  # one memcpy, faulting in fresh pages
                        return time.perf_counter() - t0
                    finally:
                        dmap.close()

                def dd() -> float:
                    out = d / "dd.out"
                    with suppress(FileNotFoundError):
                        out.unlink()
                    os.close(create_private(out))  # dd keeps its mode: 0600
                    t0 = time.perf_counter()
                    subprocess.run(  # noqa: S603
                        ["dd", f"if={stream}", f"of={out}", "bs=4M", "status=none"],  # noqa: S607
                        check=True,
                    )
                    dt = time.perf_counter() - t0
                    out.unlink()
                    return dt

                t = _best_of(
                    args.repeat, {"restore": ours, "memcpy": memcpy, "dd": dd}, first="memcpy"
                )
            finally:
                smap.close()
        finally:
            with suppress(FileNotFoundError):
                sim.remove(dst)
    data = _throughput("restore", args, nbytes, t, match=match)
    text = [
        f"restore of a {nbytes / 2**20:.0f} MiB stream (page cache, tmpfs) into a fresh "
        f"domain, best of {args.repeat}" + ("" if match else "  DIGESTS DIFFER"),
        _rate("  xcsave restore:", t["restore"], nbytes),
        _rate("  baseline memcpy into fresh anonymous memory:", t["memcpy"], nbytes),
        _rate("  reference `dd bs=4M` into a fresh tmpfs file:", t["dd"], nbytes),
        f"  ratio vs memcpy: {data['ratio']:.2f}x (bar 1.0x, goal 1.5x); vs dd "
        f"{data['ratio_vs_dd']:.2f}x",
    ]
    return Report(data=data, text=text, ok=bool(match))


#: ``xcsave bench migrate --transport``: local is a socketpair+pipe in one process.
TRANSPORTS = ("local", "insecure", "tls", "ssh")


_MIGRATE_OPTIONS = _sized_options(
    "256M",
    (
        "--rate",
        {
            "type": int,
            "default": 20000,
            "metavar": "PAGES_PER_S",
            "help": "dirtying workload during the migration",
        },
    ),
    (
        "--transport",
        {
            "choices": TRANSPORTS,
            "default": "local",
            "help": "local (in-process pair, the default) or over loopback TCP: insecure, tls, "
            "ssh (a private sshd); the network ones are measured against insecure in the same "
            "run",
        },
    ),
)


@contextmanager
def _transport_env(transport: str) -> Iterator[dict[str, Any]]:
    """What a network transport needs: TLS directories (one CA), or a private
    sshd, in a private temporary directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="xcsave-bench-keys-") as tmp:
        yield from _transport_env_in(transport, Path(tmp))


def _transport_env_in(transport: str, d: Path) -> Iterator[dict[str, Any]]:
    env: dict[str, Any] = {}
    if transport == "tls":
        from .tlsinit import tls_init

        tls_init(d / "tls-server", ["127.0.0.1"])
        tls_init(d / "tls-client", ["bench-client"], ca_dir=d / "tls-server")
        env["tls"] = d
    if transport != "ssh":
        yield env
        return
    from ._sshd import sshd

    with sshd(d / "sshd") as server:
        env["sshd"] = server
        yield env


async def _net_migration(
    transport: str, src: Path, dst: Path, env: dict[str, Any], on_event: EventSink | None
) -> MigrationResult:
    """One live migration of ``src`` into ``dst`` over loopback by ``transport``."""
    import asyncio
    import shlex

    from . import migrate

    if transport == "ssh":
        from .ssh import migrate_ssh

        server = env["sshd"]
        return await migrate_ssh(
            sim=src,
            to=server.url,
            remote_sim=str(dst),
            ssh=server.ssh_command,
            remote_command=f"{shlex.quote(sys.executable)} -P -m xcsave",
            live=True,
            on_event=on_event,
        )
    tls = transport == "tls"
    ready: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    receiving = asyncio.create_task(
        migrate.receive(
            listen=("127.0.0.1", 0),
            sim=dst,
            on_listening=ready.set_result,
            tls_dir=env["tls"] / "tls-server" if tls else None,
            insecure=not tls,
            accept_timeout=60,
        )
    )
    try:
        addr = await asyncio.wait_for(asyncio.shield(ready), 60)
        return await migrate.migrate(
            sim=src,
            to=addr,
            live=True,
            tls_dir=env["tls"] / "tls-client" if tls else None,
            insecure=not tls,
            on_event=on_event,
        )
    finally:
        if not receiving.done():
            await asyncio.wait({receiving}, timeout=60)
        if not receiving.done():
            receiving.cancel()
        await asyncio.gather(receiving, return_exceptions=True)


def _transport_run(args: argparse.Namespace, on_event: EventSink | None) -> Report:
    """Live migrations over loopback by ``--transport`` and by insecure TCP,
    interleaved: throughput of each against insecure, downtime of each."""
    from . import sim
    from ._sshd import SshdUnavailable

    kinds = ["insecure"] if args.transport == "insecure" else [args.transport, "insecure"]
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    with _workdir(args) as d:
        src, dst = d / "mig-src.dom", d / "mig-dst.dom"
        try:
            with _transport_env(args.transport) as env:
                for i in range(max(1, args.repeat)):
                    for kind in kinds:
                        for p in (src, dst):
                            with suppress(FileNotFoundError):
                                sim.remove(p)
                        sim.create(src, args.memory, vcpus=2, seed=7 + i)
                        with _workloads([src], args.rate):
                            res = run_async(partial(_net_migration, kind, src, dst, env, on_event))
                        runs[kind].append(
                            {
                                "gbps": round(res.gbps, 3),
                                "downtime_ms": round(res.downtime_ns / 1e6, 3),
                                "rounds": res.save.stats.rounds if res.save.stats else None,
                                "seconds": round(res.seconds, 3),
                                "match": sim.digest(src) == sim.digest(dst),
                            }
                        )
        except SshdUnavailable as e:
            return _skipped("migrate", f"--transport ssh: {e}")
        finally:
            for p in (src, dst):
                with suppress(FileNotFoundError):
                    sim.remove(p)
    best = {k: max(r["gbps"] for r in v) for k, v in runs.items()}
    down = {k: min(r["downtime_ms"] for r in v) for k, v in runs.items()}
    ok = all(r["match"] for v in runs.values() for r in v)
    data = _headline(
        "migrate",
        best[args.transport],
        best["insecure"],
        "GB/s",
        transport=args.transport,
        baseline_is="insecure TCP over loopback, same run",
        goal=0.7 if args.transport == "tls" else None,
        downtime_ms=down,
        runs=runs,
        rate=args.rate,
        memory=args.memory,
        repeat=args.repeat,
    )
    text = [
        f"live migration of {args.memory >> 20} MiB under {args.rate} pages/s over loopback, "
        f"best of {max(1, args.repeat)}" + ("" if ok else "  DIGESTS DIFFER"),
        *(
            f"  {k}: {best[k]:.2f} GB/s ({best[k] / best['insecure']:.2f}x insecure), "
            f"downtime {down[k]:.1f} ms"
            for k in kinds
        ),
    ]
    if args.transport == "tls":
        text.append(f"  goal: TLS >= 0.7x insecure; measured {data['ratio']:.2f}x")
    return Report(data=data, text=text, ok=ok)


def _migrate_run(args: argparse.Namespace, on_event: EventSink | None) -> Report:
    """Local live migration (helpers over a socketpair, xl's handshake) under
    a dirtying workload: downtime (suspend -> resumed at the target)."""
    from . import local, sim

    _check_memory(args)
    if getattr(args, "transport", "local") != "local":
        return _transport_run(args, on_event)
    runs: list[dict[str, Any]] = []
    series: list[RoundSeries] = []
    with _workdir(args) as d:
        src, dst = d / "mig-src.dom", d / "mig-dst.dom"
        try:
            for i in range(max(1, args.repeat)):
                for p in (src, dst):
                    with suppress(FileNotFoundError):
                        sim.remove(p)
                sim.create(src, args.memory, vcpus=2, seed=7 + i)
                with _workloads([src], args.rate):
                    res, _recv = run_async(
                        lambda: local.migrate_local(src, dst, live=True, on_event=on_event)
                    )
                match = sim.digest(src) == sim.digest(dst)
                runs.append(
                    {
                        "downtime_ms": round(res.downtime_ns / 1e6, 3),
                        "rounds": res.save.stats.rounds if res.save.stats else None,
                        "pages_per_round": list(res.pages_per_round),
                        "gbps": round(res.gbps, 3),
                        "seconds": round(res.seconds, 3),
                        "match": match,
                    }
                )
                series.append(_series(f"run {i}", res))
        finally:
            for p in (src, dst):
                with suppress(FileNotFoundError):
                    sim.remove(p)
    best = min(runs, key=lambda r: r["downtime_ms"])
    worst = max(r["downtime_ms"] for r in runs)
    data = _headline(
        "migrate",
        best["downtime_ms"],
        50.0,
        "ms",
        runs=runs,
        worst_downtime_ms=worst,
        bar=50.0,
        goal=10.0,
        rate=args.rate,
        memory=args.memory,
        repeat=args.repeat,
        gbps=best["gbps"],
        rounds=best["rounds"],
    )
    data["baseline_is"] = "the 50 ms bar"
    text = [
        f"local live migration of {args.memory >> 20} MiB under {args.rate} pages/s, "
        f"{len(runs)} run(s)",
        *(
            f"  run {i}: downtime {r['downtime_ms']:.1f} ms, {r['rounds']} rounds "
            f"{r['pages_per_round']}, {r['gbps']:.2f} GB/s, "
            + ("bit-exact" if r["match"] else "DIGESTS DIFFER")
            for i, r in enumerate(runs)
        ),
        f"  best downtime {best['downtime_ms']:.1f} ms (bar 50 ms, goal 10 ms)",
    ]
    return Report(data=data, text=text, rounds=series, ok=all(r["match"] for r in runs))


# 1 GiB by default: the figure, and a run still takes well under a
# minute on 2 cores (about 10 s for verify, 30 s for convert).
_XEN_OPTIONS = _sized_options(
    "1G",
    (
        "--xen-utils",
        {
            "metavar": "ROOT",
            "help": "an unpacked xen-utils-4.17: the folder holding usr/lib/xen-4.17 "
            "(tools/fetch-xen-utils.sh makes .cache/xen-utils/root)",
        },
    ),
)


def _skipped(bench: str, why: str) -> Report:
    return Report(
        data={"bench": bench, "skipped": why, "measured": None},
        text=[f"{bench}: skipped: {why}"],
    )


class _XenTools(NamedTuple):
    """A bench against Xen's own Python tools: where they are, the work
    directory, and the environments our commands and Xen's run in."""

    root: Path
    d: Path
    env: dict[str, str]
    xen_env: dict[str, str]


@contextmanager
def _beside_xen(args: argparse.Namespace) -> Iterator[_XenTools | None]:
    """``--memory`` checked, then :class:`_XenTools` for the block, or None
    when there are no Xen tools (the bench reports itself skipped)."""
    _check_memory(args)
    root = benchmarks.find_xen_utils(args.xen_utils)
    if root is None:
        yield None
        return
    with _workdir(args) as d:
        xen_env = benchmarks.python_env(d, PYTHONPATH=str(root / benchmarks.XEN_PY))
        yield _XenTools(root, d, benchmarks.python_env(d), xen_env)


def _conditions(args: argparse.Namespace, how: str) -> dict[str, Any]:
    """The end of a command bench's data: what it ran under (the repeat, the
    interpreter, how our command was run, the load average)."""
    return {
        "repeat": args.repeat,
        "interpreter": sys.executable,
        "command": how,
        "load_average": round(os.getloadavg()[0], 2),
    }


def _load_line(data: dict[str, Any]) -> str:
    """The last line of a command bench's text: the load average it ran under."""
    return f"  load average {data['load_average']:.2f}"


def _verify_run(args: argparse.Namespace, on_event: EventSink | None) -> Report:
    """``xcsave verify`` (command and in-process API) vs Xen's verify-stream-v2,
    both on this interpreter; interpreter start-up measured as a reference."""
    from . import sim, streamtools

    with _beside_xen(args) as xen:
        if xen is None:
            return _skipped("verify", benchmarks.XEN_UTILS_HINT)
        root, d, env, xen_env = xen
        src, img = d / "verify-src.dom", d / "verify.libxc"
        sim.create(src, args.memory, vcpus=2, seed=8)
        try:
            _save_stream(src, img)
            benchmarks.warm(img)
            ours_cmd, how = benchmarks.xcsave_command(
                "verify", "-q", "--format", "libxc", str(img)
            )
            xen_cmd = benchmarks.xen_cmd(
                root, "verify-stream-v2", "-q", "-f", "libxc", "-i", str(img)
            )
            # What any Python-hosted verifier pays before reading a byte.
            start_cmd = [sys.executable, "-P", "-c", "pass"]
            ext_cmd = [sys.executable, "-P", "-c", "import xcsave._ext"]
            for cmd in (xen_cmd, ours_cmd, start_cmd, ext_cmd):  # untimed: bytecode
                benchmarks.run_cmd(cmd, xen_env if cmd is xen_cmd else env)
            t_cmd = t_api = t_xen = t_start = t_ext = float("inf")
            for _ in range(max(1, args.repeat)):
                t_xen = min(t_xen, benchmarks.run_cmd(xen_cmd, xen_env))
                t_cmd = min(t_cmd, benchmarks.run_cmd(ours_cmd, env))
                t_start = min(t_start, benchmarks.run_cmd(start_cmd, env))
                t_ext = min(t_ext, benchmarks.run_cmd(ext_cmd, env))
                t0 = time.perf_counter()
                if not streamtools.verify(img, "libxc").valid:
                    raise XcsaveError("the benchmark image does not verify")
                t_api = min(t_api, time.perf_counter() - t0)
            nbytes = img.stat().st_size
        finally:
            sim.remove(src)
            with suppress(FileNotFoundError):
                img.unlink()
    data = _headline(
        "verify",
        t_cmd,
        t_xen,
        "s",
        api_s=round(t_api, 4),
        ratio_api=round(t_xen / t_api, 2),
        python_start_s=round(t_start, 4),
        python_import_ext_s=round(t_ext, 4),
        ratio_limit=round(t_xen / t_start, 2),
        bytes=nbytes,
        memory=args.memory,
        bar=20.0,
        goal=50.0,
        **_conditions(args, how),
    )
    text = [
        f"verify of a {nbytes / 2**20:.0f} MiB libxc image ({args.memory >> 20} MiB domain), "
        f"best of {args.repeat}, both tools on {sys.executable}, bytecode cached",
        f"  Xen verify-stream-v2: {t_xen:.3f} s",
        f"  xcsave verify (command, {how}): {t_cmd * 1000:.1f} ms  ({data['ratio']:.1f}x)   "
        "bar 20x, goal 50x",
        f"  xcsave streamtools.verify (in-process): {t_api * 1000:.1f} ms "
        f"({data['ratio_api']:.0f}x)",
        f"  reference: `python -P -c pass` {t_start * 1000:.1f} ms "
        f"(a Python command's limit: {data['ratio_limit']:.1f}x), "
        f"`python -P -c 'import xcsave._ext'` {t_ext * 1000:.1f} ms",
        _load_line(data),
    ]
    return Report(data=data, text=text)


def _convert_run(args: argparse.Namespace, on_event: EventSink | None) -> Report:
    """``xcsave convert`` of a legacy HVM image vs Xen's convert-legacy-stream:
    into a fresh file and into a pipe read by ``cat``, with ``cp`` and ``cat``
    of the same bytes as the references for what moving them costs at all."""
    from . import corpus

    with _beside_xen(args) as xen:
        if xen is None:
            return _skipped("convert", benchmarks.XEN_UTILS_HINT)
        root, d, env, xen_env = xen
        leg, out_ours, out_xen, out_cp = (
            d / "image.legacy",
            d / "ours.out",
            d / "xen.out",
            d / "cp.out",
        )
        outs = (out_ours, out_xen, out_cp)

        def fresh() -> None:  # untimed: every run writes a new file
            for p in outs:
                with suppress(FileNotFoundError):
                    p.unlink()

        try:
            corpus.write_big_legacy(leg, args.memory)
            benchmarks.warm(leg)
            conv = ["--width", "64", "--guest", "hvm", "--format", "libxc"]
            xconv = ["-w", "64", "-g", "hvm", "-f", "libxc"]
            ours_cmd, how = benchmarks.xcsave_command("convert", str(leg), "-", *conv)
            ours_path_cmd = benchmarks.xcsave_command("convert", str(leg), str(out_ours), *conv)[0]
            xen_cmd = benchmarks.xen_cmd(
                root, "convert-legacy-stream", "-i", str(leg), "-o", str(out_xen), *xconv
            )
            xen_pipe_cmd = benchmarks.xen_cmd(
                root, "convert-legacy-stream", "-i", str(leg), "-o", "1", *xconv
            )
            t = dict.fromkeys(
                ("xen", "ours", "ours_path", "cp", "xen_pipe", "ours_pipe", "cat_pipe"),
                float("inf"),
            )

            def best(key: str, run: Callable[[], float]) -> None:
                fresh()
                t[key] = min(t[key], run())

            fresh()  # untimed: bytecode
            benchmarks.run_cmd(xen_cmd, xen_env)
            benchmarks.run_cmd(ours_path_cmd, env)
            for _ in range(max(1, args.repeat)):
                best("xen", lambda: benchmarks.run_cmd(xen_cmd, xen_env))
                best("ours", lambda: benchmarks.run_cmd(ours_cmd, env, stdout=out_ours))
                best("ours_path", lambda: benchmarks.run_cmd(ours_path_cmd, env))
                best("cp", lambda: benchmarks.run_cmd(["cp", str(leg), str(out_cp)]))
                best("xen_pipe", lambda: benchmarks.run_piped(xen_pipe_cmd, xen_env))
                best("ours_pipe", lambda: benchmarks.run_piped(ours_cmd, env))
                best("cat_pipe", lambda: benchmarks.run_piped(["cat", str(leg)]))
            nbytes = leg.stat().st_size
            where = str(d)
        finally:
            fresh()
            with suppress(FileNotFoundError):
                leg.unlink()
    data = _headline(
        "convert",
        t["ours"],
        t["xen"],
        "s",
        seconds={k: round(v, 4) for k, v in t.items()},
        ratio_pipe=round(t["xen_pipe"] / t["ours_pipe"], 3),
        ratio_path=round(t["xen"] / t["ours_path"], 3),
        ratio_limit=round(t["xen"] / t["cp"], 3),
        ratio_limit_pipe=round(t["xen_pipe"] / t["cat_pipe"], 3),
        bytes=nbytes,
        memory=args.memory,
        bar=10.0,
        **_conditions(args, how),
    )
    mib = nbytes / 2**20
    text = [
        f"convert of a {mib:.0f} MiB legacy HVM image to libxc, best of {args.repeat}, "
        f"Xen's tool on {sys.executable}, ours as {how}, bytecode cached",
        f"  into a fresh file in {where}:",
        f"    Xen convert-legacy-stream -o OUT: {t['xen']:.3f} s",
        f"    xcsave convert LEG - >OUT:        {t['ours']:.3f} s  ({data['ratio']:.2f}x)  "
        "bar 10x",
        f"    xcsave convert LEG OUT (atomic):  {t['ours_path']:.3f} s  "
        f"({data['ratio_path']:.2f}x)",
        f"    reference `cp LEG OUT`:           {t['cp']:.3f} s  "
        f"(the limit of filling {mib:.0f} MiB of fresh page cache: {data['ratio_limit']:.2f}x)",
        "  into a pipe read by `cat >/dev/null`:",
        f"    Xen convert-legacy-stream -o 1:   {t['xen_pipe']:.3f} s",
        f"    xcsave convert LEG -:             {t['ours_pipe']:.3f} s  "
        f"({data['ratio_pipe']:.2f}x)",
        f"    reference `cat LEG | cat`:        {t['cat_pipe']:.3f} s  "
        f"({data['ratio_limit_pipe']:.2f}x)",
        _load_line(data),
    ]
    return Report(data=data, text=text)


def _callbacks_run(args: argparse.Namespace, on_event: EventSink | None) -> Report:
    """Callback round trip helper -> Python -> helper vs asyncio <-> cat."""
    r = benchmarks.callbacks_run(args.rounds)
    data = _headline_of(
        "callbacks", r, "us_per_callback", "baseline_us_per_rtt", "us", bar=100.0, goal=30.0
    )
    text = [
        f"callback round trip: xcsave {r['us_per_callback']:.1f} us "
        f"({r['callbacks']} callbacks + {r['other_frames']} other frames, "
        f"{r['frames_per_s']:.0f} frames/s)  bar 100 us, goal 30 us",
        f"  baseline (asyncio <-> cat, stock streams): {r['baseline_us_per_rtt']:.1f} us",
        f"  floor (asyncio <-> cat, add_reader + os.write as the supervisor reads): "
        f"{r['protocol_us_per_rtt']:.1f} us",
        f"  ratio baseline/xcsave: {data['ratio']:.2f}x (load average {r['load_average']:.2f})",
    ]
    return Report(data=data, text=text)


def _tls_link_run(args: argparse.Namespace, on_event: EventSink | None) -> Report:
    """N bytes over loopback TCP: plain vs through two TLS tunnels (xcsave.tls)."""
    if args.size < 1 << 20:
        raise UsageError("--size must be at least 1M")
    r = run_async(lambda: benchmarks.tls_link(args.size, repeat=args.repeat))
    data = _headline_of(
        "tls-link", r, "tls_gbps", "plain_gbps", "GB/s", drop=("plain_gbps", "ratio"), goal=0.7
    )
    text = [
        f"TLS link: {r['tls_gbps']:.2f} GB/s through two tunnels ({r['version']} "
        f"{r['cipher']}), plain TCP {r['plain_gbps']:.2f} GB/s, "
        f"ratio {data['ratio']:.2f}x (goal 0.7x)",
        f"  {args.size >> 20} MiB one way, best of {args.repeat}; dd source and sink: "
        "no Python in the data path",
    ]
    return Report(data=data, text=text)


BENCHES: list[Bench] = [
    Bench(
        "concurrent",
        "N simultaneous local live migrations against one alone, in the same run",
        _CONCURRENT_OPTIONS,
        _concurrent_run,
    ),
    Bench(
        "save",
        "sim save into a pipe read by cat vs cat of the stream; vmsplice vs writev",
        _sized_options("256M"),
        _save_run,
    ),
    Bench(
        "save-file",
        "sim save into a regular file: copy_threads=N vs 1 (pwritev from N threads)",
        _SAVE_FILE_OPTIONS,
        _save_file_run,
    ),
    Bench(
        "restore",
        "restore a stream into a fresh domain vs memcpy into fresh memory",
        _sized_options("256M"),
        _restore_run,
    ),
    Bench(
        "migrate",
        "live migration under a workload: downtime, rounds, GB/s (--transport: over "
        "loopback TCP, TLS or ssh against insecure)",
        _MIGRATE_OPTIONS,
        _migrate_run,
    ),
    Bench("verify", "xcsave verify vs Xen's verify-stream-v2", _XEN_OPTIONS, _verify_run),
    Bench("convert", "xcsave convert vs Xen's convert-legacy-stream", _XEN_OPTIONS, _convert_run),
    Bench(
        "callbacks",
        "callback round trip vs asyncio <-> cat",
        (
            (
                "--rounds",
                {"type": int, "default": 2000, "help": "Remus checkpoints (3 callbacks each)"},
            ),
        ),
        _callbacks_run,
    ),
    Bench(
        "tls-link",
        "bytes over loopback TCP through two TLS tunnels vs plain TCP, in the same run",
        (
            (
                "--size",
                {
                    "type": parse_size,
                    "default": parse_size("1G"),
                    "help": "bytes to send (default 1G)",
                },
            ),
            _REPEAT,
        ),
        _tls_link_run,
    ),
    Bench(
        "planner",
        "xcsave plan's predictions (total time, downtime) against real live migrations "
        "under a dirtying workload over capped links (xcsave.bench_planner)",
        bench_planner.OPTIONS,
        bench_planner.run,
    ),
    Bench(
        "link",
        "live migration between two namespaces over a tbf-shaped link: compression "
        "off/zstd/adaptive x channels 1/N, in the same run (xcsave.bench_link)",
        bench_link.OPTIONS,
        bench_link.run,
    ),
]
