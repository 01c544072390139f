"""``sim create --fill`` and ``sim dirty --fill`` (issue 14, item 6).

Each fill's pages are classified the way a compressor sees them -- zero,
compressible (zlib level 1 halves it at least), random (zlib gains under
5%) -- and the shares must match the documented rule
(docs/sim-format.md, "Contents of a new domain") within a tolerance that a
4096-page sample easily meets.  The default fill is the one domains had
before there was a choice: its digests are pinned.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from xcsave import sim

XCSAVE = [sys.executable, "-P", "-m", "xcsave"]
MiB = 1 << 20
PAGE = 4096
HDR = 4096  # pages start after the header page (docs/sim-format.md)


@pytest.fixture
def d() -> Iterator[Path]:
    """A directory for domain files, memory-backed when /dev/shm exists."""
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    p = Path(tempfile.mkdtemp(prefix="xcsave-test-fill-", dir=base))
    try:
        yield p
    finally:
        shutil.rmtree(p, ignore_errors=True)


def page_class(page: bytes) -> str:
    if page.count(0) == PAGE:
        return "zero"
    ratio = len(zlib.compress(page, 1)) / PAGE
    if ratio < 0.5:
        return "compressible"
    if ratio > 0.95:
        return "random"
    return f"other {ratio:.2f}"


def classes(dom: Path) -> list[str]:
    pages = sim.info(dom)["pages"]
    with open(dom, "rb") as f:
        f.seek(HDR)
        data = f.read(pages * PAGE)
    return [page_class(data[i : i + PAGE]) for i in range(0, len(data), PAGE)]


def shares(dom: Path) -> dict[str, float]:
    c = Counter(classes(dom))
    n = sum(c.values())
    return {k: v / n for k, v in c.items()}


WANT = {
    "classic": {"zero": 0.25, "random": 0.75},  # template copies are random pages
    "random": {"random": 1.0},
    "zero": {"zero": 1.0},
    "text": {"compressible": 1.0},
    "mixed": {"zero": 0.35, "compressible": 0.40, "random": 0.25},
}


@pytest.mark.parametrize("fill", sorted(WANT))
def test_each_fill_has_its_page_classes(d: Path, fill: str) -> None:
    dom = sim.create(d / f"{fill}.dom", 16 * MiB, seed=3, fill=fill)
    got = shares(dom)
    assert set(got) == set(WANT[fill]), got
    for k, want in WANT[fill].items():
        assert abs(got[k] - want) < 0.03, (k, got)
    assert sim.info(dom)["fill"] == fill


def test_mixed_compresses_like_a_guest(d: Path) -> None:
    """The compressible pages of mixed are really compressible as a whole
    (text, page tables, records): at least 3x together with zlib -1."""
    dom = sim.create(d / "m.dom", 4 * MiB, seed=9, fill="mixed")
    with open(dom, "rb") as f:
        f.seek(HDR)
        data = f.read(4 * MiB)
    pages = [data[i : i + PAGE] for i in range(0, len(data), PAGE)]
    comp = b"".join(p for p in pages if page_class(p) == "compressible")
    assert len(comp) > 0
    assert len(zlib.compress(comp, 1)) * 3 < len(comp)


@pytest.mark.parametrize("fill", ["random", "text", "mixed"])
def test_fill_is_a_function_of_the_seed(d: Path, fill: str) -> None:
    a = sim.create(d / "a.dom", 4 * MiB, seed=5, fill=fill)
    b = sim.create(d / "b.dom", 4 * MiB, seed=5, fill=fill)
    c = sim.create(d / "c.dom", 4 * MiB, seed=6, fill=fill)
    assert sim.digest(a) == sim.digest(b) != sim.digest(c)
    assert a.read_bytes()[HDR:] == b.read_bytes()[HDR:]


def test_default_fill_is_the_old_one(d: Path) -> None:
    """Digests computed before --fill existed (xcsave of issue 13)."""
    a = sim.create(d / "a.dom", 4 * MiB, vcpus=2, seed=7)
    b = sim.create(d / "b.dom", 1 * MiB, seed=0, fill="classic")
    assert sim.digest(a) == "c7288720080b6f1c17c474686a76a56bdc2a37728e67cd69bce16532b4d8ac65"
    assert sim.digest(b) == "de0602787729b31aab337cbcd5a1f3ad297a9f12db8dc9d747b56f55715420ef"
    assert sim.info(a)["fill"] == "classic"


def test_dirty_keeps_each_mixed_page_in_its_class(d: Path) -> None:
    dom = sim.create(d / "m.dom", 4 * MiB, seed=4, fill="mixed")
    before_bytes = dom.read_bytes()[HDR : HDR + 4 * MiB]
    before = classes(dom)
    n = sim.dirty(dom, 0, 0.3, seed=2)
    assert n > 0
    after_bytes = dom.read_bytes()[HDR : HDR + 4 * MiB]
    changed = [
        i
        for i in range(len(before))
        if before_bytes[i * PAGE : (i + 1) * PAGE] != after_bytes[i * PAGE : (i + 1) * PAGE]
    ]
    assert changed  # it wrote fresh content ...
    assert classes(dom) == before  # ... of the same kind, page by page


@pytest.mark.parametrize(("fill", "want"), [("random", "random"), ("text", "compressible")])
def test_dirty_fill_overrides_the_domains(d: Path, fill: str, want: str) -> None:
    dom = sim.create(d / "z.dom", 1 * MiB, seed=4, fill="zero")
    sim.dirty(dom, 0, 0.3, seed=2, fill=fill)
    got = Counter(classes(dom))
    assert set(got) <= {"zero", want} and got[want] > 0, got


def test_dirty_of_a_zero_domain_writes_zeros(d: Path) -> None:
    dom = sim.create(d / "z.dom", 1 * MiB, seed=4, fill="zero")
    assert sim.dirty(dom, 0, 0.2, seed=2) > 0
    assert set(classes(dom)) == {"zero"}


def test_api_refuses_a_bad_fill(d: Path) -> None:
    with pytest.raises(ValueError, match="fill must be one of"):
        sim.create(d / "x.dom", 1 * MiB, fill="lumpy")
    assert not (d / "x.dom").exists()
    dom = sim.create(d / "y.dom", 1 * MiB)
    with pytest.raises(ValueError, match="fill must be one of"):
        sim.dirty(dom, 10, 0.1, fill="lumpy")


@pytest.mark.parametrize("cmd", ["create", "dirty"])
def test_cli_refuses_a_bad_fill_in_one_usage_line(d: Path, cmd: str) -> None:
    dom = d / "x.dom"
    args = {
        "create": ["sim", "create", str(dom), "--memory", "1M", "--fill", "lumpy"],
        "dirty": ["sim", "dirty", str(dom), "--rate", "1", "--duration", "0.1", "--fill", "lumpy"],
    }[cmd]
    r = subprocess.run([*XCSAVE, *args], capture_output=True, text=True, check=False)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--fill" in errors[0] and "lumpy" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not dom.exists()


def test_cli_create_and_dirty_with_fill(d: Path) -> None:
    dom = d / "m.dom"
    r = subprocess.run(
        [*XCSAVE, "sim", "create", str(dom), "--memory", "1M", "--fill", "mixed", "--seed", "2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert sim.info(dom)["fill"] == "mixed"
    r = subprocess.run(
        [*XCSAVE, "sim", "dirty", str(dom), "--rate", "0", "--duration", "0.1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert sim.info(dom)["pages_written"] > 0
