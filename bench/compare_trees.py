"""Benchmark: one tree against another, built side by side, in the same run.

A refactoring must not cost speed.  This runs ``xcsave bench save|restore|verify``
of two installs of xcsave (two interpreters, e.g. two venvs: a baseline built
from main and the candidate) alternately, ``--repeat`` times each, and keeps
the best figure of each tree per metric.  Interleaving puts both trees under
the same load; best-of-N drops the runs another process disturbed.

Reports, per metric, both figures and the candidate's ratio (> 1 is better:
GB/s is divided new/base, seconds base/new).  Never asserted by the tests.
``--tolerance 0.05`` makes the exit status 1 when a metric is worse by more
than 5 %, for a person or a script deciding whether to merge.

    python bench/compare_trees.py --base /venv/main/bin/python \\
        --new /venv/branch/bin/python [--repeat 5] [--memory SIZE] \\
        [--xen-utils ROOT] [--json] [--tolerance 0.05]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

# bench -> (metric key in its --json report, higher_is_better)
METRICS: dict[str, list[tuple[str, bool]]] = {
    "save": [("measured", True)],
    "restore": [("measured", True)],
    "verify": [("measured", False), ("api_s", False)],
}


def run_one(python: str, bench: str, extra: list[str]) -> dict[str, Any]:
    """One ``xcsave bench BENCH --repeat 1 --json`` of the install behind python."""
    cmd = [python, "-P", "-m", "xcsave", "bench", bench, "--repeat", "1", "--json", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"compare_trees: {python} bench {bench} exited {r.returncode}: {last}")
    report: dict[str, Any] = json.loads(r.stdout)
    if report.get("skipped"):
        raise SystemExit(f"compare_trees: bench {bench} skipped: {report['skipped']}")
    return report


def compare(args: argparse.Namespace) -> dict[str, Any]:
    trees = {"base": args.base, "new": args.new}
    out: dict[str, Any] = {"repeat": args.repeat, "metrics": []}
    for bench in args.benches:
        extra = ["--memory", args.memory] if args.memory else []
        if bench == "verify" and args.xen_utils:
            extra += ["--xen-utils", args.xen_utils]
        runs: dict[tuple[str, str], list[float]] = {
            (t, k): [] for t in trees for k, _ in METRICS[bench]
        }
        for i in range(args.repeat):
            # alternate which tree goes first, so neither always runs on a warm cache
            order = list(trees) if i % 2 == 0 else list(reversed(trees))
            for t in order:
                rep = run_one(trees[t], bench, extra)
                for key, _ in METRICS[bench]:
                    runs[t, key].append(float(rep[key]))
        for key, higher in METRICS[bench]:
            best = max if higher else min
            b, n = best(runs["base", key]), best(runs["new", key])
            ratio = n / b if higher else b / n
            out["metrics"].append(
                {"bench": bench, "metric": key, "base": b, "new": n, "ratio": round(ratio, 3)}
            )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="python of the baseline install")
    ap.add_argument("--new", required=True, help="python of the candidate install")
    ap.add_argument("--repeat", type=int, default=5, help="runs per tree and bench (best of)")
    ap.add_argument("--memory", help="sim domain size for every bench (default: each one's own)")
    ap.add_argument("--xen-utils", help="unpacked xen-utils root (for bench verify)")
    ap.add_argument(
        "--benches", nargs="+", default=list(METRICS), choices=list(METRICS), metavar="BENCH"
    )
    ap.add_argument("--tolerance", type=float, help="exit 1 if a ratio is below 1 - this")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    res = compare(args)
    if args.json:
        json.dump(res, sys.stdout)
        sys.stdout.write("\n")
    else:
        for m in res["metrics"]:
            sys.stdout.write(
                f"{m['bench']:8} {m['metric']:9} base {m['base']:.4g}  new {m['new']:.4g}"
                f"  new/base {m['ratio']:.3f}x\n"
            )
    if args.tolerance is not None:
        worse = [m for m in res["metrics"] if m["ratio"] < 1 - args.tolerance]
        return 1 if worse else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
