"""Stream tools: the native verifier and legacy converter against Xen's own.

Every corpus stream (xcsave/corpus.py, generated from the facts, not from
Xen's code) goes through xcsave's verifier AND Xen's verify-stream-v2
(conftest's ``xen_verify``); where the two disagree the test asserts the
known reason (facts 4.3/4.4).  Legacy conversion is cross-checked against
Xen's convert-legacy-stream on the inputs that tool handles: both outputs
must verify under both verifiers and carry the same page contents per pfn.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import corpus_cases
import pytest

from xcsave import corpus, streamtools
from xcsave.errors import StreamError

XEN_CONVERT = Path("usr/lib/xen-4.17/bin/convert-legacy-stream")
XEN_PYTHON = Path("usr/lib/xen-4.17/lib/python")

CASES = corpus_cases.cases()
V2_CASES = [c for c in CASES if c.fmt != "legacy"]
LEGACY_CASES = [c for c in CASES if c.fmt == "legacy"]

# Xen's converter rejects these (facts 4.4): only DeviceModelRecord0002 is
# understood, and a Remus stream is read only up to its first checkpoint.
XEN_CONVERTS = {
    "legacy-hvm-0002",
    "legacy-hvm-0002-no-9",
    "legacy-hvm-toolstack",
    "legacy-pv",
    "legacy-pv-xsave",
    "legacy-pv-2013",
    "legacy-hvm32",
}


# ------------------------------------------------------------------ helpers


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def xen_convert(
    root: Path, src: Path, dst: Path, width: int, guest: str, fmt: str
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(root / XEN_PYTHON))
    return subprocess.run(
        [
            "python3",
            str(root / XEN_CONVERT),
            "-i",
            str(src),
            "-o",
            str(dst),
            "-w",
            str(width),
            "-g",
            guest,
            "-f",
            fmt,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )


def walk(data: bytes) -> dict[str, Any]:
    """Independent (Python) walk of a v3 stream: pages by pfn, emulator
    records, qemu trailer.  Enough to compare two converters' outputs."""
    out: dict[str, Any] = {"pages": {}, "emu": [], "xenstore": [], "trailer": b"", "types": []}
    off = 0
    if data.startswith(corpus.XL_MAGIC):
        optlen = struct.unpack_from("<I", data, 44)[0]
        off = 48 + optlen

    def libxc(off: int, headers: bool = True) -> int:
        if headers:
            off += 24 + 16
        while True:
            t, n = struct.unpack_from("<II", data, off)
            body = data[off + 8 : off + 8 + n]
            off += 8 + ((n + 7) & ~7)
            out["types"].append(("libxc", t))
            if t == corpus.PAGE_DATA:
                count = struct.unpack_from("<I", body)[0]
                words = struct.unpack_from(f"<{count}Q", body, 8)
                pos = 8 + 8 * count
                for w in words:
                    if (w >> 60) not in corpus.NO_DATA:
                        out["pages"][w & ((1 << 52) - 1)] = body[pos : pos + 4096]
                        pos += 4096
            if t in (corpus.END, corpus.CHECKPOINT):
                return off

    if data[off : off + 8] == struct.pack(">Q", corpus.LIBXL_IDENT):
        off += 16
        while off < len(data):
            t, n = struct.unpack_from("<II", data, off)
            body = data[off + 8 : off + 8 + n]
            off += 8 + ((n + 7) & ~7)
            out["types"].append(("libxl", t))
            if t in (corpus.L_LIBXC_CONTEXT, corpus.L_CHECKPOINT_END):
                off = libxc(off, t == corpus.L_LIBXC_CONTEXT)
            elif t == corpus.L_EMULATOR_CONTEXT:
                out["emu"].append(body[8:])
            elif t == corpus.L_EMULATOR_XENSTORE_DATA:
                out["xenstore"].append(body[8:])
            elif t == corpus.L_END:
                break
    else:
        off = libxc(off)
        out["trailer"] = data[off:]
    return out


# ------------------------------------------------------------------ both verifiers


@pytest.mark.parametrize("case", V2_CASES, ids=lambda c: c.name)
def test_corpus_both_verifiers(case: corpus_cases.Case, tmp_path: Path, xen_verify: Any) -> None:
    path = write(tmp_path, f"{case.name}.bin", case.data)

    ours = streamtools.verify(path, case.fmt, case.stream_type)
    assert ours.valid == case.ok, ours.message
    if not case.ok:
        assert ours.error is not None
        assert case.why.lower() in ours.message.lower(), ours.message
        assert ours.error.offset <= len(case.data)
        assert ours.error.record

    xen = xen_verify(path, case.fmt)
    xen_out = xen.stdout + xen.stderr
    assert (xen.returncode == 0) == case.xen_ok, xen_out
    if not case.xen_ok:
        assert case.xen_why in xen_out, xen_out

    if ours.valid != case.xen_ok:
        # The verifiers disagree: it must be one of the known reasons.
        assert case.disagree, f"unexplained disagreement: ours={ours.message} xen={xen_out}"


@pytest.mark.parametrize(
    "case",
    [c for c in V2_CASES if c.name not in ("bad-marker", "xl-bad-magic")],
    ids=lambda c: c.name,
)
def test_autodetect_agrees(case: corpus_cases.Case, tmp_path: Path) -> None:
    path = write(tmp_path, "s.bin", case.data)
    explicit = streamtools.verify(path, case.fmt, case.stream_type)
    auto = streamtools.verify(path, "auto", case.stream_type)
    assert auto.valid == explicit.valid
    if explicit.valid:
        assert auto.report["format"] == case.fmt


@pytest.mark.parametrize("case", LEGACY_CASES, ids=lambda c: c.name)
def test_legacy_corpus(case: corpus_cases.Case, tmp_path: Path) -> None:
    path = write(tmp_path, "legacy.bin", case.data)
    res = streamtools.verify(path, "legacy", case.stream_type, width=case.width, guest=case.guest)
    assert res.valid == case.ok, res.message
    if not case.ok:
        assert res.error is not None
        assert case.why.lower() in res.message.lower(), res.message
    # The section 2 heuristics guess width and guest type right here.
    guessed = streamtools.verify(path, "auto", case.stream_type)
    assert guessed.valid == case.ok, guessed.message
    assert guessed.report["guest"] == case.guest


def test_report_contents(tmp_path: Path) -> None:
    data = corpus.xl_hdr() + corpus.libxl_stream(corpus.libxc_hvm(3, optional=True), xenstore=True)
    r = streamtools.inspect(write(tmp_path, "s.bin", data))
    assert r["valid"] and r["error"] is None
    assert r["layers"] == ["xl", "libxl", "libxc"]
    assert r["guest"] == "hvm" and r["vcpus"] == 2
    assert r["xl"]["config_len"] == 29 and r["xl"]["json"]
    assert r["libxc"]["version"] == 3 and r["libxc"]["xen_major"] == 4
    assert r["libxc"]["optional"]["count"] == 1
    assert r["libxc"]["records"]["PAGE_DATA"]["count"] == 2
    assert r["libxl"]["records"]["EMULATOR_XENSTORE_DATA"]["count"] == 1
    assert r["pages"]["data"] == 17 and r["pages"]["xtab"] == 1
    assert r["pages"]["min_pfn"] == 0 and r["pages"]["max_pfn"] == 0x103
    assert r["bytes"] == len(data)
    json.dumps(r)  # the report is plain data


def test_remus_failover_and_layers(tmp_path: Path) -> None:
    full = corpus.remus_libxl(3)
    r = streamtools.inspect(write(tmp_path, "r.bin", full), stream_type="remus")
    assert r["valid"] and r["checkpoints"] == 3 and r["ended"] == "end"
    # Cut inside checkpoint 3, at a record edge: a restore fails over to 2.
    cut = full.rindex(struct.pack("<II", corpus.CHECKPOINT, 0))
    r = streamtools.inspect(write(tmp_path, "c.bin", full[:cut]), stream_type="remus")
    assert r["valid"] and r["ended"] == "eof" and r["checkpoints"] == 2
    assert r["discarded_records"] > 0 and r["warnings"]
    # Cut inside a record: truncated, whatever the stream type.
    r = streamtools.inspect(write(tmp_path, "t.bin", full[: cut - 3]), stream_type="remus")
    assert not r["valid"] and "truncated" in r["error"]["reason"]
    # Before the first checkpoint is complete there is nothing to fail over to.
    first = full.index(struct.pack("<II", corpus.CHECKPOINT, 0))
    r = streamtools.inspect(write(tmp_path, "f.bin", full[:first]), stream_type="remus")
    assert not r["valid"]


def test_stream_error_attributes(tmp_path: Path) -> None:
    bad = corpus.libxc_hvm(3) + b"\x00" * 8
    res = streamtools.verify(write(tmp_path, "b.bin", bad))
    assert not res
    with pytest.raises(StreamError) as ei:
        res.raise_for_error()
    assert ei.value.offset == len(bad) - 8
    assert ei.value.record == "trailing data"
    assert "after END" in str(ei.value)


def test_pipe_matches_file(tmp_path: Path) -> None:
    data = corpus.xl_hdr() + corpus.libxl_stream(corpus.libxc_pv(3), emu_ctx=None)
    path = write(tmp_path, "s.bin", data)
    from_file = streamtools.inspect(path)
    r, w = os.pipe()
    writer = subprocess.Popen(["cat", str(path)], stdout=w)
    os.close(w)
    try:
        from_pipe = streamtools.inspect(r)
    finally:
        os.close(r)
        writer.wait()
    assert from_pipe == from_file


def test_fd_left_after_stream(tmp_path: Path) -> None:
    """On an fd, the scan consumes the stream and nothing after it."""
    data = corpus.libxc_hvm(3)
    path = write(tmp_path, "s.bin", data + b"after")
    fd = os.open(path, os.O_RDONLY)
    try:
        r = streamtools.inspect(fd, allow_trailing=True)
        assert r["valid"]
        assert os.lseek(fd, 0, os.SEEK_CUR) == len(data)
    finally:
        os.close(fd)


def test_garbage_never_crashes(tmp_path: Path) -> None:
    rng = random.Random(1234)
    base = corpus.libxl_stream(corpus.libxc_hvm(3), xenstore=True)
    path = tmp_path / "g.bin"
    for i in range(300):
        data = bytearray(base)
        if i % 2:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randrange(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
        r = streamtools.inspect(path)
        if i % 2:
            assert not r["valid"]
        if not r["valid"]:
            assert r["error"]["reason"]


# ------------------------------------------------------------------ conversion


def convert_ours(tmp_path: Path, case: corpus_cases.Case, fmt: str, **kw: Any) -> Path:
    src = write(tmp_path, f"{case.name}.legacy", case.data)
    dst = tmp_path / f"{case.name}.ours.{fmt}"
    assert case.width is not None and case.guest is not None
    streamtools.convert(src, dst, case.width, case.guest, fmt, stream_type=case.stream_type, **kw)
    return dst


@pytest.mark.parametrize("fmt", ["libxc", "libxl"])
@pytest.mark.parametrize(
    "case", [c for c in LEGACY_CASES if c.name in XEN_CONVERTS], ids=lambda c: c.name
)
def test_convert_matches_xen(
    case: corpus_cases.Case, fmt: str, tmp_path: Path, xen_verify: Any, xen_utils_root: Path
) -> None:
    assert case.width is not None and case.guest is not None
    ours = convert_ours(tmp_path, case, fmt)
    theirs = tmp_path / f"{case.name}.xen.{fmt}"
    xc = xen_convert(
        xen_utils_root, tmp_path / f"{case.name}.legacy", theirs, case.width, case.guest, fmt
    )
    assert xc.returncode == 0, xc.stderr

    for out in (ours, theirs):
        assert streamtools.verify(out, fmt).valid, streamtools.verify(out, fmt).message
        xv = xen_verify(out, fmt)
        if fmt == "libxl" and case.name == "legacy-hvm-toolstack":
            # Known: Xen's verifier fails on any non-empty EMULATOR_XENSTORE_DATA.
            assert xv.returncode == 1 and "Data not NUL terminated" in xv.stderr
        else:
            assert xv.returncode == 0, xv.stdout + xv.stderr

    a, b = walk(ours.read_bytes()), walk(theirs.read_bytes())
    assert a["pages"] == b["pages"] and a["pages"]
    assert a["emu"] == b["emu"]
    assert a["xenstore"] == b["xenstore"]
    assert a["trailer"] == b["trailer"]
    # The pages are the legacy image's pages, by pfn.
    lg = corpus.Legacy()
    for pfn, page in a["pages"].items():
        assert page == corpus.page_bytes(pfn, 0), hex(pfn)
    del lg


def test_xend_qemu_form(tmp_path: Path, xen_utils_root: Path) -> None:
    """The xend read-to-EOF qemu record converts (Xen's converter rejects it)."""
    qemu = b"QEVM" + os.urandom(5000)
    case = corpus_cases.Case(
        "xend",
        corpus.Legacy(qemu_sig=corpus.SIG_XEND, qemu_data=qemu, last_checkpoint=False).build(),
        "legacy",
        width=64,
        guest="hvm",
    )
    out = convert_ours(tmp_path, case, "libxl")
    w = walk(out.read_bytes())
    assert w["emu"] == [qemu]
    assert streamtools.verify(out, "libxl").valid
    out = convert_ours(tmp_path, case, "libxc")
    assert walk(out.read_bytes())["trailer"] == (
        corpus.SIG_0002 + struct.pack("<I", len(qemu)) + qemu
    )
    assert streamtools.verify(out, "libxc").valid
    xc = xen_convert(
        xen_utils_root, tmp_path / "xend.legacy", tmp_path / "x.out", 64, "hvm", "libxl"
    )
    assert xc.returncode == 2 and "Unrecognised Qemu sig" in xc.stderr


def test_2013_plain_hvm_without_last_checkpoint(tmp_path: Path) -> None:
    """The 2013 regression case: no LAST_CHECKPOINT, the qemu record right
    after the tail starting "QemuDeviceModelRecord".  A plain stream ends at
    its tail; those bytes are never read as a page batch."""
    qemu = b"QEVM" + bytes(range(256)) * 8
    data = corpus.Legacy(last_checkpoint=False, qemu_sig=corpus.SIG_XEND, qemu_data=qemu).build()
    assert corpus.SIG_XEND in data and struct.pack("<i", corpus.C_LAST_CHECKPOINT) not in data
    src = write(tmp_path, "in.legacy", data)
    for fmt in ("libxl", "libxc"):
        dst = tmp_path / f"out.{fmt}"
        res = streamtools.convert(src, dst, 64, "hvm", fmt)
        assert res.failover is None and res.legacy["qemu_signature"] == "QemuDeviceModelRecord"
        w = walk(dst.read_bytes())
        assert (w["emu"] == [qemu]) if fmt == "libxl" else qemu in w["trailer"]
        assert len(w["pages"]) == 16
    r = streamtools.verify(src, "legacy", width=64, guest="hvm")
    assert r.valid and "1970103633" not in json.dumps(r.report)


def test_2013_symptom_needs_a_checkpointed_reading(tmp_path: Path) -> None:
    """A toolstack record "QemuDeviceModelRecord..." after a PV image with no
    LAST_CHECKPOINT: plain (the caller's word) stops at the tail and leaves
    those bytes unread; read as checkpointed, the same bytes become the
    famous "Max batch size exceeded (1970103633)" -- a failover to the
    complete first image, as the legacy restorer did."""
    data = corpus.legacy_xend_pv_then_qemu()
    image_len = data.index(corpus.SIG_XEND)
    src = write(tmp_path, "in.legacy", data)

    fd = os.open(src, os.O_RDONLY)
    try:
        res = streamtools.convert(fd, str(tmp_path / "plain.libxl"), 64, "pv", "libxl")
        assert os.lseek(fd, 0, os.SEEK_CUR) == image_len  # never read past the image
    finally:
        os.close(fd)
    assert res.failover is None and res.legacy["unread_bytes"] == len(data) - image_len
    assert streamtools.verify(tmp_path / "plain.libxl", "libxl").valid

    res = streamtools.convert(
        src, tmp_path / "remus.libxl", 64, "pv", "libxl", stream_type="remus"
    )
    assert res.failover is not None and "Max batch size exceeded (1970103633)" in res.failover
    assert 0x756D6551 == 1970103633 == struct.unpack("<i", b"Qemu")[0]
    v = streamtools.verify(tmp_path / "remus.libxl", "libxl", "remus")
    assert v.valid and v.report["checkpoints"] == 1 and v.report["ended"] == "eof"


def test_checkpointed_legacy_honours_last_checkpoint(tmp_path: Path) -> None:
    lg = corpus.Legacy(qemu_sig=corpus.SIG_REMUS)
    data = lg.build(checkpoints=3, last_on=1)  # -9 in the second image
    src = write(tmp_path, "remus.legacy", data)

    res = streamtools.convert(src, tmp_path / "r.libxl", 64, "hvm", "libxl", stream_type="remus")
    assert res.checkpoints == 1 and res.legacy["images"] == 2
    assert res.legacy["unread_bytes"] > 0  # the third image is not read
    v = streamtools.verify(tmp_path / "r.libxl", "libxl", "remus")
    assert v.valid and v.report["checkpoints"] == 1 and v.report["ended"] == "end"
    w = walk((tmp_path / "r.libxl").read_bytes())
    assert w["pages"][3] == corpus.page_bytes(3, 1)  # the second image's contents
    assert len(w["emu"]) == 2

    # The same bytes as a plain stream: one image, -9 in image 2 never seen.
    res = streamtools.convert(src, tmp_path / "p.libxl", 64, "hvm", "libxl")
    assert res.checkpoints == 0 and res.legacy["images"] == 1
    assert not res.legacy["last_checkpoint_seen"]
    w = walk((tmp_path / "p.libxl").read_bytes())
    assert w["pages"][3] == corpus.page_bytes(3, 0)
    assert streamtools.verify(tmp_path / "p.libxl", "libxl").valid


def test_plain_ignores_last_checkpoint(tmp_path: Path) -> None:
    """-9 is a no-op in a plain stream: same output with and without it."""
    a = streamtools.convert(
        write(tmp_path, "a", corpus.Legacy().build()), tmp_path / "a.out", 64, "hvm", "libxl"
    )
    b = streamtools.convert(
        write(tmp_path, "b", corpus.Legacy(last_checkpoint=False).build()),
        tmp_path / "b.out",
        64,
        "hvm",
        "libxl",
    )
    assert a.legacy["last_checkpoint_seen"] and not b.legacy["last_checkpoint_seen"]
    assert (tmp_path / "a.out").read_bytes() == (tmp_path / "b.out").read_bytes()


def test_toolstack_becomes_xenstore_data(tmp_path: Path) -> None:
    case = corpus_cases.Case(
        "ts", corpus.Legacy(toolstack=True).build(), "legacy", width=64, guest="hvm"
    )
    w = walk(convert_ours(tmp_path, case, "libxl").read_bytes())
    assert w["xenstore"] == [corpus.xenstore_kv(corpus.PHYSMAP_KV)]


@pytest.mark.parametrize(
    ("chunk", "name"),
    [
        (corpus.C_TMEM, "TMEM"),
        (-6, "TMEM_EXTRA"),
        (corpus.C_ENABLE_COMPRESSION, "ENABLE_COMPRESSION"),
        (corpus.C_COMPRESSED_DATA, "COMPRESSED_DATA"),
        (corpus.C_ENABLE_VERIFY_MODE, "ENABLE_VERIFY_MODE"),
    ],
)
def test_unmappable_chunks_named(chunk: int, name: str, tmp_path: Path) -> None:
    data = corpus.Legacy(extra_chunks=struct.pack("<i", chunk) + b"\x00" * 16).build()
    src = write(tmp_path, "in", data)
    with pytest.raises(StreamError) as ei:
        streamtools.convert(src, tmp_path / "out", 64, "hvm", "libxl")
    assert ei.value.record == name and name in str(ei.value)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in"]  # no temp file left


def test_xl_header_passthrough(tmp_path: Path) -> None:
    cfg = b'{"c_info": {"name": "old"}}'
    data = corpus.xl_hdr(mflags=1, config=cfg) + corpus.Legacy().build()
    src = write(tmp_path, "in", data)
    dst = tmp_path / "out"
    streamtools.convert(src, dst, 64, "hvm", "libxl", xl=True)
    out = dst.read_bytes()
    assert out.startswith(corpus.XL_MAGIC) and cfg in out[:120]
    r = streamtools.inspect(dst)
    assert r["valid"] and r["layers"] == ["xl", "libxl", "libxc"]
    assert r["xl"]["streamv2"] and r["xl"]["json"]
    # And the legacy-inside-xl input itself scans.
    r = streamtools.inspect(src, width=64, guest="hvm")
    assert r["valid"] and r["format"] == "xl" and r["legacy"]["images"] == 1


# ------------------------------------------------------------------ CLI


def xcsave(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-P", "-m", "xcsave", *args],
        input=stdin,
        capture_output=True,
        check=False,
        timeout=120,
    )


def test_cli_verify_exit_codes(tmp_path: Path) -> None:
    good = write(tmp_path, "good.bin", corpus.libxl_stream(corpus.libxc_hvm(3)))
    r = xcsave("verify", str(good))
    assert r.returncode == 0 and b"valid" in r.stdout

    bad = write(tmp_path, "bad.bin", corpus.libxc_hvm(3) + b"junk")
    r = xcsave("verify", str(bad))
    lines = r.stderr.decode().splitlines()
    assert r.returncode == 1 and len(lines) == 1
    assert lines[0].startswith(f"xcsave: verify: {bad}: offset ")
    assert "record trailing data" in lines[0] and "Traceback" not in lines[0]

    r = xcsave("verify", str(tmp_path / "nope"))
    assert r.returncode == 1  # a failure, not a usage error (docs/reliability.md)
    assert r.stderr.decode() == (
        f"xcsave: verify: {tmp_path / 'nope'}: No such file or directory (ENOENT)\n"
    )

    r = xcsave(
        "verify", "--stream-type", "remus", str(write(tmp_path, "r", corpus.remus_libxl(2)))
    )
    assert r.returncode == 0
    r = xcsave("verify", "-", stdin=corpus.remus_libxl(2))
    assert r.returncode == 1 and b"CHECKPOINT in a plain stream" in r.stderr


def test_cli_inspect(tmp_path: Path) -> None:
    path = write(tmp_path, "s.bin", corpus.xl_hdr() + corpus.libxl_stream(corpus.libxc_hvm(3)))
    r = xcsave("inspect", str(path))
    assert r.returncode == 0
    text = r.stdout.decode()
    assert "xl > libxl > libxc" in text and "PAGE_DATA" in text
    r = xcsave("inspect", "--json", str(path))
    assert json.loads(r.stdout)["pages"]["data"] == 17


def test_cli_convert(tmp_path: Path) -> None:
    src = write(tmp_path, "in.legacy", corpus.Legacy(guest="pv").build())
    out = tmp_path / "out.bin"
    out.write_bytes(b"old contents")
    r = xcsave(
        "convert", str(src), str(out), "--width", "64", "--guest", "pv", "--format", "libxl"
    )
    assert r.returncode == 0, r.stderr
    assert streamtools.verify(out, "libxl").valid
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.legacy", "out.bin"]

    r = xcsave(
        "convert",
        "-",
        "-",
        "--width",
        "64",
        "--guest",
        "pv",
        "--format",
        "libxl",
        stdin=src.read_bytes(),
    )
    assert r.returncode == 0 and r.stdout == out.read_bytes()

    bad = write(
        tmp_path,
        "bad.legacy",
        corpus.Legacy(extra_chunks=struct.pack("<i", corpus.C_TMEM)).build(),
    )
    r = xcsave("convert", str(bad), str(tmp_path / "never"), "--width", "64", "--guest", "hvm")
    lines = r.stderr.decode().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "record TMEM" in lines[0]
    assert not (tmp_path / "never").exists()

    r = xcsave("convert", str(tmp_path / "missing"), str(out), "--width", "64", "--guest", "pv")
    assert r.returncode == 1 and r.stderr.decode().endswith("(ENOENT)\n")
