"""``python -m xcsave`` and the ``xcsave`` console script."""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

# `xcsave inspect|verify|convert` take a lean path (xcsave/cmd_stream.py
# main): argparse, the stream tools and the extension, nothing else -- not
# the API, asyncio, logging, rich or the other commands' parsers -- so that
# verifying a whole image costs little more than the interpreter's start.
# Only when the command comes first: global options (-v, --log-level)
# before it go the full way, through xcsave.cli.
LEAN_COMMANDS = frozenset(("inspect", "verify", "convert"))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = sys.argv[1:] if argv is None else list(argv)
        if args and args[0] in LEAN_COMMANDS:
            from .cmd_stream import main as stream_main

            return stream_main(args)
        from .cli import main as cli_main

        return cli_main(argv)
    except KeyboardInterrupt:
        # Ctrl-C while the command starts (its imports, its parsers), before
        # it has anything to clean up: the line every interrupted command
        # prints, not a traceback.
        sys.stderr.write("xcsave: interrupted\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
