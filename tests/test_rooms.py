"""Python rooms with one idea each (issue 13): every exception in errors.py,
one errno-to-text helper, one local migration, one place for each default,
and the old import paths still working."""

from __future__ import annotations

import argparse
import ast
import errno
import inspect
import re
from pathlib import Path

import pytest

import xcsave
from xcsave import cli, cli_run, defaults, errors, jobs, local, lock, migrate, policy, proto

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "xcsave"

#: Base classes that make a class an exception (by name, as the source says).
EXCEPTION_BASES = re.compile(r"(Error|Exception|Exit|Interrupt|Busy|Unavailable|Terminated)$")


def _exception_classes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        for base in node.bases:
            name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")
            if EXCEPTION_BASES.search(name):
                found.append(f"{path.name}:{node.lineno} {node.name}({name})")
    return found


def test_every_exception_is_defined_in_errors_py() -> None:
    elsewhere = [
        c
        for p in sorted(PACKAGE.glob("*.py"))
        if p.name != "errors.py"
        for c in _exception_classes(p)
    ]
    assert elsewhere == []
    assert len(_exception_classes(PACKAGE / "errors.py")) >= 15  # the scan does find them


@pytest.mark.parametrize(
    ("old", "name"),
    [
        (migrate, "MigrationError"),
        (migrate, "HandshakeError"),
        (migrate, "MigrationInDoubt"),
        (lock, "DomainBusy"),
        (cli, "UsageError"),
        (cli_run, "Terminated"),
        (xcsave, "DomainBusy"),
    ],
)
def test_exceptions_keep_their_old_import_paths(old: object, name: str) -> None:
    assert getattr(old, name) is getattr(errors, name)


def test_moved_functions_keep_their_old_import_paths() -> None:
    from xcsave import cmd_migrate

    assert migrate.run_many is jobs.run_many
    assert migrate.Outcome is jobs.Outcome and migrate.Summary is jobs.Summary
    assert migrate.migrate_local is local.migrate_local
    assert migrate.CHANNELS is local.CHANNELS is defaults.CHANNELS
    assert cmd_migrate.run_async is cli_run.run_async
    assert cmd_migrate.renderer is cli_run.renderer
    with pytest.raises(AttributeError, match="no attribute 'live_migrate_local'"):
        migrate.live_migrate_local  # noqa: B018


def test_there_is_one_local_migration() -> None:
    from xcsave import cmd_sim

    assert not hasattr(cmd_sim, "live_migrate_local")


@pytest.mark.parametrize(
    ("e", "text"),
    [
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/y"),
         "/x/y: No such file or directory (ENOENT)"),
        (OSError(errno.EBUSY, "busy here"), "busy here (EBUSY)"),
        (OSError(errno.EIO, None), f"{__import__('os').strerror(errno.EIO)} (EIO)"),
        (OSError(999, "odd"), "odd (errno 999)"),
        (OSError("no errno at all"), "no errno at all"),
    ],
)  # fmt: skip
def test_one_errno_to_text(e: OSError, text: str) -> None:
    assert errors.oserror_text(e) == text
    assert errors.error_text(e) == text
    if e.errno:  # the CLI's line says the same (without one: the class's name too)
        assert cli.describe_error(e) == text


def test_errno_text_is_what_every_error_says() -> None:
    failed = errors.HelperFailed("save failed", retval=-1, errno=errno.ENOSPC)
    assert str(failed) == f"save failed: {errors.errno_text(errno.ENOSPC)}"
    assert str(failed).endswith("(ENOSPC)")
    busy = errors.DomainBusy("vm1", 42)
    assert (
        str(busy) == "domain vm1 is busy: another xcsave operation (pid 42) holds its lock (EBUSY)"
    )
    assert errors.error_text(TimeoutError(errno.ETIMEDOUT, "late", "host:1")).endswith(
        "(ETIMEDOUT)"
    )


def test_xen_precopy_default_is_written_once() -> None:
    sig = inspect.signature(policy.xen_default)
    assert sig.parameters["max_iters"].default == defaults.XEN_MAX_ITERS
    assert sig.parameters["threshold"].default == defaults.XEN_DIRTY_THRESHOLD
    header = proto.emit_c_header()
    assert f"#define XCS_XEN_MAX_ITERS {defaults.XEN_MAX_ITERS}\n" in header
    assert f"#define XCS_XEN_DIRTY_THRESHOLD {defaults.XEN_DIRTY_THRESHOLD}\n" in header
    # No C file spells the numbers out: they come from the generated header.
    for c in [*ROOT.glob("csrc/*.c"), *ROOT.glob("csrc/core/*.c"), *ROOT.glob("csrc/*.cpp")]:
        text = c.read_text()
        assert not re.search(r"max_iters\s*=\s*\d", text), c
        assert not re.search(r"dirty_threshold\s*=\s*\d", text), c
        assert not re.search(r"\"max_iters\"_a\s*=\s*[1-9]", text), c


def test_cli_defaults_come_from_defaults_py() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("restore", "migrate", "receive"):
        args = sub.choices[command]
        idle = next(a for a in args._actions if a.dest == "idle_timeout")
        assert idle.default == defaults.IDLE_TIMEOUT, command
    for command in ("migrate", "receive"):
        hs = next(a for a in sub.choices[command]._actions if a.dest == "handshake_timeout")
        assert hs.default == defaults.HANDSHAKE_TIMEOUT, command
    # The API's defaults: one table for every entry point's **net options.
    assert migrate.NET_DEFAULTS["handshake_timeout"] == defaults.HANDSHAKE_TIMEOUT
    assert migrate.NET_DEFAULTS["idle_timeout"] == defaults.IDLE_TIMEOUT
    assert migrate.RECEIVE_DEFAULTS["idle_timeout"] == defaults.IDLE_TIMEOUT
    for fn in (migrate.migrate, migrate.receive):
        kw = inspect.signature(fn).parameters
        assert "handshake_timeout" not in kw  # not a second default to drift
        assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in kw.values()), fn


@pytest.mark.parametrize("command", ["save", "restore", "demo", "migrate", "receive"])
def test_every_command_shares_the_progress_and_logging_flags(command: str) -> None:
    """--progress, -v and --log-level after the subcommand, from cli_run; what
    ``auto`` shows off a terminal is the same for every command: nothing
    (issue 15, item 4)."""
    argv = {
        "save": ["save", "--sim", "d", "out"],
        "restore": ["restore", "in", "--sim", "d"],
        "demo": ["demo"],
        "migrate": ["migrate", "--sim", "d", "--to", "h:1"],
        "receive": ["receive", "--stdio", "--sim", "d"],
    }[command]
    args = cli.build_parser().parse_args([*argv, "-v", "--log-level", "info"])
    assert args.progress == "auto"
    assert not hasattr(args, "progress_off_tty")
    assert args.log_level == "info"
