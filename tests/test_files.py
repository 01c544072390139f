"""xcsave/files.py: private files (0600 exactly, O_EXCL|O_NOFOLLOW|O_CLOEXEC)
and private directories (0700; a symlink, another owner, a group- or
world-writable mode refused), and the sim directory that uses them."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from xcsave import files

NOBODY = 65534
XCSAVE = [sys.executable, "-P", "-m", "xcsave"]
LEGACY_HVM = ["--legacy", "--width", "64", "--guest", "hvm"]


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


# ------------------------------------------------------------ private files


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o277, 0o777])
def test_create_private_is_0600_whatever_the_umask(tmp_path: Path, mask: int) -> None:
    p = tmp_path / "f"
    with umask(mask):
        fd = files.create_private(p, os.O_RDWR)
    try:
        assert mode(p) == 0o600
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        os.write(fd, b"guest")
    finally:
        os.close(fd)
    assert p.read_bytes() == b"guest"


def test_create_private_refuses_an_existing_file(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"theirs")
    with pytest.raises(FileExistsError):
        files.create_private(p)
    assert p.read_bytes() == b"theirs"


def test_create_private_refuses_a_planted_symlink(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"victim")
    os.chmod(target, 0o644)
    link = tmp_path / "f"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        files.create_private(link)
    assert target.read_bytes() == b"victim"
    assert mode(target) == 0o644


def test_create_private_refuses_a_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "f"
    link.symlink_to(tmp_path / "would-be-created")
    with pytest.raises(FileExistsError):
        files.create_private(link)
    assert not (tmp_path / "would-be-created").exists()
    assert link.is_symlink()


def test_create_private_temp_names_are_new_and_private(tmp_path: Path) -> None:
    seen = set()
    with umask(0):
        for _ in range(20):
            fd, path = files.create_private_temp(tmp_path, ".x-", ".tmp")
            os.close(fd)
            p = Path(path)
            assert p.parent == tmp_path
            assert p.name.startswith(".x-") and p.name.endswith(".tmp")
            assert mode(p) == 0o600
            seen.add(path)
    assert len(seen) == 20


# ------------------------------------------------------ private directories


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o777])
def test_private_dir_is_created_0700(tmp_path: Path, mask: int) -> None:
    d = tmp_path / "a" / "b" / "sim"
    with umask(mask):
        assert files.private_dir(d) == d
    assert d.is_dir()
    assert mode(d) == 0o700
    files.check_private_dir(d)  # and accepted the second time
    files.private_dir(d)


def test_private_dir_accepts_an_existing_0755_dir_unchanged(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    os.chmod(d, 0o755)
    files.private_dir(d)
    assert mode(d) == 0o755


def test_private_dir_refuses_a_symlink_to_a_good_dir(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "sim"
    link.symlink_to(real)
    with pytest.raises(PermissionError, match="symlink") as e:
        files.private_dir(link)
    assert e.value.errno == errno.EPERM
    with pytest.raises(PermissionError, match="symlink"):
        files.check_private_dir(link)


def test_private_dir_refuses_a_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "sim"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PermissionError, match="symlink"):
        files.private_dir(link)
    assert not (tmp_path / "elsewhere").exists()


@needs_root
def test_private_dir_refuses_another_owner(tmp_path: Path) -> None:
    d = tmp_path / "sim"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, -1)
    with pytest.raises(PermissionError, match=f"owned by uid {NOBODY}") as e:
        files.private_dir(d)
    assert e.value.errno == errno.EPERM


@pytest.mark.parametrize("bad", [0o777, 0o770, 0o702, 0o1777])
def test_private_dir_refuses_group_or_world_writable(tmp_path: Path, bad: int) -> None:
    d = tmp_path / "sim"
    d.mkdir()
    os.chmod(d, bad)
    with pytest.raises(PermissionError, match="writable by group or others"):
        files.private_dir(d)
    assert mode(d) == bad  # refused, not "fixed"


def test_private_dir_refuses_a_regular_file(tmp_path: Path) -> None:
    f = tmp_path / "sim"
    f.write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        files.private_dir(f)
    with pytest.raises(NotADirectoryError):
        files.check_private_dir(f)


def test_check_private_dir_of_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        files.check_private_dir(tmp_path / "missing")


# ------------------------------------------------------------ the sim directory


def xcsave(*args: str, env: dict[str, str], mask: int = 0o022) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*XCSAVE, *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=lambda: os.umask(mask),
    )


def sim_env(simdir: Path) -> dict[str, str]:
    return {**os.environ, "XCSAVE_SIM_DIR": str(simdir)}


def test_sim_dir_and_domain_are_private_under_umask_000(tmp_path: Path) -> None:
    simdir = tmp_path / "shm" / "xcsave"
    r = xcsave("sim", "create", "vm", "--memory", "64K", env=sim_env(simdir), mask=0)
    assert r.returncode == 0, r.stderr
    assert mode(simdir) == 0o700
    assert mode(simdir / "vm") == 0o600
    assert sorted(p.name for p in simdir.iterdir()) == ["vm"]


def one_line_refusal(r: subprocess.CompletedProcess[str], path: Path, what: str) -> None:
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"xcsave: sim: {path}: ")
    assert what in lines[0]
    assert lines[0].endswith("(EPERM)")
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("cmd", [["create", "vm", "--memory", "64K"], ["digest", "vm"]])
def test_sim_dir_symlink_is_refused(tmp_path: Path, cmd: list[str]) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    simdir = tmp_path / "xcsave"
    simdir.symlink_to(real)
    r = xcsave("sim", *cmd, env=sim_env(simdir))
    one_line_refusal(r, simdir, "symlink")
    assert list(real.iterdir()) == []


def test_sim_dir_world_writable_is_refused(tmp_path: Path) -> None:
    simdir = tmp_path / "xcsave"
    simdir.mkdir()
    os.chmod(simdir, 0o1777)
    r = xcsave("sim", "create", "vm", "--memory", "64K", env=sim_env(simdir))
    one_line_refusal(r, simdir, "writable by group or others")
    assert list(simdir.iterdir()) == []


@needs_root
def test_sim_dir_of_another_owner_is_refused(tmp_path: Path) -> None:
    simdir = tmp_path / "xcsave"
    simdir.mkdir(mode=0o700)
    os.chown(simdir, NOBODY, -1)
    r = xcsave("sim", "create", "vm", "--memory", "64K", env=sim_env(simdir))
    one_line_refusal(r, simdir, f"owned by uid {NOBODY}")
    assert list(simdir.iterdir()) == []


def test_a_dom_path_is_the_users_choice_but_the_file_is_private(tmp_path: Path) -> None:
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, 0o1777)  # not checked: the user named it
    r = xcsave("sim", "create", str(d / "vm"), "--memory", "64K", env=dict(os.environ), mask=0)
    assert r.returncode == 0, r.stderr
    assert mode(d / "vm") == 0o600


# ------------------------------------- files native code and the tools create


def test_restore_target_and_dm_out_are_private_and_a_planted_dm_symlink_is_replaced(
    tmp_path: Path,
) -> None:
    """The restore's target and --dm-out (whose temporary has an unguessable
    name) are 0600 under umask 000; a symlink planted at the --dm-out path is
    replaced by the file, its target untouched."""
    from xcsave import corpus

    legacy = corpus.Legacy(guest="hvm", last_checkpoint=True, qemu_sig=corpus.SIG_0002)
    src = tmp_path / "legacy.img"
    src.write_bytes(legacy.build())
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours")
    os.chmod(victim, 0o644)
    dom, dm = tmp_path / "dom", tmp_path / "dom.qemu"
    dm.symlink_to(victim)
    r = subprocess.run(
        [*XCSAVE, "restore", str(src), "--sim", str(dom), *LEGACY_HVM, "--dm-out", str(dm)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        preexec_fn=lambda: os.umask(0),
    )
    assert r.returncode == 0, r.stderr
    assert victim.read_bytes() == b"not yours"
    assert mode(victim) == 0o644
    assert not dm.is_symlink()
    assert dm.read_bytes() == legacy.qemu_data
    assert mode(dm) == 0o600
    assert mode(dom) == 0o600
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["dom", "dom.qemu", "legacy.img", "victim"]


def test_convert_output_is_private_under_umask_000(tmp_path: Path) -> None:
    from xcsave import corpus

    src = tmp_path / "legacy.img"
    src.write_bytes(corpus.Legacy(guest="hvm").build())
    out = tmp_path / "out.libxc"
    r = subprocess.run(
        [*XCSAVE, "convert", str(src), str(out), "--width", "64", "--guest", "hvm"],
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=lambda: os.umask(0),
    )
    assert r.returncode == 0, r.stderr
    assert mode(out) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["legacy.img", "out.libxc"]


def test_saved_image_is_private_and_a_planted_out_symlink_is_replaced(tmp_path: Path) -> None:
    """``save``'s image is 0600 under umask 000; a symlink planted at OUT is
    replaced by the image (the rename takes the name), its target untouched;
    no temporary is left beside it."""
    env = dict(os.environ)
    dom = tmp_path / "vm"
    assert xcsave("sim", "create", str(dom), "--memory", "64K", env=env).returncode == 0
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours")
    os.chmod(victim, 0o644)
    out = tmp_path / "vm.img"
    out.symlink_to(victim)
    r = xcsave("save", "--sim", str(dom), str(out), env=env, mask=0)
    assert r.returncode == 0, r.stderr
    assert victim.read_bytes() == b"not yours"
    assert mode(victim) == 0o644
    assert not out.is_symlink()
    assert mode(out) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim", "vm", "vm.img"]


def test_a_symlink_planted_at_a_restore_target(tmp_path: Path) -> None:
    """A symlink at the domain's name is a domain that exists: EEXIST without
    --force, its target untouched; with --force the rename replaces the
    link itself (never writes through it), and the new domain is 0600."""
    env = dict(os.environ)
    dom, image = tmp_path / "vm", tmp_path / "vm.img"
    assert xcsave("sim", "create", str(dom), "--memory", "64K", env=env).returncode == 0
    assert xcsave("save", "--sim", str(dom), str(image), env=env).returncode == 0
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours")
    target = tmp_path / "copy"
    target.symlink_to(victim)
    r = xcsave("restore", str(image), "--sim", str(target), env=env)
    assert r.returncode == 1
    assert "EEXIST" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert target.is_symlink()
    r = xcsave("restore", str(image), "--sim", str(target), "--force", env=env, mask=0)
    assert r.returncode == 0, r.stderr
    assert victim.read_bytes() == b"not yours"
    assert not target.is_symlink()
    assert mode(target) == 0o600
    assert xcsave("sim", "digest", str(target), env=env).stdout == (
        xcsave("sim", "digest", str(dom), env=env).stdout
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "victim", "vm", "vm.img"]


# ------------------------------------------------------ unnamed until complete


@pytest.mark.parametrize("umask", [0o000, 0o277])
def test_unnamed_file_is_private_and_nameless_until_published(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        fd = files.create_private_unnamed(tmp_path)
    finally:
        os.umask(old)
    if fd is None:
        pytest.skip("this filesystem has no O_TMPFILE")
    try:
        os.write(fd, b"guest memory")
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
        assert list(tmp_path.iterdir()) == []  # nothing to find, open or race for
        out = tmp_path / "out.img"
        files.publish_unnamed(fd, out)
    finally:
        os.close(fd)
    assert out.read_bytes() == b"guest memory"
    assert mode(out) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["out.img"]


def test_publish_replaces_a_file_and_a_planted_symlink_without_writing_through(
    tmp_path: Path,
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours")
    out = tmp_path / "out.img"
    for before in ("file", "symlink"):
        if before == "file":
            out.write_bytes(b"old image")
        else:
            out.unlink()
            out.symlink_to(victim)
        fd = files.create_private_unnamed(tmp_path)
        if fd is None:
            pytest.skip("this filesystem has no O_TMPFILE")
        try:
            os.write(fd, before.encode())
            files.publish_unnamed(fd, out)
        finally:
            os.close(fd)
        assert not out.is_symlink()
        assert out.read_bytes() == before.encode()
    assert victim.read_bytes() == b"not yours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.img", "victim"]


def test_unnamed_falls_back_where_the_filesystem_cannot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No O_TMPFILE (EOPNOTSUPP): None, and the converter writes through a
    named private temporary instead, still leaving only OUT."""
    from xcsave import corpus, streamtools

    real_open = os.open

    def no_tmpfile(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", no_tmpfile)
    assert files.create_private_unnamed(tmp_path) is None
    src = tmp_path / "legacy.img"
    src.write_bytes(corpus.Legacy(guest="hvm").build())
    out = tmp_path / "out.libxc"
    streamtools.convert(src, out, 64, "hvm")
    assert mode(out) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["legacy.img", "out.libxc"]


def _holds_a_file_in(pid: int, directory: Path, but: Path) -> bool:
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{n}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith(f"{directory}/") and target != str(but):
            return True
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_convert_killed_mid_write_leaves_out_as_it_was(tmp_path: Path, sig: int) -> None:
    """A signal while convert is writing OUT (its input stalled half way, from
    a FIFO): OUT keeps its old content and no other file is left beside it."""
    from xcsave import corpus

    image = corpus.Legacy(guest="hvm").build()
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out.libxc"
    out.write_bytes(b"the previous image")
    p = subprocess.Popen(
        [*XCSAVE, "convert", str(fifo), str(out), "--width", "64", "--guest", "hvm"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with open(fifo, "wb", buffering=0) as w:
            w.write(image[: len(image) // 2])
            # convert has written its headers and some pages by now: wait
            # until it holds its output file open (/proc shows the fds).
            deadline = time.monotonic() + 30
            while not _holds_a_file_in(p.pid, tmp_path, but=fifo):
                assert time.monotonic() < deadline, "convert never opened its output"
                time.sleep(0.01)
            p.send_signal(sig)
            _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0
    assert "Traceback" not in err
    assert out.read_bytes() == b"the previous image"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["in.fifo", "out.libxc"]
