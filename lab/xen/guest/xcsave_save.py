#!/usr/bin/env python3
"""Save a running Xen domain with xcsave's supervisor, from Python, in dom0.

xcsave-1 dialect (xcsave-helper, xen backend): a live save whose precopy
policy is a Python function here, which records every decision it makes.
With ``--probe-throttle P`` the policy also asks auto-converge's throttle
(P%), so that the save sets the domain's credit2 cap (read back with ``xl``
while it runs) and lifts it at the end.
xen-4.17 dialect (Xen's stock libxl-save-helper): the same save through the
``xcsave save`` command line with ``--suspend-cmd``.

Either way the guest is suspended through xenstore by ``suspend-domain``.
With ``--qmp --xl-config FILE`` (an HVM guest) xcsave writes the xl savefile
itself, the device model's state (QMP) in libxl's EMULATOR_CONTEXT record.
Prints one JSON line: what the supervisor reported.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import xcsave
from xcsave import api, policy
from xcsave.devicemodel import DeviceModel

HERE = Path(__file__).resolve().parent
SUSPEND = HERE / "suspend-domain"


def credit2_cap(domid: int) -> int | None:
    """The domain's credit2 cap as ``xl sched-credit2`` shows it (None: unread)."""
    r = subprocess.run(  # noqa: S603
        ["xl", "sched-credit2", "-d", str(domid)],  # noqa: S607
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    for line in r.stdout.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 4 and parts[1] == str(domid):
            return int(parts[3])
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--domid", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dialect", choices=("xcsave-1", "xen-4.17"), required=True)
    ap.add_argument("--helper")
    ap.add_argument(
        "--probe-throttle",
        type=int,
        default=0,
        metavar="PERCENT",
        help="xcsave-1: ask auto-converge's throttle from the first round on; "
        "report the domain's credit2 cap before, during (read with xl) and after",
    )
    ap.add_argument(
        "--xl-config",
        metavar="FILE",
        help="write an xl savefile (xcsave's own frames) with this config, not a bare libxc image",
    )
    ap.add_argument(
        "--qmp",
        action="store_true",
        help="an HVM guest: save its device model through QMP (libxl's socket) "
        "into EMULATOR_CONTEXT (needs --xl-config)",
    )
    args = ap.parse_args()
    t0 = time.monotonic()
    framing: list[str] = []
    if args.xl_config:
        framing = ["--format", "xl", "--xl-config", args.xl_config]
    if args.qmp:
        framing += ["--qmp", "auto"]

    if args.dialect == "xen-4.17":
        # The command line, as a user would type it.
        argv = [
            sys.executable,
            "-m",
            "xcsave",
            "save",
            "--domid",
            str(args.domid),
            args.out,
            "--live",
            "--dialect",
            "xen-4.17",
            "--helper",
            args.helper,
            "--suspend-cmd",
            f"{SUSPEND} {args.domid}",
            "--progress",
            "plain",
            *framing,
        ]
        r = subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603
        secs = round(time.monotonic() - t0, 2)
        print(
            json.dumps(
                {
                    "via": "cli",
                    "rc": r.returncode,
                    "secs": secs,
                    "stderr_tail": r.stderr.strip().splitlines()[-2:],
                }
            )
        )
        return r.returncode

    decisions: list[dict[str, int | str]] = []
    base = policy.xen_default(max_iters=4, threshold=50)
    caps: dict[str, int | None] = {"before": credit2_cap(args.domid)}

    def lab_policy(st: policy.PrecopyStats) -> policy.Verdict:
        v = policy.as_verdict(base(st))
        if args.probe_throttle and v.decision == policy.Decision.CONTINUE:
            if "during" not in caps and "asked" in caps:
                # Asked last time: the cap is on now, as Xen has it.
                caps["during"] = credit2_cap(args.domid)
            caps["asked"] = args.probe_throttle
            v = policy.Verdict(v.decision, "lab: throttle probe", args.probe_throttle)
        decisions.append(
            {
                "iteration": st.iteration,
                "dirty": st.dirty_count,
                "decision": v.decision.name,
                "reason": v.reason,
            }
        )
        return v

    async def suspend() -> int:
        proc = await asyncio.create_subprocess_exec(str(SUSPEND), str(args.domid))
        return int(await proc.wait() == 0)

    cbs = xcsave.Callbacks(suspend=suspend)
    dm = None
    if args.qmp:  # QEMU's dirty log is switched through QMP by the save
        dm = DeviceModel.of_domain(args.domid)
    else:  # no device model: nothing to switch
        cbs.switch_qemu_logdirty = lambda domid, enable: 0
    res = asyncio.run(
        api.save(
            args.out,
            domid=args.domid,
            live=True,
            dialect="xcsave-1",
            fmt="xl" if args.xl_config else "libxc",
            xl_config=args.xl_config,
            device_model=dm,
            callbacks=cbs,
            policy=lab_policy,
            timeout=900,
        )
    )
    stats = res.stats
    caps["after"] = credit2_cap(args.domid)
    throttle = res.throttle
    print(
        json.dumps(
            {
                "via": "api",
                "caps": caps,
                "throttle": dataclasses.asdict(throttle) if throttle else None,
                "secs": round(time.monotonic() - t0, 2),
                "elapsed": round(res.elapsed, 2),
                "rounds": stats.rounds if stats else None,
                "pages_sent": stats.pages_sent if stats else None,
                "policy_calls": len(decisions),
                "decisions": decisions[:8],
            }
        )
    )
    if not decisions:
        print("the precopy policy was never asked", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
