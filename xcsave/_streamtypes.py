"""The result types of :mod:`xcsave.streamtools` (imported from there).

Kept apart so that ``import xcsave.streamtools`` -- and with it ``xcsave
verify`` -- does not pay for ``dataclasses`` (and the ``inspect`` module it
loads); they load on the first verify()/convert() call.
"""

from __future__ import annotations

import dataclasses

from .errors import StreamError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, TypeAlias, TypeVar

    from _typeshed import DataclassInstance

    Report: TypeAlias = dict[str, Any]
    D = TypeVar("D", bound=DataclassInstance)

__all__ = ["ConvertResult", "StreamProblem", "VerifyResult", "from_native"]


def from_native(cls: type[D], native: Mapping[str, Any], **given: Any) -> D:
    """The dataclass ``cls`` from a native call's dict: each field by its
    name, unless the caller gives it (a field neither has keeps its default;
    one without a default is a TypeError: the extension and the type drifted)."""
    kw = {f.name: native[f.name] for f in dataclasses.fields(cls) if f.name in native}
    return cls(**(kw | given))


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


# Documented, pickled and shown as xcsave.streamtools.X (its __getattr__ finds them).
for _cls in (StreamProblem, VerifyResult, ConvertResult):
    _cls.__module__ = "xcsave.streamtools"
