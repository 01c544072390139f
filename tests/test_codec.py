"""The stream codecs (csrc/core/codec.c), through every reader and writer.

The headers are built by the save engine and the legacy converter and
parsed by the verifier and the restore engine, all through one codec.  These
tests hold the codec to the format from the outside:

- what the writers put on the wire is checked field by field against the
  specification's layout (``struct`` here, not the codec), so a builder and a
  parser that agree on a wrong layout still fail;
- every header fault is refused by the verifier and by the restore engine
  with the same reason, the codec's, so the two readers cannot drift;
- the format and stream type names are the C tables' (``_ext.FORMATS``,
  ``_ext.STREAM_TYPES``) wherever Python lists them (xcsave/formats.py),
  and every entry point that parses a name takes exactly its subset;
- ``_ext.sniff_format`` is the verifier's format detection on a peek.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import corpus_cases
import pytest

from xcsave import _ext, api, cli, corpus, formats, streamtools
from xcsave.errors import XcsaveError
from xcsave.supervisor import helper_path

XL_MAGIC = b"Xen saved domain, xl format\n \0 \r"
LIBXL_IDENT = 0x4C6962786C466D74  # "LibxlFmt"
IHDR_MARKER = 0xFFFFFFFFFFFFFFFF
IHDR_ID = 0x58454E46  # "XENF"


def saved_xl_stream(tmp_path: Path) -> bytes:
    """A small sim domain saved as an xl savefile (every header we write)."""
    src = str(tmp_path / "src")
    _ext.sim_create(src, 64, 1, 7)
    out = tmp_path / "saved"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _ext.engine_save(fd, src, wrap="xl")
    finally:
        os.close(fd)
    return out.read_bytes()


def offsets(stream: bytes) -> tuple[int, int, int]:
    """Where the libxl header, the image header and the domain header start."""
    optlen = struct.unpack_from("<I", stream, 44)[0]
    libxl = 48 + optlen
    ihdr = libxl + 16 + 8  # libxl header, LIBXC_CONTEXT record header
    return libxl, ihdr, ihdr + 24


def test_save_writes_the_headers_of_the_spec(tmp_path: Path) -> None:
    s = saved_xl_stream(tmp_path)
    assert s[:32] == XL_MAGIC
    order, mflags, oflags, optlen, cfglen = struct.unpack_from("<IIIII", s, 32)
    assert (order, mflags, oflags) == (0x01020304, 0x3, 0)  # JSON | STREAMV2
    assert optlen == cfglen + 4 and s[52 + cfglen - 1] == 0  # xl counts the NUL
    libxl, ihdr, dhdr = offsets(s)
    assert struct.unpack_from(">QII", s, libxl) == (LIBXL_IDENT, 2, 0)
    assert struct.unpack_from("<II", s, libxl + 16) == (1, 0)  # LIBXC_CONTEXT
    assert struct.unpack_from(">QIIHHI", s, ihdr) == (IHDR_MARKER, IHDR_ID, 3, 0, 0, 0)
    assert struct.unpack_from("<IHHII", s, dhdr) == (2, 12, 0, 4, 17)  # HVM, Xen 4.17
    # HVM static data as Xen 4.17 writes it: the CPUID policy (leaves of 24
    # bytes), the MSR policy (16-byte entries, flags zero), STATIC_DATA_END.
    off = dhdr + 16
    ctype, clen = struct.unpack_from("<II", s, off)
    assert ctype == 0x11 and clen and clen % 24 == 0  # X86_CPUID_POLICY
    leaves = [struct.unpack_from("<6I", s, off + 8 + i) for i in range(0, clen, 24)]
    assert leaves[0][:2] == (0, 0xFFFFFFFF) and leaves[0][2] >= 1  # max basic leaf
    off += 8 + clen
    mtype, mlen = struct.unpack_from("<II", s, off)
    assert (mtype, mlen) == (0x12, 32)  # X86_MSR_POLICY: the two MSRs 4.17 sends
    msrs = [struct.unpack_from("<IIQ", s, off + 8 + i) for i in range(0, mlen, 16)]
    assert [(idx, flags) for idx, flags, _ in msrs] == [(0xCE, 0), (0x10A, 0)]
    off += 8 + mlen
    assert struct.unpack_from("<II", s, off) == (0x10, 0)  # STATIC_DATA_END
    # The first PAGE_DATA: record header, then count and a zero reserved word.
    off += 8
    while struct.unpack_from("<I", s, off)[0] != 1:
        off += 8 + (struct.unpack_from("<I", s, off + 4)[0] + 7) // 8 * 8
    length, count, res = struct.unpack_from("<III", s, off + 4)
    pfns = struct.unpack_from(f"<{count}Q", s, off + 16)
    ndata = sum(1 for w in pfns if (w >> 60) < 0xD)
    assert res == 0 and length == 8 + 8 * count + 4096 * ndata


def test_the_converter_writes_the_headers_of_the_spec(tmp_path: Path) -> None:
    src = tmp_path / "legacy"
    src.write_bytes(corpus.Legacy().build())
    dst = tmp_path / "v3"
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        _ext.convert_legacy(fin.fileno(), fout.fileno(), 64, "hvm", "libxl", xl_out=True)
    s = dst.read_bytes()
    assert s[:32] == XL_MAGIC
    assert struct.unpack_from("<IIII", s, 32) == (0x01020304, 0x2, 0, 0)  # STREAMV2
    libxl, ihdr, dhdr = offsets(s)
    assert struct.unpack_from(">QII", s, libxl) == (LIBXL_IDENT, 2, 0x2)  # LEGACY
    assert struct.unpack_from("<II", s, libxl + 16) == (1, 0)
    assert struct.unpack_from(">QIIHHI", s, ihdr) == (IHDR_MARKER, IHDR_ID, 3, 0, 0, 0)
    assert struct.unpack_from("<IHHII", s, dhdr) == (2, 12, 0, 0, 1)  # converted, v1


def test_legacy_inside_an_xl_header_keeps_its_words(tmp_path: Path) -> None:
    cfg = b'{"c_info": {"name": "old"}}\0'
    hdr = XL_MAGIC + struct.pack("<IIII", 0x01020304, 0x1, 0x5A, len(cfg)) + cfg
    src = tmp_path / "legacy"
    src.write_bytes(hdr + corpus.Legacy().build())
    dst = tmp_path / "v3"
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        _ext.convert_legacy(
            fin.fileno(), fout.fileno(), 64, "hvm", "libxl", xl_in=True, xl_out=True
        )
    s = dst.read_bytes()
    # The same header, now saying STREAMV2, with its optional words and data.
    assert s[: len(hdr)] == XL_MAGIC + struct.pack("<IIII", 0x01020304, 0x3, 0x5A, len(cfg)) + cfg


# (header, offset in it, struct format, value, the codec's reason)
FAULTS = [
    ("xl", 0, "<B", 0x59, "not an xl savefile (bad magic)"),
    (
        "xl",
        32,
        "<I",
        0x04030201,
        "byte order word 0x04030201: written by a host of another byte order",
    ),
    ("xl", 36, "<I", 0x7, "unknown mandatory flags 0x4"),
    (
        "libxl",
        0,
        ">Q",
        0x4C6962786C466D75,
        'bad libxl ident 0x4c6962786c466d75 (expected "LibxlFmt")',
    ),
    ("libxl", 8, ">I", 3, "unknown libxl version 3 (expected 2)"),
    ("libxl", 12, ">I", 0x4, "reserved bits set in libxl options: 0x4"),
    ("libxl", 12, ">I", 0x1, "big-endian libxl stream: not supported"),
    ("ihdr", 0, ">Q", 0xFFFFFFFFFFFFFFFE, "bad image marker 0xfffffffffffffffe"),
    ("ihdr", 8, ">I", 0x58454E47, 'bad image id 0x58454e47 (expected "XENF")'),
    ("ihdr", 12, ">I", 4, "unknown image version 4 (expected 2 or 3)"),
    ("ihdr", 12, ">I", 1, "unknown image version 1 (expected 2 or 3)"),
    ("ihdr", 16, ">H", 0x2, "reserved bits set in image options: 0x2"),
    ("ihdr", 18, ">H", 0x1, "reserved fields set in image header: 0x0001:0x00000000"),
    ("ihdr", 20, ">I", 0x10, "reserved fields set in image header: 0x0000:0x00000010"),
    ("ihdr", 16, ">H", 0x1, "big-endian image: not supported (x86 streams are little-endian)"),
    ("dhdr", 0, "<I", 3, "unknown domain type 0x3"),
    ("dhdr", 6, "<H", 1, "reserved field set in domain header: 0x0001"),
    ("dhdr", 4, "<H", 13, "page_shift 13 (expected 12)"),
]


@pytest.mark.parametrize(
    ("header", "where", "fmt", "value", "why"),
    FAULTS,
    ids=[f"{h}+{w}={v:#x}" for h, w, _, v, _ in FAULTS],
)
def test_verify_and_restore_refuse_a_header_alike(
    tmp_path: Path, header: str, where: int, fmt: str, value: int, why: str
) -> None:
    s = bytearray(saved_xl_stream(tmp_path))
    libxl, ihdr, dhdr = offsets(bytes(s))
    base = {"xl": 0, "libxl": libxl, "ihdr": ihdr, "dhdr": dhdr}[header]
    struct.pack_into(fmt, s, base + where, value)
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(s))

    rep = _ext.scan(str(bad), "xl")
    assert not rep["valid"]
    assert rep["error"]["reason"] == why
    assert rep["error"]["offset"] == base

    fd = os.open(bad, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match=re.escape(why)) as exc:
            _ext.engine_restore(fd, str(tmp_path / "dst"), wrap="xl")
    finally:
        os.close(fd)
    assert exc.value.errno == errno.EINVAL
    assert not (tmp_path / "dst").exists()


def test_xl_config_length_must_fit_its_optional_data(tmp_path: Path) -> None:
    s = bytearray(saved_xl_stream(tmp_path))
    optlen = struct.unpack_from("<I", s, 44)[0]
    struct.pack_into("<I", s, 48, optlen - 3)
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(s))
    rep = _ext.scan(str(bad))
    assert not rep["valid"]
    assert rep["error"]["reason"] == (
        f"config length {optlen - 3} overruns the optional data ({optlen} bytes)"
    )


# ------------------------------------------------------------ format names


def test_python_format_names_are_the_c_tables() -> None:
    assert formats.ALL == _ext.FORMATS
    assert formats.STREAM_TYPES == _ext.STREAM_TYPES
    assert set(formats.STREAM) | set(formats.CONVERTED) <= set(formats.ALL) - {"auto"}
    assert set(formats.LEGACY_STREAM_TYPES) <= set(formats.STREAM_TYPES)
    # Every Python list of names is the one in xcsave.formats.
    assert api.FORMATS is formats.STREAM and cli.FORMATS is formats.STREAM
    assert streamtools.FORMATS is formats.ALL
    assert cli.STREAM_TYPES is formats.STREAM_TYPES is streamtools.STREAM_TYPES
    # A stream type's number (the helper's argv, xc_stream_type_t) is its index.
    assert api.STREAM_TYPES == {"plain": 0, "remus": 1, "colo": 2}


CANDIDATES = [*formats.ALL, "", "XL", "xl\0", "libxc ", "qcow2"]


def accepts(call: object) -> bool:
    """Whether a call got past its name arguments (a ValueError is a refusal)."""
    try:
        call()  # type: ignore[operator]
    except (OSError, XcsaveError):
        pass  # the name was taken; the garbage input or the path was not
    except ValueError:
        return False
    return True


@dataclasses.dataclass
class Ends:
    """What the entry points are called with: names are what is under test."""

    junk: str  # a file of garbage, open as fd
    fd: int
    missing: str  # a path that does not exist
    out: int  # a writable file


@pytest.fixture
def ends(tmp_path: Path) -> Iterator[Ends]:
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x01" * 64)
    with open(junk, "rb") as f, open(tmp_path / "out", "wb") as out:
        yield Ends(str(junk), f.fileno(), str(tmp_path / "missing"), out.fileno())


@pytest.mark.parametrize("name", CANDIDATES, ids=repr)
def test_each_entry_point_takes_its_subset_of_the_names(name: str, ends: Ends) -> None:
    e = ends
    assert accepts(lambda: _ext.scan(e.junk, name)) == (name in formats.ALL)
    assert accepts(lambda: _ext.engine_restore(e.fd, e.missing, name)) == (name in formats.STREAM)
    assert accepts(lambda: _ext.engine_save(e.fd, e.missing, wrap=name)) == (
        name in formats.STREAM
    )
    assert accepts(lambda: _ext.convert_legacy(e.fd, e.out, 64, "hvm", name)) == (
        name in formats.CONVERTED
    )
    if "\0" not in name:  # argv cannot carry one
        r = subprocess.run(
            [str(helper_path()), "--xcsave-1", "save", "--format", name, "--io-fd", "3"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert ("bad --format" in r.stderr) == (name not in formats.STREAM), r.stderr


@pytest.mark.parametrize("name", [*formats.STREAM_TYPES, "", "Remus", "plain\0", "1"], ids=repr)
def test_each_entry_point_takes_its_subset_of_the_stream_types(name: str, ends: Ends) -> None:
    e = ends
    assert accepts(lambda: _ext.scan(e.junk, stream_type=name)) == (name in formats.STREAM_TYPES)
    # The sim engines do plain and remus streams.
    assert accepts(lambda: _ext.engine_restore(e.fd, e.missing, stream_type=name)) == (
        name in ("plain", "remus")
    )
    # The converter's C code parses all three and refuses COLO for legacy.
    assert accepts(
        lambda: _ext.convert_legacy(e.fd, e.out, 64, "hvm", "libxl", stream_type=name)
    ) == (name in formats.LEGACY_STREAM_TYPES)


# ------------------------------------------------------------ detection


def test_sniff_format_is_the_verifiers_detection(tmp_path: Path) -> None:
    seen = set()
    for case in corpus_cases.cases():
        path = tmp_path / case.name
        path.write_bytes(case.data)
        detected = _ext.scan(str(path))["format"]
        assert _ext.sniff_format(case.data) == detected, case.name
        # A peek at the head says the same as the whole stream.
        assert _ext.sniff_format(case.data[:8]) == detected, case.name
        seen.add(detected)
    assert seen == set(formats.ALL) - {"auto"}


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (XL_MAGIC, "xl"),
        (XL_MAGIC[:8], "xl"),  # a peek at an xl savefile's first 8 bytes
        (XL_MAGIC[:7] + b"X", "legacy"),
        (b"LibxlFmt", "libxl"),
        (b"LibxlFmt\0\0\0\x02", "libxl"),
        (b"\xff" * 8, "libxc"),
        (b"\xff" * 7 + b"\xfe", "legacy"),
        (b"\0" * 8, "legacy"),  # no magic: the legacy heuristics decide
        (b"\xff" * 7, None),  # too short to tell
        (b"", None),
    ],
    ids=repr,
)
def test_sniff_format_on_a_peek(head: bytes, fmt: str | None) -> None:
    assert _ext.sniff_format(head) == fmt


def test_a_stream_shorter_than_the_xl_magic_is_no_xl_savefile(tmp_path: Path) -> None:
    """The verifier has the whole stream: 8..31 bytes of the magic are not an xl header."""
    path = tmp_path / "short"
    path.write_bytes(XL_MAGIC[:20])
    rep = _ext.scan(str(path))
    assert rep["format"] == "legacy" and not rep["valid"]
