"""Inspect, verify and convert Xen migration streams at native speed.

A typed layer over the native scanner and legacy converter in
``xcsave._ext`` (csrc/core/scan.c, legacy.c).  The scan runs in C, record by
record, with the GIL released; Python only sees the report.

- :func:`inspect` returns the report dict of a stream (valid or not).
- :func:`verify` returns a :class:`VerifyResult`; ``raise_for_error()``
  turns an invalid stream into :class:`xcsave.errors.StreamError` with
  ``offset``, ``record`` and ``reason``.
- :func:`convert` turns a pre-4.6 legacy stream into a v3 libxc image or a
  libxl stream (optionally in an xl header), writing a path atomically.

Formats: ``auto`` (detect), ``xl``, ``libxl``, ``libxc``, ``legacy``.  Stream
types: ``plain``, ``remus``, ``colo`` -- as with Xen, whether a stream is
checkpointed is the caller's word, never the stream's (facts 2.6, 3.4).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import tempfile
from collections.abc import Iterator
from typing import Any, Literal

from .errors import StreamError

log = logging.getLogger(__name__)

Source = str | os.PathLike[str] | int
Report = dict[str, Any]
Format = Literal["auto", "xl", "libxl", "libxc", "legacy"]
StreamType = Literal["plain", "remus", "colo"]
Guest = Literal["pv", "hvm"]

FORMATS: tuple[str, ...] = ("auto", "xl", "libxl", "libxc", "legacy")
STREAM_TYPES: tuple[str, ...] = ("plain", "remus", "colo")

__all__ = [
    "FORMATS",
    "STREAM_TYPES",
    "ConvertResult",
    "StreamProblem",
    "VerifyResult",
    "convert",
    "inspect",
    "verify",
]


def _ext() -> Any:
    """The compiled module, typed loosely (its contract is this file's)."""
    return importlib.import_module("xcsave._ext")


def _src(path_or_fd: Source) -> int | str:
    if isinstance(path_or_fd, int):
        return path_or_fd
    return os.fspath(path_or_fd)


@dataclasses.dataclass(frozen=True, slots=True)
class StreamProblem:
    """Where and why a stream is invalid (the FIRST problem found)."""

    offset: int
    layer: str
    record: str
    type: int | None
    reason: str

    def __str__(self) -> str:
        return f"offset {self.offset}, record {self.record}: {self.reason}"

    def exception(self) -> StreamError:
        return StreamError(self.reason, offset=self.offset, record=self.record)


@dataclasses.dataclass(frozen=True, slots=True)
class VerifyResult:
    """The verdict on one stream; true when valid."""

    valid: bool
    report: Report
    error: StreamProblem | None

    def __bool__(self) -> bool:
        return self.valid

    @property
    def message(self) -> str:
        return str(self.error) if self.error else "valid"

    def raise_for_error(self) -> None:
        if self.error is not None:
            raise self.error.exception()


@dataclasses.dataclass(frozen=True, slots=True)
class ConvertResult:
    """What a legacy conversion read and wrote."""

    in_bytes: int
    out_bytes: int
    pages: int
    vcpus: int
    checkpoints: int
    failover: str | None  # Remus: why a later checkpoint was dropped
    legacy: dict[str, Any]  # what the legacy image held (chunks, qemu, ...)


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")


def inspect(
    path_or_fd: Source,
    fmt: str = "auto",
    *,
    stream_type: str = "plain",
    width: int | None = None,
    guest: str | None = None,
    allow_trailing: bool = False,
) -> Report:
    """Scan a stream and return its report (``report["error"]`` if invalid).

    ``width``/``guest`` matter only for legacy streams, where they are
    guessed (facts section 2 hints) unless given.  I/O errors raise OSError.
    """
    _check(fmt, FORMATS, "format")
    _check(stream_type, STREAM_TYPES, "stream type")
    report: Report = _ext().scan(
        _src(path_or_fd), fmt, stream_type, width or 0, guest or "", allow_trailing
    )
    for w in report["warnings"]:
        log.info("%s", w)
    return report


def verify(
    path_or_fd: Source,
    fmt: str = "auto",
    stream_type: str = "plain",
    *,
    width: int | None = None,
    guest: str | None = None,
    allow_trailing: bool = False,
) -> VerifyResult:
    """Verify a stream: everything Xen's verify-stream-v2 checks and more."""
    report = inspect(
        path_or_fd,
        fmt,
        stream_type=stream_type,
        width=width,
        guest=guest,
        allow_trailing=allow_trailing,
    )
    err = report["error"]
    problem = (
        None
        if err is None
        else StreamProblem(
            offset=int(err["offset"]),
            layer=str(err["layer"]),
            record=str(err["record"]),
            type=err["type"],
            reason=str(err["reason"]),
        )
    )
    return VerifyResult(valid=bool(report["valid"]), report=report, error=problem)


@contextlib.contextmanager
def _atomic_output(path: str) -> Iterator[int]:
    """A temp file next to ``path``; fsync'd and renamed over it on success,
    removed on failure."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".xcsave-", suffix=".tmp", dir=directory)
    try:
        yield fd
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        tmp = ""
        with contextlib.suppress(OSError):
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def convert(  # noqa: PLR0917 - the brief's positional signature
    src: Source,
    dst: Source,
    width: int,
    guest: str,
    fmt: str = "libxc",
    xl: bool = False,
    *,
    xl_out: bool | None = None,
    stream_type: str = "plain",
    skip_qemu: bool = False,
) -> ConvertResult:
    """Convert the legacy (pre-4.6) stream ``src`` to v3 at ``dst``.

    ``width`` is the saving toolstack's word size (32/64) and ``guest`` pv or
    hvm, as Xen's convert-legacy-stream needs them.  ``fmt`` libxc writes a
    bare image (an HVM qemu record follows END as ``DeviceModelRecord0002``,
    as Xen's converter does); libxl writes the libxl stream with the qemu
    record as EMULATOR_CONTEXT.  ``xl``: the input starts with an xl header;
    ``xl_out`` (default: ``xl`` with libxl output) writes one.
    ``stream_type`` remus reads a checkpointed legacy stream.  A path ``dst``
    is written atomically; an fd is written in place and not closed.
    Invalid input raises StreamError; I/O errors OSError.
    """
    _check(fmt, ("libxc", "libxl"), "output format")
    _check(stream_type, ("plain", "remus"), "legacy stream type")
    if width not in (32, 64):
        raise ValueError(f"width must be 32 or 64, not {width}")
    _check(guest, ("pv", "hvm"), "guest type")
    if xl_out is None:
        xl_out = xl and fmt == "libxl"
        if xl and not xl_out:
            log.warning(
                "the xl header (and its config) is dropped: a bare libxc image cannot carry it"
            )

    ext = _ext()

    def run(in_fd: int, out_fd: int) -> ConvertResult:
        st: dict[str, Any] = ext.convert_legacy(
            in_fd, out_fd, width, guest, fmt, xl, xl_out, stream_type, skip_qemu
        )
        if st["failover"]:
            log.warning("%s", st["failover"])
        return ConvertResult(
            in_bytes=st["in_bytes"],
            out_bytes=st["out_bytes"],
            pages=st["pages"],
            vcpus=st["vcpus"],
            checkpoints=st["checkpoints"],
            failover=st["failover"],
            legacy=st["legacy"],
        )

    in_fd = src if isinstance(src, int) else os.open(os.fspath(src), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if isinstance(dst, int):
            return run(in_fd, dst)
        with _atomic_output(os.fspath(dst)) as out_fd:
            return run(in_fd, out_fd)
    finally:
        if not isinstance(src, int):
            os.close(in_fd)
