"""The CLI's argument parsers: help lines that say their defaults.

Its own module, importing nothing but argparse, so that the lean path of
inspect/verify/convert (xcsave/cmd_stream.py) parses with the same class.
"""

from __future__ import annotations

import argparse
from typing import Any


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help line says its default, unless it says one already
    or there is none to say (None, a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or isinstance(action, argparse._CountAction)  # -v: none means quiet
            or not action.option_strings
        ):
            return text
        shown = (
            "%(default)s" if not isinstance(default, list | tuple) else " ".join(map(str, default))
        )
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    """The CLI's parsers (subcommands too: add_subparsers makes more of this
    class): help lines that say their defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
