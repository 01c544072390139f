"""fakexen drives Debian's stock xen-4.17 libxl-save-helper.

These tests check the stand-in, not xcsave: they run the stock helper
directly with subprocess, decode its frames with a tiny reader local to this
file (no xcsave module is imported), and check the streams with Xen's own
verify-stream-v2.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
from conftest import XenVerify, fake_env

# --------------------------------------------------------------------------
# A minimal reader of the xen-4.17 helper protocol (facts §1.4, §1.6):
# helper -> us: u16 length, then body = u16 msgtype + packed args, host
# order; us -> helper: a bare native int, only for messages that need one.
# --------------------------------------------------------------------------

MSG_LOG = 1
MSG_PROGRESS = 2
MSG_SUSPEND = 3
MSG_POSTCOPY = 4
MSG_CHECKPOINT = 5
MSG_WAIT_CHECKPOINT = 6
MSG_SWITCH_QEMU_LOGDIRTY = 7
MSG_STATIC_DATA_DONE = 8
MSG_RESTORE_RESULTS = 9
MSG_COMPLETE = 10
NEEDS_REPLY = frozenset(
    {
        MSG_SUSPEND,
        MSG_POSTCOPY,
        MSG_CHECKPOINT,
        MSG_WAIT_CHECKPOINT,
        MSG_SWITCH_QEMU_LOGDIRTY,
        MSG_STATIC_DATA_DONE,
        MSG_COMPLETE,
    }
)

CBFLAGS_SAVE = 136  # suspend + switch_qemu_logdirty
CBFLAGS_SAVE_REMUS = 184  # + postcopy + checkpoint
CBFLAGS_RESTORE = 768  # static_data_done + restore_results
CBFLAGS_RESTORE_REMUS = 800  # + checkpoint
HELPER_TIMEOUT = 60.0
DOMID = 7


@dataclass(frozen=True)
class Frame:
    raw: bytes  # the whole frame, length prefix included
    msgtype: int
    args: bytes

    def strings_and_rest(self, nstrings: int) -> tuple[list[str], bytes]:
        """Split off nstrings STRING args (u32 size incl. NUL, bytes)."""
        out: list[str] = []
        rest = self.args
        for _ in range(nstrings):
            (size,) = struct.unpack_from("=I", rest)
            data = rest[4 : 4 + size]
            assert size > 0
            assert data.endswith(b"\0")
            out.append(data[:-1].decode())
            rest = rest[4 + size :]
        return out, rest

    def log(self) -> tuple[int, int, str, str]:
        assert self.msgtype == MSG_LOG
        level, errnoval = struct.unpack_from("=Ii", self.args)
        (context, text), rest = Frame(self.raw, MSG_LOG, self.args[8:]).strings_and_rest(2)
        assert rest == b""
        return level, errnoval, context, text

    def progress(self) -> tuple[str, str, int, int]:
        assert self.msgtype == MSG_PROGRESS
        (context, doing), rest = self.strings_and_rest(2)
        done, total = struct.unpack("=QQ", rest)
        return context, doing, done, total

    def ints(self, fmt: str) -> tuple[int, ...]:
        return struct.unpack("=" + fmt, self.args)


@dataclass
class HelperRun:
    frames: list[Frame] = field(default_factory=list)
    returncode: int | None = None
    replied: list[tuple[int, int]] = field(default_factory=list)

    def of(self, msgtype: int) -> list[Frame]:
        return [f for f in self.frames if f.msgtype == msgtype]

    def progress_labels(self) -> list[str]:
        return [f.progress()[1] for f in self.of(MSG_PROGRESS)]

    def complete(self) -> tuple[int, int]:
        frames = self.of(MSG_COMPLETE)
        assert len(frames) == 1, self.frames
        retval, errnoval = frames[0].ints("ii")
        return retval, errnoval

    def logs(self) -> list[tuple[int, int, str, str]]:
        return [f.log() for f in self.of(MSG_LOG)]


Reply = Callable[[Frame, int], int | None]  # (frame, nth of its type) -> reply; None closes stdin

DEFAULT_REPLIES: Mapping[int, int] = {
    MSG_SUSPEND: 1,
    MSG_POSTCOPY: 1,
    MSG_CHECKPOINT: 0,
    MSG_WAIT_CHECKPOINT: 1,
    MSG_SWITCH_QEMU_LOGDIRTY: 0,
    MSG_STATIC_DATA_DONE: 0,
    MSG_COMPLETE: 0,
}


def default_reply(frame: Frame, nth: int) -> int | None:
    return DEFAULT_REPLIES[frame.msgtype]


def read_exact(stream: IO[bytes], n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def run_helper(
    helper: Path,
    args: list[str],
    env: dict[str, str],
    io_fd: int,
    reply: Reply = default_reply,
    on_frame: Callable[[Frame, subprocess.Popen[bytes]], None] | None = None,
) -> HelperRun:
    """Run the helper to exit, answering its callbacks; a watchdog kills it."""
    run = HelperRun()
    counts: dict[int, int] = {}
    proc = subprocess.Popen(
        [str(helper), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        pass_fds=(io_fd,),
    )
    watchdog = threading.Timer(HELPER_TIMEOUT, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        while True:
            head = read_exact(proc.stdout, 2)
            if len(head) < 2:
                assert head == b"", "EOF inside a frame length"
                break
            (length,) = struct.unpack("=H", head)
            body = read_exact(proc.stdout, length)
            assert len(body) == length, "EOF inside a frame body"
            (msgtype,) = struct.unpack_from("=H", body)
            frame = Frame(head + body, msgtype, body[2:])
            run.frames.append(frame)
            if on_frame is not None:
                on_frame(frame, proc)
            if msgtype in NEEDS_REPLY and not proc.stdin.closed:
                nth = counts.get(msgtype, 0)
                counts[msgtype] = nth + 1
                value = reply(frame, nth)
                if value is None:
                    proc.stdin.close()
                    continue
                run.replied.append((msgtype, value))
                proc.stdin.write(struct.pack("=i", value))
                proc.stdin.flush()
        run.returncode = proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdin is not None and not proc.stdin.closed:
            proc.stdin.close()
        if proc.stdout is not None:
            proc.stdout.close()
    return run


def save_args(
    io_fd: int, xcflags: int = 1, cbflags: int = CBFLAGS_SAVE, stream_type: int = 0
) -> list[str]:
    return [
        "--save-domain",
        str(io_fd),
        "-1",
        str(DOMID),
        str(xcflags),
        str(cbflags),
        str(stream_type),
    ]


def restore_args(io_fd: int, cbflags: int = CBFLAGS_RESTORE, stream_type: int = 0) -> list[str]:
    # io_fd send_back_fd dom store_evtchn store_domid console_evtchn console_domid
    # cbflags stream_type
    return [
        "--restore-domain",
        str(io_fd),
        "-1",
        str(DOMID),
        "1",
        "0",
        "2",
        "0",
        str(cbflags),
        str(stream_type),
    ]


# --------------------------------------------------------------------------
# A minimal walker of libxc v2/v3 images, to look inside what was saved.
# --------------------------------------------------------------------------

REC_END = 0x00
REC_PAGE_DATA = 0x01
REC_HVM_PARAMS = 0x0A
REC_CHECKPOINT = 0x0E
REC_STATIC_DATA_END = 0x10
HVM_PARAM_STORE_PFN = 1
HVM_PARAM_CONSOLE_PFN = 17


@dataclass(frozen=True)
class Record:
    offset: int
    rtype: int
    body: bytes


def walk_image(data: bytes) -> tuple[int, list[Record], int]:
    """(version, records, image length up to and including END or EOF)."""
    marker, ident, version = struct.unpack_from(">QII", data)
    assert marker == 0xFFFFFFFFFFFFFFFF
    assert ident == 0x58454E46
    pos = 24 + 16
    records: list[Record] = []
    while pos < len(data):
        rtype, length = struct.unpack_from("<II", data, pos)
        body = data[pos + 8 : pos + 8 + length]
        records.append(Record(pos, rtype, body))
        pos += 8 + ((length + 7) & ~7)
        if rtype == REC_END:
            break
    return version, records, pos


def hvm_params(records: list[Record]) -> dict[int, int]:
    params: dict[int, int] = {}
    for rec in records:
        if rec.rtype == REC_HVM_PARAMS:
            (count,) = struct.unpack_from("<I", rec.body)
            for i in range(count):
                index, value = struct.unpack_from("<QQ", rec.body, 8 + 16 * i)
                params[index] = value
    return params


@dataclass(frozen=True)
class SavedImage:
    path: Path
    digest: str
    run: HelperRun


def do_save(
    stock_helper: Path,
    fakexen_lib: Path,
    directory: Path,
    *,
    xcflags: int = 1,
    cbflags: int = CBFLAGS_SAVE,
    stream_type: int = 0,
    reply: Reply = default_reply,
    **knobs: str | int | None,
) -> SavedImage:
    out = directory / "image.libxc"
    digest = directory / "save.digest"
    env = fake_env(fakexen_lib, save_digest=digest, **knobs)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        run = run_helper(
            stock_helper, save_args(fd, xcflags, cbflags, stream_type), env, fd, reply
        )
    finally:
        os.close(fd)
    text = digest.read_text() if digest.exists() else ""
    return SavedImage(out, text, run)


def do_restore(
    stock_helper: Path,
    fakexen_lib: Path,
    image: Path,
    *,
    cbflags: int = CBFLAGS_RESTORE,
    stream_type: int = 0,
    reply: Reply = default_reply,
    **knobs: str | int | None,
) -> tuple[HelperRun, int, str]:
    """(run, fd offset after the helper exited, restore digest or "")."""
    digest = image.parent / (image.name + ".restore.digest")
    digest.unlink(missing_ok=True)
    env = fake_env(fakexen_lib, restore_digest=digest, **knobs)
    fd = os.open(image, os.O_RDONLY)
    try:
        run = run_helper(stock_helper, restore_args(fd, cbflags, stream_type), env, fd, reply)
        offset = os.lseek(fd, 0, os.SEEK_CUR)
    finally:
        os.close(fd)
    text = digest.read_text() if digest.exists() else ""
    return run, offset, text


@pytest.fixture(scope="module")
def saved(
    stock_helper: Path, fakexen_lib: Path, tmp_path_factory: pytest.TempPathFactory
) -> SavedImage:
    """One live plain save (cbflags 136), shared by the tests that read it."""
    return do_save(stock_helper, fakexen_lib, tmp_path_factory.mktemp("saved"))


# --------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------


def test_live_save_protocol_and_stream(saved: SavedImage, xen_verify: XenVerify) -> None:
    run = saved.run
    assert run.returncode == 0
    kinds = [f.msgtype for f in run.frames]

    # log-dirty on is the first callback, with (dom, 1), before any page.
    callbacks = [f for f in run.frames if f.msgtype in NEEDS_REPLY]
    assert callbacks[0].msgtype == MSG_SWITCH_QEMU_LOGDIRTY
    assert callbacks[0].ints("II") == (DOMID, 1)
    assert run.replied[0] == (MSG_SWITCH_QEMU_LOGDIRTY, 0)

    # Progress: libxc's labels, in libxc's order.
    labels = run.progress_labels()
    assert labels[0] == "Start of stream"
    assert "Frames iteration 0" in labels
    assert labels.index("Frames iteration 0") < labels.index("Domain now suspended")
    assert labels[-2:] == ["End of stream", "Complete"]
    for frame in run.of(MSG_PROGRESS):
        context, _, done, total = frame.progress()
        assert context == "xc"
        assert done <= total

    # One suspend, answered 1, after the precopy passes.
    assert kinds.count(MSG_SUSPEND) == 1
    assert (MSG_SUSPEND, 1) in run.replied
    suspend_at = kinds.index(MSG_SUSPEND)
    first_frames = next(
        i
        for i, f in enumerate(run.frames)
        if f.msgtype == MSG_PROGRESS and f.progress()[1].startswith("Frames")
    )
    assert first_frames < suspend_at

    # Cleanup switches log-dirty off again, before complete.
    logdirty = [f.ints("II") for f in run.of(MSG_SWITCH_QEMU_LOGDIRTY)]
    assert logdirty == [(DOMID, 1), (DOMID, 0)]

    # complete(0, 0) is the last frame, byte for byte.
    assert run.frames[-1].raw == bytes.fromhex("0a00 0a00 00000000 00000000")
    assert kinds.count(MSG_COMPLETE) == 1

    proc = xen_verify(saved.path, "libxc")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Domain Header: x86 HVM from Xen 4.17" in proc.stdout
    assert len(saved.digest.strip()) == 16


def test_live_save_precopy_passes_shrink(saved: SavedImage) -> None:
    # Default FAKEXEN_DIRTY=100 halving, default policy: 256, 100, 50, 25
    # pages precopied, then 12 after suspend; each pass ends (n, n).
    finals = [
        (doing, total)
        for (_, doing, done, total) in (f.progress() for f in saved.run.of(MSG_PROGRESS))
        if doing.startswith("Frames") and done == total
    ]
    assert [t for (_, t) in finals] == [256, 100, 50, 25, 12]
    version, records, end = walk_image(saved.path.read_bytes())
    assert version == 3
    assert end == saved.path.stat().st_size
    types = [r.rtype for r in records]
    assert types.index(REC_STATIC_DATA_END) < types.index(REC_PAGE_DATA)
    assert types[-4:] == [0x08, 0x09, 0x0A, REC_END]
    assert all(
        struct.unpack_from("<I", r.body)[0] <= 1024 for r in records if r.rtype == REC_PAGE_DATA
    )


def test_nonlive_save(
    stock_helper: Path, fakexen_lib: Path, tmp_path: Path, xen_verify: XenVerify
) -> None:
    img = do_save(stock_helper, fakexen_lib, tmp_path, xcflags=0, pages=3000)
    assert img.run.returncode == 0
    assert img.run.of(MSG_SWITCH_QEMU_LOGDIRTY) == []
    labels = img.run.progress_labels()
    assert labels[:2] == ["Start of stream", "Domain now suspended"]
    frames = [f.progress()[2:] for f in img.run.of(MSG_PROGRESS) if f.progress()[1] == "Frames"]
    assert frames == [(0, 3000), (1024, 3000), (2048, 3000), (3000, 3000)]
    assert img.run.complete() == (0, 0)
    proc = xen_verify(img.path, "libxc")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_failing_save_reports_eio(stock_helper: Path, fakexen_lib: Path, tmp_path: Path) -> None:
    img = do_save(stock_helper, fakexen_lib, tmp_path, fail="memory", errno="EIO")
    run = img.run
    assert run.returncode == 0  # the helper exits 0 after complete
    assert run.frames[-1].raw == bytes.fromhex("0a00 0a00 ffffffff 05000000")
    errors = [text for (level, _, ctx, text) in run.logs() if level == 8 and ctx == "xc"]
    assert any("Failed to write page data to stream (5 = Input/output error)" in t for t in errors)
    # log-dirty was switched on, so cleanup switches it off even on failure.
    assert [f.ints("II") for f in run.of(MSG_SWITCH_QEMU_LOGDIRTY)] == [(DOMID, 1), (DOMID, 0)]
    assert img.digest == ""


@pytest.mark.parametrize(
    ("stage", "err"),
    [("headers", "ENOSPC"), ("suspend", "ESRCH"), ("context", "EFAULT"), ("end", "EPIPE")],
)
def test_failure_stages(
    stock_helper: Path, fakexen_lib: Path, tmp_path: Path, stage: str, err: str
) -> None:
    img = do_save(stock_helper, fakexen_lib, tmp_path, fail=stage, errno=err)
    assert img.run.returncode == 0
    assert img.run.complete() == (-1, getattr(errno, err))


def test_suspend_refused(stock_helper: Path, fakexen_lib: Path, tmp_path: Path) -> None:
    def reply(frame: Frame, nth: int) -> int | None:
        return 0 if frame.msgtype == MSG_SUSPEND else default_reply(frame, nth)

    img = do_save(stock_helper, fakexen_lib, tmp_path, reply=reply)
    assert img.run.returncode == 0
    retval, errnoval = img.run.complete()
    assert retval == -1
    assert errnoval != 0
    assert "Domain now suspended" not in img.run.progress_labels()
    assert any("Guest did not suspend" in text for (_, _, _, text) in img.run.logs())


def test_sigterm_mid_save_gives_ebadf(
    stock_helper: Path, fakexen_lib: Path, tmp_path: Path
) -> None:
    # libxl aborts a save with SIGTERM; the helper dup2s a read-only
    # /dev/null over io_fd, so fakexen's next write fails with EBADF.
    sent = False

    def on_frame(frame: Frame, proc: subprocess.Popen[bytes]) -> None:
        nonlocal sent
        if (
            not sent
            and frame.msgtype == MSG_PROGRESS
            and frame.progress()[1] == "Frames iteration 0"
        ):
            proc.send_signal(signal.SIGTERM)
            sent = True

    out = tmp_path / "image.libxc"
    env = fake_env(fakexen_lib, pages=4096, delay_ms=300)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        run = run_helper(stock_helper, save_args(fd), env, fd, on_frame=on_frame)
    finally:
        os.close(fd)
    assert sent
    assert run.returncode == 0
    assert run.complete() == (-1, errno.EBADF)
    assert any("(9 = Bad file descriptor)" in text for (_, _, _, text) in run.logs())


# --------------------------------------------------------------------------
# restore
# --------------------------------------------------------------------------


def test_restore_stops_at_end(
    saved: SavedImage, stock_helper: Path, fakexen_lib: Path, tmp_path: Path
) -> None:
    image = saved.path.read_bytes()
    _, records, image_len = walk_image(image)
    assert image_len == len(image)
    params = hvm_params(records)

    # What follows the libxc image belongs to the parent: it must stay unread.
    stream = tmp_path / "with-tail"
    stream.write_bytes(image + b"QemuDeviceModelRecord" + b"\xa5" * 4096)

    run, offset, digest = do_restore(stock_helper, fakexen_lib, stream)
    assert run.returncode == 0
    sdd = run.of(MSG_STATIC_DATA_DONE)
    assert [f.ints("I") for f in sdd] == [(0,)]
    assert (MSG_STATIC_DATA_DONE, 0) in run.replied
    results = run.of(MSG_RESTORE_RESULTS)
    assert len(results) == 1
    assert results[0].ints("QQ") == (params[HVM_PARAM_STORE_PFN], params[HVM_PARAM_CONSOLE_PFN])
    assert params[HVM_PARAM_STORE_PFN] != 0
    assert params[HVM_PARAM_CONSOLE_PFN] != 0
    assert run.frames[-1].raw == bytes.fromhex("0a00 0a00 00000000 00000000")
    assert offset == image_len
    assert digest == saved.digest


def test_restore_v2_infers_static_data_end(
    stock_helper: Path, fakexen_lib: Path, tmp_path: Path, xen_verify: XenVerify
) -> None:
    img = do_save(stock_helper, fakexen_lib, tmp_path, stream_version=2)
    assert img.run.complete() == (0, 0)
    version, records, _ = walk_image(img.path.read_bytes())
    assert version == 2
    assert REC_STATIC_DATA_END not in [r.rtype for r in records]
    assert xen_verify(img.path, "libxc").returncode == 0

    run, _, digest = do_restore(stock_helper, fakexen_lib, img.path)
    missing = 1 | 2  # XGR_SDD_MISSING_CPUID | XGR_SDD_MISSING_MSR
    assert [f.ints("I") for f in run.of(MSG_STATIC_DATA_DONE)] == [(missing,)]
    assert run.complete() == (0, 0)
    assert digest == img.digest


def test_restore_static_data_done_refused(
    saved: SavedImage, stock_helper: Path, fakexen_lib: Path
) -> None:
    def reply(frame: Frame, nth: int) -> int | None:
        return -1 if frame.msgtype == MSG_STATIC_DATA_DONE else default_reply(frame, nth)

    run, _, digest = do_restore(stock_helper, fakexen_lib, saved.path, reply=reply)
    assert run.returncode == 0
    assert run.complete() == (-1, errno.EINVAL)
    assert len(run.of(MSG_RESTORE_RESULTS)) == 1  # the helper always sends it
    assert digest == ""


def test_restore_injected_failure(
    saved: SavedImage, stock_helper: Path, fakexen_lib: Path
) -> None:
    run, _, _ = do_restore(stock_helper, fakexen_lib, saved.path, fail="restore", errno="ENOMEM")
    assert run.returncode == 0
    assert run.complete() == (-1, errno.ENOMEM)
    assert any("Restore failed" in text for (_, _, _, text) in run.logs())


def _mutate(image: bytes, how: str) -> bytes:
    _, records, _ = walk_image(image)
    page = next(r for r in records if r.rtype == REC_PAGE_DATA)
    data = bytearray(image)
    if how == "marker":
        data[0] = 0
    elif how == "version":
        struct.pack_into(">I", data, 12, 4)
    elif how == "big-endian":
        struct.pack_into(">H", data, 16, 1)
    elif how == "truncated":
        del data[page.offset + 100 :]
    elif how == "huge-record":
        struct.pack_into("<I", data, page.offset + 4, (128 << 20) + 8)
    elif how == "batch-too-big":
        struct.pack_into("<I", data, page.offset + 8, 1025)
    elif how == "wrong-length":
        struct.pack_into("<I", data, page.offset + 8, 3)
    elif how == "reserved-pfn-bits":
        data[page.offset + 16 + 6] |= 0x10
    elif how == "unknown-mandatory":
        struct.pack_into("<I", data, page.offset, 0x13)
    return bytes(data)


@pytest.mark.parametrize(
    ("how", "err"),
    [
        ("marker", errno.EINVAL),
        ("version", errno.EINVAL),
        ("big-endian", errno.EOPNOTSUPP),
        ("truncated", errno.ENODATA),
        ("huge-record", errno.EMSGSIZE),
        ("batch-too-big", errno.EMSGSIZE),
        ("wrong-length", errno.EINVAL),
        ("reserved-pfn-bits", errno.EINVAL),
        ("unknown-mandatory", errno.EINVAL),
    ],
)
def test_restore_rejects_malformed(
    saved: SavedImage, stock_helper: Path, fakexen_lib: Path, tmp_path: Path, how: str, err: int
) -> None:
    bad = tmp_path / f"bad-{how}"
    bad.write_bytes(_mutate(saved.path.read_bytes(), how))
    run, _, digest = do_restore(stock_helper, fakexen_lib, bad)
    assert run.returncode == 0
    assert run.complete() == (-1, err)
    assert any(level == 8 for (level, _, _, _) in run.logs())
    assert digest == ""


# --------------------------------------------------------------------------
# Remus: two checkpoints, then the primary "dies" (the stream just ends)
# --------------------------------------------------------------------------


def test_remus_checkpoints_and_failover(
    stock_helper: Path, fakexen_lib: Path, tmp_path: Path
) -> None:
    def save_reply(frame: Frame, nth: int) -> int | None:
        if frame.msgtype == MSG_CHECKPOINT:
            return 1 if nth == 0 else 0  # take one more checkpoint, then stop
        return default_reply(frame, nth)

    img = do_save(
        stock_helper,
        fakexen_lib,
        tmp_path,
        cbflags=CBFLAGS_SAVE_REMUS,
        stream_type=1,
        reply=save_reply,
    )
    assert img.run.complete() == (0, 0)
    kinds = [f.msgtype for f in img.run.frames if f.msgtype in NEEDS_REPLY]
    assert kinds == [
        MSG_SWITCH_QEMU_LOGDIRTY,
        MSG_SUSPEND,
        MSG_POSTCOPY,
        MSG_CHECKPOINT,
        MSG_SUSPEND,
        MSG_POSTCOPY,
        MSG_CHECKPOINT,
        MSG_SWITCH_QEMU_LOGDIRTY,
        MSG_COMPLETE,
    ]
    assert "Checkpointed save" in img.run.progress_labels()
    _, records, _ = walk_image(img.path.read_bytes())
    types = [r.rtype for r in records]
    assert types.count(REC_CHECKPOINT) == 2
    assert REC_END not in types

    def restore_reply(frame: Frame, nth: int) -> int | None:
        return (
            1 if frame.msgtype == MSG_CHECKPOINT else default_reply(frame, nth)
        )  # XGR_CHECKPOINT_SUCCESS

    run, offset, digest = do_restore(
        stock_helper,
        fakexen_lib,
        img.path,
        cbflags=CBFLAGS_RESTORE_REMUS,
        stream_type=1,
        reply=restore_reply,
    )
    assert run.returncode == 0
    assert len(run.of(MSG_CHECKPOINT)) == 2
    assert run.complete() == (0, 0)
    assert offset == img.path.stat().st_size
    assert digest == img.digest  # the state of the last complete checkpoint


def test_plain_restore_rejects_checkpoint(
    stock_helper: Path, fakexen_lib: Path, tmp_path: Path
) -> None:
    img = do_save(stock_helper, fakexen_lib, tmp_path, cbflags=CBFLAGS_SAVE_REMUS, stream_type=1)
    run, _, _ = do_restore(stock_helper, fakexen_lib, img.path)
    assert run.complete() == (-1, errno.EINVAL)
    assert any("Found checkpoint in non-checkpointed stream" in t for (_, _, _, t) in run.logs())


# --------------------------------------------------------------------------
# helper lifecycle
# --------------------------------------------------------------------------


def test_stdin_eof_while_waiting_exits_254(
    stock_helper: Path, fakexen_lib: Path, tmp_path: Path
) -> None:
    def reply(frame: Frame, nth: int) -> int | None:
        return None  # close stdin instead of answering the first callback

    img = do_save(stock_helper, fakexen_lib, tmp_path, reply=reply)
    assert img.run.frames[-1].msgtype == MSG_SWITCH_QEMU_LOGDIRTY
    assert img.run.returncode == 254


def test_open_eacces_exits_255(stock_helper: Path, fakexen_lib: Path, tmp_path: Path) -> None:
    img = do_save(stock_helper, fakexen_lib, tmp_path, open_errno="EACCES")
    assert img.run.returncode == 255
    assert img.run.frames
    assert {f.msgtype for f in img.run.frames} == {MSG_LOG}
    logs = img.run.logs()
    assert (
        8,
        errno.EACCES,
        "xencall",
        "Could not obtain handle on privileged command interface",
    ) in logs
    assert logs[-1][2:] == ("libxl-save-helper", "xc_interface_open failed")


def test_bad_knob_fails_open(stock_helper: Path, fakexen_lib: Path, tmp_path: Path) -> None:
    img = do_save(stock_helper, fakexen_lib, tmp_path, fail="no-such-stage")
    assert img.run.returncode == 255
    assert any(
        "unknown FAKEXEN_FAIL stage 'no-such-stage'" in t for (_, _, _, t) in img.run.logs()
    )
