#!/usr/bin/env python3
"""Write the seed corpora of the libFuzzer harnesses (fuzz/README.md).

    python3 fuzz/make_seeds.py OUTDIR

Creates OUTDIR/{scan,legacy,restore,helper,wire,skeleton}/ with one file per seed, each
starting with the option byte(s) its harness expects.  Seeds come from
xcsave/corpus.py (every named case, valid and broken, plus small variants)
and from simulated domains saved by xcsave's own engine (the only streams
the restore engine accepts), in every wrapping, plain and Remus.  The
output is deterministic, so the seeds need not be committed.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The tests' catalogue of cases; xcsave itself (its corpus builders and the
# extension the sim streams need) is the installed package.
sys.path.insert(0, str(HERE.parent / "tests"))

import corpus_cases  # noqa: E402 - after the path it comes from

from xcsave import corpus  # noqa: E402

FMT_BITS = {"auto": 0, "xl": 1, "libxl": 2, "libxc": 3, "legacy": 4}
STREAM_BITS = {"plain": 0, "remus": 1, "colo": 2}
WRAP_BITS = {"libxc": 0, "libxl": 1, "xl": 2}


def _write(outdir: Path, data: bytes) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / hashlib.sha1(data).hexdigest()).write_bytes(data)


def scan_opts(fmt: str, stream_type: str, pipe: bool, legacy: tuple[int, str] | None) -> bytes:
    b0 = int(pipe) | FMT_BITS[fmt] << 1 | STREAM_BITS[stream_type] << 4
    b1 = 0
    if legacy is not None:
        width, guest = legacy
        b1 = 1 | (2 if width == 32 else 0) | (4 if guest == "hvm" else 0)
    return bytes([b0, b1])


def legacy_opts(width: int, guest: str, *, pipe: bool, libxl: bool, remus: bool) -> bytes:
    return bytes(
        [
            int(pipe)
            | (2 if width == 32 else 0)
            | (4 if guest == "hvm" else 0)
            | (8 if libxl else 0)
            | (32 if libxl else 0)
            | (64 if remus else 0)
        ]
    )


def restore_opts(wrap: str, *, pipe: bool, remus: bool, sdd: bool = True) -> bytes:
    return bytes([int(pipe) | WRAP_BITS[wrap] << 1 | (8 if remus else 0) | (64 if sdd else 0)])


def small_streams() -> list[tuple[str, bytes, str]]:
    """Small variants of the corpus streams: fast to mutate."""
    hvm = corpus.libxc_hvm(3, pfns=(0, 1))
    pv = corpus.libxc_pv(3, p2m_size=8, pfns=(0, 1), nr_vcpus=1)
    return [
        ("libxc", hvm, "plain"),
        ("libxc", corpus.libxc_hvm(2, pfns=(0,)), "plain"),
        ("libxc", pv, "plain"),
        ("libxl", corpus.libxl_stream(hvm, xenstore=True), "plain"),
        ("xl", corpus.xl_hdr() + corpus.libxl_stream(hvm), "plain"),
        ("libxl", corpus.remus_libxl(2), "remus"),
    ]


def sim_streams(workdir: Path) -> list[tuple[str, bytes, bool]]:
    """(wrap, stream, remus) saved from tiny simulated domains by the engine."""
    from xcsave import _ext, sim

    out: list[tuple[str, bytes, bool]] = []
    dom = sim.create(workdir / "seed.dom", 4 * sim.PAGE_SIZE, vcpus=2, seed=5)
    for wrap in WRAP_BITS:
        for remus in (False, True):
            path = workdir / f"{wrap}-{remus}.img"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _ext.engine_save(
                    fd,
                    str(dom),
                    False,
                    wrap,
                    stream_type="remus" if remus else "plain",
                    checkpoints=2 if remus else 0,
                )
            finally:
                os.close(fd)
            sim.set_state(dom, "running")
            out.append((wrap, path.read_bytes(), remus))
    return out


def helper_seeds() -> list[bytes]:
    """argv (NUL-separated, empty string last) + replies, for fuzz_helper."""

    def seed(args: list[str], replies: list[int]) -> bytes:
        body = b"".join(a.encode() + b"\0" for a in args) + b"\0"
        return body + b"".join(r.to_bytes(4, "little", signed=True) for r in replies)

    xs = ["--xcsave-1"]
    return [
        seed([*xs, "save", "--io-fd", "3", "--sim", "/x", "--cbflags", "2056"], [0, 1, 1, 0]),
        seed([*xs, "save", "--io-fd", "3", "--flags", "1", "--cbflags", "2104"], [0, 0, 1, 1, 1]),
        seed([*xs, "restore", "--io-fd", "3", "--cbflags", "800"], [0, 1, 2, 0]),
        seed([*xs, "restore", "--io-fd", "3", "--max-pages", "16", "--format", "xl"], [0]),
        seed([*xs, "save", "--backend", "xen", "--io-fd", "3", "--domid", "7"], []),
        seed([*xs, "restore", "--io-fd", "3", "--legacy-width", "32", "--legacy-guest", "pv"], []),
        seed(["--save-domain", "3", "-1", "7", "1", "136", "0"], [1, 0, 0]),
        seed(["--restore-domain", "3", "-1", "8", "1", "0", "2", "0", "768", "0"], [0, 0]),
        seed(["--version"], []),
        seed([*xs, "wire-send", "--in-fd", "3", "--channel-fd", "4", "--raw"], [0]),
        seed([*xs, "wire-recv", "--out-fd", "3", "--channel-fd", "4", "--window", "1"], [0]),
    ]


def wire_seeds() -> list[bytes]:
    """An option byte + frames, for fuzz_wire: raw, zstd (an RLE frame), END."""
    hdr = struct.Struct("<IBBHIIQQ")
    magic = 0x46534358
    rle = struct.pack("<I", 0xFD2FB528) + bytes([0, 0x58])
    rle += (1 | 1 << 1 | 4096 << 3).to_bytes(3, "little") + b"\0"
    return [
        b"\x10"
        + hdr.pack(magic, 1, 0, 0, 4, 4, 0, 0)
        + b"abcd"
        + hdr.pack(magic, 2, 0, 0, 0, 0, 1, 4),
        b"\x00" + hdr.pack(magic, 1, 1, 0, 4096, len(rle), 0, 0) + rle,
        b"\x01" + hdr.pack(magic, 1, 1, 0, 8192, len(rle), 3, 0) + rle,
    ]


def skeleton_seeds() -> list[bytes]:
    """Every valid v2/v3 corpus stream, to make a skeleton of (option bit 0
    clear) and as the body made of it, to inflate (bit 0 set)."""
    from xcsave import _ext

    seeds = []
    fmts = {"auto": 0, "xl": 1, "libxl": 2, "libxc": 3}
    for case in corpus_cases.cases():
        if case.fmt not in fmts:
            continue
        opts = fmts[case.fmt] << 1 | STREAM_BITS[case.stream_type] << 3
        seeds.append(bytes([opts]) + case.data)
        if not case.ok:
            continue
        with tempfile.TemporaryFile() as f:
            f.write(case.data)
            f.seek(0)
            body, _info = _ext.skeleton_make(f.fileno(), case.fmt, case.stream_type)
        seeds.append(bytes([opts | 1]) + body)
    return seeds


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write(__doc__ or "")
        return 2
    out = Path(argv[1])
    for case in corpus_cases.cases():
        legacy = (case.width or 64, case.guest or "pv") if case.fmt == "legacy" else None
        for pipe in (False, True):
            _write(out / "scan", scan_opts(case.fmt, case.stream_type, pipe, legacy) + case.data)
        _write(out / "scan", scan_opts("auto", case.stream_type, False, None) + case.data)
        if case.fmt == "legacy":
            w, g = legacy or (64, "pv")
            remus = case.stream_type == "remus"
            for libxl in (False, True):
                _write(
                    out / "legacy",
                    legacy_opts(w, g, pipe=libxl, libxl=libxl, remus=remus) + case.data,
                )
    for fmt, data, st in small_streams():
        _write(out / "scan", scan_opts(fmt, st, False, None) + data)
        _write(out / "scan", scan_opts(fmt, st, True, None) + data)
    small_legacy = corpus.Legacy(batches=(((0, 0), (1, 0)),), qemu_data=b"QEVM")
    for guest in ("pv", "hvm"):
        for width in (32, 64):
            img = corpus.tiny_legacy(guest, width).build()
            opts = legacy_opts(width, guest, pipe=False, libxl=True, remus=False)
            _write(out / "legacy", opts + img)
            _write(out / "scan", scan_opts("legacy", "plain", False, (width, guest)) + img)
    _write(
        out / "legacy",
        legacy_opts(64, "hvm", pipe=True, libxl=False, remus=True) + small_legacy.build(2),
    )
    with tempfile.TemporaryDirectory(prefix="xcsave-seeds-") as tmp:
        for wrap, data, remus in sim_streams(Path(tmp)):
            for pipe in (False, True):
                _write(out / "restore", restore_opts(wrap, pipe=pipe, remus=remus) + data)
            _write(
                out / "scan",
                scan_opts(wrap, "remus" if remus else "plain", False, None) + data,
            )
    for s in helper_seeds():
        _write(out / "helper", s)
    for s in wire_seeds():
        _write(out / "wire", s)
    for s in skeleton_seeds():
        _write(out / "skeleton", s)
    for sub in sorted(out.iterdir()):
        sys.stdout.write(f"{sub.name}: {len(list(sub.iterdir()))} seeds\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
