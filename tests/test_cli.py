"""The command line contract: save/restore through either helper, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import corpus_cases
import pytest
from conftest import XenVerify, fake_env

import xcsave


def xcsave_cli(
    *args: str | Path, env: dict[str, str] | None = None, stdin: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    # -P: import the installed xcsave, not the source tree in the cwd
    return subprocess.run(
        [sys.executable, "-P", "-m", "xcsave", *map(str, args)],
        capture_output=True,
        text=stdin is None,
        input=stdin,
        env=env,
        check=False,
        timeout=120,
    )


def test_version_lists_backends() -> None:
    r = xcsave_cli("--version")
    assert r.returncode == 0
    assert "backends: sim" in r.stdout
    assert str(xcsave.helper_path()) in r.stdout


def test_cli_choices_are_the_apis() -> None:
    """The CLI repeats the API's tuples so that it imports light; they must agree."""
    from xcsave import api, cli, migrate

    assert cli.FORMATS == api.FORMATS
    assert tuple(api.STREAM_TYPES) == cli.STREAM_TYPES
    assert cli.CHANNELS == migrate.CHANNELS


def test_save_and_restore_through_the_stock_helper(
    fakexen_lib: Path, stock_helper: Path, tmp_path: Path, xen_verify: XenVerify
) -> None:
    saved, restored = tmp_path / "s.digest", tmp_path / "r.digest"
    env = fake_env(fakexen_lib, save_digest=saved, restore_digest=restored)
    out = tmp_path / "dom7.img"
    r = xcsave_cli(
        "save",
        "--domid",
        "7",
        out,
        "--format",
        "libxc",
        "--live",
        "--dialect",
        "xen-4.17",
        "--helper",
        stock_helper,
        "--suspend-cmd",
        "true",
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert xen_verify(out, "libxc").returncode == 0
    r = xcsave_cli(
        "restore",
        out,
        "--domid",
        "8",
        "--format",
        "libxc",
        "--dialect",
        "xen-4.17",
        "--helper",
        stock_helper,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert "store_gfn=0x" in r.stdout
    assert "console_gfn=0x" in r.stdout
    assert restored.read_text() == saved.read_text()


def test_failed_save_is_one_line_with_errno_and_no_file(
    fakexen_lib: Path, stock_helper: Path, tmp_path: Path
) -> None:
    env = fake_env(fakexen_lib, fail="memory", errno="EIO")
    out = tmp_path / "dom7.img"
    r = xcsave_cli(
        "save",
        "--domid",
        "7",
        out,
        "--dialect",
        "xen-4.17",
        "--helper",
        stock_helper,
        "--suspend-cmd",
        "true",
        env=env,
    )
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("xcsave: save: ")
    assert "(EIO)" in lines[0]
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_suspend_command_failure_fails_the_save(
    fakexen_lib: Path, stock_helper: Path, tmp_path: Path
) -> None:
    r = xcsave_cli(
        "save",
        "--domid",
        "7",
        tmp_path / "o",
        "--dialect",
        "xen-4.17",
        "--helper",
        stock_helper,
        "--suspend-cmd",
        "false",
        env=fake_env(fakexen_lib),
    )
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_domid_save_without_suspend_cmd_says_so(tmp_path: Path) -> None:
    r = xcsave_cli("save", "--domid", "7", tmp_path / "o")
    assert r.returncode == 2
    assert "--suspend-cmd" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_input_names_errno(tmp_path: Path) -> None:
    r = xcsave_cli("restore", tmp_path / "nope.img", "--domid", "3")
    assert r.returncode == 1
    assert "(ENOENT)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_save_to_stdout(fakexen_lib: Path, stock_helper: Path, tmp_path: Path) -> None:
    """OUT may be '-': the stream goes to stdout (the helper gets it as an fd > 2)."""
    out = tmp_path / "via-stdout.img"
    with out.open("wb") as f:
        r = subprocess.run(
            [
                sys.executable,
                "-P",
                "-m",
                "xcsave",
                "save",
                "--domid",
                "7",
                "-",
                "--dialect",
                "xen-4.17",
                "--helper",
                str(stock_helper),
                "--suspend-cmd",
                "true",
            ],
            stdout=f,
            stderr=subprocess.PIPE,
            env=fake_env(fakexen_lib),
            check=False,
            timeout=120,
        )
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\xff" * 8  # the libxc image marker


def test_restore_from_stdin(fakexen_lib: Path, stock_helper: Path, tmp_path: Path) -> None:
    img = tmp_path / "dom.img"
    env = fake_env(fakexen_lib)
    assert (
        xcsave_cli(
            "save",
            "--domid",
            "7",
            img,
            "--dialect",
            "xen-4.17",
            "--helper",
            stock_helper,
            "--suspend-cmd",
            "true",
            env=env,
        ).returncode
        == 0
    )
    with img.open("rb") as f:
        r = subprocess.run(
            [
                sys.executable,
                "-P",
                "-m",
                "xcsave",
                "restore",
                "-",
                "--domid",
                "9",
                "--dialect",
                "xen-4.17",
                "--helper",
                str(stock_helper),
            ],
            stdin=f,
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=120,
        )
    assert r.returncode == 0, r.stderr
    assert "store_gfn=" in r.stdout


@pytest.mark.parametrize("progress", ["plain", "json"])
def test_progress_modes(
    progress: str, fakexen_lib: Path, stock_helper: Path, tmp_path: Path
) -> None:
    r = xcsave_cli(
        "save",
        "--domid",
        "7",
        tmp_path / "o",
        "--dialect",
        "xen-4.17",
        "--helper",
        stock_helper,
        "--suspend-cmd",
        "true",
        "--progress",
        progress,
        env=fake_env(fakexen_lib),
    )
    assert r.returncode == 0, r.stderr
    if progress == "json":
        import json

        events = [json.loads(line) for line in r.stdout.splitlines()]
        kinds = {e["event"] for e in events}
        assert {"progress", "done"} <= kinds
        assert events[-1]["ok"] is True
    else:
        assert "done in" in r.stderr


def test_no_env_leak_of_helper_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XCSAVE_HELPER", raising=False)
    assert os.access(xcsave.helper_path(), os.X_OK)


# ---------------------------------------------------------------- the lean path

# What `xcsave inspect|verify|convert` must not import (xcsave/__main__.py
# sends them to cmd_stream.main): checked structurally with -X importtime,
# never by timing.  Modules that site imports before us do not count.
HEAVY = {
    "asyncio",
    "logging",
    "typing",
    "dataclasses",
    "inspect",
    "json",
    "tempfile",
    "subprocess",
    "rich",
    "xcsave.cli",
    "xcsave.api",
    "xcsave.supervisor",
    "xcsave.migrate",
    "xcsave.proto",
    "xcsave.policy",
    "xcsave.progress",
    "xcsave.cmd_bench",
    "xcsave.cmd_migrate",
    "xcsave.cmd_sim",
    "xcsave._streamtypes",
}


def imported_after_site(*args: str | Path) -> set[str]:
    r = subprocess.run(
        [sys.executable, "-P", "-X", "importtime", "-m", "xcsave", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
        timeout=60,
    )
    names = [
        line.rsplit("|", 1)[1].strip()
        for line in r.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    ]
    assert "site" in names, r.stderr[-500:]  # the top-level `site` import closes its block
    after = names[len(names) - names[::-1].index("site") :]
    assert "xcsave.cmd_stream" in after and "xcsave._ext" in after, after
    return {n.split(".")[0] if not n.startswith("xcsave") else n for n in after} | set(after)


def stream_case(name: str) -> bytes:

    return next(c.data for c in corpus_cases.cases() if c.name == name)


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_stream_commands_start_lean(command: str, tmp_path: Path) -> None:
    img = tmp_path / "hvm.libxc"
    img.write_bytes(stream_case("libxc-v3-hvm"))
    mods = imported_after_site(
        command, img, "--format=libxc", "--stream-type", "plain", "--allow-trailing"
    )
    # A well-formed command line is read without argparse (cmd_stream._fast_args).
    assert not mods & (HEAVY | {"argparse", "gettext", "locale", "shutil"}), sorted(
        mods & (HEAVY | {"argparse", "gettext", "locale", "shutil"})
    )


def test_convert_starts_lean(tmp_path: Path) -> None:
    leg = tmp_path / "hvm.legacy"
    leg.write_bytes(stream_case("legacy-hvm-0002"))
    mods = imported_after_site("convert", leg, "-", "--width", "64", "--guest", "hvm")
    # the result type (a dataclass) is convert's; the rest stays out
    assert not mods & (HEAVY - {"dataclasses", "inspect", "xcsave._streamtypes"}), sorted(
        mods & HEAVY
    )


FULL_CLI = "import sys; from xcsave.cli import main; sys.exit(main(sys.argv[1:]))"


def run_bytes(*argv: str | Path) -> tuple[int, bytes, bytes]:
    r = subprocess.run(
        [sys.executable, "-P", *map(str, argv)], capture_output=True, check=False, timeout=60
    )
    return r.returncode, r.stdout, r.stderr


def test_lean_path_behaves_as_the_full_cli(tmp_path: Path) -> None:
    good, bad, leg = tmp_path / "good", tmp_path / "bad", tmp_path / "leg"
    good.write_bytes(stream_case("libxl-hvm"))
    bad.write_bytes(stream_case("bad-padding"))
    leg.write_bytes(stream_case("legacy-hvm-xend"))
    runs: list[tuple[str | Path, ...]] = [
        ("verify", good),
        ("verify", "-q", good),
        ("verify", "--json", good),
        ("verify", bad),
        ("verify", tmp_path / "missing"),
        ("verify", "--format", "nope", good),
        ("verify", "--help"),
        ("verify",),
        ("verify", "--format=libxl", "--stream-type", "plain", good, "--allow-trailing"),
        ("verify", "--width", "64", "--guest", "hvm", "-q", good),
        ("verify", "--width", "33", good),
        ("verify", "--width", "\N{FULLWIDTH DIGIT SIX}\N{FULLWIDTH DIGIT FOUR}", good),
        ("verify", "--form", "libxl", good),  # an abbreviation: argparse's to judge
        ("verify", "--json=yes", good),
        ("verify", "-qx", good),
        ("verify", good, good),
        ("verify", "--format", good),
        ("verify", "--", good),
        ("inspect", "-q", good),
        ("inspect", "--stream-type=remus", good),
        ("inspect", good),
        ("inspect", "--json", bad),
        ("convert", leg, "-", "--width", "64", "--guest", "hvm", "--json"),
        ("convert", leg, tmp_path / "out", "--width", "64", "--guest", "hvm"),
        ("convert", good, "-", "--width", "64", "--guest", "hvm"),
        ("convert", leg, "-", "--width", "64", "--guest", "hvm", "--xl-out"),
        ("convert", "--help"),
    ]
    for args in runs:
        lean = run_bytes("-m", "xcsave", *args)  # xcsave/__main__.py: cmd_stream.main
        full = run_bytes("-c", FULL_CLI, *args)  # every parser, logging set up
        assert lean == full, args
        rc, _out, err = lean
        if rc:
            assert len(err.splitlines()) == 1 or b"usage:" in err, err
