"""Generator of Xen migration streams for xcsave's tests and benchmarks.

Written from shared/specs/xen-migration-facts.md (sections 2 and 3), never
from Xen's code: libxc images v2/v3 (HVM and PV), the libxl stream, the xl
savefile header, checkpointed (Remus) streams, the pre-4.6 legacy format
(PV and HVM, every qemu signature, with and without LAST_CHECKPOINT), and
broken variants of each.

Every builder returns ``bytes``.  The tests' catalogue of named cases (what
xcsave's verifier and Xen's ``verify-stream-v2`` are expected to say of
each) is tests/corpus_cases.py.  The big-image writers stream to a file for
benchmarks and ``xcsave sim legacy-image`` (an image to try ``convert`` on).
"""

from __future__ import annotations

import contextlib
import dataclasses
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

# The libxl and xl framing (section 3.2-3.3) is xcsave's one encoder of it.
from .libxlframe import (  # noqa: F401 (re-exported for the corpus' users)
    L_CHECKPOINT_END,
    L_CHECKPOINT_STATE,
    L_EMULATOR_CONTEXT,
    L_EMULATOR_XENSTORE_DATA,
    L_END,
    L_LIBXC_CONTEXT,
    LIBXL_IDENT,
    XL_MAGIC,
    emu,
    libxl_hdr,
    pad8,
    rec,
    xenstore_kv,
    xl_hdr,
)

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

# PFINFO types (bits 31..28 of a legacy pfn word; bits 63..60 in v2)
NOTAB = 0x0
L1TAB = 0x1
L4TAB = 0x4
LPINTAB = 0x8
BROKEN = 0xD
XALLOC = 0xE
XTAB = 0xF
NO_DATA = (BROKEN, XALLOC, XTAB)

# HVM params (xen/include/public/hvm/params.h numbers)
HVM_PARAM_STORE_PFN = 1
HVM_PARAM_IOREQ_PFN = 5
HVM_PARAM_BUFIOREQ_PFN = 6
HVM_PARAM_IDENT_PT = 12
HVM_PARAM_CONSOLE_PFN = 17

# legacy chunk ids (section 2.3), by what follows the 4-byte id.
# Nothing (markers):
C_ENABLE_VERIFY_MODE = -1
C_LAST_CHECKPOINT = -9
C_ENABLE_COMPRESSION = -13

# pad4 + u64 (an HVM param's value):
C_HVM_IDENT_PT = -3
C_HVM_VM86_TSS = -4
C_HVM_CONSOLE_PFN = -8
C_HVM_VIRIDIAN = -11

# A body of their own:
C_VCPU_INFO = -2  # int max_vcpu_id; u64 vcpumap[max_vcpu_id / 64 + 1]
C_TMEM = -5  # variable (xc_tmem_restore)
C_TSC_INFO = -7  # u32 mode, u64 nsec, u32 khz, u32 incarnation (20 bytes, unaligned)
C_COMPRESSED_DATA = -12  # ulong size; size bytes (Remus format B)
C_TOOLSTACK = -18  # u32 len; len bytes

SIG_XEND = b"QemuDeviceModelRecord"
SIG_0002 = b"DeviceModelRecord0002"
SIG_REMUS = b"RemusDeviceModelState"

PV64_VCPU_CTX = 0x1430
PV32_VCPU_CTX = 0xAF0


# ---------------------------------------------------------------- helpers


def page_bytes(pfn: int, gen: int = 0) -> bytes:
    """A page whose content is a function of (pfn, gen), so tests can compare."""
    return struct.pack("<QQ", pfn, gen ^ 0x5A5A5A5A) * (PAGE // 16)


# ---------------------------------------------------------------- libxc


def ihdr(
    version: int = 3,
    *,
    options: int = 0,
    marker: int = 0xFFFFFFFFFFFFFFFF,
    ident: int = 0x58454E46,
) -> bytes:
    """The image header: marker, ident ("XENF"), version, options, then zeros (reserved)."""
    return struct.pack(">QIIHHI", marker, ident, version, options, 0, 0)


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
