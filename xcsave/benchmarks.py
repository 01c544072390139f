"""Measurement code shared by ``xcsave bench`` (cmd_bench.py) and bench/*.py.

Lives in the package so the CLI works from an installed xcsave without the
repository's bench/ directory.  Nothing here judges a timing.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from .defaults import shm_dir

XEN_BIN = Path("usr/lib/xen-4.17/bin")
XEN_PY = Path("usr/lib/xen-4.17/lib/python")
REPO = Path(__file__).resolve().parent.parent


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` calls of ``fn``."""
    best = float("inf")
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_cmd(
    cmd: list[str],
    env: dict[str, str] | None = None,
    stdout: Path | None = None,
) -> float:
    """Wall time of one command (process start included); raises on failure."""
    with open(stdout or os.devnull, "wb") as out:
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.PIPE, check=False)  # noqa: S603
        dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({r.returncode}): "
            f"{r.stderr.decode(errors='replace').strip()[-300:]}"
        )
    return dt


def xen_cmd(root: Path, tool: str, *args: str) -> list[str]:
    """argv running one of Xen's Python tools with *this* interpreter.

    Same binary as ours (``sys.executable``), so the comparison is of the
    tools, not of interpreters: the ``python3`` found on PATH may be another
    build, or a pyenv shim (a bash script that costs ~0.1 s per start).
    """
    return [sys.executable, str(root / XEN_BIN / tool), *args]


def python_env(workdir: Path, **more: str) -> dict[str, str]:
    """Environment for timed Python commands, ours and Xen's alike: bytecode
    cached (as an installed package has it) in ``workdir/pycache``, not in
    anyone's tree, even when PYTHONDONTWRITEBYTECODE is set here.  Run each
    command once untimed first to fill the cache."""
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(workdir / "pycache"), **more)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def run_piped(cmd: list[str], env: dict[str, str] | None = None) -> float:
    """Wall time of ``cmd`` writing its stdout into a pipe read by
    ``cat >/dev/null`` (both exits included); raises on failure."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # noqa: S603
    assert proc.stdout is not None
    cat = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=subprocess.DEVNULL)  # noqa: S607
    proc.stdout.close()
    _out, err = proc.communicate()
    cat.wait()
    dt = time.perf_counter() - t0
    if proc.returncode != 0 or cat.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} | cat failed ({proc.returncode}/{cat.returncode}): "
            f"{err.decode(errors='replace').strip()[-300:]}"
        )
    return dt


def xcsave_command(*args: str) -> tuple[list[str], str]:
    """argv running ``xcsave ARGS`` as a user does: the console script
    installed beside this interpreter (its shebang names it), else
    ``python -P -m xcsave`` (which also pays for runpy).  And which it is."""
    from .cli import self_argv

    script = Path(sys.executable).with_name("xcsave")
    try:
        with open(script, "rb") as f:
            first = f.readline()
    except OSError:
        first = b""
    if first.startswith(b"#!"):
        interp = Path(first[2:].strip().decode(errors="replace"))
        if interp.resolve() == Path(sys.executable).resolve():
            return [str(script), *args], "the xcsave console script"
    return self_argv(*args), "python -P -m xcsave"


#: How to get Xen's tools when find_xen_utils finds none (one line).
XEN_UTILS_HINT: Final = (
    "Xen's tools not found: run tools/fetch-xen-utils.sh in a checkout of xcsave (it "
    "unpacks Debian's xen-utils-4.17 into .cache/xen-utils/root, installing nothing), "
    "then run from that checkout or pass --xen-utils ROOT (or set XCSAVE_XEN_UTILS)"
)


def find_xen_utils(given: str | None = None) -> Path | None:
    """Root of an unpacked xen-utils-4.17 (tools/fetch-xen-utils.sh), or None:
    ``given``, ``$XCSAVE_XEN_UTILS``, then where tools/test puts it in the
    checkout this xcsave runs from or in the current directory."""
    candidates = [
        given,
        os.environ.get("XCSAVE_XEN_UTILS"),
        str(REPO / ".cache" / "xen-utils" / "root"),
        str(Path.cwd() / ".cache" / "xen-utils" / "root"),
    ]
    for c in candidates:
        if c and (Path(c) / XEN_BIN / "verify-stream-v2").is_file():
            return Path(c)
    return None


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


# ------------------------------------------------------------- callbacks


async def callback_baseline(n: int) -> float:
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


async def callback_baseline_protocol(n: int) -> float:
    """Seconds per round trip through `cat` read the way the supervisor reads
    a helper: ``loop.add_reader`` on a non-blocking pipe, ``os.read`` in the
    loop callback, the next message written at once with ``os.write``."""
    loop = asyncio.get_running_loop()
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec("cat", stdin=in_r, stdout=out_w)
    finally:
        os.close(in_r)
        os.close(out_w)
    os.set_blocking(out_r, False)
    done: asyncio.Future[None] = loop.create_future()
    got = 0

    def readable() -> None:
        nonlocal got
        got += len(os.read(out_r, 4096))
        if got >= 4 * n:
            done.set_result(None)
        elif got % 4 == 0:
            os.write(in_w, b"ping")

    loop.add_reader(out_r, readable)
    try:
        t0 = time.perf_counter()
        os.write(in_w, b"ping")
        await done
        dt = time.perf_counter() - t0
    finally:
        loop.remove_reader(out_r)
        os.close(in_w)
        os.close(out_r)
        await proc.wait()
    return dt / n


async def xcsave_callbacks(checkpoints: int, workdir: Path) -> dict[str, Any]:
    """A Remus save of a 4-page sim domain into /dev/null with ``checkpoints``
    checkpoints: three callbacks each (suspend, postcopy, checkpoint)."""
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


def callbacks_run(rounds: int) -> dict[str, Any]:
    base = asyncio.run(callback_baseline(rounds * 3))
    floor = asyncio.run(callback_baseline_protocol(rounds * 3))
    with tempfile.TemporaryDirectory(dir=shm_dir()) as d:
        ours = asyncio.run(xcsave_callbacks(rounds, Path(d)))
    return {
        "baseline_us_per_rtt": base * 1e6,
        "protocol_us_per_rtt": floor * 1e6,
        **ours,
        "ratio_to_baseline": ours["us_per_callback"] / (base * 1e6),
        "ratio_to_protocol": ours["us_per_callback"] / (floor * 1e6),
        "load_average": os.getloadavg()[0],
    }


# ----------------------------------------------------------------- TLS link


async def _tcp_pair() -> tuple[Any, Any]:
    """A connected loopback TCP pair (client, server), non-blocking."""
    import socket

    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as lsn:
        lsn.bind(("127.0.0.1", 0))
        lsn.listen(1)
        lsn.setblocking(False)
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.setblocking(False)
        await loop.sock_connect(client, lsn.getsockname())
        server, _ = await loop.sock_accept(lsn)
    return client, server


async def _pump_native(src: Any, dst: Any, nbytes: int) -> float:
    """Seconds to push ``nbytes`` zeros into socket ``src`` and drain them from
    socket ``dst``, by two ``dd`` processes: no Python in the data path."""
    import socket

    src.setblocking(True)  # dd expects blocking fds (the flag is shared)
    dst.setblocking(True)
    t0 = time.perf_counter()
    source = await asyncio.create_subprocess_exec(
        "dd", "if=/dev/zero", "bs=1M", f"count={nbytes >> 20}", "status=none", stdout=src
    )
    sink = await asyncio.create_subprocess_exec(
        "dd", "of=/dev/null", "bs=1M", "status=none", stdin=dst
    )
    rc_source = await source.wait()
    src.shutdown(socket.SHUT_WR)  # our copy too: the sink's EOF (or close_notify)
    rc = (rc_source, await sink.wait())
    dt = time.perf_counter() - t0
    if rc != (0, 0):
        raise RuntimeError(f"dd source/sink failed with {rc}")
    return dt


async def tls_link(nbytes: int, tls_dir: Path | None = None, *, repeat: int = 3) -> dict[str, Any]:
    """``nbytes`` one way over loopback TCP, plain and through two TLS
    tunnels (xcsave.tls), in the same run: best of ``repeat`` each.

    ``tls_dir`` holds ``server/`` and ``client/`` TLS directories sharing a
    CA (made with xcsave.tlsinit in a temporary directory when None).  The
    data comes from ``dd if=/dev/zero`` and goes to ``dd of=/dev/null``.
    """
    from . import tls, tlsinit

    with tempfile.TemporaryDirectory(prefix="xcsave-tls-bench.") as tmp:
        root = tls_dir or Path(tmp)
        if tls_dir is None:
            tlsinit.tls_init(root / "server", ["127.0.0.1"])
            tlsinit.tls_init(root / "client", ["client"], ca_dir=root / "server")
        plain: list[float] = []
        tunneled: list[float] = []
        peer: dict[str, str] = {}
        for _ in range(max(1, repeat)):
            client, server = await _tcp_pair()
            try:
                plain.append(await _pump_native(client, server, nbytes))
            finally:
                client.close()
                server.close()
            client, server = await _tcp_pair()
            try:
                c, s = await asyncio.gather(
                    tls.tls_client(client, tls_dir=root / "client", server_name="127.0.0.1"),
                    tls.tls_server(server, tls_dir=root / "server"),
                )
            finally:
                client.close()
                server.close()
            try:
                tunneled.append(await _pump_native(c.sock, s.sock, nbytes))
                peer = {"version": c.version, "cipher": c.cipher}
            finally:
                await asyncio.gather(c.aclose(), s.aclose())
            moved = (c.stats.sent if c.stats else -1, s.stats.received if s.stats else -1)
            if moved != (nbytes, nbytes):
                raise RuntimeError(f"the tunnels moved {moved} bytes, not {nbytes}")
    best_plain, best_tls = min(plain), min(tunneled)
    return {
        "bytes": nbytes,
        "plain_gbps": nbytes / best_plain / 1e9,
        "tls_gbps": nbytes / best_tls / 1e9,
        "ratio": best_plain / best_tls,
        "plain_s": plain,
        "tls_s": tunneled,
        **peer,
    }
