"""Benchmark: N simultaneous local live migrations against one alone, same run.

The same code as ``xcsave bench concurrent`` (xcsave/cmd_bench.py): each
migration is a sim save into a pipe and a restore from it (``--channel
socket``: a socketpair), with xl's handshake on a socketpair beside it, all
driven by one Supervisor; one migration alone, then N at once, best of
``--repeat`` each, interleaved.  Reports each domain's GB/s, the aggregate
GB/s over the span of the N saves, and the single one's.  Never asserted by
the tests.

    python bench/bench_concurrent.py --domains 8 --memory 256M [--rate 20000] [--json]
        [--channel pipe|socket] [--repeat 3] [--plot rounds.png]
"""

from __future__ import annotations

import sys

from xcsave.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "concurrent", *sys.argv[1:]]))
