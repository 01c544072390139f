"""Generator of Xen migration streams for xcsave's tests and benchmarks.

Written from shared/specs/xen-migration-facts.md (sections 2 and 3), never
from Xen's code: libxc images v2/v3 (HVM and PV), the libxl stream, the xl
savefile header, checkpointed (Remus) streams, the pre-4.6 legacy format
(PV and HVM, every qemu signature, with and without LAST_CHECKPOINT), and
broken variants of each.

Every builder returns ``bytes``.  ``cases()`` lists named streams with what
xcsave's verifier and Xen's ``verify-stream-v2`` are expected to say, and
why they disagree where they do.  ``python -m xcsave.corpus DIR`` writes the
corpus to DIR.  The big-image writers stream to a file for benchmarks and
``xcsave sim legacy-image`` (an image to try ``convert`` on).
"""

from __future__ import annotations

import contextlib
import dataclasses
import struct
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

PAGE = 4096

# libxc record types (section 3.1)
END = 0x00
PAGE_DATA = 0x01
X86_PV_INFO = 0x02
X86_PV_P2M_FRAMES = 0x03
X86_PV_VCPU_BASIC = 0x04
X86_PV_VCPU_EXTENDED = 0x05
X86_PV_VCPU_XSAVE = 0x06
SHARED_INFO = 0x07
X86_TSC_INFO = 0x08
HVM_CONTEXT = 0x09
HVM_PARAMS = 0x0A
TOOLSTACK = 0x0B
X86_PV_VCPU_MSRS = 0x0C
VERIFY = 0x0D
CHECKPOINT = 0x0E
CHECKPOINT_DIRTY_PFN_LIST = 0x0F
STATIC_DATA_END = 0x10
X86_CPUID_POLICY = 0x11
X86_MSR_POLICY = 0x12

# libxl record types (section 3.2)
L_END = 0
L_LIBXC_CONTEXT = 1
L_EMULATOR_XENSTORE_DATA = 2
L_EMULATOR_CONTEXT = 3
L_CHECKPOINT_END = 4
L_CHECKPOINT_STATE = 5

# PFINFO types (bits 31..28 of a legacy pfn word; bits 63..60 in v2)
NOTAB = 0x0
L1TAB = 0x1
L4TAB = 0x4
LPINTAB = 0x8
BROKEN = 0xD
XALLOC = 0xE
XTAB = 0xF
NO_DATA = (BROKEN, XALLOC, XTAB)

XL_MAGIC = b"Xen saved domain, xl format\n \x00 \r"
LIBXL_IDENT = 0x4C6962786C466D74

# HVM params (xen/include/public/hvm/params.h numbers)
HVM_PARAM_STORE_PFN = 1
HVM_PARAM_IOREQ_PFN = 5
HVM_PARAM_BUFIOREQ_PFN = 6
HVM_PARAM_IDENT_PT = 12
HVM_PARAM_CONSOLE_PFN = 17

# legacy chunk ids (section 2.3)
C_ENABLE_VERIFY_MODE = -1
C_VCPU_INFO = -2
C_HVM_IDENT_PT = -3
C_HVM_VM86_TSS = -4
C_TMEM = -5
C_TSC_INFO = -7
C_HVM_CONSOLE_PFN = -8
C_LAST_CHECKPOINT = -9
C_HVM_VIRIDIAN = -11
C_COMPRESSED_DATA = -12
C_ENABLE_COMPRESSION = -13
C_TOOLSTACK = -18

SIG_XEND = b"QemuDeviceModelRecord"
SIG_0002 = b"DeviceModelRecord0002"
SIG_REMUS = b"RemusDeviceModelState"

PV64_VCPU_CTX = 0x1430
PV32_VCPU_CTX = 0xAF0


# ---------------------------------------------------------------- helpers


def page_bytes(pfn: int, gen: int = 0) -> bytes:
    """A page whose content is a function of (pfn, gen), so tests can compare."""
    return struct.pack("<QQ", pfn, gen ^ 0x5A5A5A5A) * (PAGE // 16)


def pad8(body: bytes, fill: int = 0) -> bytes:
    return body + bytes([fill]) * ((8 - len(body) % 8) % 8)


def rec(rtype: int, body: bytes = b"", *, length: int | None = None, fill: int = 0) -> bytes:
    """A v2 record: {u32 type; u32 length} + body + zero padding to 8."""
    n = len(body) if length is None else length
    return struct.pack("<II", rtype, n) + pad8(body, fill)


# ---------------------------------------------------------------- libxc


def ihdr(  # noqa: PLR0917 - every header field, positionally, as the tests write them
    version: int = 3,
    options: int = 0,
    res1: int = 0,
    res2: int = 0,
    marker: int = 0xFFFFFFFFFFFFFFFF,
    ident: int = 0x58454E46,
) -> bytes:
    return struct.pack(">QIIHHI", marker, ident, version, options, res1, res2)


def dhdr(gtype: int, page_shift: int = 12, res: int = 0, major: int = 4, minor: int = 17) -> bytes:
    return struct.pack("<IHHII", gtype, page_shift, res, major, minor)


def page_data(
    entries: Sequence[tuple[int, int]], gen: int = 0, res: int = 0, data: bytes | None = None
) -> bytes:
    """PAGE_DATA for (pfn, type) entries; types in NO_DATA carry no page."""
    words = b"".join(struct.pack("<Q", (t << 60) | pfn) for pfn, t in entries)
    if data is None:
        data = b"".join(page_bytes(pfn, gen) for pfn, t in entries if t not in NO_DATA)
    return rec(PAGE_DATA, struct.pack("<II", len(entries), res) + words + data)


def pages(pfns: Iterable[int], gen: int = 0, batch: int = 1024) -> bytes:
    lst = list(pfns)
    return b"".join(
        page_data([(p, NOTAB) for p in lst[i : i + batch]], gen) for i in range(0, len(lst), batch)
    )


def pv_info(width: int = 8, levels: int = 4) -> bytes:
    return rec(X86_PV_INFO, struct.pack("<BBHI", width, levels, 0, 0))


def p2m_frames(start: int, end: int, frames: Sequence[int]) -> bytes:
    return rec(
        X86_PV_P2M_FRAMES,
        struct.pack("<II", start, end) + b"".join(struct.pack("<Q", f) for f in frames),
    )


def vcpu(rtype: int, vcpu_id: int, ctx: bytes, res: int = 0) -> bytes:
    return rec(rtype, struct.pack("<II", vcpu_id, res) + ctx)


def shared_info(data: bytes | None = None) -> bytes:
    return rec(SHARED_INFO, data if data is not None else b"\x55" * PAGE)


def tsc(
    mode: int = 0, khz: int = 2_000_000, nsec: int = 123_456_789, incarn: int = 1, res: int = 0
) -> bytes:
    return rec(X86_TSC_INFO, struct.pack("<IIQII", mode, khz, nsec, incarn, res))


def hvm_blob(nr_vcpus: int = 2) -> bytes:
    """An HVM context: {u16 typecode; u16 instance; u32 length} descriptors."""
    out = struct.pack("<HHI", 1, 0, 24) + struct.pack("<IIQII", 0x54381286, 1, 0, 0x306C3, 0)
    for i in range(nr_vcpus):
        out += struct.pack("<HHI", 2, i, 1024) + bytes([i + 1]) * 1024
    return out + struct.pack("<HHI", 0, 0, 0)


def hvm_context(blob: bytes | None = None) -> bytes:
    return rec(HVM_CONTEXT, hvm_blob() if blob is None else blob)


def hvm_params(params: Sequence[tuple[int, int]], res: int = 0) -> bytes:
    return rec(
        HVM_PARAMS,
        struct.pack("<II", len(params), res)
        + b"".join(struct.pack("<QQ", i, v) for i, v in params),
    )


DEFAULT_PARAMS = (
    (HVM_PARAM_STORE_PFN, 0xFEFFF),
    (HVM_PARAM_IOREQ_PFN, 0xFEFFE),
    (HVM_PARAM_BUFIOREQ_PFN, 0xFEFFD),
    (HVM_PARAM_CONSOLE_PFN, 0xFEFFC),
)


def cpuid_policy(n: int = 2) -> bytes:
    return rec(X86_CPUID_POLICY, b"".join(struct.pack("<6I", i, 0, 1, 2, 3, 4) for i in range(n)))


def msr_policy(n: int = 2) -> bytes:
    return rec(
        X86_MSR_POLICY, b"".join(struct.pack("<IIQ", 0xC0000080 + i, 0, i) for i in range(n))
    )


def sde() -> bytes:
    return rec(STATIC_DATA_END)


def end() -> bytes:
    return rec(END)


def libxc_hvm(
    version: int = 3,
    pfns: Sequence[int] = tuple(range(16)),
    *,
    with_xtab: bool = True,
    optional: bool = False,
    policies: bool = True,
    tail: bool = True,
    final: bytes | None = None,
) -> bytes:
    """A plain HVM image shaped like 4.17's (section 3.1 record order)."""
    out = ihdr(version) + dhdr(2)
    if version >= 3:
        if policies:
            out += cpuid_policy() + msr_policy()
        out += sde()
    if optional:
        out += rec(0x80000001, b"opt-data")
    out += pages(pfns)
    if with_xtab:
        out += page_data([(0x100, XTAB), (0x101, NOTAB), (0x102, BROKEN), (0x103, XALLOC)])
    if tail:
        out += tsc() + hvm_context() + hvm_params(DEFAULT_PARAMS)
    return out + (end() if final is None else final)


def libxc_pv(
    version: int = 3,
    p2m_size: int = 64,
    pfns: Sequence[int] = tuple(range(16)),
    *,
    nr_vcpus: int = 2,
    width: int = 8,
    final: bytes | None = None,
) -> bytes:
    fpp = PAGE // width
    nframes = (p2m_size - 1) // fpp + 1
    out = ihdr(version) + dhdr(1) + pv_info(width, 4 if width == 8 else 3)
    if version >= 3:
        out += cpuid_policy() + msr_policy() + sde()
    out += p2m_frames(0, p2m_size - 1, [0x1000 + i for i in range(nframes)])
    out += page_data([(p, L4TAB if p == 0 else NOTAB) for p in pfns])
    out += tsc() + shared_info()
    ctx_len = PV64_VCPU_CTX if width == 8 else PV32_VCPU_CTX
    for v in range(nr_vcpus):
        out += vcpu(X86_PV_VCPU_BASIC, v, bytes([v]) * ctx_len)
        out += vcpu(X86_PV_VCPU_EXTENDED, v, b"\x01" * 128)
        out += vcpu(X86_PV_VCPU_MSRS, v, b"")
    return out + (end() if final is None else final)


# ---------------------------------------------------------------- libxl / xl


def libxl_hdr(options: int = 0, version: int = 2, ident: int = LIBXL_IDENT) -> bytes:
    return struct.pack(">QII", ident, version, options)


def emu(rtype: int, payload: bytes, emu_id: int = 2, index: int = 0) -> bytes:
    return rec(rtype, struct.pack("<II", emu_id, index) + payload)


def xenstore_kv(pairs: Sequence[tuple[bytes, bytes]]) -> bytes:
    return b"".join(k + b"\x00" + v + b"\x00" for k, v in pairs)


PHYSMAP_KV = (
    (b"physmap/f0000000/start_addr", b"f0000000"),
    (b"physmap/f0000000/size", b"800000"),
    (b"physmap/f0000000/name", b"vga.vram"),
)


def libxl_stream(
    libxc: bytes, *, xenstore: bool = False, emu_ctx: bytes | None = b"QEVM" * 64, options: int = 0
) -> bytes:
    out = libxl_hdr(options) + rec(L_LIBXC_CONTEXT) + libxc
    if xenstore:
        out += emu(L_EMULATOR_XENSTORE_DATA, xenstore_kv(PHYSMAP_KV))
    if emu_ctx is not None:
        out += emu(L_EMULATOR_CONTEXT, emu_ctx)
    return out + rec(L_END)


def xl_hdr(
    mflags: int = 3,
    config: bytes = b'{"c_info": {"name": "guest"}}',
    byteorder: int = 0x01020304,
    oflags: int = 0,
) -> bytes:
    opt = struct.pack("<I", len(config)) + config if config else b""
    return XL_MAGIC + struct.pack("<IIII", byteorder, mflags, oflags, len(opt)) + opt


def remus_libxl(checkpoints: int = 3, *, xenstore: bool = True, final_end: bool = True) -> bytes:
    """LibxlHDR LIBXC_CONTEXT IHDR DHDR .. SDE PAGE_DATA.. TSC CTX PARAMS CHECKPOINT
    [EMU_XS] EMU_CTX CHECKPOINT_END  PAGE_DATA.. CHECKPOINT ...  (section 3.4)."""
    out = libxl_hdr() + rec(L_LIBXC_CONTEXT) + ihdr(3) + dhdr(2) + cpuid_policy() + sde()
    for cp in range(checkpoints):
        pf = range(32) if cp == 0 else range(cp, 32, 4)
        out += pages(pf, gen=cp) + tsc() + hvm_context() + hvm_params(DEFAULT_PARAMS)
        out += rec(CHECKPOINT)
        if xenstore:
            out += emu(L_EMULATOR_XENSTORE_DATA, xenstore_kv(PHYSMAP_KV))
        out += emu(L_EMULATOR_CONTEXT, b"QEVM" + bytes([cp]) * 60)
        out += rec(L_CHECKPOINT_END)
    if final_end:
        out += end() + rec(L_END)
    return out


# ---------------------------------------------------------------- legacy (pre-4.6)


@dataclasses.dataclass
class Legacy:
    """A legacy image description; ``build()`` lays it out per section 2."""

    guest: str = "hvm"  # "pv" | "hvm"
    width: int = 64  # toolstack unsigned long bits
    p2m_size: int = 0x100
    batches: Sequence[Sequence[tuple[int, int]]] = ((tuple((p, NOTAB) for p in range(16))),)
    gen: int = 0
    last_checkpoint: bool = True
    qemu_sig: bytes = SIG_0002
    qemu_data: bytes = b"QEVM" + bytes(range(200))
    toolstack: bool = False
    vcpus: Sequence[int] = (0, 1)
    guest_width: int = 8  # PV guest word size (vcpu block size)
    extv: bool = True
    xsave_len: int = 0  # "xcnt": xsave size + 16, 0 = absent
    tsc_chunk: bool = True
    hvm_param_chunks: bool = True
    extra_chunks: bytes = b""  # raw bytes added before LAST_CHECKPOINT
    trailer: bytes = b""  # raw bytes after the image

    def ulong(self, v: int) -> bytes:
        return struct.pack("<Q" if self.width == 64 else "<I", v)

    def header(self) -> bytes:
        out = self.ulong(self.p2m_size)
        if self.guest == "pv":
            ctx = PV64_VCPU_CTX if self.guest_width == 8 else PV32_VCPU_CTX
            blocks = struct.pack("<4sI", b"vcpu", ctx) + b"\x11" * ctx
            if self.extv:
                blocks += struct.pack("<4sI", b"extv", 0)
            if self.xsave_len:
                blocks += struct.pack("<4sII", b"xcnt", 4, self.xsave_len)
            out += self.ulong((1 << self.width) - 1) + struct.pack("<I", len(blocks)) + blocks
            fpp = PAGE // self.guest_width
            nframes = (self.p2m_size - 1) // fpp + 1
            out += b"".join(self.ulong(0x2000 + i) for i in range(nframes))
        return out

    def batch(self, entries: Sequence[tuple[int, int]], gen: int) -> bytes:
        out = struct.pack("<i", len(entries))
        out += b"".join(self.ulong((t << 28) | p) for p, t in entries)
        return out + b"".join(page_bytes(p, gen) for p, t in entries if t not in NO_DATA)

    def body(self, gen: int, last: bool) -> bytes:
        out = b""
        if self.tsc_chunk:
            out += struct.pack("<iIQII", C_TSC_INFO, 1, 987654321, 1_500_000, 3)
        for b in self.batches:
            out += self.batch(b, gen)
        maxid = max(self.vcpus) if self.vcpus else 0
        words = [0] * (maxid // 64 + 1)
        for v in self.vcpus:
            words[v // 64] |= 1 << (v % 64)
        out += struct.pack("<ii", C_VCPU_INFO, maxid) + b"".join(
            struct.pack("<Q", w) for w in words
        )
        if self.guest == "hvm" and self.hvm_param_chunks:
            out += struct.pack("<iiQ", C_HVM_IDENT_PT, 0, 0xFEFFB000)
            out += struct.pack("<iiQ", C_HVM_CONSOLE_PFN, 0, 0xFEFFC)
            out += struct.pack("<iiQ", C_HVM_VIRIDIAN, 0, 1)
        if self.toolstack:
            blob = self.physmap_blob()
            out += struct.pack("<iI", C_TOOLSTACK, len(blob)) + blob
        out += self.extra_chunks
        if last:
            out += struct.pack("<i", C_LAST_CHECKPOINT)
        return out + struct.pack("<i", 0)

    def physmap_blob(self) -> bytes:
        """libxl's toolstack blob: u32 version=1; u32 count; physmap entries,
        with 4 bytes of padding leaking after the name on 64-bit toolstacks."""
        name = b"vga.vram\x00"
        ent = struct.pack("<QQQI", 0xF0000000, 0xF0000000, 0x800000, len(name)) + name
        if self.width == 64:
            ent += b"\xee" * 4
        return struct.pack("<II", 1, 1) + ent

    def tail(self, gen: int) -> bytes:
        if self.guest == "pv":
            out = struct.pack("<I", 2) + self.ulong(0x30) + self.ulong(0x31)
            ctx = PV64_VCPU_CTX if self.guest_width == 8 else PV32_VCPU_CTX
            for v in self.vcpus:
                out += bytes([0x40 + v + gen]) * ctx
                if self.extv:
                    out += bytes([0x60 + v]) * 128
                if self.xsave_len:
                    size = self.xsave_len - 16
                    out += struct.pack("<QQ", 7, size) + bytes([0x70 + v]) * size
            return out + bytes([0x22 + gen]) * PAGE
        blob = hvm_blob(len(self.vcpus))
        out = struct.pack("<QQQ", 0xFEFFE, 0xFEFFD, 0xFEFFF) + struct.pack("<I", len(blob)) + blob
        return out + self.qemu(gen)

    def qemu(self, gen: int) -> bytes:
        data = self.qemu_data if gen == 0 else self.qemu_data + bytes([gen])
        if self.qemu_sig == SIG_XEND:
            return SIG_XEND + data
        return self.qemu_sig + struct.pack("<I", len(data)) + data

    def build(self, checkpoints: int = 1, last_on: int | None = None) -> bytes:
        """checkpoints > 1 makes a Remus stream; -9 goes in body ``last_on``
        (default: the last one) when ``last_checkpoint``."""
        out = self.header()
        last_idx = checkpoints - 1 if last_on is None else last_on
        for cp in range(checkpoints):
            out += self.body(cp, self.last_checkpoint and cp == last_idx) + self.tail(cp)
        return out + self.trailer


def tiny_legacy(guest: str = "hvm", width: int = 64) -> Legacy:
    """The smallest legacy image of a kind: two pages, one vCPU, a short qemu
    record (hostile-input sweeps and fuzz seeds cut or flip every byte)."""
    return Legacy(
        guest=guest,
        width=width,
        p2m_size=8,
        batches=(((0, NOTAB), (1, NOTAB)),),
        qemu_data=b"QEVM",
        vcpus=(0,),
    )


def legacy_xend_pv_then_qemu() -> bytes:
    """The 2013 case: a plain PV image with no LAST_CHECKPOINT, followed by a
    toolstack-written device-model record starting "QemuDeviceModelRecord"."""
    return Legacy(
        guest="pv", last_checkpoint=False, trailer=SIG_XEND + b"QEVM" + b"\x00" * 60
    ).build()


# ---------------------------------------------------------------- the corpus


@dataclasses.dataclass
class Case:
    name: str
    data: bytes
    fmt: str  # libxc | libxl | xl | legacy
    stream_type: str = "plain"
    ok: bool = True  # xcsave's verdict
    why: str = ""  # substring of xcsave's error when not ok
    xen_ok: bool | None = None  # Xen verify-stream-v2's verdict (None: not applicable)
    xen_why: str = ""  # substring of Xen's output when not ok
    disagree: str = ""  # the known reason the verifiers disagree (facts 4.3/4.4)
    width: int | None = None
    guest: str | None = None


def _swap_rec(stream: bytes, old: bytes, new: bytes) -> bytes:
    assert stream.count(old) >= 1, "pattern not found"
    return stream.replace(old, new, 1)


def cases() -> list[Case]:
    c: list[Case] = []
    hvm3 = libxc_hvm(3)
    pv3 = libxc_pv(3)
    add = c.append

    # ---- valid streams
    add(Case("libxc-v3-hvm", hvm3, "libxc", xen_ok=True))
    add(Case("libxc-v2-hvm", libxc_hvm(2), "libxc", xen_ok=True))
    add(Case("libxc-v3-pv", pv3, "libxc", xen_ok=True))
    add(Case("libxc-v2-pv", libxc_pv(2), "libxc", xen_ok=True))
    add(Case("libxc-v3-pv32", libxc_pv(3, width=4), "libxc", xen_ok=True))
    add(
        Case(
            "libxc-v3-hvm-optional",
            libxc_hvm(3, optional=True),
            "libxc",
            xen_ok=False,
            xen_why="Unrecognised record type 0x80000001",
            disagree="Xen's verifier rejects optional (bit-31) records (4.4)",
        )
    )
    add(Case("libxl-hvm", libxl_stream(hvm3), "libxl", xen_ok=True))
    add(
        Case(
            "libxl-hvm-xenstore",
            libxl_stream(hvm3, xenstore=True),
            "libxl",
            xen_ok=False,
            xen_why="Data not NUL terminated",
            disagree="Xen's verifier fails on any non-empty EMULATOR_XENSTORE_DATA (Py3 bug, 4.4)",
        )
    )
    add(Case("libxl-pv", libxl_stream(pv3, emu_ctx=None), "libxl", xen_ok=True))
    add(Case("xl-libxl-hvm", xl_hdr() + libxl_stream(hvm3), "xl", xen_ok=True))
    add(Case("xl-noconfig", xl_hdr(mflags=2, config=b"") + libxl_stream(hvm3), "xl", xen_ok=True))
    add(
        Case(
            "remus-libxl",
            remus_libxl(3),
            "libxl",
            "remus",
            xen_ok=False,
            xen_why="Error",
            disagree="Xen's verifier cannot parse checkpointed streams (4.3)",
        )
    )
    add(
        Case(
            "remus-libxl-failover",
            remus_libxl(2, final_end=False),
            "libxl",
            "remus",
            xen_ok=False,
            xen_why="Error",
            disagree="Xen's verifier cannot parse checkpointed streams (4.3)",
        )
    )
    add(
        Case(
            "remus-libxl-noxs",
            remus_libxl(2, xenstore=False),
            "libxl",
            "colo",
            xen_ok=False,
            xen_why="Error",
            disagree="Xen's verifier cannot parse checkpointed streams (4.3)",
        )
    )
    add(
        Case(
            "libxc-v3-hvm-verify",
            libxc_hvm(3, final=rec(VERIFY) + pages(range(16)) + end()),
            "libxc",
            xen_ok=True,
        )
    )

    # ---- broken: both verifiers must reject
    tsc_pad = rec(X86_TSC_INFO, struct.pack("<IIQII", 0, 1, 2, 3, 0)[:20], fill=0xAA)
    bad_pad = _swap_rec(hvm3, tsc(), tsc_pad)
    add(
        Case(
            "bad-padding",
            bad_pad,
            "libxc",
            ok=False,
            why="padding",
            xen_ok=False,
            xen_why="Padding containing non0 bytes found",
        )
    )
    add(
        Case(
            "truncated",
            hvm3[: len(hvm3) - 100],
            "libxc",
            ok=False,
            why="truncated",
            xen_ok=False,
            xen_why="Stream truncated",
        )
    )
    add(
        Case(
            "truncated-header",
            hvm3[:20],
            "libxc",
            ok=False,
            why="truncated",
            xen_ok=False,
            xen_why="Stream truncated",
        )
    )
    add(
        Case(
            "bad-tsc-length",
            _swap_rec(hvm3, tsc(), rec(X86_TSC_INFO, b"\x00" * 16)),
            "libxc",
            ok=False,
            why="24",
            xen_ok=False,
            xen_why="Length should be 24 bytes",
        )
    )
    bad_pd = page_data([(1, NOTAB), (2, NOTAB)], data=page_bytes(1))
    add(
        Case(
            "bad-page-data-length",
            libxc_hvm(3, final=bad_pd + end()),
            "libxc",
            ok=False,
            why="PAGE_DATA",
            xen_ok=False,
            xen_why="Expected 8 + 16 + 8192",
        )
    )
    add(
        Case(
            "unknown-mandatory",
            libxc_hvm(3, final=rec(0x13, b"x") + end()),
            "libxc",
            ok=False,
            why="unknown mandatory",
            xen_ok=False,
            xen_why="Unrecognised record type 0x13",
        )
    )
    add(
        Case(
            "bad-marker",
            ihdr(3, marker=0xFFFFFFFFFFFFFFFE) + hvm3[24:],
            "libxc",
            ok=False,
            why="marker",
            xen_ok=False,
            xen_why="Bad image marker",
        )
    )
    add(
        Case(
            "bad-version",
            ihdr(4) + hvm3[24:],
            "libxc",
            ok=False,
            why="version",
            xen_ok=False,
            xen_why="Unknown image version",
        )
    )
    add(
        Case(
            "page-shift",
            ihdr(3) + dhdr(2, page_shift=13) + hvm3[40:],
            "libxc",
            ok=False,
            why="page_shift",
            xen_ok=False,
            xen_why="Page shift expected to be 12",
        )
    )
    add(
        Case(
            "pfn-reserved-bits",
            libxc_hvm(
                3,
                final=rec(PAGE_DATA, struct.pack("<IIQ", 1, 0, (1 << 55) | 5) + page_bytes(5))
                + end(),
            ),
            "libxc",
            ok=False,
            why="reserved",
            xen_ok=False,
            xen_why="Reserved bits set in pfn[0]",
        )
    )
    add(
        Case(
            "pfn-bad-type",
            libxc_hvm(3, final=page_data([(7, 6)], data=page_bytes(7)) + end()),
            "libxc",
            ok=False,
            why="type",
            xen_ok=False,
            xen_why="Invalid type value in pfn[0]",
        )
    )
    add(
        Case(
            "sde-in-v2",
            libxc_hvm(2, final=sde() + end()),
            "libxc",
            ok=False,
            why="STATIC_DATA_END",
            xen_ok=False,
            xen_why="Static data end record found in v2",
        )
    )
    add(
        Case(
            "checkpoint-in-plain",
            libxc_hvm(3, final=rec(CHECKPOINT) + end()),
            "libxc",
            ok=False,
            why="CHECKPOINT in a plain stream",
            xen_ok=True,
            disagree="Xen's verifier does not know the stream type (4.3)",
        )
    )
    add(
        Case(
            "dirty-pfn-list",
            libxc_hvm(3, final=rec(CHECKPOINT_DIRTY_PFN_LIST, struct.pack("<Q", 1)) + end()),
            "libxc",
            ok=False,
            why="CHECKPOINT_DIRTY_PFN_LIST",
            xen_ok=False,
            xen_why="checkpoint dirty pfn list",
        )
    )
    add(
        Case(
            "libxl-bad-padding",
            libxl_stream(hvm3, emu_ctx=None)[:-8]
            + rec(L_EMULATOR_CONTEXT, struct.pack("<II", 2, 0) + b"abc", fill=1)
            + rec(L_END),
            "libxl",
            ok=False,
            why="padding",
            xen_ok=False,
            xen_why="Padding containing non0 bytes found",
        )
    )
    add(
        Case(
            "libxl-unknown-record",
            libxl_stream(hvm3, emu_ctx=None)[:-8] + rec(9) + rec(L_END),
            "libxl",
            ok=False,
            why="unknown libxl record",
            xen_ok=False,
            xen_why="Unrecognised record type",
        )
    )
    add(
        Case(
            "libxl-bad-emulator",
            libxl_stream(hvm3, emu_ctx=None)[:-8]
            + emu(L_EMULATOR_CONTEXT, b"x", emu_id=7)
            + rec(L_END),
            "libxl",
            ok=False,
            why="emulator id",
            xen_ok=False,
            xen_why="Unrecognised emulator id",
        )
    )
    add(
        Case(
            "libxl-xs-odd",
            libxl_stream(hvm3, emu_ctx=None)[:-8]
            + emu(L_EMULATOR_XENSTORE_DATA, b"k\x00v\x00x\x00")
            + rec(L_END),
            "libxl",
            ok=False,
            why="even",
            xen_ok=False,
            xen_why="Data not NUL terminated",
        )
    )
    add(
        Case(
            "libxl-xs-nonul",
            libxl_stream(hvm3, emu_ctx=None)[:-8]
            + emu(L_EMULATOR_XENSTORE_DATA, b"k\x00v")
            + rec(L_END),
            "libxl",
            ok=False,
            why="NUL",
            xen_ok=False,
            xen_why="Data not NUL terminated",
        )
    )
    add(
        Case(
            "libxl-bad-version",
            libxl_hdr(version=3) + libxl_stream(hvm3)[16:],
            "libxl",
            ok=False,
            why="version",
            xen_ok=False,
            xen_why="Unknown image version",
        )
    )
    add(
        Case(
            "xl-bad-magic",
            b"Y" + xl_hdr()[1:] + libxl_stream(hvm3),
            "xl",
            ok=False,
            why="magic",
            xen_ok=False,
            xen_why="No xl header",
        )
    )

    # ---- broken: only xcsave's verifier catches these (4.3 "Not checked")
    nc = "Xen's verifier does not check {} (4.3)"
    add(
        Case(
            "bytes-after-end",
            hvm3 + b"\x00" * 16,
            "libxc",
            ok=False,
            why="after END",
            xen_ok=True,
            disagree=nc.format("trailing bytes after END"),
        )
    )
    add(
        Case(
            "libxl-bytes-after-end",
            libxl_stream(hvm3) + b"junk",
            "libxl",
            ok=False,
            why="after END",
            xen_ok=True,
            disagree=nc.format("trailing bytes after END"),
        )
    )
    add(
        Case(
            "dup-pfn-in-record",
            libxc_hvm(3, final=page_data([(3, NOTAB), (3, NOTAB)]) + end()),
            "libxc",
            ok=False,
            why="duplicate pfn",
            xen_ok=True,
            disagree=nc.format("duplicate pfns"),
        )
    )
    add(
        Case(
            "pv-pfn-out-of-range",
            libxc_pv(3, p2m_size=64, pfns=(1, 2, 100)),
            "libxc",
            ok=False,
            why="out of range",
            xen_ok=True,
            disagree=nc.format("out-of-range pfns"),
        )
    )
    no_sde_order = (
        ihdr(3)
        + dhdr(2)
        + pages(range(4))
        + sde()
        + tsc()
        + hvm_context()
        + hvm_params(DEFAULT_PARAMS)
        + end()
    )
    add(
        Case(
            "page-before-sde",
            no_sde_order,
            "libxc",
            ok=False,
            why="before STATIC_DATA_END",
            xen_ok=True,
            disagree=nc.format("record ordering"),
        )
    )
    add(
        Case(
            "no-sde-v3",
            libxc_hvm(3, policies=False).replace(sde(), b"", 1),
            "libxc",
            ok=False,
            why="STATIC_DATA_END",
            xen_ok=True,
            disagree=nc.format("record ordering"),
        )
    )
    add(
        Case(
            "two-sde",
            libxc_hvm(3).replace(sde(), sde() + sde(), 1),
            "libxc",
            ok=False,
            why="second STATIC_DATA_END",
            xen_ok=True,
            disagree=nc.format("record ordering"),
        )
    )
    pv_order = (
        ihdr(3)
        + dhdr(1)
        + cpuid_policy()
        + pv_info()
        + sde()
        + p2m_frames(0, 63, [1])
        + page_data([(1, NOTAB)])
        + tsc()
        + shared_info()
        + vcpu(X86_PV_VCPU_BASIC, 0, b"\x00" * PV64_VCPU_CTX)
        + end()
    )
    add(
        Case(
            "pv-info-not-first",
            pv_order,
            "libxc",
            ok=False,
            why="X86_PV_INFO",
            xen_ok=True,
            disagree=nc.format("record ordering"),
        )
    )
    pv_p2m_late = (
        ihdr(3)
        + dhdr(1)
        + pv_info()
        + sde()
        + page_data([(1, NOTAB)])
        + p2m_frames(0, 63, [1])
        + tsc()
        + shared_info()
        + vcpu(X86_PV_VCPU_BASIC, 0, b"\x00" * PV64_VCPU_CTX)
        + end()
    )
    add(
        Case(
            "pv-page-before-p2m",
            pv_p2m_late,
            "libxc",
            ok=False,
            why="P2M_FRAMES",
            xen_ok=True,
            disagree=nc.format("record ordering"),
        )
    )
    add(
        Case(
            "hvm-missing-context",
            libxc_hvm(3, tail=False, final=tsc() + hvm_params(DEFAULT_PARAMS) + end()),
            "libxc",
            ok=False,
            why="HVM_CONTEXT",
            xen_ok=True,
            disagree=nc.format("presence of mandatory records"),
        )
    )
    add(
        Case(
            "pv-missing-shinfo",
            pv3.replace(shared_info(), b"", 1),
            "libxc",
            ok=False,
            why="SHARED_INFO",
            xen_ok=True,
            disagree=nc.format("presence of mandatory records"),
        )
    )
    add(
        Case(
            "pv-record-in-hvm",
            libxc_hvm(3, final=shared_info() + end()),
            "libxc",
            ok=False,
            why="HVM stream",
            xen_ok=True,
            disagree=nc.format("guest-type consistency"),
        )
    )
    add(
        Case(
            "hvm-record-in-pv",
            pv3[:-8] + hvm_params(DEFAULT_PARAMS) + end(),
            "libxc",
            ok=False,
            why="PV stream",
            xen_ok=True,
            disagree=nc.format("guest-type consistency"),
        )
    )
    add(
        Case(
            "remus-as-plain",
            remus_libxl(2),
            "libxl",
            "plain",
            ok=False,
            why="CHECKPOINT in a plain stream",
            xen_ok=False,
            xen_why="Error",
            disagree="Xen's verifier cannot parse checkpointed streams (4.3)",
        )
    )
    add(
        Case(
            "checkpoint-end-in-plain",
            libxl_stream(hvm3)[:-8] + rec(L_CHECKPOINT_END) + rec(L_END),
            "libxl",
            ok=False,
            why="CHECKPOINT_END",
            xen_ok=True,
            disagree="Xen's verifier does not know the stream type (4.3)",
        )
    )
    add(
        Case(
            "no-libxc-context",
            libxl_hdr() + rec(L_END),
            "libxl",
            ok=False,
            why="LIBXC_CONTEXT",
            xen_ok=True,
            disagree=nc.format("presence of mandatory records"),
        )
    )

    # ---- legacy streams (Xen's verifier does not read them; its converter does)
    add(Case("legacy-hvm-0002", Legacy().build(), "legacy", width=64, guest="hvm"))
    add(
        Case(
            "legacy-hvm-0002-no-9",
            Legacy(last_checkpoint=False).build(),
            "legacy",
            width=64,
            guest="hvm",
        )
    )
    add(
        Case(
            "legacy-hvm-xend",
            Legacy(qemu_sig=SIG_XEND, last_checkpoint=False).build(),
            "legacy",
            width=64,
            guest="hvm",
        )
    )
    add(
        Case(
            "legacy-hvm-remus-sig",
            Legacy(qemu_sig=SIG_REMUS).build(),
            "legacy",
            width=64,
            guest="hvm",
        )
    )
    add(
        Case(
            "legacy-hvm-toolstack", Legacy(toolstack=True).build(), "legacy", width=64, guest="hvm"
        )
    )
    add(Case("legacy-pv", Legacy(guest="pv").build(), "legacy", width=64, guest="pv"))
    add(
        Case(
            "legacy-pv-xsave",
            Legacy(guest="pv", xsave_len=0x340).build(),
            "legacy",
            width=64,
            guest="pv",
        )
    )
    add(Case("legacy-pv-2013", legacy_xend_pv_then_qemu(), "legacy", width=64, guest="pv"))
    add(Case("legacy-hvm32", Legacy(width=32).build(), "legacy", width=32, guest="hvm"))
    add(
        Case(
            "legacy-remus-hvm",
            Legacy(qemu_sig=SIG_REMUS).build(checkpoints=3),
            "legacy",
            "remus",
            width=64,
            guest="hvm",
        )
    )
    add(
        Case(
            "legacy-batch-too-big",
            Legacy(extra_chunks=struct.pack("<i", 2000)).build(),
            "legacy",
            ok=False,
            why="Max batch size exceeded (2000)",
            width=64,
            guest="hvm",
        )
    )
    add(
        Case(
            "legacy-dup-pfn",
            Legacy(batches=(((1, NOTAB), (1, NOTAB)),)).build(),
            "legacy",
            ok=False,
            why="duplicate pfn",
            width=64,
            guest="hvm",
        )
    )
    add(
        Case(
            "legacy-pfn-range",
            Legacy(batches=(((0x200, NOTAB),),)).build(),
            "legacy",
            ok=False,
            why="out of range",
            width=64,
            guest="hvm",
        )
    )
    add(
        Case(
            "legacy-tmem",
            Legacy(extra_chunks=struct.pack("<i", C_TMEM)).build(),
            "legacy",
            ok=False,
            why="TMEM",
            width=64,
            guest="hvm",
        )
    )
    add(
        Case(
            "legacy-compression",
            Legacy(extra_chunks=struct.pack("<i", C_ENABLE_COMPRESSION)).build(),
            "legacy",
            ok=False,
            why="ENABLE_COMPRESSION",
            width=64,
            guest="hvm",
        )
    )
    add(
        Case(
            "legacy-truncated",
            Legacy().build()[:-50],
            "legacy",
            ok=False,
            why="truncated",
            width=64,
            guest="hvm",
        )
    )
    add(
        Case(
            "legacy-bad-qemu-sig",
            Legacy(qemu_sig=b"NotAQemuSignature!!!!").build(),
            "legacy",
            ok=False,
            why="qemu",
            width=64,
            guest="hvm",
        )
    )
    return c


# ---------------------------------------------------------------- big images (bench)


def write_big_libxc(path: str | Path, size: int, batch: int = 1024) -> int:
    """Write a v3 HVM libxc image with about ``size`` bytes of page data."""
    npages = max(1, size // PAGE)
    chunk = bytes(range(256)) * (PAGE * batch // 256)
    with open(path, "wb") as f:
        f.write(ihdr(3) + dhdr(2) + cpuid_policy() + sde())
        for base in range(0, npages, batch):
            n = min(batch, npages - base)
            f.write(struct.pack("<IIII", PAGE_DATA, 8 + 8 * n + PAGE * n, n, 0))
            f.write(struct.pack(f"<{n}Q", *range(base, base + n)))
            f.write(chunk[: PAGE * n])
        f.write(tsc() + hvm_context() + hvm_params(DEFAULT_PARAMS) + end())
    return npages


def write_big_legacy(path: str | Path | BinaryIO, size: int, batch: int = 1024) -> int:
    """Write a 64-bit legacy HVM image with about ``size`` bytes of pages
    to ``path`` (or into an open binary file)."""
    npages = max(1, size // PAGE)
    lg = Legacy(p2m_size=npages + 16, batches=())
    chunk = bytes(range(256)) * (PAGE * batch // 256)
    with open(path, "wb") if isinstance(path, (str, Path)) else contextlib.nullcontext(path) as f:
        f.write(lg.header())
        f.write(struct.pack("<iIQII", C_TSC_INFO, 1, 987654321, 1_500_000, 3))
        for base in range(0, npages, batch):
            n = min(batch, npages - base)
            f.write(struct.pack("<i", n) + struct.pack(f"<{n}Q", *range(base, base + n)))
            f.write(chunk[: PAGE * n])
        f.write(lg.body(0, True) + lg.tail(0))
    return npages


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m xcsave.corpus OUTDIR\n")
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for case in cases():
        (out / f"{case.name}.bin").write_bytes(case.data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
