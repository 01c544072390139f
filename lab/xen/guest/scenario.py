#!/usr/bin/env python3
"""The lab's scenarios, run by dom0's init inside the Xen lab (Python 3.11, stdlib only).

Each step is judged by what the domain does -- which domains exist, in what
state, and whether the domU's console goes on with the same boot id and a
counter that continues -- never by a command's exit status alone.  Every
``xl`` call has a timeout and one retry: under TCG, dom0 userspace now and
then segfaults or hangs after the Xen operation itself has succeeded.

Results are JSON objects, one a line, written both to the console (marked
``@@XCLAB``, so the host can find them in the serial log) and to
/var/log/xcsave-lab/results.jsonl on dom0's disk (which the host reads back
from the image after the run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

LAB = Path("/opt/xcsave-lab")
RESULTS = Path("/var/log/xcsave-lab/results.jsonl")
#: Skeletons of the real streams (``xcsave skeleton make``), read back by the
#: host and compared with the ones committed under tests/data/real/.
SKELETONS = Path("/var/log/xcsave-lab/skeletons")
WORK = Path("/var/tmp/xcsave-lab")
CONSOLE_DIR = Path("/var/log/xen/console")
XEN_BIN = Path("/usr/lib/xen-4.17/bin")
STOCK_HELPER = XEN_BIN / "libxl-save-helper"
VERIFY_STREAM = XEN_BIN / "verify-stream-v2"
XEN_PYTHONPATH = "/usr/lib/xen-4.17/lib/python"
DOMAIN = "lab1"
MARK = "@@XCLAB "
TICK = re.compile(r"XCLAB-TICK boot=(\S+) n=(\d+)")

CFG: dict[str, Any] = {}
OUR_HELPER = ""  # set in main(): the xcsave-helper of the installed package

#: The guest type the steps run on now (``use_guest``), the one lab1 was
#: created as (a step that finds another type's lab1 replaces it), and its boot id.
GUEST = {"type": "pv", "running": "", "boot": ""}

#: What each guest type adds to the domU's config.  PVH and HVM guests are
#: HVM containers: under QEMU TCG they hang at their first RDTSCP unless the
#: TSC is native (QEMU reports RDTSCP as an RDTSC exit without nrip-save, and
#: Xen's instruction-length check fails: "SVM Insn len emulation failed").
GUEST_CONFIG: dict[str, list[str]] = {
    "pv": ['type = "pv"'],
    "pvh": ['type = "pvh"', 'tsc_mode = "native"'],
    # Direct kernel boot through Debian's qemu-system-xen; no display.  The
    # guest's PV drivers give it hvc0, which xenconsoled logs as for PV.
    "hvm": ['type = "hvm"', 'tsc_mode = "native"', 'vga = "none"', "vnc = 0"],
    "pvh-shadow": ['type = "pvh"', 'tsc_mode = "native"', "hap = 0"],
}


class StepFailed(Exception):
    """A step's judgement failed; the message says what was seen."""


# --------------------------------------------------------------------- output


def emit(obj: dict[str, Any]) -> None:
    line = json.dumps(obj, sort_keys=False)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    # One write() per line: the console may interleave other writers' lines.
    os.write(1, (MARK + line + "\n").encode())


def note(text: str) -> None:
    os.write(1, f"xcsave-lab: {text}\n".encode())


def scaled(secs: float) -> float:
    return secs * float(CFG.get("slow", 1.0))


# --------------------------------------------------------------------- commands


class Result:
    def __init__(self, argv: list[str], rc: int | None, out: str, err: str, secs: float):
        self.argv, self.rc, self.out, self.err, self.secs = argv, rc, out, err, secs

    @property
    def timed_out(self) -> bool:
        return self.rc is None

    def brief(self) -> str:
        what = "timed out" if self.rc is None else f"rc={self.rc}"
        tail = (self.err.strip() or self.out.strip()).splitlines()[-3:]
        return f"{shlex.join(self.argv)}: {what} after {self.secs:.1f}s: {' | '.join(tail)}"


def run(argv: list[str], timeout: float, env: dict[str, str] | None = None) -> Result:
    """Run argv with a timeout; output to files (xl's daemons may keep pipes open)."""
    WORK.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    if env:
        for k, v in env.items():
            if v is None:
                full_env.pop(k, None)
            else:
                full_env[k] = v
    t0 = time.monotonic()
    with open(WORK / "cmd.out", "w+") as fo, open(WORK / "cmd.err", "w+") as fe:
        proc = subprocess.Popen(  # noqa: S603 (the lab's own argv lists)
            argv,
            stdout=fo,
            stderr=fe,
            stdin=subprocess.DEVNULL,
            env=full_env,
            start_new_session=True,
        )
        try:
            rc: int | None = _wait(proc, scaled(timeout))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        secs = time.monotonic() - t0
        fo.seek(0)
        fe.seek(0)
        return Result(argv, rc, fo.read(), fe.read(), secs)


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """``proc.wait(timeout)``, through a glitch of dom0's clock: under TCG,
    CLOCK_MONOTONIC once read as a value past what Python can hold
    (OverflowError in the wait's deadline arithmetic) in the middle of a PVH
    migration; the clock came back.  Each glitch costs at most one more wait."""
    for _ in range(5):
        try:
            return proc.wait(timeout=timeout)
        except OverflowError as e:
            note(f"dom0's clock glitched while waiting ({e}); waiting again")
            time.sleep(1)
    return proc.wait(timeout=timeout)


def helper_env(helper: str | None) -> dict[str, Any]:
    """LIBXL_SAVE_HELPER for xl: our helper, a given one, or unset (stock)."""
    return {"LIBXL_SAVE_HELPER": helper}


def xl_list() -> dict[str, tuple[int, str]] | None:
    """name -> (domid, state) for every domain, or None if xl list failed twice."""
    for _ in range(2):
        r = run(["xl", "list"], timeout=60)
        if r.rc == 0:
            doms = {}
            for line in r.out.splitlines()[1:]:
                parts = line.split()
                if len(parts) >= 5:
                    doms[parts[0]] = (int(parts[1]), parts[4])
            return doms
    return None


def domain(name: str = DOMAIN) -> tuple[int, str] | None:
    doms = xl_list()
    if doms is None:
        raise StepFailed("xl list failed twice")
    return doms.get(name)


# --------------------------------------------------------------------- console


def last_tick(name: str = DOMAIN) -> tuple[str, int] | None:
    """The newest (boot id, counter) in the domain's console logs (incoming ones too).

    The current boot is the one of the last tick in the most recently written
    log; its counter is the highest seen for that boot in any of the logs.
    """
    paths = sorted(glob.glob(str(CONSOLE_DIR / f"guest-{name}*.log")), key=os.path.getmtime)
    boot = None
    for path in reversed(paths):
        with contextlib.suppress(OSError):
            found = TICK.findall(Path(path).read_text(errors="replace"))
            if found:
                boot = found[-1][0]
                break
    if boot is None:
        return None
    return boot, max(ticks_of(boot, name))


def ticks_of(boot: str, name: str = DOMAIN) -> list[int]:
    seen = []
    for path in sorted(glob.glob(str(CONSOLE_DIR / f"guest-{name}*.log"))):
        with contextlib.suppress(OSError):
            for m in TICK.finditer(Path(path).read_text(errors="replace")):
                if m.group(1) == boot:
                    seen.append(int(m.group(2)))
    return seen


def wait_ticking(
    boot: str | None = None, after: int = 0, timeout: float = 90, name: str = DOMAIN
) -> tuple[str, int]:
    """Wait until the console shows a counter past ``after`` (same ``boot`` if given)."""
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        if boot is not None:
            seen = ticks_of(boot, name)
            if seen and max(seen) > after:
                return boot, max(seen)
        else:
            t = last_tick(name)
            if t is not None and t[1] > after:
                return t
        time.sleep(0.5)
    t = last_tick(name)
    want = f"boot {boot} past {after}" if boot else f"a tick past {after}"
    raise StepFailed(f"console did not go on ({want}); last tick seen: {t}")


def wait_new_boot(old: str | None, name: str = DOMAIN, timeout: float = 90) -> tuple[str, int]:
    """Wait until the console ticks with a boot id other than ``old``."""
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        t = last_tick(name)
        if t is not None and t[0] != old:
            return t
        time.sleep(0.5)
    raise StepFailed(f"no new boot on the console (the last was {old}): {last_tick(name)}")


def snapshot() -> tuple[str, int]:
    """The domain's current (boot, counter), making sure it is advancing.

    The boot is the one ``create`` saw start when there is one: a log can
    receive a destroyed domain's last lines late, so the newest line in the
    logs is not always the running guest's."""
    boot = GUEST["boot"] or None
    if boot is None:
        t = last_tick()
        if t is None:
            return wait_ticking()
        boot = t[0]
    seen = ticks_of(boot)
    return wait_ticking(boot, max(seen, default=0), timeout=60)


# --------------------------------------------------------------------- domains


def domu_config(name: str = DOMAIN, memory: int | None = None) -> Path:
    mem = memory or int(CFG.get("domu_mem", 256))
    path = WORK / f"{name}.cfg"
    path.write_text(
        "\n".join(
            [
                f'name = "{name}"',
                *GUEST_CONFIG[GUEST["type"]],
                f'kernel = "{LAB}/domu/vmlinuz"',
                f'ramdisk = "{LAB}/domu/initrd.cpio.gz"',
                'extra = "console=hvc0 loglevel=3"',
                f"memory = {mem}",
                "vcpus = 1",
                'on_crash = "preserve"',
                "",
            ]
        )
    )
    return path


def destroy(name: str = DOMAIN) -> None:
    for _ in range(3):
        doms = xl_list() or {}
        victims = [n for n in doms if n == name or n.startswith(name + "--")]
        if not victims:
            return
        for v in victims:
            run(["xl", "destroy", v], timeout=60)
    raise StepFailed(f"could not destroy {name}")


def create(name: str = DOMAIN) -> dict[str, Any]:
    cfg = domu_config(name)
    last = ""
    for attempt in (1, 2):
        # The console log outlives the domain: the new one is the new boot id.
        old = last_tick(name)
        r = run(["xl", "create", "-e", str(cfg)], timeout=180)
        d = domain(name)
        if d is not None:
            with contextlib.suppress(StepFailed):
                # An HVM guest boots through firmware and a device model:
                # under TCG on a busy host, minutes.
                wait = 240 if GUEST["type"] == "hvm" else 90
                boot, n = wait_new_boot(old[0] if old else None, name, timeout=wait)
                GUEST["running"], GUEST["boot"] = GUEST["type"], boot
                return {
                    "type": GUEST["type"],
                    "domid": d[0],
                    "boot": boot,
                    "tick": n,
                    "xl_secs": round(r.secs, 2),
                    "attempts": attempt,
                }
        last = r.brief()
        destroy(name)
    raise StepFailed(f"xl create failed twice: {last}")


def ensure_domain() -> dict[str, Any] | None:
    """A running, ticking lab1; a fresh one (new boot) if the last step lost it."""
    d = domain()
    same = GUEST["running"] == GUEST["type"]
    if same and d is not None and d[1].startswith(("r", "b", "-")) and "s" not in d[1]:
        with contextlib.suppress(StepFailed):
            snapshot()
            return None
    destroy()
    return create()


# --------------------------------------------------------------------- xl operations


def xl_save(path: Path, helper: str | None) -> dict[str, Any]:
    """``xl save`` with a helper; ok = the domain is gone and the file is an xl image."""
    d = domain()
    if d is None:
        raise StepFailed("no domain to save")
    boot, n = snapshot()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    last = None
    for attempt in (1, 2):
        r = run(["xl", "save", DOMAIN, str(path)], timeout=300, env=helper_env(helper))
        last = r
        after = domain()
        if after is None and path.exists() and path.stat().st_size > 1 << 20:
            with path.open("rb") as f:
                magic = f.read(32)
            if not magic.startswith(b"Xen saved domain, xl format"):
                raise StepFailed(f"{path} is not an xl savefile (magic {magic!r})")
            return {
                "secs": r.secs,
                "boot": boot,
                "tick": n,
                "attempts": attempt,
                "rc": r.rc,
                "bytes": path.stat().st_size,
            }
        if after is not None and "s" in after[1]:
            raise StepFailed(f"domain left shut down/suspended after save: {r.brief()}")
        # still running (the save failed and xl resumed it): try once more
    assert last is not None
    raise StepFailed(f"save did not happen (domain still there): {last.brief()}")


def xl_restore(path: Path, helper: str | None, boot: str, tick: int) -> dict[str, Any]:
    """``xl restore``; ok = the domain runs and its console goes on from
    ``tick`` (an HVM one: and its new device model answers QMP, running)."""
    last = None
    for attempt in (1, 2):
        r = run(["xl", "restore", "-e", str(path)], timeout=300, env=helper_env(helper))
        last = r
        d = domain()
        if d is not None and "p" not in d[1]:
            try:
                _, n = wait_ticking(boot, tick, timeout=90)
            except StepFailed:
                if attempt == 2:
                    raise
            else:
                out = {
                    "secs": r.secs,
                    "attempts": attempt,
                    "rc": r.rc,
                    "domid": d[0],
                    "tick_after": n,
                    "gap": _gap(boot, tick),
                }
                if GUEST["type"] == "hvm":  # its device model came back, and runs
                    out["device_model"] = device_model_running(d[0])
                return out
        destroy()
    assert last is not None
    raise StepFailed(f"restore did not bring the domain back: {last.brief()}")


def _gap(boot: str, tick: int) -> int:
    """The first counter value seen after ``tick`` minus ``tick`` (1 = seamless)."""
    later = sorted(x for x in ticks_of(boot) if x > tick)
    return later[0] - tick if later else -1


# --------------------------------------------------------------------- steps


TIMES: dict[str, list[float]] = {}


def step(name: str, fn: Callable[[], dict[str, Any] | None]) -> bool:
    note(f"step {name} ...")
    t0 = time.monotonic()
    try:
        info = fn() or {}
        ok = True
    except Exception as e:  # every failure is reported as the step's result
        info = {"error": f"{type(e).__name__}: {e}"}
        if not isinstance(e, StepFailed):
            info["trace"] = traceback.format_exc(limit=4)[-800:]
        ok = False
    emit({"step": name, "ok": ok, "secs": round(time.monotonic() - t0, 2), **info})
    return ok


def save_restore(
    tag: str,
    save_helper: str | None,
    restore_helper: str | None,
    *,
    where: Path = WORK,
    timing: str = "",
    skeleton: str = "",
) -> Callable:
    """xl save then xl restore of the same domain; ``timing`` files the times for the
    ratio; ``skeleton`` names the saved image's skeleton (``KIND-NAME.skel``)."""

    def fn() -> dict[str, Any]:
        fresh = ensure_domain()
        path = where / f"{tag}.xl"
        s = xl_save(path, save_helper)
        if timing:
            TIMES.setdefault(f"{timing}save:{_who(save_helper)}", []).append(s["secs"])
        res = xl_restore(path, restore_helper, s["boot"], s["tick"])
        if timing:
            TIMES.setdefault(f"{timing}restore:{_who(restore_helper)}", []).append(res["secs"])
        out = {
            "save_helper": _who(save_helper),
            "restore_helper": _who(restore_helper),
            "save_secs": round(s["secs"], 2),
            "restore_secs": round(res["secs"], 2),
            "bytes": s["bytes"],
            "boot": s["boot"],
            "tick_before": s["tick"],
            "tick_after": res["tick_after"],
            "gap": res["gap"],
            "attempts": [s["attempts"], res["attempts"]],
        }
        if "device_model" in res:
            out["device_model"] = res["device_model"]
        if skeleton and CFG.get("skeletons", 1):
            out["skeleton"] = make_skeleton(path, f"{GUEST['type']}-{skeleton}")
        if CFG.get("keep_image") != tag:
            path.unlink()
        if fresh:
            out["fresh_domain"] = fresh
        return out

    return fn


def make_skeleton(image: Path, name: str) -> dict[str, Any]:
    """The image's skeleton (every record as written, pages as digests) into
    SKELETONS/NAME.skel, for the host to compare with the committed one."""
    SKELETONS.mkdir(parents=True, exist_ok=True)
    out = SKELETONS / f"{name}.skel"
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    r = run(
        [sys.executable, "-m", "xcsave", "skeleton", "make", str(image), str(out)], timeout=300
    )
    if r.rc != 0:
        raise StepFailed(f"xcsave skeleton make: {r.brief()}")
    return {"name": out.name, "bytes": out.stat().st_size}


def _kind_prefix() -> str:
    """How a timing names the guest type: "" for PV (the first type), else "KIND-"."""
    return "" if GUEST["type"] == "pv" else f"{GUEST['type']}-"


def _who(helper: str | None) -> str:
    if helper is None:
        return "stock"
    if helper == OUR_HELPER:
        return "xcsave"
    return Path(helper).name


def verify_image(path: Path, fmt: str) -> dict[str, Any]:
    """Both judges: xcsave verify and Xen's verify-stream-v2."""
    out: dict[str, Any] = {}
    r = run([sys.executable, "-m", "xcsave", "verify", str(path), "--format", fmt], timeout=300)
    if r.rc != 0:
        raise StepFailed(f"xcsave verify: {r.brief()}")
    out["xcsave_verify"] = "ok"
    r = run(
        [sys.executable, str(VERIFY_STREAM), "-q", "-f", fmt, "-i", str(path)],
        timeout=600,
        env={"PYTHONPATH": XEN_PYTHONPATH},
    )
    if r.rc != 0:
        raise StepFailed(f"verify-stream-v2: {r.brief()}")
    out["verify_stream_v2"] = "ok"
    return out


def migrate(helper: str | None) -> Callable:
    def fn() -> dict[str, Any]:
        fresh = ensure_domain()
        d = domain()
        assert d is not None
        boot, n = snapshot()
        env = helper_env(helper)
        recv = "xl migrate-receive -e"
        if helper is not None:
            recv = f"env LIBXL_SAVE_HELPER={shlex.quote(helper)} {recv}"
        last = None
        for attempt in (1, 2):
            r = run(["xl", "migrate", "-s", "", DOMAIN, recv], timeout=400, env=env)
            last = r
            # A live migration: afterwards exactly one lab1, a new domid, running.
            doms = xl_list() or {}
            incoming = [x for x in doms if x.startswith(DOMAIN + "--")]
            now = doms.get(DOMAIN)
            if now is not None and now[0] != d[0] and not incoming:
                _, n2 = wait_ticking(boot, n, timeout=90)
                TIMES.setdefault(f"{_kind_prefix()}migrate:{_who(helper)}", []).append(r.secs)
                out = {
                    "helper": _who(helper),
                    "secs_xl": round(r.secs, 2),
                    "rc": r.rc,
                    "domid_before": d[0],
                    "domid_after": now[0],
                    "boot": boot,
                    "tick_before": n,
                    "tick_after": n2,
                    "gap": _gap(boot, n),
                    "attempts": attempt,
                }
                if fresh:
                    out["fresh_domain"] = fresh
                return out
            if now is not None and now[0] == d[0] and not incoming and "s" not in now[1]:
                continue  # migration failed cleanly, source still runs: retry
            break
        assert last is not None
        raise StepFailed(f"migration did not complete: {last.brief()}; domains: {xl_list()}")

    return fn


# --------------------------------------------------------------------- xcsave supervisor


def xl_config_json(domid: int) -> bytes:
    """The domain's libxl config as JSON (what ``xl save`` puts in its header)."""
    for _ in range(2):
        r = run(["xl", "list", "-l", str(domid)], timeout=60)
        if r.rc == 0:
            try:
                data = json.loads(r.out)
                return json.dumps(data[0]["config"], indent=4).encode()
            except (ValueError, LookupError, TypeError):
                pass
    raise StepFailed(f"xl list -l {domid} failed twice")


def wrap_xl(libxc: Path, out: Path, config: bytes) -> None:
    """libxc image -> xl savefile: xl header + JSON config, libxl stream around the image.

    This is exactly what ``xl save`` writes for a PV or PVH domain: the xl
    header, then the libxl v2 stream -- header, LIBXC_CONTEXT, the libxc
    image, END (no emulator records without a device model); the frames are
    xcsave's own encoder's (:mod:`xcsave.libxlframe`).
    """
    from xcsave import libxlframe

    with out.open("wb") as f, libxc.open("rb") as src:
        f.write(libxlframe.head(config))
        while chunk := src.read(1 << 20):
            f.write(chunk)
        f.write(libxlframe.tail(None))


def supervisor_save(
    dialect: str, restore_helper: str | None, probe: int = 0, qmp: bool = False
) -> Callable:
    """xcsave's own supervisor saves the running domU; then xl restores the image.

    ``probe``: the save's policy asks auto-converge's throttle (``probe``%):
    the domain's credit2 cap, read back with ``xl sched-credit2``, must be
    ``(100 - probe) x vCPUs`` while the save runs and what it was after.
    ``qmp`` (an HVM domU): xcsave saves the device model through QMP and
    writes the xl savefile itself; after ``xl restore`` the new device model
    must answer QMP and run."""

    def fn() -> dict[str, Any]:
        fresh = ensure_domain()
        d = domain()
        assert d is not None
        domid = d[0]
        config = xl_config_json(domid)
        boot, n = snapshot()
        libxc = WORK / f"sup-{dialect}.{'xl' if qmp else 'libxc'}"
        with contextlib.suppress(FileNotFoundError):
            libxc.unlink()
        argv = [
            sys.executable,
            str(LAB / "xcsave_save.py"),
            "--domid",
            str(domid),
            "--out",
            str(libxc),
            "--dialect",
            dialect,
        ]
        if dialect == "xen-4.17":
            argv += ["--helper", str(STOCK_HELPER)]
        if probe:
            argv += ["--probe-throttle", str(probe)]
        if qmp:
            cfg = WORK / f"sup-{dialect}.json"
            cfg.write_bytes(config)
            argv += ["--qmp", "--xl-config", str(cfg)]
        r = run(argv, timeout=400)
        try:
            report = json.loads(r.out.strip().splitlines()[-1]) if r.out.strip() else {}
        except ValueError:
            report = {}
        after = domain()
        if r.rc != 0 or not libxc.exists():
            # Put the domain back if the save failed after suspending it.
            if after is not None and "s" in after[1]:
                run(["xl", "destroy", DOMAIN], timeout=60)
            raise StepFailed(f"xcsave save failed: {r.brief()}")
        if after is None or after[0] != domid or "s" not in after[1]:
            raise StepFailed(f"after the save the domain should be suspended, is {after}")
        if probe:
            check_caps(report, probe)
        TIMES.setdefault(f"sup-save:{dialect}", []).append(r.secs)
        out: dict[str, Any] = {
            "dialect": dialect,
            "save_secs": round(r.secs, 2),
            "bytes": libxc.stat().st_size,
            "saver": report,
        }
        if qmp:  # xcsave wrote the xl savefile, the device model's state in it
            xl_img = libxc
            out["emulator_context"] = emulator_context_len(xl_img)
        else:
            out["libxc"] = verify_image(libxc, "libxc")
            xl_img = WORK / f"sup-{dialect}.xl"
            wrap_xl(libxc, xl_img, config)
            libxc.unlink()
        out["xl"] = verify_image(xl_img, "xl")
        # The source is suspended in Xen: destroy it, restore the copy by xl.
        run(["xl", "destroy", str(domid)], timeout=60)
        res = xl_restore(xl_img, restore_helper, boot, n)
        xl_img.unlink()
        if "device_model" in res:
            out["device_model"] = res["device_model"]
        out.update(
            {
                "restore_helper": _who(restore_helper),
                "restore_secs": round(res["secs"], 2),
                "boot": boot,
                "tick_before": n,
                "tick_after": res["tick_after"],
                "gap": res["gap"],
            }
        )
        if fresh:
            out["fresh_domain"] = fresh
        return out

    return fn


def emulator_context_len(path: Path) -> int:
    """The EMULATOR_CONTEXT record's length in an xl savefile (from
    ``xcsave inspect``'s JSON); a save without one fails the step."""
    r = run([sys.executable, "-m", "xcsave", "inspect", "--json", str(path)], timeout=300)
    if r.rc != 0:
        raise StepFailed(f"xcsave inspect: {r.brief()}")
    try:
        doc = json.loads(r.out)
    except ValueError as e:
        raise StepFailed(f"xcsave inspect printed no JSON: {r.brief()}") from e
    emu = ((doc.get("libxl") or {}).get("records") or {}).get("EMULATOR_CONTEXT") or {}
    if emu.get("count") != 1 or not emu.get("bytes"):
        raise StepFailed(f"expected one EMULATOR_CONTEXT record, found {emu}")
    return int(emu["bytes"])


def device_model_running(domid: int) -> dict[str, Any]:
    """The restored domain's device model (QEMU) answers QMP and runs."""
    from xcsave.devicemodel import QMP_PATH
    from xcsave.qmp import Qmp, QmpError

    async def ask() -> dict[str, Any]:
        async with await Qmp.connect(QMP_PATH.format(domid=domid), timeout=60) as q:
            status = await q.execute("query-status")
        return status if isinstance(status, dict) else {"status": status}

    try:
        status = asyncio.run(ask())
    except QmpError as e:
        raise StepFailed(f"the restored domain's device model: {e}") from e
    if status.get("status") != "running":
        raise StepFailed(f"the restored domain's device model is not running: {status}")
    return {"qmp_status": status.get("status")}


def supervisor_refused() -> dict[str, Any]:
    """xcsave's own supervisor (xcsave-1) refuses the HVM domU in one line,
    before touching it (xcsave.formats.SUPERVISOR_GUESTS): no image, and the
    guest runs on in the same boot, still counting."""
    ensure_domain()
    d = domain()
    assert d is not None
    domid = d[0]
    boot, n = snapshot()
    out = WORK / "sup-refused.img"
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    argv = [sys.executable, "-m", "xcsave", "save", "--domid", str(domid), str(out), "--live"]
    r = run([*argv, "--suspend-cmd", f"{LAB / 'suspend-domain'} {domid}"], timeout=120)
    lines = r.err.strip().splitlines()
    if r.rc != 1 or len(lines) != 1 or "is an HVM guest" not in lines[0]:
        raise StepFailed(f"expected one line refusing the HVM guest: {r.brief()}")
    if out.exists():
        raise StepFailed(f"the refused save left {out}")
    after = domain()
    if after is None or after[0] != domid or "s" in after[1]:
        raise StepFailed(f"after the refusal the domain should run on, is {after}")
    boot_after, n_after = snapshot()
    if boot_after != boot or n_after <= n:
        raise StepFailed(f"the guest did not run on: ({boot}, {n}) -> ({boot_after}, {n_after})")
    return {"line": lines[0], "boot": boot, "tick_before": n, "tick_after": n_after}


def check_caps(report: dict[str, Any], probe: int) -> None:
    """Auto-converge's credit2 cap: on while the save ran, lifted after it."""
    caps = report.get("caps") or {}
    want = 100 - probe  # the lab's domU has one vCPU
    if caps.get("during") != want:
        raise StepFailed(f"credit2 cap while throttled {probe}%: {caps}, expected {want}")
    if caps.get("after") != caps.get("before"):
        raise StepFailed(f"credit2 cap not restored after the save: {caps}")
    if not (report.get("throttle") or {}).get("seconds"):
        raise StepFailed(f"the save reported no throttle: {report.get('throttle')}")


def plan_domain() -> dict[str, Any]:
    """``xcsave plan --domid N``: a dirty rate from the real log-dirty, twice
    (the second one could not turn log-dirty on had the first left it on)."""
    ensure_domain()
    d = domain()
    assert d is not None
    boot, n = snapshot()
    out: dict[str, Any] = {}
    for attempt in ("first", "second"):
        argv = [sys.executable, "-m", "xcsave", "plan", "--domid", str(d[0])]
        argv += ["--sample-seconds", "3", "--link", "100M", "--json"]
        r = run(argv, timeout=180)
        if r.rc != 0:
            raise StepFailed(f"xcsave plan ({attempt}): {r.brief()}")
        try:
            res = json.loads(r.out.strip().splitlines()[-1])
        except (ValueError, IndexError) as e:
            raise StepFailed(f"xcsave plan ({attempt}) printed no JSON: {r.brief()}") from e
        profile = res.get("profile") or {}
        if not isinstance(profile.get("dirty_rate"), (int, float)):
            raise StepFailed(f"xcsave plan ({attempt}) reported no dirty rate: {res}")
        out[attempt] = {
            k: profile.get(k) for k in ("dirty_rate", "working_set", "memory_pages")
        } | {"go": res.get("go"), "why": res.get("why"), "secs": round(r.secs, 2)}
    wait_ticking(boot, n, timeout=60)  # still running
    return out


# --------------------------------------------------------------------- main


def ratio_rounds(rounds: int, migrations: int = 0) -> None:
    """Side by side on the same domU and boot: xcsave-helper vs the stock helper.

    Save + restore with the image in dom0's tmpfs (no disk noise), then live
    migrations; the order alternates from one round to the next.
    """
    shm = Path("/dev/shm")
    pair: list[tuple[str, str | None]] = [("xcsave", OUR_HELPER), ("stock", None)]
    for i in range(rounds):
        for who, helper in pair if i % 2 == 0 else pair[::-1]:
            fn = save_restore(f"r{i}{who}", helper, helper, where=shm, timing="tmpfs-")
            step(f"ratio-{i}-{who}", fn)
    for i in range(migrations):
        for who, helper in pair if i % 2 == 0 else pair[::-1]:
            step(f"ratio-migrate-{i}-{who}", migrate(helper))


def ratio_summary() -> dict[str, Any]:
    def med(key: str) -> float | None:
        v = TIMES.get(key)
        return round(statistics.median(v), 2) if v else None

    out: dict[str, Any] = {"samples": {k: [round(x, 2) for x in v] for k, v in TIMES.items()}}
    # Every operation timed with both helpers (PVH and HVM ones carry their
    # guest type: "pvh-disk-save", "hvm-migrate").
    for op in sorted({key.partition(":")[0] for key in TIMES}):
        ours, stock = med(f"{op}:xcsave"), med(f"{op}:stock")
        if ours and stock:
            out[f"{op}_xcsave_s"], out[f"{op}_stock_s"] = ours, stock
            out[f"{op}_ratio"] = round(ours / stock, 3)
    return out


def setup() -> dict[str, Any]:
    r = run(["xl", "info"], timeout=60)
    if r.rc != 0:  # one retry, as for every xl call
        r = run(["xl", "info"], timeout=60)
    info = {}
    for line in r.out.splitlines():
        k, _, v = line.partition(":")
        if k.strip() in (
            "xen_version",
            "xen_extra",
            "total_memory",
            "free_memory",
            "xen_commandline",
            "virt_caps",
        ):
            info[k.strip()] = v.strip()
    if r.rc != 0:
        raise StepFailed(f"xl info: {r.brief()}")
    if "shadow" not in info.get("virt_caps", "").split():
        # Without shadow paging a PV guest has no log-dirty: no live save.
        raise StepFailed(f"this Xen has no shadow paging: virt_caps {info.get('virt_caps')!r}")
    ver = run(["dpkg-query", "-W", "-f", "${Version}", "xen-hypervisor-4.17-amd64"], timeout=30)
    info["xen_package"] = ver.out.strip()
    hv = run([sys.executable, "-m", "xcsave", "--version"], timeout=60)
    info["xcsave"] = hv.out.strip().replace("\n", "; ")
    if "xen" not in hv.out.split("backends:")[-1].split("\n")[0]:
        raise StepFailed(f"xcsave has no xen backend: {hv.out.strip()} {hv.err.strip()}")
    info["domain"] = create()
    return info


#: The guest types after PV, per level (PV's own steps keep their names).
GUEST_SETS: dict[str, tuple[str, ...]] = {
    "quick": ("pvh",),
    "default": ("pvh", "hvm"),
    "full": ("pvh", "hvm", "pvh-shadow"),
    "ratio": (),
}


def use_guest(kind: str) -> dict[str, Any]:
    """From now on the steps run on a ``kind`` lab1 (the last one is destroyed)."""
    GUEST["type"] = kind
    destroy()
    return create()


def other_guest(kind: str, dropin: str, full: bool) -> None:
    """A PVH or HVM lab1 through the drop-in scenarios: ``KIND-boot``, then
    ``KIND-dropin-save-restore``; with ``full``, crossed with the stock
    helper both ways and ``xl migrate`` with xcsave-helper."""
    if not step(f"{kind}-boot", lambda: use_guest(kind)):
        return
    ours = OUR_HELPER
    keep = "xl-by-xcsave" if dropin == ours else ""
    # Timed as "KIND-disk-save:xcsave" / ":stock" and so on, for the ratio:
    # the crossed steps time each helper's save and restore.
    timing = f"{kind}-disk-"
    step(
        f"{kind}-dropin-save-restore",
        save_restore(f"{kind}-dropin", dropin, dropin, timing=timing, skeleton=keep),
    )
    if full:
        step(
            f"{kind}-cross-save-xcsave-restore-stock",
            save_restore(f"{kind}-x1", ours, None, timing=timing),
        )
        step(
            f"{kind}-cross-save-stock-restore-xcsave",
            save_restore(f"{kind}-x2", None, ours, timing=timing, skeleton="xl-by-stock"),
        )
        step(f"{kind}-migrate-xcsave", migrate(ours))
        if kind == "pvh":
            # No device model: the libxc stream in xl's frame is all xl writes.
            step(f"{kind}-supervisor-xcsave1-live-save", supervisor_save("xcsave-1", None))
        if kind == "hvm":
            # A device model: refused without its QMP socket; saved with it,
            # through either helper, into an xl savefile of xcsave's own.
            step(f"{kind}-supervisor-refused", supervisor_refused)
            step(
                f"{kind}-supervisor-xcsave1-live-save",
                supervisor_save("xcsave-1", None, qmp=True),
            )
            step(
                f"{kind}-supervisor-stock-helper-live-save",
                supervisor_save("xen-4.17", OUR_HELPER, qmp=True),
            )


def main() -> int:
    global OUR_HELPER  # noqa: PLW0603 (set once, before any step)
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(LAB / "config.json"))
    args = ap.parse_args()
    CFG.update(json.loads(Path(args.config).read_text()))
    WORK.mkdir(parents=True, exist_ok=True)
    import xcsave.supervisor

    OUR_HELPER = str(xcsave.supervisor.helper_path())
    # The broken helper wrapper (--broken-helper runs only) wraps ours.
    os.environ["XCSAVE_LAB_REAL_HELPER"] = OUR_HELPER
    dropin = CFG.get("dropin_helper") or OUR_HELPER
    level = CFG.get("level", "default")
    emit({"event": "start", "level": level, "dropin_helper": dropin, "our_helper": OUR_HELPER})

    if not step("setup", setup):
        return 1
    if level == "ratio":
        ratio_rounds(int(CFG.get("ratio_rounds", 3)), migrations=2)
        emit({"event": "ratio", **ratio_summary()})
        emit({"event": "done"})
        return 0
    keep = "xl-by-xcsave" if dropin == OUR_HELPER else ""
    step(
        "dropin-save-restore",
        save_restore("dropin", dropin, dropin, timing="disk-", skeleton=keep),
    )
    step("supervisor-xcsave1-live-save", supervisor_save("xcsave-1", None, probe=50))
    step("plan-domu", plan_domain)
    if level in ("default", "full"):
        step(
            "stock-save-restore",
            save_restore("stock", None, None, timing="disk-", skeleton="xl-by-stock"),
        )
        step("cross-save-xcsave-restore-stock", save_restore("cross1", OUR_HELPER, None))
        step("cross-save-stock-restore-xcsave", save_restore("cross2", None, OUR_HELPER))
        step("supervisor-stock-helper-live-save", supervisor_save("xen-4.17", OUR_HELPER))
        step("migrate-xcsave", migrate(OUR_HELPER))
    if level == "full":
        step("migrate-stock", migrate(None))
        ratio_rounds(int(CFG.get("ratio_rounds", 3)))
    for kind in GUEST_SETS[level]:
        other_guest(kind, dropin, full=level != "quick")
    emit({"event": "ratio", **ratio_summary()})
    emit({"event": "done"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
