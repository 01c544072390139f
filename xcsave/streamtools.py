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

import os

from . import formats

# Lean on purpose: `xcsave verify` imports this module and the extension
# and little else (tests/test_cli.py checks it), so no typing, logging,
# dataclasses or tempfile at import time.  The result classes live in
# xcsave._streamtypes (dataclasses) and load on first use; a module
# __getattr__ keeps them importable from here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, ParamSpec, TypeAlias, TypeVar

    from ._streamtypes import ConvertResult, StreamProblem, VerifyResult

    Source: TypeAlias = str | os.PathLike[str] | int
    Report: TypeAlias = dict[str, Any]
    _T = TypeVar("_T")
    _P = ParamSpec("_P")

FORMATS: tuple[str, ...] = formats.ALL
STREAM_TYPES: tuple[str, ...] = formats.STREAM_TYPES

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

_RESULT_TYPES = ("ConvertResult", "StreamProblem", "VerifyResult")


def __getattr__(name: str) -> object:
    if name in _RESULT_TYPES:
        from . import _streamtypes

        return getattr(_streamtypes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _log(level: str, msg: str) -> None:
    """Log through ``xcsave.streamtools`` (logging is imported only when
    there is something to say)."""
    from ._log import logger

    getattr(logger(__name__), level)("%s", msg)


def _ext() -> Any:
    """The compiled module, typed loosely (its contract is this file's)."""
    from . import _ext as ext

    return ext


def _src(path_or_fd: Source) -> int | str:
    if isinstance(path_or_fd, int):
        return path_or_fd
    return os.fspath(path_or_fd)


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}, not {value!r}")


def inspect(
    path_or_fd: Source,
    fmt: str = "auto",
    stream_type: str = "plain",
    *,
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
        _log("info", w)
    return report


def _judged(
    scan: Callable[_P, Report],
) -> Callable[[Callable[[Report], _T]], Callable[_P, _T]]:
    """Make ``judge(report)`` a function taking ``scan``'s arguments, so the
    two cannot drift apart (``help()`` shows ``scan``'s signature)."""

    def wrap(judge: Callable[[Report], _T]) -> Callable[_P, _T]:
        def run(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            return judge(scan(*args, **kwargs))

        run.__name__ = run.__qualname__ = judge.__name__
        run.__doc__ = judge.__doc__
        run.__wrapped__ = scan  # type: ignore[attr-defined]
        return run

    return wrap


@_judged(inspect)
def verify(report: Report) -> VerifyResult:
    """Verify a stream: everything Xen's verify-stream-v2 checks and more.

    Takes :func:`inspect`'s arguments.
    """
    from ._streamtypes import StreamProblem, VerifyResult

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
    _check(fmt, formats.CONVERTED, "output format")
    _check(stream_type, formats.LEGACY_STREAM_TYPES, "legacy stream type")
    if width not in (32, 64):
        raise ValueError(f"width must be 32 or 64, not {width}")
    _check(guest, ("pv", "hvm"), "guest type")
    if xl_out is None:
        xl_out = xl and fmt == "libxl"
        if xl and not xl_out:
            _log(
                "warning",
                "the xl header (and its config) is dropped: a bare libxc image cannot carry it",
            )

    ext = _ext()
    from ._streamtypes import ConvertResult, from_native

    def run(in_fd: int, out_fd: int) -> ConvertResult:
        st: dict[str, Any] = ext.convert_legacy(
            in_fd, out_fd, width, guest, fmt, xl, xl_out, stream_type, skip_qemu
        )
        if st["failover"]:
            _log("warning", st["failover"])
        return from_native(ConvertResult, st)

    in_fd = src if isinstance(src, int) else os.open(os.fspath(src), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if isinstance(dst, int):
            return run(in_fd, dst)
        from .files import write_atomically

        return write_atomically(os.fspath(dst), lambda out_fd: run(in_fd, out_fd))
    finally:
        if not isinstance(src, int):
            os.close(in_fd)
