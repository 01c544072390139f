"""CLI: ``xcsave skeleton make|inflate|show|compare`` (xcsave/skeleton.py).

Exit status: 0 success (compare: the sequences match), 1 a failure -- an
invalid stream or skeleton, an I/O error, with ONE line on stderr naming the
file and what is wrong -- or, for compare, sequences that differ (the
differences on stdout), 2 bad usage.  Never a traceback, and never a
partial output file (make and inflate write whole or not at all).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import formats
from .cmd_stream import _STREAM_TYPE_OPT, _add_opts, _ScanOpt
from .errors import StreamError, oserror_text

EXIT_FAILED = 1
EXIT_DIFFERENT = 1
MAX_DIFFS = 50  # compare prints at most this many lines of differences

#: What make's --format takes: v2/v3 streams (a legacy one has no skeleton).
MAKE_FORMATS = ("auto", *formats.STREAM)
#: make's options, declared as verify's (whose --stream-type it shares).
_MAKE_OPTS: tuple[_ScanOpt, ...] = (
    (("--format",), "fmt", str, MAKE_FORMATS, "auto", "stream format (default: detect)"),
    _STREAM_TYPE_OPT,
)


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("skeleton", help="stream skeletons: a stream without its page contents")
    ss = p.add_subparsers(dest="skeleton_command", metavar="SKELCOMMAND", required=True)

    m = ss.add_parser("make", help="make the skeleton of a saved stream")
    m.add_argument("stream", metavar="IN", help="a saved stream (a regular file)")
    m.add_argument("out", metavar="OUT", help="the skeleton to write (0600, whole or not at all)")
    _add_opts(m, _MAKE_OPTS)
    m.add_argument("--json", action="store_true", help="print the skeleton's summary as JSON")
    m.set_defaults(func=do_make)

    i = ss.add_parser("inflate", help="write the stream a skeleton stands for")
    i.add_argument("skeleton", metavar="SKEL", help="a skeleton")
    i.add_argument("out", metavar="OUT", help="the stream to write (0600, whole or not at all)")
    i.set_defaults(func=do_inflate)

    s = ss.add_parser("show", help="a skeleton's headers and record sequence")
    s.add_argument("skeleton", metavar="SKEL", help="a skeleton (or a stream)")
    s.add_argument("--json", action="store_true", help="everything, every record, as JSON")
    s.set_defaults(func=do_show)

    c = ss.add_parser("compare", help="where two skeletons' record sequences differ")
    for side in ("a", "b"):  # two operands alike
        c.add_argument(side, metavar=side.upper(), help="a skeleton (or a stream)")
    c.add_argument(
        "--pages",
        action="store_true",
        help="also compare every PAGE_DATA record (pfns, pages, length; default: runs only)",
    )
    c.add_argument("--json", action="store_true", help="the differences as a JSON list")
    c.set_defaults(func=do_compare)


def _fail(cmd: str, path: str, e: BaseException) -> int:
    if isinstance(e, OSError):
        text = oserror_text(e, filename=False) if e.errno else str(e)
    else:
        text = str(e)
    sys.stderr.write(f"xcsave: skeleton {cmd}: {path}: {text}\n")
    return EXIT_FAILED


def do_make(args: argparse.Namespace) -> int:
    from .cmd_stream import _signals_end_the_command
    from .skeleton import make_skeleton

    _signals_end_the_command()
    try:
        skel = make_skeleton(args.stream, args.out, args.fmt, args.stream_type)
    except StreamError as e:
        return _fail("make", args.stream, e)
    except OSError as e:
        return _fail("make", e.filename if e.filename is not None else args.stream, e)
    if args.json:
        sys.stdout.write(json.dumps(skel.to_json(records=False), indent=2) + "\n")
    else:
        import os

        size = os.stat(args.out).st_size
        sys.stdout.write(
            f"{args.stream} -> {args.out}: {skel.format} stream of {skel.stream_size} bytes, "
            f"{len(skel.records)} records, {skel.pages} pages; skeleton {size} bytes\n"
        )
    return 0


def do_inflate(args: argparse.Namespace) -> int:
    from .cmd_stream import _signals_end_the_command
    from .skeleton import inflate, load_skeleton

    _signals_end_the_command()
    try:
        skel = load_skeleton(args.skeleton)
    except (StreamError, OSError) as e:
        return _fail("inflate", args.skeleton, e)
    try:
        size = inflate(skel, args.out)
    except (StreamError, OSError) as e:
        return _fail("inflate", args.out, e)
    sys.stdout.write(
        f"{args.skeleton} -> {args.out}: {skel.format} stream of {size} bytes, "
        f"{len(skel.records)} records, {skel.pages} pages\n"
    )
    return 0


def do_show(args: argparse.Namespace) -> int:
    from .skeleton import format_show, load_skeleton

    try:
        skel = load_skeleton(args.skeleton)
    except (StreamError, OSError) as e:
        return _fail("show", args.skeleton, e)
    if args.json:
        sys.stdout.write(json.dumps(skel.to_json(), indent=2) + "\n")
    else:
        sys.stdout.write(format_show(skel, args.skeleton) + "\n")
    return 0


def do_compare(args: argparse.Namespace) -> int:
    from .skeleton import compare, load_skeleton

    loaded = []
    for path in (args.a, args.b):
        try:
            loaded.append(load_skeleton(path))
        except (StreamError, OSError) as e:
            return _fail("compare", path, e)
    diffs = compare(loaded[0], loaded[1], pages=args.pages)
    if args.json:
        sys.stdout.write(json.dumps(diffs, indent=2) + "\n")
    elif diffs:
        sys.stdout.write(f"A: {args.a}\nB: {args.b}\n")
        for line in diffs[:MAX_DIFFS]:
            sys.stdout.write(line + "\n")
        if len(diffs) > MAX_DIFFS:
            sys.stdout.write(f"... and {len(diffs) - MAX_DIFFS} more\n")
    else:
        sys.stdout.write(f"{args.a} and {args.b}: the same record sequence\n")
    return EXIT_DIFFERENT if diffs else 0


__all__ = ["add_parsers", "do_compare", "do_inflate", "do_make", "do_show"]
