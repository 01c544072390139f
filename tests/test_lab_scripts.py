"""The Xen lab's own scripts (lab/xen), without booting Xen.

The lab itself (``lab/xen/run``) needs QEMU, a Debian archive and many
minutes; these tests check its pieces that can go wrong quietly: the xl
savefile wrapper that turns a libxc image into something ``xl restore``
takes (judged by xcsave's and Xen's verifiers), the console-continuity
reader, the verdict printer, and the ``--ci`` skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
LAB = REPO / "lab" / "xen"

pytestmark = pytest.mark.skipif(not LAB.is_dir(), reason="no lab/xen in this tree")


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def scenario() -> ModuleType:
    return _load("lab_scenario", LAB / "guest" / "scenario.py")


def _xcsave(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-m", "xcsave", *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_wrap_xl_makes_an_image_both_verifiers_accept(
    scenario: ModuleType, tmp_path: Path, xen_verify: object
) -> None:
    dom = tmp_path / "d.sim"
    assert _xcsave("sim", "create", dom, "--memory", "4M").returncode == 0
    libxc = tmp_path / "d.libxc"
    r = _xcsave("save", "--sim", dom, libxc, "--format", "libxc")
    assert r.returncode == 0, r.stderr
    xl = tmp_path / "d.xl"
    config = json.dumps({"c_info": {"name": "lab1", "type": "pv"}}).encode()
    scenario.wrap_xl(libxc, xl, config)

    data = xl.read_bytes()
    assert data.startswith(b"Xen saved domain, xl format\n \0 \r")
    # the JSON config, NUL-terminated, right after the header's length word
    clen = int.from_bytes(data[48:52], sys.byteorder)
    assert data[52 : 52 + clen] == config + b"\0"
    assert data.endswith(b"\0" * 8)  # libxl END record
    r = _xcsave("verify", xl, "--format", "xl")
    assert r.returncode == 0, r.stderr
    v = xen_verify(xl, "xl")  # type: ignore[operator]
    assert v.returncode == 0, v.stdout + v.stderr


def test_console_reader_follows_one_boot_across_logs(
    scenario: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scenario, "CONSOLE_DIR", tmp_path)
    old = tmp_path / "guest-lab1.log"
    old.write_text("XCLAB-TICK boot=aaa n=1\nXCLAB-TICK boot=bbb n=1\nXCLAB-TICK boot=bbb n=2\n")
    inc = tmp_path / "guest-lab1--incoming.log"
    inc.write_text("noise\nXCLAB-TICK boot=bbb n=3\nXCLAB-TICK boot=bbb n=4\n")
    now = time.time()
    os.utime(old, (now - 10, now - 10))
    os.utime(inc, (now, now))
    assert scenario.last_tick() == ("bbb", 4)
    assert sorted(scenario.ticks_of("bbb")) == [1, 2, 3, 4]
    assert scenario._gap("bbb", 2) == 1
    # a reboot (new boot id) is seen as such, not as continuity
    inc.write_text("XCLAB-TICK boot=ccc n=1\n")
    os.utime(inc, (now + 1, now + 1))
    assert scenario.last_tick() == ("ccc", 1)


def _report(tmp_path: Path, lines: list[dict[str, object]], *extra: str) -> tuple[int, list]:
    res = tmp_path / "results.jsonl"
    res.write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = subprocess.run(
        [
            sys.executable,
            str(LAB / "report.py"),
            "--results",
            str(res),
            "--started",
            str(time.time() - 5),
            *extra,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return r.returncode, [json.loads(x) for x in r.stdout.splitlines()]


def test_report_passes_only_a_complete_run(tmp_path: Path) -> None:
    ok = [
        {"event": "start"},
        {"step": "setup", "ok": True, "secs": 1.0},
        {"step": "dropin", "ok": True, "secs": 2.0},
        {"event": "done"},
    ]
    rc, out = _report(tmp_path, ok, "--expect", "setup,dropin")
    assert rc == 0
    assert out[-1]["result"] == "pass"
    assert out[-1]["passed"] == 2

    rc, out = _report(
        tmp_path,
        [
            *ok[:2],
            {"step": "dropin", "ok": False, "secs": 2.0, "error": "StepFailed: console stopped"},
            ok[3],
        ],
    )
    assert rc == 1
    assert out[-1]["result"] == "fail"
    assert "console stopped" in out[-1]["failures"][0]

    rc, out = _report(tmp_path, ok[:2], "--expect", "setup,dropin")  # dom0 never finished
    assert rc == 1
    assert any("never reported" in f for f in out[-1]["failures"])

    rc, out = _report(tmp_path, ok, "--qemu-rc", "124")
    assert rc == 1


def test_report_reads_the_serial_log_when_the_disk_lost_the_tail(tmp_path: Path) -> None:
    """A dom0 that died before ext4 checkpointed leaves results.jsonl short;
    the same records on the serial log are read instead (the CI failure of
    dd9313f: every step passed, the last one was missing from the disk)."""
    recs = [
        {"event": "start"},
        {"step": "setup", "ok": True, "secs": 1.0},
        {"step": "dropin", "ok": True, "secs": 2.0},
        {"event": "done"},
    ]
    serial = tmp_path / "serial.log"
    serial.write_text(
        "(XEN) boot noise\n"
        + "".join(f"@@XCLAB {json.dumps(x)}\n" for x in recs)
        + "[  115.2] Kernel panic\n"
    )
    rc, out = _report(tmp_path, recs[:2], "--serial", str(serial), "--expect", "setup,dropin")
    assert rc == 0, out
    assert out[-1]["source"] == "serial log"
    # and the disk, when it has everything, is still the one read
    rc, out = _report(tmp_path, recs, "--serial", str(serial), "--expect", "setup,dropin")
    assert rc == 0
    assert out[-1]["source"] == "dom0 disk"


def test_run_ci_skips_cleanly_when_disabled() -> None:
    env = dict(os.environ, XCSAVE_LAB="0")
    r = subprocess.run(
        [str(LAB / "run"), "--quick", "--ci"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )
    assert r.returncode == 0
    assert json.loads(r.stdout.splitlines()[-1])["result"] == "skip"
    assert "XCSAVE_LAB=0" in r.stderr


@pytest.mark.parametrize(
    "script",
    [
        "run",
        "update-skeletons",
        "guest/stage1-init",
        "guest/dom0-init",
        "guest/domu-init",
        "guest/suspend-domain",
    ],
)
def test_lab_shell_scripts_parse(script: str) -> None:
    path = LAB / script
    shell = "sh" if script.startswith("guest/") else "bash"
    assert os.access(path, os.X_OK)
    r = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
