"""Restore detects the format as inspect, verify and receive do (issue 15,
item 1): an image saved with --format xl or libxl restores without --format;
a legacy image without --legacy gets the flags to add; a --format that the
file contradicts is refused before anything is built."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_cli import xcsave_cli

import xcsave
from xcsave import api, corpus


@pytest.fixture
def env(sim_env: dict[str, str]) -> dict[str, str]:
    return sim_env


def _ok(*args: str | Path, env: dict[str, str], stdin: bytes | None = None) -> str:
    r = xcsave_cli(*args, env=env, stdin=stdin)
    out = r.stdout if isinstance(r.stdout, str) else r.stdout.decode()
    err = r.stderr if isinstance(r.stderr, str) else r.stderr.decode()
    assert r.returncode == 0, err
    return out


@pytest.mark.parametrize("fmt", ["xl", "libxl", "libxc"])
def test_restore_without_format_reads_what_the_file_is(
    fmt: str, tmp_path: Path, env: dict[str, str]
) -> None:
    _ok("sim", "create", "a", "--memory", "4M", "--seed", "3", env=env)
    img = tmp_path / f"a.{fmt}"
    _ok("save", "--sim", "a", "--format", fmt, img, env=env)
    _ok("restore", img, "--sim", "b", env=env)
    assert _ok("sim", "digest", "a", env=env) == _ok("sim", "digest", "b", env=env)
    # The same bytes through a pipe: a pipe cannot be peeked at, so its
    # format is what --format says (auto reads a pipe as libxc).
    _ok("restore", "-", "--sim", "c", "--format", fmt, env=env, stdin=img.read_bytes())
    assert _ok("sim", "digest", "c", env=env) == _ok("sim", "digest", "a", env=env)


def test_a_contradicting_format_is_refused_with_the_right_flag(
    tmp_path: Path, env: dict[str, str]
) -> None:
    _ok("sim", "create", "a", "--memory", "4M", env=env)
    img = tmp_path / "a.xl"
    _ok("save", "--sim", "a", "--format", "xl", img, env=env)
    r = xcsave_cli("restore", img, "--sim", "b", "--format", "libxc", env=env)
    assert r.returncode == 1
    assert r.stderr == (
        f"xcsave: restore: {img}: an xl stream, not libxc: restore it with --format xl "
        "(or --format auto)\n"
    )
    assert not (tmp_path / "sim" / "b").exists()


def test_a_legacy_image_without_legacy_says_which_flags(
    tmp_path: Path, env: dict[str, str]
) -> None:
    leg = tmp_path / "old.img"
    leg.write_bytes(corpus.tiny_legacy("hvm", 64).build())
    r = xcsave_cli("restore", leg, "--sim", "b", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [
        f"xcsave: restore: {leg}: not an xl, libxl or libxc stream; if it is a pre-4.6 "
        "(legacy) image, restore it with --legacy --width 32|64 --guest pv|hvm"
    ]
    _ok("restore", leg, "--sim", "b", "--legacy", "--width", "64", "--guest", "hvm", env=env)


def test_a_short_file_is_refused_in_one_line(tmp_path: Path, env: dict[str, str]) -> None:
    short = tmp_path / "short"
    short.write_bytes(b"Xen")
    r = xcsave_cli("restore", short, "--sim", "b", env=env)
    assert r.returncode == 1
    assert r.stderr == f"xcsave: restore: {short}: 3 bytes: too short for a stream\n"


def test_the_api_detects_from_an_fd_without_moving_it(tmp_path: Path) -> None:
    img = tmp_path / "x"
    img.write_bytes(b"junk" + corpus.libxl_stream(corpus.libxc_hvm(2)))
    with open(img, "rb") as f:
        f.seek(4)
        assert api.restore_format(f.fileno(), "auto", legacy=False, name="x") == "libxl"
        assert f.tell() == 4
    with pytest.raises(xcsave.StreamError):
        with open(img, "rb") as f:  # at offset 0: "junk..." has no magic
            api.restore_format(f.fileno(), "auto", legacy=False, name="x")


def test_sim_legacy_image_gives_an_image_convert_and_restore_take(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """The legacy corpus ships in the package (issue 15, item 9): an installed
    xcsave writes an image to try convert on, privately and whole."""
    leg = tmp_path / "old.img"
    out = _ok("sim", "legacy-image", leg, "--memory", "2M", env=env)
    assert "--width 64 --guest hvm" in out
    assert (leg.stat().st_mode & 0o777) == 0o600
    _ok("convert", leg, tmp_path / "new.img", "--width", "64", "--guest", "hvm", env=env)
    _ok("verify", tmp_path / "new.img", env=env)
    _ok("restore", leg, "--sim", "b", "--legacy", "--width", "64", "--guest", "hvm", env=env)
