"""CLI: ``xcsave inspect``, ``xcsave verify`` and ``xcsave convert``.

Exit status: 0 success (a valid stream), 1 an invalid or unconvertible
stream, with ONE line on stderr saying where (offset, record) and why, 2 bad
usage or an I/O error, with the errno name.  Never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from . import streamtools
from .errors import StreamError, XcsaveError, errno_name

# `xcsave inspect|verify|convert` run from main() below, straight from
# xcsave/__main__.py: this module, argparse, streamtools and the extension
# are all they import (no typing, json, logging, asyncio or the other
# commands); tests/test_cli.py checks that structurally.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

EXIT_INVALID = 1
EXIT_USAGE = 2


def add_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("stream", metavar="STREAM", help="stream file, or - for stdin")
    common.add_argument(
        "--format",
        dest="fmt",
        choices=streamtools.FORMATS,
        default="auto",
        help="stream format (default: detect)",
    )
    common.add_argument(
        "--stream-type",
        choices=streamtools.STREAM_TYPES,
        default="plain",
        help="checkpointed or not: the caller says, never the stream",
    )
    common.add_argument(
        "--width",
        type=int,
        choices=(32, 64),
        help="legacy streams: toolstack word size (default: guess)",
    )
    common.add_argument(
        "--guest", choices=("pv", "hvm"), help="legacy streams: guest type (default: guess)"
    )
    common.add_argument(
        "--allow-trailing",
        action="store_true",
        help="bytes after the outermost END are not an error",
    )
    common.add_argument("--json", action="store_true", help="print the report as JSON")

    p = sub.add_parser("inspect", parents=[common], help="describe a migration stream")
    p.set_defaults(func=do_inspect)

    p = sub.add_parser("verify", parents=[common], help="verify a migration stream")
    p.add_argument("-q", "--quiet", action="store_true", help="no output when valid")
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
    p.add_argument("--guest", choices=("pv", "hvm"), required=True)
    p.add_argument(
        "--format",
        dest="fmt",
        choices=("libxc", "libxl"),
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
        choices=("plain", "remus"),
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
    what = e.strerror or str(e)
    _err(cmd, f"{name}: {what} ({errno_name(e.errno)})" if e.errno else f"{name}: {what}")
    return EXIT_USAGE


def _source(path: str) -> str | int:
    return 0 if path == "-" else path


def _label(path: str) -> str:
    return "<stdin>" if path == "-" else path


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


def do_inspect(args: argparse.Namespace) -> int:
    try:
        r = _scan(args)
    except OSError as e:
        return _oserror("inspect", e, _label(args.stream))
    if args.json:
        sys.stdout.write(_json(r) + "\n")
    else:
        sys.stdout.write(format_table(r, _label(args.stream)) + "\n")
    if not r["valid"]:
        _err("inspect", f"{_label(args.stream)}: {_problem(r)}")
        return EXIT_INVALID
    return 0


def do_verify(args: argparse.Namespace) -> int:
    try:
        r = _scan(args)
    except OSError as e:
        return _oserror("verify", e, _label(args.stream))
    if args.json:
        sys.stdout.write(_json(r) + "\n")
    if not r["valid"]:
        _err("verify", f"{_label(args.stream)}: {_problem(r)}")
        return EXIT_INVALID
    if not args.json and not args.quiet:
        sys.stdout.write(f"{_label(args.stream)}: valid {_summary(r)}\n")
    return 0


# ----------------------------------------------------------------- convert


def do_convert(args: argparse.Namespace) -> int:
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


def main(argv: Sequence[str]) -> int:
    """``xcsave inspect|verify|convert ...`` (argv[0] is the command): the
    lean entry xcsave/__main__.py takes for them.  Same parser, exit codes
    and one-line errors as xcsave.cli.main, which would build every
    command's parser and import logging first; the quiet logging it sets up
    needs nothing here (a record from streamtools meets only the library's
    NullHandler, as it would meet cli's silent root level)."""
    parser = argparse.ArgumentParser(prog="xcsave")
    add_parsers(parser.add_subparsers(dest="command", metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except (ValueError, OSError, XcsaveError, KeyboardInterrupt) as e:
        from .cli import report_failure

        return report_failure(args.command, e)
    return rc


__all__ = ["add_parsers", "do_convert", "do_inspect", "do_verify", "format_table", "main"]


if __name__ == "__main__":  # pragma: no cover - python -m xcsave.cmd_stream verify ...
    raise SystemExit(main(sys.argv[1:]))
