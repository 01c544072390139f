"""Benchmark: the control path — a callback round trip helper -> Python -> helper.

Same run, same machine:

  baseline  an asyncio round trip through a C process on stock streams:
            4 bytes to ``cat`` and back (StreamWriter.write+drain, readexactly)
  xcsave    a Remus save of a 4-page simulated domain into /dev/null with
            N checkpoints and no interval: every checkpoint is three callbacks
            (suspend, postcopy, checkpoint) answered by Python through the
            supervisor, plus the progress and log frames libxc would send

Reports microseconds per round trip for both, frames per second for xcsave and
the ratio.  Never asserted by the tests.

    python bench/bench_callbacks.py [--rounds 2000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


async def baseline(n: int) -> float:
    """Seconds per round trip through `cat` with asyncio streams."""
    proc = await asyncio.create_subprocess_exec(
        "cat", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    t0 = time.perf_counter()
    for _ in range(n):
        proc.stdin.write(b"ping")
        await proc.stdin.drain()
        await proc.stdout.readexactly(4)
    dt = time.perf_counter() - t0
    proc.stdin.close()
    await proc.wait()
    return dt / n


async def xcsave_callbacks(checkpoints: int, workdir: Path) -> dict[str, Any]:
    import xcsave
    from xcsave import sim

    dom = sim.create(workdir / "bench-callbacks.dom", 4 * 4096, seed=1)
    calls = 0
    frames = 0

    def answer() -> int:
        nonlocal calls
        calls += 1
        return 1

    def checkpoint() -> int:
        nonlocal calls
        calls += 1
        return 1 if calls < 3 * checkpoints else 0

    def count(_ev: object) -> None:
        nonlocal frames
        frames += 1

    cbs = xcsave.Callbacks(suspend=answer, postcopy=answer, checkpoint=checkpoint)
    out = os.open(os.devnull, os.O_WRONLY)
    try:
        t0 = time.perf_counter()
        await xcsave.save(
            out,
            sim=dom,
            stream_type="remus",
            checkpoints=checkpoints,
            interval_ms=0,
            callbacks=cbs,
            on_event=count,
        )
        dt = time.perf_counter() - t0
    finally:
        os.close(out)
        sim.remove(dom)
    return {
        "callbacks": calls,
        "other_frames": frames,
        "seconds": dt,
        "us_per_callback": dt / calls * 1e6,
        "frames_per_s": (calls + frames) / dt,
    }


def run(rounds: int) -> dict[str, Any]:
    base = asyncio.run(baseline(rounds * 3))
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        ours = asyncio.run(xcsave_callbacks(rounds, Path(d)))
    return {
        "baseline_us_per_rtt": base * 1e6,
        **ours,
        "ratio_to_baseline": ours["us_per_callback"] / (base * 1e6),
        "load_average": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--rounds", type=int, default=2000, help="Remus checkpoints (3 callbacks each)"
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    r = run(args.rounds)
    if args.json:
        sys.stdout.write(json.dumps(r) + "\n")
    else:
        sys.stdout.write(
            f"callback round trip: xcsave {r['us_per_callback']:.1f} us "
            f"({r['callbacks']} callbacks + {r['other_frames']} other frames, "
            f"{r['frames_per_s']:.0f} frames/s)\n"
            f"baseline (asyncio <-> cat, stock streams): {r['baseline_us_per_rtt']:.1f} us\n"
            f"ratio xcsave/baseline: {r['ratio_to_baseline']:.2f}  "
            f"(load average {r['load_average']:.2f})\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
