"""Benchmark: N simultaneous local live migrations against one alone, same run.

The same code as ``xcsave bench concurrent`` (xcsave/cmd_bench.py): each
migration is a sim save into one end of a socketpair and a restore from the
other, with xl's handshake around the stream, all driven by one Supervisor;
first one migration alone, then N at once.  Reports each domain's GB/s, the
aggregate GB/s over the span of the N saves, and the single one's.  Never
asserted by the tests.

    python bench/bench_concurrent.py --domains 8 --memory 256M [--rate 20000] [--json]
        [--plot rounds.png]
"""

from __future__ import annotations

import sys

from xcsave.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "concurrent", *sys.argv[1:]]))
