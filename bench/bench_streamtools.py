"""Benchmark: ``xcsave verify`` / ``xcsave convert`` against Xen's own tools.

Builds one large v3 libxc image and one large legacy HVM image (default
1 GiB of pages each, ``--size``), warms the page cache, then times in the
same run, on the same files:

  verify   xcsave verify IMG --format libxc   vs  verify-stream-v2 -f libxc -i IMG
  convert  xcsave convert LEG OUT ...         vs  convert-legacy-stream -i LEG -o OUT ...

Both sides are timed as whole commands (process start included), best of
``--repeat`` runs; the in-process API time (``streamtools.verify``) is shown
too.  Prints ratios (Xen time / xcsave time), or JSON with ``--json``.
Never asserted by the tests.

    python bench/bench_streamtools.py --size 1G [--xen-utils ROOT] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from xcsave import corpus

HERE = Path(__file__).resolve().parent

XEN_BIN = Path("usr/lib/xen-4.17/bin")
XEN_PY = Path("usr/lib/xen-4.17/lib/python")


def parse_size(text: str) -> int:
    units = {"K": 10, "M": 20, "G": 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    if t and t[-1] in units:
        return int(float(t[:-1]) * (1 << units[t[-1]]))
    return int(t)


def find_xen_utils(given: str | None) -> Path:
    candidates = [
        given,
        os.environ.get("XCSAVE_XEN_UTILS"),
        str(HERE.parent / ".cache" / "xen-utils" / "root"),
        "/tmp/xu/root",
    ]
    for c in candidates:
        if c and (Path(c) / XEN_BIN / "verify-stream-v2").is_file():
            return Path(c)
    raise SystemExit(
        "bench: Xen's tools not found: pass --xen-utils ROOT (an unpacked xen-utils-4.17)"
    )


def best_of(
    cmd: list[str],
    repeat: int,
    env: dict[str, str] | None = None,
    fresh: Path | None = None,
    stdout: Path | None = None,
) -> float:
    """Best wall time of ``repeat`` runs; ``fresh`` is removed before each
    run (untimed) so every run writes a new file; ``stdout`` receives the
    command's standard output."""
    best = float("inf")
    for _ in range(repeat):
        for p in (fresh, stdout):
            if p is not None and p.exists():
                p.unlink()
        with open(stdout or os.devnull, "wb") as out:
            t0 = time.perf_counter()
            r = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.PIPE, check=False)
            dt = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(
                f"bench: {' '.join(cmd)} failed ({r.returncode}): "
                f"{r.stderr.decode(errors='replace').strip()[-300:]}"
            )
        best = min(best, dt)
    return best


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="page data, e.g. 1G")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--xen-utils", help="root of an unpacked xen-utils-4.17")
    ap.add_argument("--dir", help="where to put the images (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from xcsave import streamtools

    root = find_xen_utils(args.xen_utils)
    xen_env = dict(os.environ, PYTHONPATH=str(root / XEN_PY))
    xcsave = [sys.executable, "-P", "-m", "xcsave"]
    results: dict[str, object] = {"size": args.size, "repeat": args.repeat}

    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        img, leg = Path(d) / "image.libxc", Path(d) / "image.legacy"
        corpus.write_big_libxc(img, args.size)
        corpus.write_big_legacy(leg, args.size)
        warm(img)
        warm(leg)

        api = float("inf")
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            assert streamtools.verify(img, "libxc").valid
            api = min(api, time.perf_counter() - t0)
        start = best_of([sys.executable, "-c", "pass"], args.repeat)
        ours = best_of([*xcsave, "verify", "-q", "--format", "libxc", str(img)], args.repeat)
        xen = best_of(
            [
                sys.executable,  # the same interpreter as ours (not a PATH shim)
                str(root / XEN_BIN / "verify-stream-v2"),
                "-q",
                "-f",
                "libxc",
                "-i",
                str(img),
            ],
            args.repeat,
            xen_env,
        )
        results["verify"] = {
            "xcsave_s": ours,
            "xcsave_api_s": api,
            "xen_s": xen,
            "python_start_s": start,
            "ratio": xen / ours,
            "ratio_api": xen / api,
        }

        out_ours, out_xen = Path(d) / "ours.out", Path(d) / "xen.out"
        conv = ["convert", str(leg), "--width", "64", "--guest", "hvm", "--format", "libxc"]
        atomic = best_of(
            [*xcsave, *conv[:2], str(out_ours), *conv[2:]], args.repeat, fresh=out_ours
        )
        ours = best_of([*xcsave, *conv[:2], "-", *conv[2:]], args.repeat, stdout=out_ours)
        xen = best_of(
            [
                sys.executable,  # the same interpreter as ours (not a PATH shim)
                str(root / XEN_BIN / "convert-legacy-stream"),
                "-i",
                str(leg),
                "-o",
                str(out_xen),
                "-w",
                "64",
                "-g",
                "hvm",
                "-f",
                "libxc",
            ],
            args.repeat,
            xen_env,
            fresh=out_xen,
        )
        results["convert"] = {
            "xcsave_s": ours,
            "xcsave_atomic_fsync_s": atomic,
            "xen_s": xen,
            "ratio": xen / ours,
            "ratio_atomic_fsync": xen / atomic,
        }

    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    gib = args.size / (1 << 30)
    v, c = results["verify"], results["convert"]
    assert isinstance(v, dict)
    assert isinstance(c, dict)
    print(f"image: {gib:.2f} GiB of pages, best of {args.repeat}, page cache warm")
    print(
        f"verify : Xen {v['xen_s']:.3f} s | xcsave command {v['xcsave_s']:.3f} s "
        f"({v['ratio']:.1f}x; python itself starts in {v['python_start_s']:.3f} s) | "
        f"native scan in-process {v['xcsave_api_s'] * 1000:.1f} ms ({v['ratio_api']:.0f}x)"
    )
    print(
        f"convert: Xen {c['xen_s']:.3f} s | xcsave to stdout {c['xcsave_s']:.3f} s "
        f"({c['ratio']:.1f}x) | xcsave to OUT, atomic + fsync "
        f"{c['xcsave_atomic_fsync_s']:.3f} s ({c['ratio_atomic_fsync']:.1f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
