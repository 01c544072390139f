"""CLI: ``xcsave inspect``, ``xcsave verify`` and ``xcsave convert``.

Exit status: 0 success (a valid stream), 1 an invalid or unconvertible
stream, with ONE line on stderr saying where (offset, record) and why, 2 bad
usage or an I/O error, with the errno name.  Never a traceback.
"""

from __future__ import annotations

import errno
import signal
import sys

from . import formats, streamtools
from .errors import StreamError, UsageError, XcsaveError, oserror_text

# `xcsave inspect|verify|convert` run from main() below, straight from
# xcsave/__main__.py: this module, streamtools and the extension are all
# they import (no typing, json, logging, asyncio or the other commands; for
# a well-formed inspect/verify not even argparse, see _fast_args);
# tests/test_cli.py checks that structurally.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import Any, NoReturn

EXIT_INVALID = 1  # an invalid stream
EXIT_FAILED = 1  # the operation failed (an OSError: a missing file, a directory, EROFS)
EXIT_USAGE = 2


# inspect's and verify's options, declared once: add_parsers builds them into
# argparse, and _fast_args reads a well-formed command line with them.
# (flags, dest, type, choices, default, help); type bool is a store_true flag.
_ScanOpt = tuple[tuple[str, ...], str, type, "tuple[object, ...] | None", object, str]
#: ``--stream-type`` as inspect, verify and ``skeleton make`` take it.
_STREAM_TYPE_OPT: _ScanOpt = (
    ("--stream-type",),
    "stream_type",
    str,
    streamtools.STREAM_TYPES,
    "plain",
    "checkpointed or not: the caller says, never the stream",
)
_SCAN_OPTS: tuple[_ScanOpt, ...] = (
    (("--format",), "fmt", str, streamtools.FORMATS, "auto", "stream format (default: detect)"),
    _STREAM_TYPE_OPT,
    (
        ("--width",),
        "width",
        int,
        (32, 64),
        None,
        "legacy streams: toolstack word size (default: guess)",
    ),
    (
        ("--guest",),
        "guest",
        str,
        ("pv", "hvm"),
        None,
        "legacy streams: guest type (default: guess)",
    ),
    (
        ("--allow-trailing",),
        "allow_trailing",
        bool,
        None,
        False,
        "bytes after the outermost END are not an error",
    ),
    (("--json",), "json", bool, None, False, "print the report as JSON"),
)
_VERIFY_OPTS: tuple[_ScanOpt, ...] = (
    (("-q", "--quiet"), "quiet", bool, None, False, "no output when valid"),
)


def _add_opts(p: argparse.ArgumentParser, opts: tuple[_ScanOpt, ...]) -> None:
    for flags, dest, kind, choices, default, text in opts:
        if kind is bool:
            p.add_argument(*flags, dest=dest, action="store_true", help=text)
        else:
            p.add_argument(
                *flags, dest=dest, type=kind, choices=choices, default=default, help=text
            )


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    import argparse

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("stream", metavar="STREAM", help="stream file, or - for stdin")
    _add_opts(common, _SCAN_OPTS)

    p = sub.add_parser("inspect", parents=[common], help="describe a migration stream")
    p.set_defaults(func=do_inspect)

    p = sub.add_parser("verify", parents=[common], help="verify a migration stream")
    _add_opts(p, _VERIFY_OPTS)
    p.set_defaults(func=do_verify)

    p = sub.add_parser("convert", help="convert a legacy (pre-4.6) stream to v3")
    p.add_argument("legacy", metavar="LEGACY", help="legacy stream, or - for stdin")
    p.add_argument("out", metavar="OUT", help="output (written atomically), or - for stdout")
    p.add_argument(
        "--width",
        type=int,
        choices=(32, 64),
        required=True,
        help="the saving toolstack's word size",
    )
    p.add_argument("--guest", choices=("pv", "hvm"), required=True, help="the guest's type")
    p.add_argument(
        "--format",
        dest="fmt",
        choices=formats.CONVERTED,
        default="libxc",
        help="output format (default libxc)",
    )
    p.add_argument("--xl", action="store_true", help="the input starts with an xl header")
    p.add_argument(
        "--xl-out",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="write an xl header (default: with --xl and --format libxl)",
    )
    p.add_argument(
        "--stream-type",
        choices=formats.LEGACY_STREAM_TYPES,
        default="plain",
        help="remus: a checkpointed legacy stream (LAST_CHECKPOINT counts)",
    )
    p.add_argument("--skip-qemu", action="store_true", help="drop the HVM qemu record")
    p.add_argument("--json", action="store_true", help="print statistics as JSON")
    p.set_defaults(func=do_convert)


# ----------------------------------------------------------------- helpers


def _json(obj: object) -> str:
    import json

    return json.dumps(obj, indent=2)


def _err(cmd: str, text: str) -> None:
    sys.stderr.write(f"xcsave: {cmd}: {text}\n")


def _oserror(cmd: str, e: OSError, default_name: str) -> int:
    name = e.filename if e.filename is not None else default_name
    _err(cmd, f"{name}: {oserror_text(e, filename=False) if e.errno else e.strerror or e}")
    return EXIT_FAILED


def _source(path: str) -> str | int:
    return 0 if path == "-" else path


def _label(path: str, std: str = "<stdin>") -> str:
    return std if path == "-" else path


def _scan(args: argparse.Namespace) -> dict[str, Any]:
    return streamtools.inspect(
        _source(args.stream),
        args.fmt,
        stream_type=args.stream_type,
        width=args.width,
        guest=args.guest,
        allow_trailing=args.allow_trailing,
    )


def _problem(report: dict[str, Any]) -> str:
    e = report["error"]
    record = e["record"] or "?"
    return f"offset {e['offset']}, record {record}: {e['reason']}"


# ----------------------------------------------------------------- inspect


def _hex(v: int | None) -> str:
    return "-" if v is None else f"{v:#x}"


def _summary(r: dict[str, Any]) -> str:
    layers = " > ".join(r["layers"]) or r["format"]
    guest = (r["guest"] or "unknown guest").upper()
    pages = r["pages"]["data"]
    return f"{layers} stream, {r['stream_type']}, {guest}, {r['vcpus']} vcpus, {pages} pages"


def format_table(r: dict[str, Any], label: str) -> str:
    """The human-readable report."""
    rows: list[tuple[str, str]] = [("stream", f"{label} ({r['bytes']} bytes read)")]
    state = "valid" if r["valid"] else "INVALID"
    rows.append(
        (
            "format",
            f"{' > '.join(r['layers']) or r['format']}; stream type {r['stream_type']}; {state}",
        )
    )
    rows.append(("guest", f"{(r['guest'] or '?').upper()}, {r['vcpus']} vcpus"))
    if r["xl"]:
        x = r["xl"]
        flags = [n for n, on in (("JSON config", x["json"]), ("stream v2", x["streamv2"])) if on]
        rows.append(
            (
                "xl header",
                f"mandatory flags {x['mandatory_flags']:#x} "
                f"({', '.join(flags) or 'legacy stream'}), "
                f"config {x['config_len']} bytes",
            )
        )
    if r["libxl"]:
        x = r["libxl"]
        rows.append(
            (
                "libxl",
                f"version {x['version']}, options {x['options']:#x}"
                f"{' (converted from legacy)' if x['legacy'] else ''}",
            )
        )
    if r["libxc"]:
        x = r["libxc"]
        origin = (
            "converted from legacy"
            if x["converted"]
            else f"from Xen {x['xen_major']}.{x['xen_minor']}"
        )
        extra = f", {x['pv_width'] * 8}-bit PV, {x['pv_levels']} levels" if x["pv_width"] else ""
        rows.append(("libxc", f"v{x['version']}, {origin}{extra}, image at offset {x['offset']}"))
    if r["legacy"]:
        lg = r["legacy"]
        guessed = " (guessed)" if lg["guessed"] else ""
        rows.append(
            (
                "legacy",
                f"{lg['width']}-bit toolstack{guessed}, p2m_size "
                f"{lg['p2m_size']:#x}, {lg['batches']} batches, "
                f"{lg['images']} image(s)",
            )
        )
        if lg["qemu_signature"]:
            rows.append(("qemu", f"{lg['qemu_signature']}, {lg['qemu_len']} bytes"))
        if lg["chunks"]:
            rows.append(("chunks", ", ".join(f"{k} {v}" for k, v in lg["chunks"].items())))
        rows.append(("LAST_CHECKPOINT", "present" if lg["last_checkpoint_seen"] else "absent"))
    p = r["pages"]
    if r["legacy"]:
        rows.append(
            (
                "pages",
                f"{p['data']} with data, {p['entries']} entries, pfns "
                f"{_hex(p['min_pfn'])}..{_hex(p['max_pfn'])}",
            )
        )
    else:
        rows.append(
            (
                "pages",
                f"{p['data']} with data ({p['unique']} distinct pfns), "
                f"{p['entries']} entries ({p['xtab']} XTAB, {p['broken']} "
                f"broken, {p['xalloc']} XALLOC), pfns {_hex(p['min_pfn'])}.."
                f"{_hex(p['max_pfn'])}, largest record {p['max_batch']} pfns",
            )
        )
    if r["checkpoints"] or r["stream_type"] != "plain":
        dropped = r["discarded_records"]
        rows.append(
            (
                "checkpoints",
                f"{r['checkpoints']}, ended by {r['ended'] or '-'}"
                + (f", {dropped} records discarded" if dropped else ""),
            )
        )
    if r["qemu_trailer_len"] is not None:
        rows.append(("qemu trailer", f"DeviceModelRecord0002, {r['qemu_trailer_len']} bytes"))
    width = max(len(k) for k, _ in rows)
    out = [f"{k:<{width}}  {v}" for k, v in rows]

    recs: list[tuple[str, str, int, int]] = []
    for layer in ("libxl", "libxc"):
        if r[layer]:
            for name, e in r[layer]["records"].items():
                recs.append((layer, name, e["count"], e["bytes"]))
    if r["libxc"] and r["libxc"]["optional"]["count"]:
        o = r["libxc"]["optional"]
        recs.append(("libxc", "(optional records)", o["count"], o["bytes"]))
    if recs:
        out.append("")
        out.append(f"{'layer':<6} {'record':<26} {'count':>8} {'bytes':>14}")
        out.extend(f"{a:<6} {b:<26} {c:>8} {d:>14}" for a, b, c, d in recs)
    for w in r["warnings"]:
        out.append(f"warning: {w}")
    if r["error"]:
        out.append(f"error: {_problem(r)}")
    return "\n".join(out)


def _signals_end_the_command() -> None:
    """inspect, verify and convert spend their time in one native call, which
    Python's SIGINT handler cannot interrupt (it runs only once the call has
    returned, and a read blocked on a pipe never returns).  So SIGINT keeps
    its default action, like SIGTERM and SIGHUP: the command ends at once, and
    leaves nothing behind (convert's output has no name until it is complete:
    files.write_atomically)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _scan_command(args: argparse.Namespace, cmd: str) -> int:
    """inspect (the report: a table or JSON) and verify (a line; JSON with --json)."""
    _signals_end_the_command()
    label = _label(args.stream)
    try:
        r = _scan(args)
    except OSError as e:
        return _oserror(cmd, e, label)
    if args.json:
        sys.stdout.write(_json(r) + "\n")
    elif cmd == "inspect":
        sys.stdout.write(format_table(r, label) + "\n")
    if not r["valid"]:
        _err(cmd, f"{label}: {_problem(r)}")
        return EXIT_INVALID
    if cmd == "verify" and not args.json and not args.quiet:
        sys.stdout.write(f"{label}: valid {_summary(r)}\n")
    return 0


def do_inspect(args: argparse.Namespace) -> int:
    return _scan_command(args, "inspect")


def do_verify(args: argparse.Namespace) -> int:
    return _scan_command(args, "verify")


# ----------------------------------------------------------------- convert


_WRITE_ONLY_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EPIPE})


def do_convert(args: argparse.Namespace) -> int:
    _signals_end_the_command()
    src: str | int = 0 if args.legacy == "-" else args.legacy
    dst: str | int = 1 if args.out == "-" else args.out
    if dst == 1:
        sys.stdout.flush()
    try:
        res = streamtools.convert(
            src,
            dst,
            args.width,
            args.guest,
            args.fmt,
            args.xl,
            xl_out=args.xl_out,
            stream_type=args.stream_type,
            skip_qemu=args.skip_qemu,
        )
    except StreamError as e:
        _err("convert", f"{_label(args.legacy)}: {e}")
        return EXIT_INVALID
    except OSError as e:
        # The native converter reads LEGACY and writes OUT through one call;
        # errors only a write can have are OUT's.
        if e.errno in _WRITE_ONLY_ERRNOS:
            return _oserror("convert", e, _label(args.out, "<stdout>"))
        return _oserror("convert", e, _label(args.legacy))
    except ValueError as e:
        _err("convert", str(e))
        return EXIT_USAGE
    if res.failover:
        _err("convert", f"warning: {res.failover}")
    # Statistics go to stderr when the stream itself goes to stdout.
    stream = sys.stderr if dst == 1 else sys.stdout
    if args.json:
        stream.write(
            _json(
                {
                    "in_bytes": res.in_bytes,
                    "out_bytes": res.out_bytes,
                    "pages": res.pages,
                    "vcpus": res.vcpus,
                    "checkpoints": res.checkpoints,
                    "failover": res.failover,
                    "legacy": res.legacy,
                }
            )
            + "\n"
        )
    elif dst != 1:
        stream.write(
            f"{_label(args.legacy)} -> {args.out}: {res.pages} pages, "
            f"{res.in_bytes} bytes in, {res.out_bytes} bytes out ({args.fmt})\n"
        )
    unread = res.legacy.get("unread_bytes", 0)
    if unread:
        _err("convert", f"note: {unread} bytes after the legacy image were left unread")
    return 0


def _fast_args(argv: Sequence[str]) -> argparse.Namespace | None:
    """A well-formed ``inspect|verify`` command line, read without argparse
    (argparse, with the gettext, locale and shutil it loads, costs more than
    scanning a 1 GiB image); None for anything else -- help, an unknown or
    abbreviated option, a bad value, a missing or extra argument -- which
    then goes to argparse, whose messages and exit codes are the reference."""
    from types import SimpleNamespace

    command = argv[0]
    opts = _SCAN_OPTS + (_VERIFY_OPTS if command == "verify" else ())
    by_flag = {flag: opt for opt in opts for flag in opt[0]}
    values: dict[str, object] = {opt[1]: opt[4] for opt in opts}
    stream = None
    i = 1
    while i < len(argv):
        tok = argv[i]
        i += 1
        if tok == "-" or not tok.startswith("-"):
            if stream is not None:
                return None
            stream = tok
            continue
        flag, eq, value = tok.partition("=")
        opt = by_flag.get(flag)
        if opt is None:
            return None
        _flags, dest, kind, choices, _default, _help = opt
        if kind is bool:
            if eq:
                return None
            values[dest] = True
            continue
        if not eq:
            if i == len(argv) or argv[i].startswith("-"):
                return None
            value = argv[i]
            i += 1
        if kind is int and not (value.isascii() and value.isdigit()):
            return None
        v = int(value) if kind is int else value
        if choices is None or v not in choices:
            return None
        values[dest] = v
    if stream is None:
        return None
    func = do_verify if command == "verify" else do_inspect
    ns = SimpleNamespace(command=command, func=func, stream=stream, **values)
    return ns  # type: ignore[return-value]  # the attributes an argparse.Namespace would have


def _lean_args(argv: Sequence[str]) -> argparse.Namespace | None:
    """argv parsed by this module's parsers alone; None when it is wrong."""

    from ._argparse import Parser

    class Lean(Parser):
        def error(self, message: str) -> NoReturn:
            raise UsageError(message)

    parser = Lean(prog="xcsave")
    add_parsers(parser.add_subparsers(dest="command", metavar="COMMAND"))
    try:
        return parser.parse_args(argv)
    except UsageError:
        return None


def main(argv: Sequence[str]) -> int:
    """``xcsave inspect|verify|convert ...`` (argv[0] is the command): the
    lean entry xcsave/__main__.py takes for them.  A well-formed inspect or
    verify is read by _fast_args, anything else by this module's argparse
    parsers; a command line either finds wrong goes to xcsave.cli.main,
    whose parser (every command's, and the global options) prints the usage
    error, so messages and exit codes are exactly the full CLI's.  The quiet
    logging cli.main sets up needs nothing here (a record from streamtools
    meets only the library's NullHandler, as it would meet cli's silent root
    level)."""
    args = _fast_args(argv) if argv and argv[0] in ("inspect", "verify") else None
    if args is None:
        args = _lean_args(argv)
    if args is None:
        from .cli import main as cli_main

        return cli_main(argv)
    try:
        rc: int = args.func(args)
    except (ValueError, OSError, XcsaveError, KeyboardInterrupt) as e:
        from .cli import report_failure

        return report_failure(args.command, e)
    return rc


__all__ = ["add_parsers", "do_convert", "do_inspect", "do_verify", "format_table", "main"]


if __name__ == "__main__":  # pragma: no cover - python -m xcsave.cmd_stream verify ...
    raise SystemExit(main(sys.argv[1:]))
