"""Stream format and stream type names: the one Python place that lists them.

They are the names of the C codec's tables (csrc/core/codec.c, exported as
``xcsave._ext.FORMATS`` and ``xcsave._ext.STREAM_TYPES``, in enum order);
tests/test_codec.py fails if the two drift.  Listed here rather than read
from the extension so that the CLI's lean paths stay light: this module
imports nothing at run time.  The C format detection is
``xcsave._ext.sniff_format``.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

#: Every format, in the C enum's order (``enum xcs_fmt``): what verify,
#: inspect and convert's input take; ``auto`` is "detect it".
ALL: Final = ("auto", "xl", "libxl", "libxc", "legacy")
#: What save, restore and migrate write and read (the engines' ``wrap``):
#: a libxc v2/v3 image, bare, in a libxl stream, or that behind an xl header.
STREAM: Final = ("libxc", "libxl", "xl")
#: What the legacy converter writes (convert's output; the C converter's
#: ``out_format``): a bare v3 image or a libxl stream (optionally behind an
#: xl header, which is a flag, not a format).
CONVERTED: Final = ("libxc", "libxl")
#: Stream types in the C enum's order (``enum xcs_stream_type``): a type's
#: index is its number on the helper's argv (xc_stream_type_t).
STREAM_TYPES: Final = ("plain", "remus", "colo")
#: The stream types a legacy (pre-4.6) stream can have: COLO came later.
LEGACY_STREAM_TYPES: Final = ("plain", "remus")
#: The Xen guest types xcsave's own supervisor (the xcsave-1 dialect) saves
#: and restores.  An HVM guest is refused in one line (EOPNOTSUPP) before
#: it is touched: its device model's state (QEMU's, through QMP) belongs in
#: its image and only a toolstack that drives QEMU saves it.  Under libxl
#: (the xen-4.17 dialect: xcsave-helper as libxl's save helper) every type
#: goes, libxl saving the device model itself (csrc/backend_xen.c).
SUPERVISOR_GUESTS: Final = ("pv", "pvh")

__all__ = [
    "ALL",
    "CONVERTED",
    "LEGACY_STREAM_TYPES",
    "STREAM",
    "STREAM_TYPES",
    "SUPERVISOR_GUESTS",
]
