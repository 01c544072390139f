"""The framing a toolstack writes around a libxc image: the libxl v2 stream
and the xl savefile header.

Written from shared/specs/xen-migration-facts.md (section 3.2, the libxl
stream; section 3.3, xl's header), never from Xen's code.  One encoder for
both users: :mod:`xcsave.corpus` (test streams, broken ones included: hence
``rec``'s ``length`` and ``fill`` knobs) and :mod:`xcsave.devicemodel` (the
records an HVM save carries after the libxc image)::

    [xl header + JSON config] libxl header | LIBXC_CONTEXT | <libxc image>
        | [EMULATOR_XENSTORE_DATA] | [EMULATOR_CONTEXT] | END
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final

# libxl record types (section 3.2)
L_END: Final = 0
L_LIBXC_CONTEXT: Final = 1
L_EMULATOR_XENSTORE_DATA: Final = 2
L_EMULATOR_CONTEXT: Final = 3
L_CHECKPOINT_END: Final = 4
L_CHECKPOINT_STATE: Final = 5

#: The emulator ids of the EMULATOR_* records' header (0 unknown, 1 qemu-trad).
EMULATOR_QEMU_UPSTREAM: Final = 2

XL_MAGIC: Final = b"Xen saved domain, xl format\n \x00 \r"
XL_BYTEORDER: Final = 0x01020304
#: xl header mandatory flags: the config is JSON; the stream after it is libxl v2.
XL_FLAG_JSON: Final = 1
XL_FLAG_STREAMV2: Final = 2
LIBXL_IDENT: Final = 0x4C6962786C466D74  # "LibxlFmt"


def pad8(body: bytes, fill: int = 0) -> bytes:
    """``body`` padded to a multiple of 8 bytes with ``fill``."""
    return body + bytes([fill]) * ((8 - len(body) % 8) % 8)


def rec(rtype: int, body: bytes = b"", *, length: int | None = None, fill: int = 0) -> bytes:
    """A v2 record: {u32 type; u32 length} + body + zero padding to 8."""
    n = len(body) if length is None else length
    return struct.pack("<II", rtype, n) + pad8(body, fill)


def libxl_hdr(options: int = 0, version: int = 2, ident: int = LIBXL_IDENT) -> bytes:
    """The libxl stream header: big-endian ident, version, options."""
    return struct.pack(">QII", ident, version, options)


def emu(rtype: int, payload: bytes, emu_id: int = EMULATOR_QEMU_UPSTREAM, index: int = 0) -> bytes:
    """An EMULATOR_* record: {u32 emulator id; u32 index} + payload."""
    return rec(rtype, struct.pack("<II", emu_id, index) + payload)


def xenstore_kv(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    """EMULATOR_XENSTORE_DATA's payload: ``key\\0value\\0`` for each pair."""
    return b"".join(k + b"\x00" + v + b"\x00" for k, v in pairs)


def xl_hdr(
    mflags: int = XL_FLAG_JSON | XL_FLAG_STREAMV2,
    config: bytes = b'{"c_info": {"name": "guest"}}',
    byteorder: int = XL_BYTEORDER,
    oflags: int = 0,
) -> bytes:
    """xl's savefile header: magic, byte order, flags, then the optional data
    (u32 length + the config, which xl writes with its NUL)."""
    opt = struct.pack("<I", len(config)) + config if config else b""
    return XL_MAGIC + struct.pack("<IIII", byteorder, mflags, oflags, len(opt)) + opt


def head(xl_config: bytes | None) -> bytes:
    """What comes before the libxc image: [the xl header with ``xl_config``
    (JSON, NUL-terminated here as xl writes it)], the libxl header and an
    empty LIBXC_CONTEXT record (the image follows it directly)."""
    xl = xl_hdr(config=xl_config + b"\x00") if xl_config is not None else b""
    return xl + libxl_hdr() + rec(L_LIBXC_CONTEXT)


def tail(emulator_context: bytes | None, xenstore: Iterable[tuple[bytes, bytes]] = ()) -> bytes:
    """What comes after the libxc image: the device model's records where
    libxl puts them (EMULATOR_XENSTORE_DATA only when there is data), END."""
    kv = xenstore_kv(xenstore)
    out = emu(L_EMULATOR_XENSTORE_DATA, kv) if kv else b""
    if emulator_context is not None:
        out += emu(L_EMULATOR_CONTEXT, emulator_context)
    return out + rec(L_END)


__all__ = [
    "EMULATOR_QEMU_UPSTREAM",
    "LIBXL_IDENT",
    "L_CHECKPOINT_END",
    "L_CHECKPOINT_STATE",
    "L_EMULATOR_CONTEXT",
    "L_EMULATOR_XENSTORE_DATA",
    "L_END",
    "L_LIBXC_CONTEXT",
    "XL_MAGIC",
    "emu",
    "head",
    "libxl_hdr",
    "pad8",
    "rec",
    "tail",
    "xenstore_kv",
    "xl_hdr",
]
