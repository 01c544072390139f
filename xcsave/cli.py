"""The ``xcsave`` command line (the contract in DESIGN.md).

Every failure is one line on stderr, ``xcsave: <command>: <what failed>``
with the errno name where there is one, and a non-zero exit: 1 for a failed
operation or an invalid stream, 2 for bad usage.  Never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from . import __version__, converge, formats, policy
from ._argparse import Parser, integer, seconds, size
from ._log import logger
from .cli_run import (
    LOG_LEVELS,
    add_logging_flags,
    add_progress_flag,
    restore_signals,
    run_rendered,
)
from .defaults import CHANNELS, DOM_HELP, IDLE_TIMEOUT, MAX_COPY_THREADS, MAX_DOMID, U32_MAX
from .errors import UsageError, XcsaveError, oserror_text

if TYPE_CHECKING:
    from .events import ThrottleEvent
    from .progress import Renderer
    from .supervisor import Callbacks, RunResult

# asyncio, the API and the supervisor are imported by the commands that run
# helpers, not here: `xcsave verify` and `xcsave --version` start faster.
# The API's own names (xcsave.formats, which imports nothing).
FORMATS = formats.STREAM
STREAM_TYPES = formats.STREAM_TYPES

log = logger("xcsave.cli")

EXIT_FAILED = 1
EXIT_USAGE = 2


def self_argv(*args: str) -> list[str]:
    """argv that runs this xcsave again in a child (workloads, benchmarks).

    ``-P`` keeps the child's cwd off ``sys.path``: run from a source checkout,
    ``-m xcsave`` would otherwise import the unbuilt tree instead of the
    installed package with its extension and helper.
    """
    return [sys.executable, "-P", "-m", "xcsave", *args]


#: ``256M``, ``1G``, ``4096``, ``64MiB`` -> bytes (any size; bounded ones:
#: xcsave._argparse.size).
parse_size = size()


def parse_policy_spec(text: str) -> policy.PolicySpec:
    """``--policy``: :data:`xcsave.policy.GRAMMAR`, read by :func:`xcsave.policy.parse`
    into a factory (one fresh policy per save); bad text is one line naming
    what is wrong and listing the forms (argparse: exit 2)."""
    try:
        return policy.parse(text)
    except ValueError as e:
        shown = text if len(text) <= 60 else text[:60] + "..."
        raise argparse.ArgumentTypeError(
            f"bad policy {shown!r}: {e}; expected {policy.GRAMMAR}"
        ) from None


def parse_policy(text: str) -> policy.Policy:
    """One policy from ``--policy`` text (:func:`parse_policy_spec`'s ``make()``)."""
    return parse_policy_spec(text).make()


def live_policy(args: argparse.Namespace) -> policy.Policy | None:
    """The policy of a save or migrate: a fresh one from ``--policy``, wrapped
    in auto-converge with ``--auto-converge``.  Without ``--policy``, a live
    save over xcsave-1 gets Xen's default from here rather than the helper's
    own copy of it: the same decisions, explained
    in the events and ``--json``.  (None: the helper decides, as xen-4.17's
    helper must: that dialect has no precopy_policy message.)"""
    spec: policy.PolicySpec | None = args.policy
    if spec is None and args.live and getattr(args, "dialect", "xcsave-1") == "xcsave-1":
        spec = policy.parse("xen")
    pol = spec.make() if spec is not None else None
    if getattr(args, "auto_converge", None) is None:
        return pol
    # --auto-converge wraps the policy, outermost (its throttle passes through
    # nothing else).
    initial, increment, ceiling = args.auto_converge
    return converge.auto_converge(
        pol or policy.xen_default(), initial=initial, increment=increment, ceiling=ceiling
    )


# ----------------------------------------------------------------- callbacks


async def _run_cmd(cmd: str, *extra: str) -> int:
    import asyncio

    argv = [*shlex.split(cmd), *extra]
    proc = await asyncio.create_subprocess_exec(*argv)
    return await proc.wait()


def cmd_callbacks(args: argparse.Namespace) -> Callbacks:
    """Callbacks answered by external commands (``--suspend-cmd`` etc.)."""
    from .supervisor import Callbacks

    cbs = Callbacks()
    suspend_cmd = getattr(args, "suspend_cmd", None)
    logdirty_cmd = getattr(args, "logdirty_cmd", None)
    if suspend_cmd:

        async def suspend() -> int:
            # exit 0 = the guest is suspended (libxl replies !rc)
            return int(await _run_cmd(suspend_cmd) == 0)

        cbs.suspend = suspend
    if getattr(args, "domid", None) is not None and not getattr(args, "qmp", None):
        # (with --qmp the save switches QEMU's dirty log through QMP)
        if logdirty_cmd:

            async def logdirty(domid: int, enable: int) -> int:
                return 0 if await _run_cmd(logdirty_cmd, str(domid), str(enable)) == 0 else -1

            cbs.switch_qemu_logdirty = logdirty
        else:
            # No device model for a PV guest: nothing to switch.
            cbs.switch_qemu_logdirty = lambda domid, enable: 0
    return cbs


# ----------------------------------------------------------------- save/restore


def _stream_target(path: str, for_write: bool) -> int | str:
    """A path, or for ``-`` stdout/stdin's fd -- never a terminal's: a stream
    is binary, and nobody types one (refused as gzip refuses)."""
    if path != "-":
        return path
    std = sys.stdout if for_write else sys.stdin
    if std.isatty():
        raise UsageError(
            "refusing to write a binary stream to a terminal: name a file or redirect stdout"
            if for_write
            else "refusing to read a stream from a terminal: name a file or redirect stdin"
        )
    return std.fileno()


def _result_json(res: RunResult, **what: object) -> str:
    """``--json``: what was done, the run's statistics, its elapsed time, and
    (a save) each precopy round with the policy's decision and reason."""
    import dataclasses
    import json

    from .progress import policy_round

    doc: dict[str, object] = {**what, "elapsed_s": round(res.elapsed, 6)}
    if res.stats is not None:  # a save: its precopy rounds, each decision explained
        doc["precopy_rounds"] = [policy_round(ev) for ev in res.rounds]
    for name in ("stats", "restore_stats"):
        rec = getattr(res, name)
        if rec is not None:
            doc[name] = dataclasses.asdict(rec)
    if res.store_gfn is not None:
        doc["store_gfn"] = res.store_gfn
        doc["console_gfn"] = res.console_gfn
    if res.throttle is not None:
        doc["throttle"] = throttle_json(res.throttle)
    return json.dumps(doc, sort_keys=True)


def throttle_json(ev: ThrottleEvent) -> dict[str, object]:
    """Auto-converge's effect, for ``--json`` (save and migrate)."""
    return {
        "actuator": ev.actuator,
        "seconds": round(ev.seconds, 3),
        "max_percent": ev.max_percent,
        "mean_percent": round(ev.mean_percent, 1),
        "restored": ev.restored,
    }


def throttle_text(ev: ThrottleEvent | None) -> str:
    """Auto-converge's effect, for the result line ("" when never throttled)."""
    if ev is None:
        return ""
    return (
        f"; the guest ran throttled {ev.seconds:.1f} s (at most {ev.max_percent}%, "
        f"{ev.mean_percent:.0f}% on average), now lifted"
    )


def _say(args: argparse.Namespace, line: str) -> None:
    """The command's result: on stdout, or on stderr when stdout carries the
    stream (``save ... -``) or JSON events (``--progress json``, one object a
    line) that a line of text would break."""
    from .progress import write_result

    stream_out = getattr(args, "out", None) == "-"
    events_out = args.progress == "json" and not args.json
    write_result(sys.stderr if stream_out or events_out else sys.stdout, line)


def _describe(res: RunResult) -> str:
    parts = [f"ok in {res.elapsed:.2f} s"]
    if res.stats is not None:
        s = res.stats
        parts.append(f"{s.rounds} round(s), {s.pages_sent} pages, {s.bytes} bytes")
        if gbps := _gbps(s.bytes, s.duration_ns):
            parts.append(f"{gbps:.2f} GB/s")
        if s.downtime_ns:  # suspended -> end of stream; a migration's downtime is longer
            parts.append(f"stop-and-copy {s.downtime_ns / 1e6:.1f} ms")
    if res.restore_stats is not None:
        r = res.restore_stats
        if r.checkpoints:
            parts.append(f"{r.checkpoints} checkpoint(s)")
        parts.append(f"{r.pages_received} pages, {r.bytes} bytes received")
        if gbps := _gbps(r.bytes, r.duration_ns):
            parts.append(f"{gbps:.2f} GB/s")
    return ", ".join(parts)


def _gbps(nbytes: int, duration_ns: int) -> float:
    return nbytes / duration_ns if duration_ns > 0 and nbytes else 0.0


def _run_options(args: argparse.Namespace, on_event: Callable[[Any], object]) -> dict[str, Any]:
    """What save and restore are both given from :func:`_add_common`'s options."""
    return {
        "domid": args.domid,
        "sim": args.sim,
        "fmt": args.format,
        "dialect": args.dialect,
        "helper": args.helper,
        "stream_type": args.stream_type,
        "timeout": args.timeout,
        "on_event": on_event,
    }


def do_save(args: argparse.Namespace) -> int:
    from . import api

    if args.domid is not None and not args.suspend_cmd:
        raise UsageError(
            "saving a Xen domain needs --suspend-cmd CMD (a command that suspends the "
            "guest; exit 0 = suspended); xenstore-based suspend is not built in"
        )
    out = _stream_target(args.out, for_write=True)
    dm = None
    if args.qmp is not None:
        from .devicemodel import DeviceModel

        if args.domid is None:
            raise UsageError("--qmp is an HVM Xen domain's (--domid N), not a sim domain's")
        dm = DeviceModel.of_domain(args.domid, qmp=None if args.qmp == "auto" else args.qmp)
    res = _run_op(
        args,
        lambda rend: api.save(
            out,
            live=args.live,
            callbacks=cmd_callbacks(args),
            policy=live_policy(args),
            checkpoints=args.checkpoints,
            interval_ms=args.interval_ms,
            copy_threads=args.copy_threads,
            xl_config=args.xl_config,
            device_model=dm,
            **_run_options(args, rend),
        ),
    )
    where = "<stdout>" if args.out == "-" else args.out
    dom = args.sim if args.sim is not None else f"domain {args.domid}"
    if args.json:
        _say(args, _result_json(res, op="save", domain=dom, out=where, format=args.format))
    else:
        _say(args, f"saved {dom} to {where}: {_describe(res)}{throttle_text(res.throttle)}")
    return 0


def _run_op(
    args: argparse.Namespace, make: Callable[[Renderer], Awaitable[RunResult]]
) -> RunResult:
    """Run a save or restore command: its events where :func:`_event_stream` says."""
    return run_rendered(args, make, _event_stream(args))


def do_restore(args: argparse.Namespace) -> int:
    from . import api

    src = _stream_target(args.input, for_write=False)
    legacy_width = args.width if args.legacy else None
    legacy_guest = args.guest if args.legacy else None
    if args.legacy and (args.width is None or args.guest is None):
        raise UsageError("--legacy needs --width 32|64 and --guest pv|hvm")
    res = _run_op(
        args,
        lambda rend: api.restore(
            src,
            store_evtchn=args.store_evtchn,
            store_domid=args.store_domid,
            console_evtchn=args.console_evtchn,
            console_domid=args.console_domid,
            max_pages=args.max_pages,
            max_memory=args.max_memory or 0,
            idle_timeout=args.idle_timeout or None,  # 0: never
            legacy_width=legacy_width,
            legacy_guest=legacy_guest,
            dm_out=args.dm_out,
            foreign=args.foreign,
            force=args.force,
            **_run_options(args, rend),
        ),
    )
    where = "<stdin>" if args.input == "-" else args.input
    dom = args.sim if args.sim is not None else f"domain {args.domid}"
    if args.json:
        _say(args, _result_json(res, op="restore", domain=dom, input=where))
    else:
        _say(
            args,
            f"restored {dom} from {where}: {_describe(res)}; "
            f"store_gfn={res.store_gfn:#x} console_gfn={res.console_gfn:#x}",
        )
    return 0


def _event_stream(args: argparse.Namespace) -> Any:
    # Machine-readable events go to stdout, unless the stream itself does.
    if args.progress == "json" and "-" not in (
        getattr(args, "out", None),
        getattr(args, "input", None),
    ):
        return sys.stdout
    return sys.stderr


def _add_common(p: argparse.ArgumentParser, *, reading: bool = False) -> None:
    dom = p.add_mutually_exclusive_group(required=True)
    dom.add_argument("--sim", metavar="DOM", help=DOM_HELP)
    dom.add_argument("--domid", type=integer(0, MAX_DOMID), metavar="N", help="a Xen domain id")
    if reading:
        p.add_argument(
            "--format",
            choices=("auto", *FORMATS),
            default="auto",
            help="stream framing (default auto: what a file's first bytes say; "
            "a pipe or socket is read as libxc)",
        )
    else:
        p.add_argument(
            "--format", choices=FORMATS, default="libxc", help="stream framing (default libxc)"
        )
    p.add_argument("--helper", metavar="PATH", help="helper executable (default: bundled)")
    p.add_argument(
        "--dialect",
        choices=("xcsave-1", "xen-4.17"),
        default="xcsave-1",
        help="helper protocol (xen-4.17 drives Xen's stock libxl-save-helper)",
    )
    p.add_argument(
        "--stream-type",
        choices=STREAM_TYPES,
        default="plain",
        help="plain: one image; remus/colo: checkpointed (a stream of checkpoints)",
    )
    p.add_argument("--timeout", type=seconds(), metavar="S", help="give up after S seconds")
    add_progress_flag(p)
    p.add_argument(
        "--json", action="store_true", help="print the result and statistics as one JSON object"
    )
    add_logging_flags(p)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad number of seconds {text!r}") from None
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 (never) to 86400 seconds")
    return value


def add_bounds_flags(p: argparse.ArgumentParser, *, max_memory: str | None) -> None:
    """``--idle-timeout S``, and ``--max-memory SIZE`` unless ``max_memory`` is None
    (else its text says what the default is)."""
    if max_memory is not None:
        p.add_argument(
            "--max-memory",
            type=parse_size,
            default=None if max_memory else 0,
            metavar="SIZE",
            help="refuse (ERANGE) a stream whose domain is larger, before allocating it"
            + (f" (default: {max_memory})" if max_memory else ""),
        )
    p.add_argument(
        "--idle-timeout",
        type=_positive_seconds,
        default=IDLE_TIMEOUT,
        metavar="S",
        help="fail (ETIMEDOUT) when the stream stays silent S seconds once started "
        f"(default {IDLE_TIMEOUT:g}; 0: never)",
    )


def add_live_flags(p: argparse.ArgumentParser) -> None:
    """``--live``, ``--policy POLICY`` and ``--auto-converge`` (save and migrate)."""
    p.add_argument("--live", action="store_true", help="live precopy rounds")
    p.add_argument(
        "--policy",
        type=parse_policy_spec,
        metavar="POLICY",
        help=f"precopy policy: {policy.GRAMMAR} (default: xen)",
    )
    p.add_argument(
        "--auto-converge",
        nargs="?",
        const=converge.DEFAULTS,
        type=_parse_auto_converge,
        metavar="I:N[:C]",
        help="slow the guest down while it dirties faster than the link sends: a throttle "
        "of I%% (default 20), raised N (10) at a time up to C%% (99), lifted at the end "
        "whatever happens; wraps --policy (sim: the domain's throttle; Xen: credit2 cap)",
    )


def _parse_auto_converge(text: str) -> tuple[int, int, int]:
    try:
        return converge.parse_auto_converge(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_save_restore(sub: Any) -> None:
    p = sub.add_parser("save", help="save a domain into a stream")
    p.add_argument("out", metavar="OUT", help="output stream (file, or - for stdout)")
    _add_common(p)
    add_live_flags(p)
    p.add_argument("--suspend-cmd", metavar="CMD", help="command that suspends the guest")
    p.add_argument(
        "--logdirty-cmd",
        metavar="CMD",
        help="command run as CMD DOMID 0|1 for switch_qemu_logdirty",
    )
    p.add_argument(
        "--qmp",
        metavar="SOCKET",
        help="an HVM guest's device model: its QMP socket (auto: where libxl puts it, "
        "/var/run/xen/qmp-libxl-N); its state goes in libxl's EMULATOR_CONTEXT record "
        "(--format libxl or xl)",
    )
    p.add_argument(
        "--xl-config",
        metavar="FILE",
        help="--format xl: the domain's libxl config (JSON) for xl's header "
        "(a Xen domain's: `xl list -l`'s config; required for one)",
    )
    p.add_argument("--checkpoints", type=integer(0), default=0, help="remus: checkpoints to send")
    p.add_argument("--interval-ms", type=integer(0), default=0, help="remus: checkpoint interval")
    p.add_argument(
        "--copy-threads",
        type=integer(1, MAX_COPY_THREADS),
        default=1,
        metavar="N",
        help="sim save into a regular file: write page data with N threads (default 1)",
    )
    p.set_defaults(func=do_save)

    p = sub.add_parser("restore", help="restore a domain from a stream")
    p.add_argument("input", metavar="IN", help="input stream (file, or - for stdin)")
    _add_common(p, reading=True)
    p.add_argument("--legacy", action="store_true", help="the input is a pre-4.6 legacy stream")
    p.add_argument("--width", type=int, choices=(32, 64), help="legacy: toolstack word size")
    p.add_argument("--guest", choices=("pv", "hvm"), help="legacy: guest type")
    p.add_argument("--max-pages", type=int, default=0, help="refuse streams with more pages")
    add_bounds_flags(p, max_memory="")
    p.add_argument(
        "--dm-out", metavar="FILE", help="hand the device model's saved state over in FILE"
    )
    p.add_argument(
        "--foreign",
        action="store_true",
        help="--sim: a stream the simulator did not write (real Xen's PVH or HVM save): "
        "the domain sized by its highest pfn, vCPU 0 from HVM_CONTEXT",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --sim DOM (kept as it was unless the restore succeeds)",
    )
    for name, what in (
        ("store-evtchn", "xenstore's event channel in the new domain"),
        ("store-domid", "the domain that runs xenstore"),
        ("console-evtchn", "the console's event channel in the new domain"),
        ("console-domid", "the domain that runs the console backend"),
    ):
        p.add_argument(f"--{name}", type=integer(0, U32_MAX), default=0, help=f"Xen: {what}")
    p.set_defaults(func=do_restore)


# ----------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="xcsave",
        description="Save, restore and live-migrate Xen domains through a native helper.",
    )
    parser.add_argument("--version", action="store_true", help="print version and backends")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        help="logging level (default: quiet; failures are one line)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_save_restore(sub)
    for modname in (
        "cmd_sim",
        "cmd_stream",
        "cmd_migrate",
        "cmd_bench",
        "cmd_tls",
        "cmd_skeleton",
        "cmd_plan",
    ):
        mod = _optional_module(modname)
        if mod is not None:
            mod.add_parsers(sub)
    return parser


def _optional_module(name: str) -> Any:
    import importlib

    try:
        return importlib.import_module(f"xcsave.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"xcsave.{name}":
            raise
        return None


def version_text() -> str:
    lines = [f"xcsave {__version__}"]
    try:
        from . import _ext

        lines.append(f"backends: {_ext.BACKENDS}")
    except ImportError as e:
        lines.append(f"backends: unknown (extension not built: {e})")
    from .supervisor import helper_path

    try:
        hp = helper_path()
        lines.append(f"helper: {hp}")
    except FileNotFoundError as e:
        lines.append(f"helper: missing ({e})")
    return "\n".join(lines)


def _setup_logging(args: argparse.Namespace) -> None:
    if args.log_level:
        level = getattr(logging, args.log_level.upper())
    elif args.verbose:
        level = logging.DEBUG if args.verbose > 1 else logging.INFO
    else:
        level = logging.CRITICAL + 1  # quiet: failures are reported as one line
    logging.basicConfig(level=level, format="xcsave: %(name)s: %(message)s", stream=sys.stderr)


def describe_error(e: BaseException) -> str:
    """One line for any failure we expect, with the errno name when there is one."""
    if isinstance(e, OSError) and e.errno:
        return oserror_text(e)
    if isinstance(e, XcsaveError):
        return str(e)
    return f"{type(e).__name__}: {e}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        sys.stdout.write(version_text() + "\n")
        return 0
    if not getattr(args, "func", None):
        parser.print_usage(sys.stderr)
        return EXIT_USAGE
    _setup_logging(args)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (UsageError, ValueError, XcsaveError, OSError, KeyboardInterrupt) as e:
        return report_failure(args.command, e)
    finally:
        if argv is not None:
            # Called in-process (not as the program): the caller's handlers
            # back.  The program itself keeps ignoring the stop signals until
            # it exits, once its operation succeeded (see defer_signals).
            restore_signals()


def report_failure(command: str, e: BaseException) -> int:
    """One line on stderr for a command that raised; its exit status.
    (Also the lean path's, xcsave/cmd_stream.py main().)"""
    if isinstance(e, (UsageError, ValueError)):
        sys.stderr.write(f"xcsave: {command}: {e}\n")
        return EXIT_USAGE
    if isinstance(e, KeyboardInterrupt):
        sys.stderr.write(f"xcsave: {command}: interrupted\n")
        return 130
    sys.stderr.write(f"xcsave: {command}: {describe_error(e)}\n")
    return EXIT_FAILED


__all__ = ["CHANNELS", "UsageError", "main", "parse_size"]
