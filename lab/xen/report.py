#!/usr/bin/env python3
"""Read a lab run's results back and print the verdict, one JSON object a line.

Input: the results.jsonl that dom0 wrote on its disk (read back from the image
with debugfs) and the ``@@XCLAB`` lines of the serial log; dom0 writes every
record to both, and the copy with more records is the one read.
Output: ``{"step": ..., "ok": ..., "secs": ...}`` for each step (the host's
steps, already timed by ``run``, come first from --host-steps), a ``ratio``
line, and last ``{"result": "pass"|"fail", ...}``.  Exit 0 only on pass.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

MARK = "@@XCLAB "


def parse(lines: list[str]) -> list[dict[str, Any]]:
    out = []
    for ln in lines:
        try:
            obj = json.loads(ln)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def load(results: Path | None, serial: Path | None) -> tuple[list[dict[str, Any]], str]:
    """dom0 writes each record to both; the disk copy can lose its tail (a
    crash before ext4 checkpoints) and the serial copy can lose lines (a full
    console), so the one with more records wins, the disk on a tie."""
    disk: list[dict[str, Any]] = []
    if results is not None and results.is_file():
        disk = parse(results.read_text(errors="replace").splitlines())
    console: list[dict[str, Any]] = []
    if serial is not None and serial.is_file():
        console = parse(
            [
                ln.split(MARK, 1)[1]
                for ln in serial.read_text(errors="replace").splitlines()
                if MARK in ln
            ]
        )
    if not disk and not console:
        return [], "nothing"
    if len(console) > len(disk):
        return console, "serial log"
    return disk, "dom0 disk"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path)
    ap.add_argument("--serial", type=Path)
    ap.add_argument("--host-steps", type=Path, help="JSON lines of the host's own steps")
    ap.add_argument("--started", type=float, required=True, help="run start (epoch seconds)")
    ap.add_argument("--expect", default="", help="comma-separated steps that must be present")
    ap.add_argument("--level", default="")
    ap.add_argument("--qemu-rc", type=int, default=0)
    ap.add_argument("--note", action="append", default=[])
    args = ap.parse_args()

    failures: list[str] = []
    host = []
    if args.host_steps and args.host_steps.is_file():
        host = [json.loads(x) for x in args.host_steps.read_text().splitlines() if x.strip()]
    failures += [f"host step {h['step']} failed" for h in host if not h.get("ok")]

    records, source = load(args.results, args.serial)
    steps = [r for r in records if "step" in r]
    events = {r["event"]: r for r in records if "event" in r}
    for s in steps:
        print(json.dumps(s), flush=True)
        if not s.get("ok"):
            failures.append(f"{s['step']}: {s.get('error', 'failed')}")
    if "ratio" in events:
        print(json.dumps(events["ratio"]), flush=True)

    seen = {s["step"] for s in steps}
    for want in filter(None, args.expect.split(",")):
        if want not in seen:
            failures.append(f"step {want} never reported")
    if not records:
        failures.append("no results from dom0 (did it boot? see the serial log)")
    elif "done" not in events:
        failures.append("dom0's scenario did not finish")
    if "exit" in events and events["exit"].get("rc") not in (0, None):
        failures.append(f"dom0's scenario exited {events['exit'].get('rc')}")
    if args.qemu_rc not in (0,):
        failures.append(
            "qemu timed out (overall budget)"
            if args.qemu_rc == 124
            else f"qemu exited {args.qemu_rc}"
        )

    ok = not failures
    result: dict[str, Any] = {
        "result": "pass" if ok else "fail",
        "level": args.level,
        "secs": round(time.time() - args.started, 1),
        "steps": len(steps) + len(host),
        "passed": sum(1 for s in [*steps, *host] if s.get("ok")),
        "source": source,
    }
    if "start" in events:
        result["dropin_helper"] = events["start"].get("dropin_helper")
    if failures:
        result["failures"] = failures[:12]
    if args.note:
        result["notes"] = args.note
    print(json.dumps(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
