"""What real Xen 4.17 writes, on every run: the lab's skeletons (tests/data/real,
made by lab/xen/run and committed with lab/xen/update-skeletons) of `xl save`
images of a PV, a PVH and an HVM domU, saved once by the stock
libxl-save-helper and once by xcsave-helper as its drop-in.

(test_skeleton.py inflates every committed skeleton and has both verifiers
judge it; here: what the records say.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xcsave.skeleton import Skeleton, compare, load_skeleton

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
