"""The named stream cases the tests judge xcsave by: every corpus stream
(xcsave.corpus builds them), valid and broken, with what xcsave's verifier
and Xen's ``verify-stream-v2`` are expected to say, and why they disagree
where they do.  ``python tests/corpus_cases.py DIR`` writes them to DIR (the
fuzzers' seeds start from them).

The builders ship in the package (an installed xcsave can make streams:
``xcsave sim legacy-image``); this catalogue of expectations is the tests'.
"""

from __future__ import annotations

import dataclasses
import struct
import sys
from pathlib import Path

from xcsave.corpus import *  # noqa: F403 - the builders, by the names the cases use


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


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: corpus_cases.py OUTDIR\n")
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for case in cases():
        (out / f"{case.name}.bin").write_bytes(case.data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
