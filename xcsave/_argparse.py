"""The CLI's argument parsers: help lines that say their defaults.

Its own module, importing nothing but argparse, so that the lean path of
inspect/verify/convert (xcsave/cmd_stream.py) parses with the same class.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
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


_UNITS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def _size_text(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def size(lo: int = 0, hi: int | None = None, *, multiple: int = 1) -> Callable[[str], int]:
    """An argparse type: ``256M``, ``1G``, ``4096``, ``64MiB`` -> bytes, from
    ``lo`` to ``hi`` and a multiple of ``multiple``; the error says which."""

    def parse(text: str) -> int:
        m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtTpPeE]?)(i?[bB])?\s*", text)
        if not m:
            raise argparse.ArgumentTypeError(f"bad size {text!r}: expected e.g. 256M or 1G")
        n = int(m.group(1)) << _UNITS[m.group(2).lower()]
        if n < lo or (hi is not None and n > hi):
            most = f" and at most {_size_text(hi)}" if hi is not None else ""
            raise argparse.ArgumentTypeError(f"{text}: must be at least {_size_text(lo)}{most}")
        if n % multiple:
            raise argparse.ArgumentTypeError(f"{text}: must be a multiple of {multiple} bytes")
        return n

    parse.__name__ = "size"
    return parse


def rate(least: int = 0, why: str = "") -> Callable[[str], int]:
    """An argparse type: :func:`xcsave.wire.parse_rate`'s grammar (``1gbit``,
    ``100M``) -> bytes/s, at least ``least`` (``why`` says why, after the text)."""

    def parse(text: str) -> int:
        from .wire import parse_rate  # not at import: the lean path needs none of it

        try:
            value = parse_rate(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{text}: {why}")
        return value

    parse.__name__ = "rate"
    return parse


def integer(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from ``lo`` to ``hi``."""

    def parse(text: str) -> int:
        try:
            n = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < lo or (hi is not None and n > hi):
            span = f"from {lo} to {hi}" if hi is not None else f"at least {lo}"
            raise argparse.ArgumentTypeError(f"{text}: must be {span}")
        return n

    parse.__name__ = "integer"
    return parse


def seconds(*, zero: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds, above 0 (or 0 too)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not math.isfinite(v) or v < 0 or (v == 0 and not zero):
            raise argparse.ArgumentTypeError(
                f"{text}: must be {'0 or more' if zero else 'more than 0'} seconds"
            )
        return v

    parse.__name__ = "seconds"
    return parse
