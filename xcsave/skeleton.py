"""Stream skeletons: a migration stream without its page contents.

A skeleton keeps every record of a v2/v3 stream (xl, libxl or libxc
format) exactly as written -- the xl header and its config, the libxl
records, the image and domain headers, the pfn words of every PAGE_DATA
record, HVM_CONTEXT, TSC_INFO, the X86_PV_* records, the device model's
state -- except that each 4096-byte page becomes its 8-byte digest.  A
256 MiB guest's stream becomes a file of a few hundred KB that can be
committed, compared and inflated back into a valid stream with the same
record sequence and lengths (each page a deterministic function of its
digest; zero pages stay zero).  The format and what is kept:
docs/skeletons.md.

The page walk is native (csrc/core/skeleton.c, through ``xcsave._ext``):
page data never enters Python; the body Python compresses is records and
digests.

- :func:`make_skeleton` reads a saved stream and writes its skeleton;
- :func:`load_skeleton` reads a skeleton (or makes one, in memory, of a
  stream) and checks every field of it before anything trusts it;
- :func:`inflate` writes the stream back;
- :func:`compare` says where two skeletons' record sequences differ;
- :func:`format_show` is ``xcsave skeleton show``'s text.

A skeleton file is input like any other: a bad one raises
:class:`xcsave.errors.StreamError` naming what is wrong (offset and part),
and nothing it says is allocated before it is checked against the
file's own size and the body limit.
"""

from __future__ import annotations

import dataclasses
import difflib
import lzma
import os
import struct
from collections.abc import Iterable, Sequence
from typing import Any, Final

from . import files, formats
from ._streamtypes import from_native
from .errors import StreamError

__all__ = [
    "HEADER",
    "MAGIC",
    "VERSION",
    "VOLATILE_LENGTHS",
    "Record",
    "Skeleton",
    "build_skeleton",
    "compare",
    "format_show",
    "inflate",
    "load_skeleton",
    "make_skeleton",
]

#: The first 16 bytes of every skeleton file.
MAGIC: Final = b"xcsave-skeleton\n"
#: The one version this module writes and reads.
VERSION: Final = 1
#: The fixed header: magic, version, flags, format, stream type, the
#: original's size and XXH64, the body's size, pages and zero pages.
HEADER: Final = struct.Struct("<16sII8s8sQQQQQ")
PAGE: Final = 4096
DIGEST: Final = 8
#: The compressed body's decoder may use this much memory (xz preset 6
#: needs 9 MiB, preset 9 65 MiB; a hostile stream cannot ask for more).
XZ_MEMLIMIT: Final = 128 << 20
XZ_PRESET: Final = 6
_READ: Final = 1 << 20

#: Record lengths that differ between two saves of the same guest by the
#: same toolstack, which :func:`compare` does not compare unless asked:
#: the device model's state (its size follows its devices' state) and the
#: xenstore keys it saved.  PAGE_DATA runs are compared as runs (see
#: :func:`compare`); record contents never are.
VOLATILE_LENGTHS: Final = frozenset(
    {("libxl", "EMULATOR_CONTEXT"), ("libxl", "EMULATOR_XENSTORE_DATA")}
)


def _ext() -> Any:
    from . import _ext as ext

    return ext


def body_limit() -> int:
    """The largest body (uncompressed) made or read: the native limit."""
    limit: int = _ext().SKELETON_BODY_MAX
    return limit


@dataclasses.dataclass(frozen=True)
class Record:
    """One record of the stream, in order."""

    layer: str  #: "libxc" or "libxl"
    name: str  #: the record type's name (codec.c's table)
    type: int
    offset: int  #: its header's offset in the original stream
    length: int  #: as in its header (PAGE_DATA: its pages included)
    count: int = 0  #: PAGE_DATA: pfn words
    pages: int = 0  #: PAGE_DATA: pages with data

    def describe(self) -> str:
        name = self.name
        if self.type & 0x80000000 or not name.replace("_", "").isalnum():
            name += f" {self.type:#x}"  # optional or unknown: its number says which
        what = f"{self.layer} {name} ({self.length} bytes"
        if self.name == "PAGE_DATA":
            what += f", {self.count} pfns, {self.pages} pages"
        return what + f", offset {self.offset:#x})"


@dataclasses.dataclass(frozen=True)
class Skeleton:
    """A stream skeleton: what :func:`load_skeleton` read or
    :func:`build_skeleton` made.  ``body`` is the uncompressed body (records
    and digests; docs/skeletons.md)."""

    format: str  #: xl, libxl or libxc
    stream_type: str  #: plain, remus or colo
    stream_size: int  #: the original stream's bytes (= the inflated one's)
    stream_xxh64: int  #: XXH64 (seed 0) of the original stream
    pages: int  #: pages with data (digests)
    zero_pages: int  #: of which all-zero
    records: tuple[Record, ...]
    xl: dict[str, int] | None
    libxl: dict[str, int] | None
    libxc: dict[str, Any] | None
    checkpoints: int
    ended: str | None  #: "end", or "eof" (a checkpointed stream's failover)
    trailing: int  #: bytes after the outermost END, kept as they are
    body: bytes = dataclasses.field(repr=False)
    source: str | None = None  #: the file it was read or made from

    @property
    def guest(self) -> str | None:
        """``pv`` or ``hvm`` (the domain header's type)."""
        return self.libxc["guest"] if self.libxc else None

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(n for n in ("xl", "libxl", "libxc") if getattr(self, n))

    def to_bytes(self) -> bytes:
        """The skeleton file: header and the xz-compressed body."""
        head = HEADER.pack(
            MAGIC,
            VERSION,
            0,
            self.format.encode(),
            self.stream_type.encode(),
            self.stream_size,
            self.stream_xxh64,
            len(self.body),
            self.pages,
            self.zero_pages,
        )
        return head + lzma.compress(self.body, format=lzma.FORMAT_XZ, preset=XZ_PRESET)

    def to_json(self, records: bool = True) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": self.format,
            "stream_type": self.stream_type,
            "guest": self.guest,
            "stream_size": self.stream_size,
            "stream_xxh64": f"{self.stream_xxh64:016x}",
            "body_size": len(self.body),
            "pages": self.pages,
            "zero_pages": self.zero_pages,
            "xl": self.xl,
            "libxl": self.libxl,
            "libxc": self.libxc,
            "checkpoints": self.checkpoints,
            "ended": self.ended,
            "trailing": self.trailing,
            "nrecords": len(self.records),
        }
        if records:
            doc["records"] = [dataclasses.asdict(r) for r in self.records]
        return doc


def _skeleton(info: dict[str, Any], body: bytes, **fields: Any) -> Skeleton:
    records = tuple(Record(*r) for r in info["records"])
    return from_native(Skeleton, info, records=records, body=body, **fields)


def _open_regular(path: str | os.PathLike[str]) -> int:
    """An fd on a regular file (O_NONBLOCK: a FIFO planted at the path does
    not hang the open; it is refused like any other non-file)."""
    import errno
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            code = errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL
            raise OSError(code, "not a regular file", os.fspath(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def build_skeleton(
    stream: str | os.PathLike[str], fmt: str = "auto", stream_type: str = "plain"
) -> Skeleton:
    """The skeleton of the stream in the regular file ``stream`` (in memory).

    ``fmt`` as ``xcsave verify --format`` (``auto``: detected; legacy
    streams have no skeleton); ``stream_type`` is the caller's word, as
    for verify.  An invalid stream raises StreamError (where and why)."""
    fd = _open_regular(stream)
    try:
        body, info = _ext().skeleton_make(fd, fmt, stream_type)
    finally:
        os.close(fd)
    return _skeleton(info, body, stream_type=stream_type, source=os.fspath(stream))


def make_skeleton(
    stream: str | os.PathLike[str],
    out: str | os.PathLike[str],
    fmt: str = "auto",
    stream_type: str = "plain",
) -> Skeleton:
    """Write the skeleton of ``stream`` to ``out`` (private, 0600, and whole
    or not at all: :func:`xcsave.files.write_atomically`) and return it."""
    skel = build_skeleton(stream, fmt, stream_type)
    data = skel.to_bytes()

    def write(fd: int) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    files.write_atomically(os.fspath(out), write)
    return skel


# ------------------------------------------------------------------ reading


def _bad(what: str, reason: str, offset: int | None = None) -> StreamError:
    """A bad skeleton: ``offset N: <what>: <reason>`` (N in the file)."""
    return StreamError(f"{what}: {reason}", offset=offset)


def _name(raw: bytes, allowed: Sequence[str], what: str, offset: int) -> str:
    text = raw.rstrip(b"\0")
    if b"\0" in text or not text.isascii() or text.decode() not in allowed:
        raise _bad("skeleton header", f"{what} {raw!r}: not one of {', '.join(allowed)}", offset)
    return text.decode()


def _read_body(fd: int, size: int, offset: int) -> bytes:
    """The xz stream from ``fd``'s offset to EOF, decompressed: exactly
    ``size`` bytes, or StreamError.  Neither the compressed nor the
    decompressed bytes may exceed what the header says (nor the decoder
    its memory limit), so a bomb stops at the first byte too many."""
    dec = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)
    out = bytearray()
    at = offset
    try:
        while not dec.eof:
            chunk = b""
            if dec.needs_input:
                chunk = os.read(fd, _READ)
                if not chunk:
                    raise _bad(
                        "skeleton body",
                        f"truncated: the compressed body ends at offset {at} "
                        f"after {len(out)} of {size} bytes",
                        at,
                    )
                at += len(chunk)
            out += dec.decompress(chunk, max_length=size + 1 - len(out))
            if len(out) > size:
                raise _bad(
                    "skeleton body", f"longer than the {size} bytes the header says", offset
                )
    except lzma.LZMAError as e:
        raise _bad("skeleton body", f"xz: {e}", offset) from None
    extra = len(dec.unused_data) + len(os.read(fd, 1))
    if extra:
        raise _bad("skeleton body", "bytes after the compressed body", at - len(dec.unused_data))
    if len(out) != size:
        raise _bad("skeleton body", f"{len(out)} bytes, the header says {size}", offset)
    return bytes(out)


def _check_counts(info: dict[str, Any], head: dict[str, int]) -> None:
    for key, what in (
        ("pages", "page digests"),
        ("zero_pages", "zero-page digests"),
        ("stream_size", "stream size"),
    ):
        if info[key] != head[key]:
            raise _bad(
                "skeleton body",
                f"{what}: the body has {info[key]}, the header says {head[key]}",
            )


def load_skeleton(path: str | os.PathLike[str]) -> Skeleton:
    """The skeleton in the file ``path``, checked whole: the header's fields,
    the body against the header's sizes and counts, and the body's records
    walked as a stream.  A file that is a stream itself (xl, libxl or libxc)
    is made into a skeleton in memory instead, so a fresh lab stream and a
    committed skeleton load alike."""
    fd = _open_regular(path)
    try:
        size = os.fstat(fd).st_size
        head = os.read(fd, HEADER.size)
        if head[: len(MAGIC)] != MAGIC:
            kind = _ext().sniff_format(head)
            if kind in formats.STREAM:
                os.close(fd)
                fd = -1
                return build_skeleton(path)
            raise _bad(
                "skeleton header",
                f"{size} bytes: too short for a skeleton"
                if len(head) < len(MAGIC)
                else "not an xcsave skeleton (no magic) nor an xl, libxl or libxc stream",
                0,
            )
        if len(head) < HEADER.size:
            raise _bad(
                "skeleton header",
                f"truncated: {len(head)} of its {HEADER.size} bytes",
                0,
            )
        (_, version, flags, fmt, stype, ssize, sxxh, bsize, pages, zeros) = HEADER.unpack(head)
        if version != VERSION:
            raise _bad("skeleton header", f"version {version} (this xcsave reads {VERSION})", 16)
        if flags:
            raise _bad("skeleton header", f"unknown flags {flags:#x}", 20)
        fmt_name = _name(fmt, formats.STREAM, "format", 24)
        type_name = _name(stype, formats.STREAM_TYPES, "stream type", 32)
        if bsize > body_limit():
            raise _bad(
                "skeleton header",
                f"body of {bsize} bytes: over the {body_limit()}-byte limit (EMSGSIZE)",
                56,
            )
        if zeros > pages or pages * DIGEST > bsize:
            raise _bad(
                "skeleton header",
                f"{pages} pages ({zeros} zero) cannot fit a body of {bsize} bytes",
                64,
            )
        if ssize != bsize + pages * (PAGE - DIGEST):
            raise _bad(
                "skeleton header",
                f"stream size {ssize}: a body of {bsize} bytes with {pages} pages "
                f"inflates to {bsize + pages * (PAGE - DIGEST)}",
                40,
            )
        body = _read_body(fd, bsize, HEADER.size)
    finally:
        if fd >= 0:
            os.close(fd)
    try:
        info = _ext().skeleton_walk(body, fmt_name, type_name)
    except StreamError as e:
        raise _bad(
            "skeleton body", f"at body offset {e.offset} ({e.record or '?'}): {e.reason}"
        ) from None
    _check_counts(info, {"stream_size": ssize, "pages": pages, "zero_pages": zeros})
    return _skeleton(info, body, stream_type=type_name, stream_xxh64=sxxh, source=os.fspath(path))


def inflate(skel: Skeleton, out: str | os.PathLike[str]) -> int:
    """Write the stream ``skel`` inflates to to ``out`` (private, whole or
    not at all); returns its size."""

    def write(fd: int) -> int:
        info = _ext().skeleton_walk(skel.body, skel.format, skel.stream_type, out_fd=fd)
        size: int = info["stream_size"]
        if size != skel.stream_size:  # the walk was checked at load: a bug
            raise _bad("skeleton body", f"inflated to {size} bytes, not {skel.stream_size}")
        return size

    return files.write_atomically(os.fspath(out), write)


# ------------------------------------------------------------------ compare


@dataclasses.dataclass(frozen=True)
class _Step:
    """One step of a record sequence as compared: a record, or a run of
    PAGE_DATA records."""

    key: tuple[str, str]
    length: int | None  # None: not compared
    first: Record
    batches: int = 1
    pfns: int = 0
    pages: int = 0

    def describe(self) -> str:
        if self.key[1] == "PAGE_DATA":
            return (
                f"libxc PAGE_DATA x{self.batches} ({self.pfns} pfns, {self.pages} pages, "
                f"offset {self.first.offset:#x})"
            )
        return self.first.describe()


def _steps(
    records: Iterable[Record], pages: bool, volatile: frozenset[tuple[str, str]]
) -> list[_Step]:
    out: list[_Step] = []
    for r in records:
        key = (r.layer, r.name)
        if r.name == "PAGE_DATA" and r.layer == "libxc":
            if not pages and out and out[-1].key == key:
                last = out[-1]
                out[-1] = dataclasses.replace(
                    last,
                    batches=last.batches + 1,
                    pfns=last.pfns + r.count,
                    pages=last.pages + r.pages,
                )
                continue
            out.append(_Step(key, r.length if pages else None, r, pfns=r.count, pages=r.pages))
            continue
        out.append(_Step(key, None if key in volatile else r.length, r))
    return out


def _header_facts(s: Skeleton) -> dict[str, object]:
    facts: dict[str, object] = {
        "format": s.format,
        "stream type": s.stream_type,
        "guest": s.guest,
        "ended by": s.ended,
        "checkpoints": s.checkpoints,
    }
    if s.xl:
        facts["xl mandatory flags"] = s.xl["mandatory_flags"]
    if s.libxl:
        facts["libxl version"] = s.libxl["version"]
        facts["libxl options"] = s.libxl["options"]
    if s.libxc:
        facts["libxc version"] = s.libxc["version"]
        facts["Xen version"] = f"{s.libxc['xen_major']}.{s.libxc['xen_minor']}"
    return facts


def compare(
    a: Skeleton,
    b: Skeleton,
    *,
    pages: bool = False,
    volatile: Iterable[tuple[str, str]] = VOLATILE_LENGTHS,
) -> list[str]:
    """Where ``a`` and ``b``'s record sequences differ, one line each (an
    empty list: they match).

    Compared: the format, stream type, guest type, how the stream ends, the
    header fields a toolstack sets (xl's mandatory flags, libxl's version
    and options, the libxc version and the Xen version in the domain
    header), then the records in order by layer and type, and the length
    of each record but those in ``volatile`` (:data:`VOLATILE_LENGTHS`).
    Consecutive PAGE_DATA records compare as one run, whatever their
    number, pfns and pages (how a toolstack batches the pages, and how many
    it sends, differ between saves); ``pages=True`` compares every
    PAGE_DATA record's pfn count, page count and length as well.  Never
    compared: page digests, record contents (TSC_INFO's times, register
    values, the xl config's uuid), offsets and the original's digest."""
    diffs: list[str] = []
    fa, fb = _header_facts(a), _header_facts(b)
    for key in dict.fromkeys([*fa, *fb]):
        if fa.get(key) != fb.get(key):
            diffs.append(f"{key}: {fa.get(key, '-')} in A, {fb.get(key, '-')} in B")
    vol = frozenset(volatile)
    sa, sb = _steps(a.records, pages, vol), _steps(b.records, pages, vol)
    ka = [(s.key, s.length) for s in sa]
    kb = [(s.key, s.length) for s in sb]
    matcher = difflib.SequenceMatcher(a=ka, b=kb, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            continue
        where = f"record {i1 + 1} of A, {j1 + 1} of B"
        if op == "replace" and i2 - i1 == j2 - j1:
            for i, j in zip(range(i1, i2), range(j1, j2), strict=True):
                diffs.append(
                    f"record {i + 1} of A, {j + 1} of B: A has {sa[i].describe()}, "
                    f"B has {sb[j].describe()}"
                )
            continue
        if i2 > i1:
            diffs.append(f"{where}: only A has " + ", ".join(s.describe() for s in sa[i1:i2]))
        if j2 > j1:
            diffs.append(f"{where}: only B has " + ", ".join(s.describe() for s in sb[j1:j2]))
    if pages and a.pages != b.pages:
        diffs.append(f"pages: {a.pages} in A, {b.pages} in B")
    return diffs


# ------------------------------------------------------------------ show


def _runs(records: Sequence[Record]) -> list[tuple[Record, int, int, int, int]]:
    """Records with PAGE_DATA runs folded: (first, records, pfns, pages, bytes)."""
    out: list[tuple[Record, int, int, int, int]] = []
    for r in records:
        if r.name == "PAGE_DATA" and out and out[-1][0].name == "PAGE_DATA":
            first, n, pfns, pgs, size = out[-1]
            out[-1] = (first, n + 1, pfns + r.count, pgs + r.pages, size + r.length)
        else:
            out.append((r, 1, r.count, r.pages, r.length))
    return out


def format_show(skel: Skeleton, label: str | None = None) -> str:
    """``xcsave skeleton show``: the headers, then the record sequence with
    each run of PAGE_DATA records on one line."""
    rows: list[tuple[str, str]] = [("skeleton", label or skel.source or "-")]
    guest = (skel.guest or "?").upper()
    rows.append(
        (
            "stream",
            f"{' > '.join(skel.layers)}, {skel.stream_type}, {guest}, {skel.stream_size} bytes, "
            f"xxh64 {skel.stream_xxh64:016x}",
        )
    )
    if skel.xl:
        rows.append(
            (
                "xl",
                f"mandatory flags {skel.xl['mandatory_flags']:#x}, "
                f"config {skel.xl['config_len']} bytes",
            )
        )
    if skel.libxl:
        rows.append(
            ("libxl", f"version {skel.libxl['version']}, options {skel.libxl['options']:#x}")
        )
    if skel.libxc:
        x = skel.libxc
        rows.append(
            (
                "libxc",
                f"v{x['version']}, Xen {x['xen_major']}.{x['xen_minor']}, {guest}, "
                f"image at offset {x['offset']:#x}",
            )
        )
    batches = sum(1 for r in skel.records if r.name == "PAGE_DATA")
    rows.append(
        (
            "pages",
            f"{skel.pages} ({skel.zero_pages} zero) in {batches} PAGE_DATA records",
        )
    )
    ended = skel.ended or "-"
    rows.append(("records", f"{len(skel.records)}, ended by {ended}"))
    if skel.checkpoints:
        rows.append(("checkpoints", str(skel.checkpoints)))
    if skel.trailing:
        rows.append(("trailing", f"{skel.trailing} bytes after END"))
    width = max(len(k) for k, _ in rows)
    out = [f"{k:<{width}}  {v}" for k, v in rows]
    out.append("")
    out.append(f"{'offset':>12}  {'layer':<6} {'record':<24} {'length':>10}")
    for first, n, pfns, pgs, size in _runs(skel.records):
        line = f"{first.offset:>#12x}  {first.layer:<6} {first.name:<24} {size:>10}"
        if first.name == "PAGE_DATA":
            line += f"  x{n}: {pfns} pfns, {pgs} pages"
        out.append(line)
    return "\n".join(out)
