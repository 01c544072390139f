"""Help that answers (issue 15, item 8): every option and argument of every
command has a help line, and an option with a default says it."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from test_cli import xcsave_cli

from xcsave.cli import build_parser


def _actions(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, argparse.Action]]:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _actions(sub, (*path, name))
        elif not isinstance(a, argparse._HelpAction):
            yield path, parser, a


def test_every_option_has_help_and_says_its_default() -> None:
    missing, silent = [], []
    for path, parser, a in _actions(build_parser()):
        name = " ".join((*path, *(a.option_strings or [a.dest])))
        if not a.help:
            missing.append(name)
            continue
        shown = parser._get_formatter()._get_help_string(a) or ""
        has_default = a.default is not None and a.default is not False and a.option_strings
        if has_default and not isinstance(a, argparse._CountAction) and "default" not in shown:
            silent.append(name)
    assert missing == [], f"options without a help line: {missing}"
    assert silent == [], f"options whose help hides their default: {silent}"


def test_help_names_where_a_bare_domain_lives() -> None:
    r = xcsave_cli("save", "--help")
    assert r.returncode == 0 and "$XCSAVE_SIM_DIR" in r.stdout
    assert "default: plain" in r.stdout.replace("\n", " ").replace("  ", " ")


def test_lean_commands_say_defaults_too() -> None:
    r = xcsave_cli("convert", "--help")
    assert r.returncode == 0
    assert "(default: plain)" in " ".join(r.stdout.split())


def test_dirty_on_a_suspended_domain_says_so(sim_env: dict[str, str]) -> None:
    env = sim_env
    assert xcsave_cli("sim", "create", "d", "--memory", "4M", env=env).returncode == 0
    assert xcsave_cli("sim", "suspend", "d", env=env).returncode == 0
    r = xcsave_cli("sim", "dirty", "d", "--rate", "100", "--duration", "60", env=env)
    assert r.returncode == 1
    assert r.stderr == (
        "xcsave: sim: d: the domain is suspended: its guest writes nothing until it runs "
        "(xcsave sim resume d) (EAGAIN)\n"
    )
