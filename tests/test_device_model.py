"""An HVM guest's device model in xcsave's own save: QMP, as libxl drives it.

A fake QEMU (a QMP server on a Unix socket, in the test's event loop) stands
in for qemu-system-xen; fakexen stands in for the hypervisor under both
helpers.  The image must carry the device state in libxl's EMULATOR_CONTEXT
record exactly where xl puts it, pass xcsave's verifier and Xen's, and a
device model that misbehaves in any way (garbage, a size bomb, silence, an
error, a symlink) must fail the save in one line, leave no image, and get
its vCPUs back (``cont``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import fake_env

import xcsave
from xcsave import qmp
from xcsave.devicemodel import DeviceModel, read_physmap
from xcsave.supervisor import Callbacks

STATE = b"QEVM\x00\x00\x00\x03" + bytes(range(256)) * 23 + b"device-state-end"
PHYSMAP = (
    ("physmap/f0000000/start_addr", "f0000000"),
    ("physmap/f0000000/size", "800000"),
    ("physmap/f0000000/name", "vga.vram"),
)
KV = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in PHYSMAP)
XL_MAGIC = b"Xen saved domain, xl format\n \x00 \r"


class FakeQemu:
    """A QMP server speaking as qemu-system-xen does, or misbehaving (``mode``)."""

    def __init__(self, path: str, mode: str = "ok") -> None:
        self.path = path
        self.mode = mode
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.server: asyncio.Server | None = None

    def names(self) -> list[str]:
        return [c for c, _ in self.commands if c != "qmp_capabilities"]

    async def __aenter__(self) -> FakeQemu:
        self.server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await self._session(r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    async def _session(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        def send(obj: object) -> None:
            w.write(json.dumps(obj).encode() + b"\n")

        if self.mode == "garbage-greeting":
            w.write(b"\x00\xffnot json at all\n")
            await w.drain()
            return
        if self.mode == "bomb":
            w.write(b'{"QMP": "' + b"A" * (qmp.MAX_LINE + 10) + b'"}\n')
            await w.drain()
            return
        if self.mode == "silent":
            await asyncio.sleep(3600)
        send({"QMP": {"version": {"qemu": {"major": 7, "minor": 2}}, "capabilities": []}})
        while line := await r.readline():
            msg = json.loads(line)
            cmd, args, ident = msg["execute"], msg.get("arguments", {}), msg.get("id")
            self.commands.append((cmd, args))
            if self.mode == "events" and cmd == "stop":
                for _ in range(qmp.MAX_SKIPPED + 1):
                    send({"event": "STOP", "timestamp": {"seconds": 0, "microseconds": 0}})
            elif self.mode == "wrong-id" and cmd == "stop":
                send({"return": {}, "id": 999})
            elif cmd == "xen-save-devices-state":
                self._write_state(args["filename"])
                if self.mode == "save-error":
                    send({"error": {"class": "GenericError", "desc": "disk full"}, "id": ident})
                else:
                    send({"return": {}, "id": ident})
            elif self.mode == "hang-save" and cmd == "stop":
                await asyncio.sleep(3600)
            else:
                send({"return": {}, "id": ident})
            await w.drain()

    def _write_state(self, filename: str) -> None:
        if self.mode == "symlink-state":
            os.symlink("/etc/passwd", filename)
        elif self.mode == "big-state":
            Path(filename).write_bytes(b"QEVM" + b"\x00" * (1 << 20))
        elif self.mode == "not-qemu":
            Path(filename).write_bytes(b"GARBAGE" * 10)
        else:
            Path(filename).write_bytes(STATE)


@pytest.fixture
def sockdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="xcs-qmp-", dir="/tmp")  # short: sun_path is 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@contextlib.asynccontextmanager
async def qemu(sockdir: str, mode: str = "ok") -> AsyncIterator[FakeQemu]:
    async with FakeQemu(os.path.join(sockdir, f"qmp-{mode}"), mode) as q:
        yield q


@pytest.fixture
def hvm(fakexen_lib: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in fake_env(fakexen_lib, guest="hvm").items():
        if k == "LD_PRELOAD" or k.startswith("FAKEXEN_"):
            monkeypatch.setenv(k, v)


@pytest.fixture
def ours() -> Path:
    if "xen" not in xcsave.backends():
        msg = "xcsave-helper was built without the xen backend (libxen-dev missing)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return xcsave.helper_path()


@pytest.fixture(params=["xcsave-1", "stock-417"])
def helper(request: pytest.FixtureRequest, ours: Path, stock_helper: Path) -> tuple[Path, str]:
    if request.param == "stock-417":
        return stock_helper, "xen-4.17"
    return ours, "xcsave-1"


def _suspend_cbs(calls: list[str]) -> Callbacks:
    def suspend() -> int:
        calls.append("suspend")
        return 1

    return Callbacks(suspend=suspend)


def _libxl_save(img: Path, ours: Path, dm: DeviceModel) -> Any:
    """A non-live save of fakexen's domain 7 by xcsave-helper, framed libxl."""
    return xcsave.save(
        img, domid=7, fmt="libxl", helper=ours, callbacks=_suspend_cbs([]), device_model=dm
    )


def _records(data: bytes, fmt: str) -> tuple[bytes | None, list[tuple[int, bytes]]]:
    """An independent reading of the frames: (xl config, the libxl records
    after the libxc image).  The libxc image is walked record by record."""
    off, cfg = 0, None
    if fmt == "xl":
        assert data[:32] == XL_MAGIC
        _bo, mflags, _of, optlen = struct.unpack_from("<IIII", data, 32)
        assert mflags == 3
        (n,) = struct.unpack_from("<I", data, 48)
        cfg = data[52 : 52 + n]
        off = 48 + optlen
    ident, ver, _opts = struct.unpack_from(">QII", data, off)
    assert (ident, ver) == (0x4C6962786C466D74, 2)
    off += 16
    assert struct.unpack_from("<II", data, off) == (1, 0)  # LIBXC_CONTEXT, empty
    off += 8 + 24 + 16  # the libxc image and domain headers
    while True:  # libxc records to END
        rtype, length = struct.unpack_from("<II", data, off)
        off += 8 + (length + 7) // 8 * 8
        if rtype == 0:
            break
    out = []
    while off < len(data):
        rtype, length = struct.unpack_from("<II", data, off)
        out.append((rtype, data[off + 8 : off + 8 + length]))
        off += 8 + (length + 7) // 8 * 8
    assert off == len(data)
    return cfg, out


def _emu(payload: bytes) -> bytes:
    return struct.pack("<II", 2, 0) + payload  # qemu upstream, index 0


def _verify(path: Path, fmt: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-m", "xcsave", "verify", "--format", fmt, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize("fmt", ["libxl", "xl"])
async def test_hvm_live_save_carries_the_device_model(
    hvm: None, helper: tuple[Path, str], sockdir: str, tmp_path: Path, fmt: str, xen_verify: Any
) -> None:
    """Both helpers: QEMU's dirty log on for the live rounds and off after,
    ``stop`` and its device state once the guest is suspended (never before),
    the state in EMULATOR_CONTEXT after the libxc image, then END; xcsave's
    verifier and Xen's accept the image."""
    path, dialect = helper
    img, cfg = tmp_path / "hvm.img", tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"c_info": {"type": "hvm", "name": "lab1"}}))
    calls: list[str] = []
    async with qemu(sockdir) as q:
        orig = _suspend_cbs(calls).suspend
        assert orig is not None

        def suspend() -> int:
            calls.append(f"qmp before suspend: {q.names()}")
            return int(orig())

        res = await xcsave.save(
            img,
            domid=7,
            live=True,
            fmt=fmt,
            xl_config=cfg if fmt == "xl" else None,
            dialect=dialect,  # type: ignore[arg-type]
            helper=path,
            callbacks=Callbacks(suspend=suspend),
            device_model=DeviceModel(q.path),
        )
    assert res.retval == 0
    assert calls[0] == "qmp before suspend: ['xen-set-global-dirty-log']"
    assert q.names() == [
        "xen-set-global-dirty-log",
        "stop",
        "xen-save-devices-state",
        "xen-set-global-dirty-log",
    ]
    assert [c[1] for c in q.commands if c[0] == "xen-set-global-dirty-log"] == [
        {"enable": True},
        {"enable": False},
    ]
    (save_args,) = [a for c, a in q.commands if c == "xen-save-devices-state"]
    assert save_args["live"] is True
    assert not os.path.exists(save_args["filename"])  # read back and removed, its directory too
    assert not os.path.exists(os.path.dirname(save_args["filename"]))
    data = img.read_bytes()
    xlcfg, tail = _records(data, fmt)
    assert tail == [(3, _emu(STATE)), (0, b"")]  # EMULATOR_CONTEXT, END: no physmap, no record
    if fmt == "xl":
        assert xlcfg is not None and json.loads(xlcfg.rstrip(b"\0"))["c_info"]["name"] == "lab1"
        assert xlcfg.endswith(b"\0")
    assert stat_mode(img) == 0o600
    v = _verify(img, fmt)
    assert v.returncode == 0, v.stderr
    x = xen_verify(img, fmt)
    assert x.returncode == 0, x.stdout + x.stderr


def stat_mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


async def test_physmap_goes_in_emulator_xenstore_data(
    hvm: None, ours: Path, sockdir: str, tmp_path: Path
) -> None:
    """EMULATOR_XENSTORE_DATA before EMULATOR_CONTEXT, key\\0value\\0 each,
    when there is a physmap; xcsave's verifier accepts it (Xen's has a
    Python 3 bug on any such record: facts section 5)."""
    img = tmp_path / "hvm.img"
    async with qemu(sockdir) as q:
        await _libxl_save(img, ours, DeviceModel(q.path, xenstore=PHYSMAP))
    _, tail = _records(img.read_bytes(), "libxl")
    assert tail == [(2, _emu(KV)), (3, _emu(STATE)), (0, b"")]
    v = _verify(img, "libxl")
    assert v.returncode == 0, v.stderr


def _fake_xenstore(bindir: Path, domid: int, physmap: bool) -> None:
    """xenstore-exists / xenstore-ls as xenstore-utils print, for one domain."""
    base = f"/local/domain/0/device-model/{domid}/physmap"
    lines = [f'{base} = ""', f'{base}/f0000000 = ""']
    lines += [f'/local/domain/0/device-model/{domid}/{k} = "{v}"' for k, v in PHYSMAP]
    bindir.mkdir(exist_ok=True)
    (bindir / "xenstore-exists").write_text(
        f'#!/bin/sh\n[ "$1" = "{base}" ] && exit {0 if physmap else 1}\nexit 1\n'
    )
    listing = "\n".join(lines)
    (bindir / "xenstore-ls").write_text(
        f'#!/bin/sh\n[ "$1 $2" = "-f {base}" ] || exit 1\ncat <<"EOF"\n{listing}\nEOF\n'
    )
    for f in ("xenstore-exists", "xenstore-ls"):
        (bindir / f).chmod(0o755)


@pytest.mark.parametrize("physmap", [True, False])
async def test_cli_save_qmp_reads_the_physmap(
    hvm: None,
    ours: Path,
    sockdir: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    physmap: bool,
) -> None:
    """``xcsave save --domid N --qmp SOCKET --format xl --xl-config FILE``:
    the physmap read from xenstore (xenstore-utils) into the image."""
    _fake_xenstore(tmp_path / "bin", 7, physmap)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    img, cfg = tmp_path / "hvm.xl", tmp_path / "cfg.json"
    cfg.write_text('{"c_info": {"type": "hvm"}}\n')
    async with qemu(sockdir) as q:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-P", "-m", "xcsave", "save", "--domid", "7", str(img),
            "--live", "--qmp", q.path, "--format", "xl", "--xl-config", str(cfg),
            "--suspend-cmd", "true", "--helper", str(ours),
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    _, tail = _records(img.read_bytes(), "xl")
    assert tail == ([(2, _emu(KV))] if physmap else []) + [(3, _emu(STATE)), (0, b"")]
    assert "xen-save-devices-state" in q.names()


@pytest.mark.parametrize(
    ("script", "says", "err"),
    [
        ("echo 'this is not xenstore-ls'", "unexpected line", errno.EPROTO),
        ("exec sleep 30", "no answer in", errno.ETIMEDOUT),
        # A pipeline: the children, not the shell, hold the pipe.
        ("head -c 2000000 /dev/zero | tr '\\0' x", "over 1048576 bytes", errno.E2BIG),
        # An orphan holds the pipe open after the command itself exits.
        ('sleep 30 & echo $! > "$PIDFILE"; exit 0', "no answer in", errno.ETIMEDOUT),
    ],
    ids=["garbage", "silence", "size-bomb", "orphan-holds-pipe"],
)
async def test_read_physmap_refuses_a_hostile_xenstore_ls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str, says: str, err: int
) -> None:
    """xenstore-ls's output is read bounded in time and parsed strictly."""
    bindir = tmp_path / "bin"
    _fake_xenstore(bindir, 3, True)
    (bindir / "xenstore-ls").write_text(f"#!/bin/sh\n{script}\n")
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    pidfile = tmp_path / "orphan.pid"
    monkeypatch.setenv("PIDFILE", str(pidfile))
    with pytest.raises(xcsave.XcsaveError, match=says) as e:
        await read_physmap(3, timeout=2.0)
    assert e.value.errno == err  # type: ignore[attr-defined]
    if pidfile.exists():  # whatever it started is gone with it
        orphan = int(pidfile.read_text())
        for _ in range(100):
            if not _alive(orphan):
                break
            await asyncio.sleep(0.01)
        assert not _alive(orphan)


async def test_read_physmap_is_not_held_by_a_daemon_on_its_pipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child that left the session (out of reach of the group's SIGKILL)
    and holds the pipe: the size bomb still fails in one line, soon."""
    bindir = tmp_path / "bin"
    _fake_xenstore(bindir, 3, True)
    escaped = tmp_path / "escaped.pid"
    (bindir / "xenstore-ls").write_text(
        "#!/bin/sh\n"
        f"setsid sh -c 'echo $$ > {escaped}; exec sleep 30' &\n"
        "head -c 2000000 /dev/zero | tr '\\0' x\n"
    )
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    t0 = time.monotonic()
    try:
        with pytest.raises(xcsave.XcsaveError, match="over 1048576 bytes") as e:
            await read_physmap(3, timeout=5.0)
        assert e.value.errno == errno.E2BIG  # type: ignore[attr-defined]
        assert time.monotonic() - t0 < 5.0
    finally:
        for _ in range(100):
            if escaped.exists() and escaped.read_text().strip():
                break
            await asyncio.sleep(0.01)
        with contextlib.suppress(ValueError, ProcessLookupError, FileNotFoundError):
            os.kill(int(escaped.read_text()), signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, reaped by nobody yet, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_cancelled_while_qemu_is_stopped_gives_it_back(
    hvm: None, ours: Path, sockdir: str, tmp_path: Path
) -> None:
    """A cancellation (the CLI's SIGTERM) while QEMU is stopped and its state
    being saved: no image, and QEMU gets its vCPUs back (``cont``)."""
    img = tmp_path / "hvm.img"
    async with qemu(sockdir, "hang-save") as q:
        task = asyncio.ensure_future(_libxl_save(img, ours, DeviceModel(q.path)))
        for _ in range(500):
            if "stop" in q.names():
                break
            await asyncio.sleep(0.01)
        assert "stop" in q.names()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert q.names()[-1] == "cont", q.names()
    assert not img.exists() and list(tmp_path.glob(".hvm.img*")) == []


def test_cli_hvm_without_qmp_is_refused_in_one_line(hvm: None, ours: Path, tmp_path: Path) -> None:
    img = tmp_path / "hvm.img"
    r = subprocess.run(
        [sys.executable, "-P", "-m", "xcsave", "save", "--domid", "7", str(img), "--live",
         "--suspend-cmd", "false", "--helper", str(ours)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert "is an HVM guest" in lines[0] and "--qmp" in lines[0] and "(ENOTSUP)" in lines[0]
    assert not img.exists()


# A device model that misbehaves: (mode, what the one line says, errno, whether
# QEMU was stopped and must be given its vCPUs back).
HOSTILE = [
    ("garbage-greeting", "not JSON", errno.EPROTO, False),
    ("bomb", "a line over", errno.EMSGSIZE, False),
    ("silent", "no answer in", errno.ETIMEDOUT, False),
    ("events", "no reply among", errno.EPROTO, True),
    ("wrong-id", "a reply to id 999", errno.EPROTO, True),
    ("hang-save", "no answer in", errno.ETIMEDOUT, True),
    ("save-error", "GenericError: disk full", errno.EREMOTEIO, True),
    ("symlink-state", "devices-state", errno.ELOOP, True),
    ("big-state", "over the 65536 taken", errno.EFBIG, True),
    ("not-qemu", "QEMU's magic", errno.EINVAL, True),
]


@pytest.mark.parametrize(("mode", "says", "err", "stopped"), HOSTILE, ids=[h[0] for h in HOSTILE])
async def test_hostile_device_model_fails_the_save_cleanly(
    hvm: None,
    ours: Path,
    sockdir: str,
    tmp_path: Path,
    mode: str,
    says: str,
    err: int,
    stopped: bool,
) -> None:
    """A non-live save (the device model is first asked once the guest is
    suspended): one line naming what is wrong, no image, nothing left in the
    work directory, and QEMU's vCPUs back (``cont``) if it was stopped."""
    img, work = tmp_path / "hvm.img", tmp_path / "work"
    work.mkdir()
    async with qemu(sockdir, mode) as q:
        with pytest.raises(xcsave.CallbackError) as e:
            await _libxl_save(
                img, ours, DeviceModel(q.path, timeout=0.5, max_state=65536, workdir=str(work))
            )
        if stopped:
            # The undo connects anew; a hanging session is still open.
            assert q.names()[0] == "stop" and q.names()[-1] == "cont", q.names()
    msg = str(e.value)
    assert says in msg and "\n" not in msg, msg
    cause = e.value.__cause__
    assert getattr(cause, "errno", None) == err, repr(cause)
    assert not img.exists() and list(tmp_path.glob(".hvm.img*")) == []
    assert list(work.iterdir()) == []


async def test_qmp_symlink_is_refused_before_the_guest_is_touched(
    hvm: None, ours: Path, sockdir: str, tmp_path: Path
) -> None:
    """A live save asks QEMU first for its dirty log, before any suspend: a
    socket path that is a symlink is refused there (ELOOP), the guest never
    suspended."""
    link = os.path.join(sockdir, "link")
    calls: list[str] = []
    async with qemu(sockdir) as q:
        os.symlink(q.path, link)
        with pytest.raises(xcsave.CallbackError) as e:
            await xcsave.save(
                tmp_path / "x.img",
                domid=7,
                live=True,
                fmt="libxl",
                helper=ours,
                callbacks=_suspend_cbs(calls),
                device_model=DeviceModel(link),
            )
    assert getattr(e.value.__cause__, "errno", None) == errno.ELOOP
    assert calls == [] and q.commands == []


async def test_device_model_arguments_refused_before_anything(tmp_path: Path) -> None:
    dm = DeviceModel("/nonexistent/qmp")
    cfg = tmp_path / "cfg.json"
    cbs = _suspend_cbs([])
    cases: list[tuple[dict[str, Any], str]] = [
        ({"sim": str(tmp_path / "d"), "fmt": "libxl"}, "sim domain has no QEMU"),
        ({"domid": 7}, "needs fmt='libxl' or 'xl'"),
        ({"domid": 7, "fmt": "libxl", "stream_type": "remus"}, "plain stream"),
    ]
    for kw, says in cases:
        with pytest.raises(ValueError, match=says):
            await xcsave.save(tmp_path / "x", device_model=dm, callbacks=cbs, **kw)
    with pytest.raises(ValueError, match="needs xl_config"):
        await xcsave.save(tmp_path / "x", domid=7, fmt="xl", callbacks=cbs)
    for text in ("not json", "[1, 2]", "{" * 10):
        cfg.write_text(text)
        with pytest.raises(ValueError, match="is not a JSON object"):
            await xcsave.save(tmp_path / "x", domid=7, fmt="xl", xl_config=cfg, callbacks=cbs)
    cfg.write_bytes(b'{"a": "' + b"x" * (1 << 20) + b'"}')
    with pytest.raises(ValueError, match="larger than"):
        await xcsave.save(tmp_path / "x", domid=7, fmt="xl", xl_config=cfg, callbacks=cbs)
    with pytest.raises(ValueError, match="timeout"):
        DeviceModel("/x", timeout=0)
    assert not (tmp_path / "x").exists()


async def test_pvh_xl_savefile_is_framed(
    fakexen_lib: Path, ours: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fmt="xl"`` for a Xen domain without a device model (PV, PVH): xl's
    header and libxl's frame around the libxc image, no emulator record.
    (The xen backend writes the libxc image only: before the frames were
    written here, the xl format of a Xen domain came out a bare image.)"""
    for k, v in fake_env(fakexen_lib, guest="pvh").items():
        if k == "LD_PRELOAD" or k.startswith("FAKEXEN_"):
            monkeypatch.setenv(k, v)
    img, cfg = tmp_path / "pvh.xl", tmp_path / "cfg.json"
    cfg.write_text('{"c_info": {"type": "pvh", "name": "g"}}')
    await xcsave.save(
        img, domid=7, fmt="xl", xl_config=cfg, helper=ours, callbacks=_suspend_cbs([])
    )
    xlcfg, tail = _records(img.read_bytes(), "xl")
    assert xlcfg == cfg.read_bytes() + b"\0"
    assert tail == [(0, b"")]
    assert _verify(img, "xl").returncode == 0
