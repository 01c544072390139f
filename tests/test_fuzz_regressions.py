"""Every fuzzer finding, replayed through the product (issue 7, part 3).

Each file in tests/regressions/ is the input that found a bug, in the format
of the libFuzzer harness that found it (fuzz/README.md): its name starts
with the harness (``scan-``, ``legacy-``, ``restore-``, ``helper-``), and
the first byte(s) are that harness's option bits.  Here each is decoded and
sent where a user's input would go -- ``xcsave verify``, ``xcsave convert``,
a restore through the helper, the helper's argv -- under the same
guarantees as tests/test_hostile.py: no crash, one line, bounded memory.
``fuzz/run --replay`` runs the same files through the sanitized harnesses.

EXPECT says what each finding must now produce (a substring of the one
line of the rejection, or ACCEPTED), and which commit fixed it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from test_hostile import (
    check_clean,
    cli_argv,
    helper_as_limit,
    restore_one,
    run_bounded,
    stream_worker,
)

from xcsave.supervisor import helper_path

REGRESSIONS = Path(__file__).resolve().parent / "regressions"
ACCEPTED = "<accepted>"

#: file -> (what the product must say now, the bug it found)
EXPECT: dict[str, tuple[str, str]] = {
    "scan-libxl-record-length-1.4g-pipe.bin": (
        "truncated",
        "verify from a pipe allocated the record length the stream claimed (1.4 GB) "
        "before reading it; now the buffer grows as bytes arrive",
    ),
    "scan-pfn-sizes-unique-page-bitmap.bin": (
        "exceeds the restorer's limit",
        "one pfn word near 2^30 made verify allocate and zero a 128 MiB bitmap; "
        "now the unique-page tracker is sparse (4 KiB chunks)",
    ),
    "scan-libxl-length-padding-wraps.bin": (
        "no record can be that long",
        "a libxl record length of 0xfffffffd wrapped its padded size to 0: verify "
        "read 4 GiB past the record (SIGSEGV); now refused",
    ),
    "restore-tsc-length-100m-pipe.bin": (
        "truncated",
        "a record header claiming 100 MiB made the restoring helper allocate it "
        "before reading (ENOMEM under a memory limit); now bodies grow as they arrive",
    ),
    "restore-end-with-length.bin": (
        "END at offset",
        "a libxc END claiming a body was accepted without reading it, so the libxl "
        "layer after the image would have read that body as its next record; found "
        "by test_hostile's bit flips; now refused, as the verifier does",
    ),
    "helper-argv-newline.bin": (
        "unexpected mode argument",
        "a newline in argv split the helper's fatal message into several lines",
    ),
    "helper-io-fd-is-stdout.bin": (
        "fds 0-2",
        "--io-fd 1 made the helper write the migration stream into its control pipe",
    ),
    "helper-logdirty-not-built-leak.bin": (
        ACCEPTED,
        "the one-shot modes (logdirty, sched-cap) returned without freeing the frame "
        "buffer their messages grew: a leak in the fuzz harness, which runs main() "
        "again and again; now freed on their way out, as the other modes do",
    ),
}


def _cases() -> list[Path]:
    return sorted(REGRESSIONS.glob("*.bin"))


def test_every_regression_has_an_expectation() -> None:
    names = {p.name for p in _cases()}
    assert names == set(EXPECT), names ^ set(EXPECT)


# ---------------------------------------------------------------- replays

FMTS = ("auto", "xl", "libxl", "libxc", "legacy", "auto", "auto", "auto")
STREAM_TYPES = ("plain", "remus", "colo", "plain")
WRAPS = ("libxc", "libxl", "xl", "libxc")


def replay_scan(data: bytes, tmp: Path, expect: str) -> None:
    """fuzz_scan's options -> ``xcsave verify`` (worker and CLI), file and pipe."""
    b0, b1, stream = data[0], data[1], data[2:]
    fmt, stream_type = FMTS[(b0 >> 1) & 7], STREAM_TYPES[(b0 >> 4) & 3]
    legacy: list[str] = []
    item: dict[str, object] = {"fmt": fmt, "stream_type": stream_type}
    if b1 & 1:
        width, guest = (32 if b1 & 2 else 64), ("hvm" if b1 & 4 else "pv")
        legacy = ["--width", str(width), "--guest", guest]
        item |= {"width": width, "guest": guest}
    path = tmp / "in.bin"
    path.write_bytes(stream)
    for r in stream_worker("verify", [{**item, "path": str(path)}]):
        assert (expect == ACCEPTED) == r["ok"], r
        if expect != ACCEPTED:
            assert expect in r["message"], r
    args = ["verify", "-", "--format", fmt, "--stream-type", stream_type, *legacy]
    if b1 & 8:
        args.append("--allow-trailing")
    run = run_bounded(cli_argv(*args), stdin=stream, stdin_pipe=bool(b0 & 1))
    check_clean(run)
    assert expect in (run.stderr or ACCEPTED), run


def replay_legacy(data: bytes, tmp: Path, expect: str) -> None:
    """fuzz_legacy's options -> ``xcsave convert``."""
    o, stream = data[0], data[1:]
    out = tmp / "out.img"
    args = [
        "convert", "-", out, "--width", "32" if o & 2 else "64", "--guest",
        "hvm" if o & 4 else "pv", "--format", "libxl" if o & 8 else "libxc",
        "--stream-type", "remus" if o & 64 else "plain",
        *(["--xl"] if o & 16 else []),
        *(["--xl-out"] if o & 32 else ["--no-xl-out"]),
        *(["--skip-qemu"] if o & 128 else []),
    ]  # fmt: skip
    run = run_bounded(cli_argv(*args), stdin=stream, stdin_pipe=bool(o & 1))
    check_clean(run, fail=(1, 2))
    assert expect in (run.stderr or ACCEPTED), run
    if run.returncode:
        assert not out.exists()


def replay_restore(data: bytes, tmp: Path, expect: str) -> None:
    """fuzz_restore's options -> a restore through the helper (API), memory-limited."""
    o, stream = data[0], data[1:]
    with helper_as_limit():
        outcome = asyncio.run(
            restore_one(
                stream,
                tmp / "target.dom",
                fmt=WRAPS[(o >> 1) & 3],
                stream_type="remus" if o & 8 else "plain",
                pipe=bool(o & 1),
                max_pages=64 if o & 128 else 4096,
            )
        )
    if expect == ACCEPTED:
        assert outcome.accepted, outcome
    else:
        assert expect in outcome.message, outcome


def replay_helper(data: bytes, tmp: Path, expect: str) -> None:
    """fuzz_helper's input -> the helper's argv and stdin."""
    parts = data.split(b"\0")
    args: list[str] = []
    for i, part in enumerate(parts):
        if not part:
            replies = b"\0".join(parts[i + 1 :])
            break
        args.append(os.fsdecode(part))
    else:
        replies = b""
    run = run_bounded([str(helper_path()), *args], stdin=replies, as_limit=None, timeout=30)
    assert run.returncode in (0, 254, 255), run
    assert len(run.stderr.splitlines()) <= 1, run.stderr
    assert expect in (run.stderr or ACCEPTED), run


REPLAY = {
    "scan": replay_scan,
    "legacy": replay_legacy,
    "restore": replay_restore,
    "helper": replay_helper,
}


@pytest.mark.parametrize("path", _cases(), ids=lambda p: p.name)
def test_regression(path: Path, tmp_path: Path) -> None:
    harness = path.name.split("-", 1)[0]
    expect, _why = EXPECT[path.name]
    REPLAY[harness](path.read_bytes(), tmp_path, expect)
