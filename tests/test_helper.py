"""xcsave-helper run directly: argv, handshake, exit statuses, SIGTERM abort."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
from conftest import fake_env

import xcsave
from xcsave import proto

EXIT_FATAL = 255


def _run(
    *args: str, env: dict[str, str] | None = None, fds: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(xcsave.helper_path()), *args],
        capture_output=True,
        env=env,
        pass_fds=fds,
        stdin=subprocess.DEVNULL,
        check=False,
        timeout=60,
    )


def _frames(dialect: proto.Dialect, out: bytes, mode: str | None = None) -> list[proto.Frame]:
    dec = proto.Decoder(dialect, mode)
    dec.feed(out)
    return list(dec)


def test_version_names_protocol_table_and_backends() -> None:
    r = _run("--version")
    assert r.returncode == 0
    text = r.stdout.decode()
    assert f"protocol {proto.PROTO_VERSION}" in text
    assert f"table 0x{proto.TABLE_HASH:016x}" in text
    assert "backends sim" in text


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((), "unexpected mode"),
        (("--bogus",), "unexpected mode"),
        (("--save-domain", "5"), "takes 6 arguments"),
        (("--restore-domain", "5", "-1", "1"), "takes 9 arguments"),
        (("--save-domain", "x", "-1", "1", "0", "0", "0"), "bad <io_fd>"),
        (("--save-domain", "5", "-1", "1", "0", "0", "7"), "bad <stream_type>"),
        (("--save-domain", "5", "-1", "99999999999", "0", "0", "0"), "bad <domid>"),
        (("--save-domain", "77", "-1", "1", "0", "0", "0"), "io_fd 77 is not open"),
        (("--xcsave-1", "dance"), "needs a mode"),
        (("--xcsave-1", "save"), "--io-fd is required"),
        (("--xcsave-1", "save", "--io-fd", "5", "--format", "tar"), "bad --format"),
        (("--xcsave-1", "save", "--io-fd", "5", "--frobnicate", "2"), "unknown"),
        (("--xcsave-1", "tunnel", "--io-fd", "5"), "tunnel needs --plain-fd, --role"),
        (
            ("--xcsave-1", "tunnel", "--io-fd", "5", "--plain-fd", "6", "--role", "peer"),
            "bad --role",
        ),
        (
            ("--xcsave-1", "tunnel", "--io-fd", "5", "--plain-fd", "5", "--role", "server",
             "--tls-dir", "/x"),
            "must differ",
        ),
        (
            ("--xcsave-1", "tunnel", "--io-fd", "5", "--plain-fd", "6", "--role", "client",
             "--tls-dir", "/x"),
            "needs --peer-name",
        ),
        (
            ("--xcsave-1", "tunnel", "--io-fd", "5", "--plain-fd", "6", "--role", "server",
             "--tls-dir", "/x", "--handshake-timeout-ms", "0"),
            "bad <handshake-timeout-ms>",
        ),
        (("--xcsave-1", "save", "--io-fd", "5", "--tls-dir", "/x"), "are tunnel options"),
    ],
)  # fmt: skip
def test_bad_argv_is_one_line_and_exit_255(args: tuple[str, ...], match: str) -> None:
    r = _run(*args)
    assert r.returncode == EXIT_FATAL
    err = r.stderr.decode().strip()
    assert len(err.splitlines()) == 1
    assert match in err
    assert r.stdout == b""  # nothing on the protocol pipe


def test_xcsave1_hello_comes_first(tmp_path: Path) -> None:
    out = tmp_path / "o"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT)
    try:
        r = _run("--xcsave-1", "save", "--backend", "nope", "--io-fd", str(fd), fds=(fd,))
    finally:
        os.close(fd)
    assert r.returncode == EXIT_FATAL
    frames = _frames(proto.XCSAVE_1, r.stdout, "save")
    assert frames[0].name == "hello"
    assert frames[0].asdict() == {
        "version": proto.PROTO_VERSION,
        "table_hash": proto.TABLE_HASH,
        "backend": "nope",
        "mode": "save",
    }
    assert frames[1].name == "log"
    assert "not built into this helper" in str(frames[1].args[3])


def test_sim_backend_needs_a_domain(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "o", os.O_WRONLY | os.O_CREAT)
    try:
        r = _run("--xcsave-1", "save", "--backend", "sim", "--io-fd", str(fd), fds=(fd,))
    finally:
        os.close(fd)
    # complete() waits for a reply; stdin is /dev/null, so EOF -> 254
    assert r.returncode == 254
    frames = _frames(proto.XCSAVE_1, r.stdout, "save")
    names = [f.name for f in frames]
    assert names[0] == "hello"
    assert names[-1] == "complete"
    assert frames[-1].args[0] == -1
    assert any("needs --sim" in str(f.args[3]) for f in frames if f.name == "log")


def _xen_backend() -> None:
    if "xen" not in xcsave.backends():
        pytest.skip("xcsave-helper built without the xen backend")


def test_sigterm_during_save_fails_cleanly(fakexen_lib: Path, tmp_path: Path) -> None:
    """SIGTERM = dup2(/dev/null) over io_fd: libxc fails by itself; complete(-1, errno); exit 0."""
    _xen_backend()
    env = fake_env(fakexen_lib, pages=2048, delay_ms=50)
    out = tmp_path / "o"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT)
    try:
        proc = subprocess.Popen(
            # live (xcflags 1), suspend installed (cbflags 8)
            [str(xcsave.helper_path()), "--save-domain", str(fd), "-1", "7", "1", "8", "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(fd,),
            env=env,
        )
    finally:
        os.close(fd)
    with proc:
        assert proc.stdout is not None and proc.stdin is not None
        dec = proto.Decoder(proto.XEN_417, "save")
        sent_term = False
        frames: list[proto.Frame] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            dec.feed(chunk)
            for f in dec:
                frames.append(f)
                if f.name == "progress" and not sent_term and f.args[2]:
                    proc.send_signal(signal.SIGTERM)
                    sent_term = True
                if f.name in ("complete", "suspend"):
                    proc.stdin.write(struct.pack("=i", 1))
                    proc.stdin.flush()
        rc = proc.wait(timeout=30)
    assert sent_term
    complete = [f for f in frames if f.name == "complete"]
    assert complete, [f.name for f in frames]
    assert complete[0].args[0] == -1
    assert complete[0].args[1] != 0
    assert rc == 0


def test_xen_argv_reaches_the_xen_backend(fakexen_lib: Path, tmp_path: Path) -> None:
    """The 4.17 layout with cbflags=0: no callbacks are asked; libxc's own logs relayed."""
    _xen_backend()
    out = tmp_path / "o"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT)
    try:
        r = subprocess.run(
            [str(xcsave.helper_path()), "--save-domain", str(fd), "-1", "7", "0", "0", "0"],
            input=struct.pack("=i", 0),
            capture_output=True,
            pass_fds=(fd,),
            env=fake_env(fakexen_lib),
            check=False,
            timeout=60,
        )
    finally:
        os.close(fd)
    frames = _frames(proto.XEN_417, r.stdout, "save")
    # no suspend callback installed: fakexen (like libxc) fails the save
    assert frames[0].name == "log"
    assert frames[0].args[2:] == ("xcsave-helper", "starting save")
    assert frames[-1].name == "complete"
    assert r.returncode == 0


@pytest.mark.parametrize("kind", ["other-file", "symlink", "missing", "restore"])
def test_out_tmp_must_be_the_stream_file(tmp_path: Path, kind: str) -> None:
    """--out-tmp names the file the helper may remove: refused (exit 255, one
    line, nothing touched) unless it is the very file behind --io-fd, not
    through a symlink; and it is a save option."""
    stream = tmp_path / "stream"
    other = tmp_path / "other"
    other.write_bytes(b"keep")
    dom = tmp_path / "dom"
    fd = os.open(stream, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if kind == "symlink":
            path = tmp_path / "link"
            path.symlink_to(stream)
        else:
            path = {"other-file": other, "missing": tmp_path / "nope"}.get(kind, stream)
        mode = "restore" if kind == "restore" else "save"
        r = _run(
            "--xcsave-1",
            mode,
            "--io-fd",
            str(fd),
            "--sim",
            str(dom),
            "--out-tmp",
            str(path),
            fds=(fd,),
        )
    finally:
        os.close(fd)
    assert r.returncode == EXIT_FATAL
    assert len(r.stderr.decode().strip().splitlines()) == 1, r.stderr
    assert b"--out-tmp" in r.stderr
    assert r.stdout == b""  # refused before hello: nothing was started
    assert stream.exists() and other.read_bytes() == b"keep" and not dom.exists()
