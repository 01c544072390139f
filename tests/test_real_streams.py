"""What real Xen 4.17 writes, on every run: the lab's skeletons (tests/data/real,
made by lab/xen/run and committed with lab/xen/update-skeletons) of `xl save`
images of a PV, a PVH and an HVM domU, saved once by the stock
libxl-save-helper and once by xcsave-helper as its drop-in.

(test_skeleton.py inflates every committed skeleton and has both verifiers
judge it; here: what the records say.)
"""

from __future__ import annotations

import errno
import hashlib
import struct
from pathlib import Path

import pytest

import xcsave
import xcsave.sync
from xcsave.skeleton import Skeleton, compare, inflate, load_skeleton

REAL = Path(__file__).resolve().parent / "data" / "real"
KINDS = ("pv", "pvh", "hvm")


def real(kind: str, who: str) -> Skeleton:
    path = REAL / f"{kind}-xl-by-{who}.skel"
    if not path.exists():
        pytest.fail(f"{path} is missing: run lab/xen/run, then lab/xen/update-skeletons")
    return load_skeleton(path)


def names(skel: Skeleton, layer: str) -> list[str]:
    """The layer's record names, consecutive PAGE_DATA records as one."""
    out: list[str] = []
    for r in skel.records:
        if r.layer == layer and not (r.name == "PAGE_DATA" and out and out[-1] == "PAGE_DATA"):
            out.append(r.name)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_xcsave_helper_writes_what_the_stock_helper_writes(kind: str) -> None:
    """xcsave-helper as libxl's drop-in: the same record sequence as Xen's own
    helper, for every guest type (both run libxc's save; the frame around it,
    the callbacks and the stream's end are the helpers')."""
    assert compare(real(kind, "stock"), real(kind, "xcsave")) == []


@pytest.mark.parametrize("kind", KINDS)
def test_the_stream_is_xls_whole_image(kind: str) -> None:
    skel = real(kind, "stock")
    assert skel.format == "xl" and skel.stream_type == "plain" and skel.ended == "end"
    assert skel.layers == ("xl", "libxl", "libxc")
    assert skel.guest == ("pv" if kind == "pv" else "hvm")  # PVH is an HVM container
    # 256 MiB of guest memory, most of it never touched by a busybox guest.
    assert 65000 <= skel.pages <= 66000 and skel.zero_pages > skel.pages // 2


def test_pv_records() -> None:
    assert names(real("pv", "stock"), "libxc") == [
        "X86_PV_INFO",
        "X86_CPUID_POLICY",
        "X86_MSR_POLICY",
        "STATIC_DATA_END",
        "X86_PV_P2M_FRAMES",
        "PAGE_DATA",
        "X86_TSC_INFO",
        "SHARED_INFO",
        "X86_PV_VCPU_BASIC",
        "X86_PV_VCPU_EXTENDED",
        "X86_PV_VCPU_XSAVE",
        "END",
    ]
    assert names(real("pv", "stock"), "libxl") == ["LIBXC_CONTEXT", "END"]


@pytest.mark.parametrize("kind", ["pvh", "hvm"])
def test_hvm_container_records(kind: str) -> None:
    """PVH and HVM: the same libxc records; only HVM has a device model, whose
    state follows the libxc image in libxl's EMULATOR_CONTEXT."""
    skel = real(kind, "stock")
    assert names(skel, "libxc") == [
        "X86_CPUID_POLICY",
        "X86_MSR_POLICY",
        "STATIC_DATA_END",
        "PAGE_DATA",
        "X86_TSC_INFO",
        "HVM_CONTEXT",
        "HVM_PARAMS",
        "END",
    ]
    emulator = ["EMULATOR_CONTEXT"] if kind == "hvm" else []
    assert names(skel, "libxl") == ["LIBXC_CONTEXT", *emulator, "END"]
    # Batches of up to 1024 pfns over the whole pfn space: the holes travel
    # as entries without data.
    batches = [r for r in skel.records if r.name == "PAGE_DATA"]
    assert max(r.count for r in batches) == 1024
    assert sum(r.count for r in batches) > skel.pages


# ---------------------------------------------------------------- into a sim domain


def _pages(path: Path, start: int) -> dict[int, bytes]:
    """pfn -> sha256 of each non-zero page a libxc image at ``start`` carries
    (the last copy wins), read independently of xcsave's codec."""
    out: dict[int, bytes] = {}
    with path.open("rb") as f:
        f.seek(start + 24 + 16)  # the image and domain headers
        while hdr := f.read(8):
            rtype, length = struct.unpack("<II", hdr)
            body = f.read((length + 7) // 8 * 8)
            if rtype == 0:  # END
                break
            if rtype != 1:  # not PAGE_DATA
                continue
            (count,) = struct.unpack_from("<I", body)
            pfns = struct.unpack_from(f"<{count}Q", body, 8)
            off = 8 + 8 * count
            for word in pfns:
                if word >> 60 in (0xD, 0xE, 0xF):  # BROKEN, XALLOC, XTAB: no data
                    continue
                page = body[off : off + 4096]
                off += 4096
                pfn = word & ((1 << 52) - 1)
                if page.count(0) == len(page):
                    out.pop(pfn, None)
                else:
                    out[pfn] = hashlib.sha256(page).digest()
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_real_stream_restores_into_a_sim_domain_with_foreign(kind: str, tmp_path: Path) -> None:
    """Real Xen's save restores into a sim domain when the caller says the
    stream is foreign (the sim did not write it): every page where the
    stream put it, as the sim's own save of the domain then shows.  Without
    ``foreign`` the sim refuses it, on purpose, and leaves nothing."""
    skel = real(kind, "stock")
    stream = tmp_path / f"{kind}.xl"
    inflate(skel, stream)
    dom, resaved = tmp_path / f"{kind}.dom", tmp_path / f"{kind}.libxc"
    if kind != "pv":
        with pytest.raises(xcsave.HelperFailed, match="HVM_CONTEXT at offset"):
            xcsave.sync.restore(stream, sim=dom, fmt="xl")
    else:
        with pytest.raises(xcsave.HelperFailed, match="domain type 1"):
            xcsave.sync.restore(stream, sim=dom, fmt="xl")
    assert list(tmp_path.glob(f"*{kind}.dom*")) == []
    res = xcsave.sync.restore(stream, sim=dom, fmt="xl", foreign=True)
    assert res.restore_stats is not None and res.restore_stats.pages_received == skel.pages
    xcsave.sync.save(resaved, sim=dom, fmt="libxc")
    start = stream.read_bytes().index(b"\xff" * 8 + b"XENF")  # the libxc image header
    assert _pages(resaved, 0) == _pages(stream, start)


def test_foreign_restore_keeps_the_bounds(tmp_path: Path) -> None:
    """``foreign`` sizes the domain by the stream's highest pfn, within the
    caller's bounds: the HVM image reaches pfn 0xfeffc (4 GiB), so a 1 GiB
    bound refuses it (ERANGE) and leaves nothing; a sim stream is refused."""
    stream = tmp_path / "hvm.xl"
    inflate(real("hvm", "stock"), stream)
    with pytest.raises(xcsave.HelperFailed) as e:
        xcsave.sync.restore(
            stream, sim=tmp_path / "d.dom", fmt="xl", foreign=True, max_memory=1 << 30
        )
    assert e.value.errno == errno.ERANGE
    assert list(tmp_path.glob("*d.dom*")) == []
    with pytest.raises(ValueError, match="simulated domain"):
        xcsave.sync.restore(stream, domid=5, fmt="xl", foreign=True)


def test_foreign_restore_of_a_cut_stream_leaves_nothing(tmp_path: Path) -> None:
    """A real stream cut in the middle of its pages, restored as foreign:
    one failure, no domain and no partial left."""
    stream = tmp_path / "pvh.xl"
    inflate(real("pvh", "stock"), stream)
    with stream.open("r+b") as f:
        f.truncate(stream.stat().st_size // 2)
    with pytest.raises(xcsave.HelperFailed):
        xcsave.sync.restore(stream, sim=tmp_path / "d.dom", fmt="xl", foreign=True)
    assert list(tmp_path.glob("*d.dom*")) == []
