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
import json
import sys
from typing import Any


def run(rounds: int) -> dict[str, Any]:
    """The measurement lives in the package (``xcsave bench callbacks``)."""
    from xcsave.benchmarks import callbacks_run

    return callbacks_run(rounds)


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
