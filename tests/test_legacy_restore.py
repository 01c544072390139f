"""Legacy (pre-4.6) streams restored into simulated domains, with the 2013 rule:
whether a stream is checkpointed comes from the caller, never from the stream.

In a plain stream LAST_CHECKPOINT is a no-op and the image ends at its tail,
so the device-model record right after it ("QemuDeviceModelRecord"...) is
never read as a page batch ("Max batch size exceeded (1970103633)").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import xcsave
import xcsave.sync
from xcsave import corpus, sim

PAGE = 4096
HDR = 4096  # the sim file's header page; guest pages follow (docs/sim-format.md)


def page_of(dom: Path, pfn: int) -> bytes:
    with dom.open("rb") as f:
        f.seek(HDR + pfn * PAGE)
        return f.read(PAGE)


def restore_cli(src: Path, dom: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-m", "xcsave", "restore", str(src), "--sim", str(dom), *extra],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


@pytest.mark.parametrize("sig", [corpus.SIG_0002, corpus.SIG_XEND], ids=["0002", "xend"])
@pytest.mark.parametrize("last_checkpoint", [True, False], ids=["with-9", "without-9"])
def test_plain_hvm_restores_and_hands_the_device_model_over(
    sig: bytes, last_checkpoint: bool, tmp_path: Path
) -> None:
    legacy = corpus.Legacy(guest="hvm", last_checkpoint=last_checkpoint, qemu_sig=sig)
    src = tmp_path / "legacy.img"
    src.write_bytes(legacy.build())
    dom, dm = tmp_path / "dom", tmp_path / "dom.qemu"
    r = restore_cli(src, dom, "--legacy", "--width", "64", "--guest", "hvm", "--dm-out", str(dm))
    assert r.returncode == 0, r.stderr
    assert dm.read_bytes() == legacy.qemu_data  # handed over intact
    for batch in legacy.batches:
        for pfn, _ in batch:
            assert page_of(dom, pfn) == corpus.page_bytes(pfn, 0)
    assert sim.info(dom)["state"] == "paused"


def test_pv_plain_stops_at_the_tail_before_the_qemu_record(tmp_path: Path) -> None:
    """The 2013 case: no -9 from the old sender; the toolstack's record follows."""
    image = corpus.Legacy(guest="pv", last_checkpoint=False).build()
    whole = corpus.legacy_xend_pv_then_qemu()
    assert whole.startswith(image)
    assert whole[len(image) : len(image) + 4] == b"Qemu"  # 1970103633 as an int
    src = tmp_path / "legacy.img"
    src.write_bytes(whole)
    dom = tmp_path / "dom"
    fd = os.open(src, os.O_RDONLY)
    try:
        xcsave.sync.restore(fd, sim=dom, legacy_width=64, legacy_guest="pv")
        # nothing past the image was consumed: the record is there for its reader
        assert os.lseek(fd, 0, os.SEEK_CUR) == len(image)
    finally:
        os.close(fd)
    assert page_of(dom, 3) == corpus.page_bytes(3, 0)
    assert sim.info(dom)["vcpus"] == 2


def test_the_same_bytes_read_as_checkpointed_show_the_2013_symptom(tmp_path: Path) -> None:
    """Only a caller who says "checkpointed" makes the reader look for another
    batch, and then the qemu record is what it finds."""
    src = tmp_path / "legacy.img"
    src.write_bytes(corpus.legacy_xend_pv_then_qemu())
    dom = tmp_path / "dom"
    fd = os.open(src, os.O_RDONLY)
    try:
        res = xcsave.sync.restore(
            fd, sim=dom, legacy_width=64, legacy_guest="pv", stream_type="remus"
        )
        # it fails over to the complete image, as the legacy restorer did ...
        assert res.retval == 0
        # ... but it has eaten into the record that was not its own
        image = corpus.Legacy(guest="pv", last_checkpoint=False).build()
        assert os.lseek(fd, 0, os.SEEK_CUR) > len(image)
    finally:
        os.close(fd)
    assert any("1970103633" in ev.message for ev in res.logs)


def test_checkpointed_stream_honours_last_checkpoint(tmp_path: Path) -> None:
    """Remus: BODY+TAIL repeat; -9 on the second image ends the stream there."""
    legacy = corpus.Legacy(guest="hvm")
    src = tmp_path / "remus.img"
    src.write_bytes(legacy.build(checkpoints=3, last_on=1))
    dom = tmp_path / "dom"
    r = restore_cli(src, dom, "--legacy", "--width", "64", "--guest", "hvm",
                    "--stream-type", "remus")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert page_of(dom, 5) == corpus.page_bytes(5, 1)  # checkpoint 1's memory


def test_plain_stream_ignores_last_checkpoint_position(tmp_path: Path) -> None:
    """Plain: the image ends at the first tail, -9 or not; later images are not read."""
    legacy = corpus.Legacy(guest="hvm")
    src = tmp_path / "remus.img"
    src.write_bytes(legacy.build(checkpoints=3, last_on=1))
    dom = tmp_path / "dom"
    r = restore_cli(src, dom, "--legacy", "--width", "64", "--guest", "hvm")
    assert r.returncode == 0, r.stderr
    assert page_of(dom, 5) == corpus.page_bytes(5, 0)


def test_remus_failover_to_the_last_complete_checkpoint(tmp_path: Path) -> None:
    legacy = corpus.Legacy(guest="hvm", last_checkpoint=False)
    data = legacy.build(checkpoints=3)
    cut = len(legacy.build(checkpoints=2)) + 100  # the sender died in checkpoint 2
    src = tmp_path / "remus.img"
    src.write_bytes(data[:cut])
    dom = tmp_path / "dom"
    r = restore_cli(src, dom, "--legacy", "--width", "64", "--guest", "hvm",
                    "--stream-type", "remus")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert page_of(dom, 5) == corpus.page_bytes(5, 1)


def test_unconvertible_chunk_is_named_and_leaves_nothing(tmp_path: Path) -> None:
    import struct

    legacy = corpus.Legacy(guest="hvm", extra_chunks=struct.pack("<i", -5))  # TMEM
    src = tmp_path / "tmem.img"
    src.write_bytes(legacy.build())
    dom = tmp_path / "dom"
    r = restore_cli(src, dom, "--legacy", "--width", "64", "--guest", "hvm")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "TMEM" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmem.img"]


def test_legacy_needs_width_and_guest(tmp_path: Path) -> None:
    src = tmp_path / "x.img"
    src.write_bytes(b"")
    r = restore_cli(src, tmp_path / "dom", "--legacy")
    assert r.returncode == 2
    assert "--width" in r.stderr
