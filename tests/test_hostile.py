"""Hostile and broken input (issue 7, part 2) and the helper's boundaries (part 4).

Every input below goes where a real one would: streams into a restore
through the helper (``xcsave.restore``, a few through ``xcsave restore IN
--sim DOM``), into ``xcsave verify`` and into the legacy converter; argv
straight into ``xcsave-helper``.  Each must end in a success (some mutations
are legitimately valid: a flipped bit inside page data is still a page) or
in ONE clear line, with no crash (no signal), no traceback, no half-built
domain and bounded memory.  Memory is bounded by running the restoring
helper under RLIMIT_AS (``prlimit`` as the supervisor's wrapper) and the
verifier/converter in a worker process under RLIMIT_AS: an allocation sized
by a length or a count the stream claims would surface as ENOMEM here.

The stress version of the mutation tests is ``tools/stress-faults
--hostile`` (1000 bit flips per stream instead of a sample).

Module contents, in order: the runner and checks (also used by
tests/test_fuzz_regressions.py and tools/stress-faults), a walker that maps a
stream's bytes to records and fields, the restore/verify/convert drivers,
then the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import corpus_cases
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xcsave
from xcsave import corpus, proto, sim
from xcsave.supervisor import helper_path

REPO = Path(__file__).resolve().parent.parent

#: Address-space limit of a restoring helper (its own needs are < 16 MiB; the
#: largest legitimate buffer is one 4 MiB PAGE_DATA batch).
HELPER_AS_LIMIT = 64 << 20
#: Address-space limit of a Python process running the verifier/converter
#: (the interpreter with the extension needs about 25 MiB).
PYTHON_AS_LIMIT = 128 << 20
#: Peak RSS allowed to the verify/convert worker, which holds one input at
#: a time (the largest corpus stream is 200 KiB).
WORKER_RSS_LIMIT_KIB = 40 << 10
#: Seeded sample sizes in CI; tools/stress-faults --hostile uses 1000.
CI_FLIPS = 100
MEMORY_WORDS = ("ENOMEM", "Cannot allocate memory", "MemoryError", "out of memory")


# ---------------------------------------------------------------- the runner


@dataclasses.dataclass(frozen=True)
class Run:
    """A finished child process: exit status, output and peak memory."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes
    stderr: str
    maxrss_kib: int

    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def sanitized_helper() -> bool:
    """Whether the installed helper was built with ASan (which needs huge VA)."""
    return b"__asan_init" in helper_path().read_bytes()


def sanitized_python() -> bool:
    """Whether Python runs with a sanitizer runtime preloaded (tools/ci-sanitize)."""
    return "libasan" in os.environ.get("LD_PRELOAD", "")


def rlimits_usable() -> bool:
    """RLIMIT_AS and RSS bounds prove bounded memory, unless a sanitizer (huge
    shadow mappings, quarantined frees) or a wrapper (valgrind) is in the way."""
    return (
        not sanitized_helper()
        and not sanitized_python()
        and not os.environ.get("XCSAVE_HELPER_WRAPPER")
    )


def python_as_limit() -> int | None:
    return PYTHON_AS_LIMIT if rlimits_usable() else None


def _set_as_limit(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run_bounded(
    argv: Sequence[str],
    *,
    stdin: bytes = b"",
    stdin_pipe: bool = False,
    as_limit: int | str | None = "default",
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
) -> Run:
    """Run argv with stdin from a regular file or a pipe, under RLIMIT_AS.

    The child is reaped with wait4(), so its peak RSS (and its reaped
    descendants', e.g. a helper) is measured.  stdin_pipe feeds stdin
    through a pipe from a thread, so readers take their exact-read path.
    """
    if as_limit == "default":
        as_limit = python_as_limit()
    assert not isinstance(as_limit, str)
    with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout:
        with tempfile.TemporaryFile() as ferr:
            if not stdin_pipe:
                fin.write(stdin)
                fin.seek(0)
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if stdin_pipe else fin,
                stdout=fout,
                stderr=ferr,
                env=env,
                preexec_fn=_set_as_limit(as_limit) if as_limit else None,  # noqa: PLW1509
            )
            feeder: threading.Thread | None = None
            if stdin_pipe:
                assert proc.stdin is not None
                pipe = proc.stdin

                def feed() -> None:
                    with contextlib.suppress(BrokenPipeError, OSError):
                        pipe.write(stdin)
                    with contextlib.suppress(BrokenPipeError, OSError):
                        pipe.close()

                feeder = threading.Thread(target=feed, daemon=True)
                feeder.start()
            timer = threading.Timer(timeout, proc.kill)
            timer.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            finally:
                timer.cancel()
            proc.returncode = os.waitstatus_to_exitcode(status)
            if feeder is not None:
                feeder.join(timeout)
                assert proc.stdin is not None
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            fout.seek(0)
            ferr.seek(0)
            return Run(
                tuple(argv),
                proc.returncode,
                fout.read(),
                ferr.read().decode("utf-8", "replace"),
                int(usage.ru_maxrss),
            )


def cli_argv(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-P", "-m", "xcsave", *(os.fspath(a) for a in args)]


def check_clean(run: Run, *, ok: Sequence[int] = (0,), fail: Sequence[int] = (1,)) -> None:
    """A CLI run ended cleanly: a known exit status, and on failure one line."""
    what = f"{' '.join(run.argv[3:])}: rc={run.returncode}, stderr={run.stderr!r}"
    assert run.returncode >= 0, f"killed by signal {-run.returncode}: {what}"
    assert run.returncode in (*ok, *fail), what
    assert "Traceback" not in run.stderr, what
    for word in MEMORY_WORDS:
        assert word not in run.stderr, what
    if run.returncode not in ok:
        assert len(run.lines()) == 1, f"not one line: {what}"
        assert run.lines()[0].startswith("xcsave: "), what


def check_one_line(message: str) -> None:
    assert message and "\n" not in message, repr(message)
    for word in MEMORY_WORDS:
        assert word not in message, message


# ---------------------------------------------------------------- the stream walker


@dataclasses.dataclass(frozen=True)
class Field:
    """A span of a stream: which record, which part of it."""

    start: int
    end: int
    layer: str  # xl | libxl | libxc
    record: str  # record name, or "header"
    part: str  # rhdr | body | pfns | page-data | vcpu-data | hvm-desc | padding | ...


LIBXC_NAMES = {
    0x00: "END",
    0x01: "PAGE_DATA",
    0x08: "X86_TSC_INFO",
    0x09: "HVM_CONTEXT",
    0x0A: "HVM_PARAMS",
    0x0D: "VERIFY",
    0x0E: "CHECKPOINT",
    0x10: "STATIC_DATA_END",
    0x11: "X86_CPUID_POLICY",
    0x12: "X86_MSR_POLICY",
}
LIBXL_NAMES = {0: "END", 1: "LIBXC_CONTEXT", 2: "EMULATOR_XENSTORE_DATA", 3: "EMULATOR_CONTEXT",
               4: "CHECKPOINT_END"}  # fmt: skip


def _pad(n: int) -> int:
    return (n + 7) & ~7


def _body_fields(layer: str, name: str, body: int, data: bytes, length: int) -> list[Field]:
    """The parts of one record body (what a bit flip there would hit)."""
    out: list[Field] = []
    end = body + length
    if layer == "libxc" and name == "PAGE_DATA" and length >= 8:
        count = struct.unpack_from("<I", data, body)[0]
        pfn_end = min(end, body + 8 + 8 * count)
        out.append(Field(body, body + 8, layer, name, "count"))
        out.append(Field(body + 8, pfn_end, layer, name, "pfns"))
        out.append(Field(pfn_end, end, layer, name, "page-data"))
    elif layer == "libxc" and name == "HVM_CONTEXT":
        p = body
        while p + 8 <= end:
            code, _inst, dlen = struct.unpack_from("<HHI", data, p)
            out.append(Field(p, p + 8, layer, name, "hvm-desc"))
            part = {1: "hvm-header", 2: "vcpu-data", 0x78: "hvm-sim"}.get(code, "hvm-other")
            if part == "hvm-sim" and dlen == 32:
                # magic, version, vcpu_size | nr_pages | nr_vcpus, page_shift
                out.append(Field(p + 8, p + 24, layer, name, "hvm-sim"))
                out.append(Field(p + 24, p + 32, layer, name, "hvm-sim-pages"))
                out.append(Field(p + 32, p + 40, layer, name, "hvm-sim"))
            else:
                out.append(Field(p + 8, min(end, p + 8 + dlen), layer, name, part))
            p += 8 + dlen
            if code == 0:
                break
    elif layer == "libxc" and name == "HVM_PARAMS" and length >= 8:
        out.append(Field(body, body + 8, layer, name, "count"))
        for q in range(body + 8, end, 16):
            out.append(Field(q, q + 8, layer, name, "param-index"))
            out.append(Field(q + 8, q + 16, layer, name, "param-value"))
    elif layer == "libxl" and name.startswith("EMULATOR") and length >= 8:
        out.append(Field(body, body + 8, layer, name, "emulator-id"))
        out.append(Field(body + 8, end, layer, name, "emulator-data"))
    elif length:
        out.append(Field(body, end, layer, name, "body"))
    return out


def walk(data: bytes, fmt: str) -> list[Field]:
    """Every byte of a v2/v3, libxl or xl stream (as xcsave writes them), by field.

    Records only: what follows the outermost END is reported as "trailing".
    Raises ValueError on a stream it cannot follow (the inputs are ours).
    """
    out: list[Field] = []
    pos = 0

    def header(layer: str, n: int, part: str = "header") -> None:
        nonlocal pos
        out.append(Field(pos, pos + n, layer, "header", part))
        pos += n

    def record(layer: str, names: dict[int, str]) -> tuple[int, str]:
        nonlocal pos
        rtype, length = struct.unpack_from("<II", data, pos)
        name = names.get(rtype, f"0x{rtype:x}")
        out.append(Field(pos, pos + 8, layer, name, "rhdr"))
        body = pos + 8
        out.extend(_body_fields(layer, name, body, data, length))
        if _pad(length) > length:
            out.append(Field(body + length, body + _pad(length), layer, name, "padding"))
        pos = body + _pad(length)
        if pos > len(data):
            raise ValueError("record runs past the end")
        return rtype, name

    def libxc_records(in_libxl: bool) -> str:
        while True:
            rtype, _ = record("libxc", LIBXC_NAMES)
            if rtype == 0x00:
                return "END"
            if rtype == 0x0E and in_libxl:
                return "CHECKPOINT"

    def libxc_image(in_libxl: bool) -> str:
        header("libxc", 24, "ihdr")
        header("libxc", 16, "dhdr")
        return libxc_records(in_libxl)

    if fmt == "xl":
        header("xl", 32, "magic")
        optlen = struct.unpack_from("<I", data, pos + 12)[0]
        header("xl", 16, "xl-fields")
        header("xl", optlen, "xl-config")
        fmt = "libxl"
    if fmt == "libxc":
        libxc_image(False)
    elif fmt == "libxl":
        header("libxl", 16)
        while pos < len(data):
            rtype, _ = record("libxl", LIBXL_NAMES)
            if rtype == 1:
                libxc_image(True)
            elif rtype == 4 and pos < len(data):
                # Remus: the libxc records resume after CHECKPOINT_END.
                libxc_records(True)
            elif rtype == 0:
                break
    else:
        raise ValueError(f"cannot walk {fmt}")
    if pos < len(data):
        out.append(Field(pos, len(data), fmt, "trailing", "trailing"))
    return out


def field_at(fields: Sequence[Field], offset: int) -> Field:
    for f in fields:
        if f.start <= offset < f.end:
            return f
    raise KeyError(offset)


def record_starts(fields: Sequence[Field]) -> list[int]:
    return sorted({f.start for f in fields if f.part in ("rhdr", "ihdr", "dhdr", "magic",
                                                          "xl-fields", "header")})  # fmt: skip


def cut_points(data: bytes, fields: Sequence[Field]) -> list[int]:
    """Truncation points: every record boundary, and inside every record."""
    points: set[int] = set()
    for start in record_starts(fields):
        points.update({start, start + 1, start + 4, start + 7})
    for f in fields:
        if f.end - f.start > 1:
            points.add(f.start + 1)
            points.add((f.start + f.end) // 2)
            points.add(f.end - 1)
    return sorted(p for p in points if 0 <= p < len(data))


def flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


# ---------------------------------------------------------------- restore driver


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How one restore of a (possibly hostile) stream ended."""

    accepted: bool
    message: str  # the one line of a rejection
    digest: str | None  # of the restored domain


@contextlib.contextmanager
def helper_as_limit(limit: int = HELPER_AS_LIMIT) -> Iterator[bool]:
    """Run every helper under RLIMIT_AS (prlimit as the supervisor's wrapper).

    Yields whether the limit is in force (not with an ASan helper or another
    wrapper, e.g. valgrind, which need the address space).
    """
    prlimit = shutil.which("prlimit")
    if prlimit is None or not rlimits_usable():
        yield False
        return
    old = os.environ.get("XCSAVE_HELPER_WRAPPER")
    os.environ["XCSAVE_HELPER_WRAPPER"] = f"{prlimit} --as={limit} --"
    try:
        yield True
    finally:
        if old is None:
            os.environ.pop("XCSAVE_HELPER_WRAPPER", None)
        else:
            os.environ["XCSAVE_HELPER_WRAPPER"] = old


def _leftovers(target: Path) -> list[str]:
    return sorted(
        p.name
        for p in target.parent.iterdir()
        if p.name == target.name or p.name.startswith(f".{target.name}.partial.")
    )


async def restore_one(
    data: bytes,
    target: Path,
    *,
    fmt: str,
    stream_type: str = "plain",
    pipe: bool = False,
    max_pages: int = 0,
    timeout: float = 60.0,
) -> Outcome:
    """Restore data into the sim domain target through the helper, and judge it.

    Asserts what every restore must guarantee, success or not: no crash
    (HelperDied), one line on failure, nothing left behind on failure.
    """
    assert not target.exists()
    rfd = wfd = -1
    writer: threading.Thread | None = None
    src: int | Path
    if pipe:
        rfd, wfd = os.pipe()

        def feed(fd: int = wfd) -> None:
            with contextlib.suppress(OSError):
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            os.close(fd)

        writer = threading.Thread(target=feed, daemon=True)
        writer.start()
        src = rfd
    else:
        src = target.with_name(target.name + ".in")
        src.write_bytes(data)
    failure: xcsave.HelperFailed | None = None
    try:
        await xcsave.restore(
            src,
            sim=target,
            fmt=fmt,
            stream_type=stream_type,
            max_pages=max_pages,
            timeout=timeout,
        )
    except xcsave.HelperFailed as e:
        failure = e
    finally:
        if pipe:
            os.close(rfd)
            assert writer is not None
            writer.join(30)
        else:
            assert isinstance(src, Path)
            src.unlink()
    if failure is not None:
        check_one_line(str(failure))
        assert _leftovers(target) == [], f"{failure}: left {_leftovers(target)}"
        return Outcome(False, str(failure), None)
    digest = sim.digest(target)
    assert _leftovers(target) == [target.name]
    target.unlink()
    return Outcome(True, "", digest)


def restore_many(inputs: Sequence[bytes], target: Path, **kw: Any) -> list[Outcome]:
    async def go() -> list[Outcome]:
        return [await restore_one(d, target, **kw) for d in inputs]

    return asyncio.run(go())


# ---------------------------------------------------------------- verify/convert worker

#: Runs in a child under RLIMIT_AS: scans (or converts) each input file, both
#: as a path (mapped) and through a pipe (exact reads); prints JSON lines.
_WORKER = r"""
import json, os, resource, sys, threading
limit = int(sys.argv[1])
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from xcsave import streamtools
from xcsave.errors import StreamError
job = json.load(sys.stdin)
def piped(data):
    r, w = os.pipe()
    def feed():
        try:
            for i in range(0, len(data), 65536):
                os.write(w, data[i:i + 65536])
        except OSError:
            pass
        os.close(w)
    t = threading.Thread(target=feed, daemon=True)
    t.start()
    return r, t
def memfd(data):
    fd = os.memfd_create("input")
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
def variants(item):
    whole = open(item["path"], "rb").read()
    for cut in item.get("cuts") or [None]:
        yield cut, whole if cut is None else whole[:cut]
for item, (cut, data) in ((i, v) for i in job["items"] for v in variants(i)):
    for mode in job["modes"]:
        res = {"path": item["path"], "mode": mode, "cut": cut}
        if mode == "pipe":
            src, t = piped(data)
        else:
            src, t = (item["path"] if cut is None else memfd(data)), None
        try:
            if job["op"] == "verify":
                rep = streamtools.inspect(src, item["fmt"], stream_type=item["stream_type"],
                                          width=item.get("width"), guest=item.get("guest"))
                res["ok"] = bool(rep["valid"])
                res["warnings"] = rep["warnings"]
                if rep["error"]:
                    e = rep["error"]
                    res["message"] = f"offset {e['offset']}, record {e['record']}: {e['reason']}"
            else:
                out = item["path"] + ".out"
                try:
                    streamtools.convert(src, out, item["width"], item["guest"], item["out_fmt"],
                                        stream_type=item["stream_type"])
                    res["ok"] = True
                    v = streamtools.inspect(out, item["out_fmt"], stream_type=item["stream_type"])
                    res["output_valid"] = bool(v["valid"])
                    if not v["valid"]:
                        res["message"] = str(v["error"])
                    os.unlink(out)
                except StreamError as e:
                    res["ok"] = False
                    res["message"] = str(e)
                    res["left_output"] = os.path.exists(out)
        except OSError as e:
            res["ok"] = False
            res["oserror"] = f"{e.strerror} ({e.errno})"
        finally:
            if isinstance(src, int):
                os.close(src)
            if t is not None:
                t.join()
        print(json.dumps(res), flush=True)
status = open("/proc/self/status").read()
print(json.dumps({"vmhwm_kib": int(status.split("VmHWM:")[1].split()[0])}), flush=True)
"""


WORKER_CHUNK = 1000  # inputs per worker process: its own bookkeeping stays small


def stream_worker(
    op: str, items: Sequence[dict[str, Any]], modes: Sequence[str] = ("file", "pipe")
) -> list[dict[str, Any]]:
    """Run verify/convert over many inputs in children under RLIMIT_AS."""
    results: list[dict[str, Any]] = []
    limit = python_as_limit() or 0
    for i in range(0, len(items), WORKER_CHUNK):
        job = json.dumps(
            {"op": op, "items": list(items[i : i + WORKER_CHUNK]), "modes": list(modes)}
        )
        proc = subprocess.run(
            [sys.executable, "-P", "-c", _WORKER, str(limit)],
            input=job,
            capture_output=True,
            text=True,
            check=False,
            timeout=1800,
        )
        assert proc.returncode == 0, f"worker died ({proc.returncode}): {proc.stderr[-2000:]}"
        chunk = [json.loads(line) for line in proc.stdout.splitlines()]
        peak = chunk.pop()["vmhwm_kib"]
        if rlimits_usable():
            assert peak < WORKER_RSS_LIMIT_KIB, f"the {op} worker peaked at {peak} KiB"
        results += chunk
    assert len(results) == sum(len(i.get("cuts") or [None]) for i in items) * len(modes)
    for r in results:
        assert "oserror" not in r, r  # the native code never fails with an I/O error here
        for w in r.get("warnings", []):
            for word in MEMORY_WORDS:
                assert word not in w, r
        if not r["ok"]:
            check_one_line(r["message"])
            assert not r.get("left_output"), f"failed convert left its output: {r}"
        elif op == "convert":
            assert r["output_valid"], f"converted output does not verify: {r}"
    return results


# ---------------------------------------------------------------- fixtures

MiB = 1 << 20
SIM_FORMATS = ("libxc", "libxl", "xl")


@dataclasses.dataclass(frozen=True)
class SimStream:
    name: str
    data: bytes
    fmt: str
    stream_type: str
    digest: str  # of the domain it restores to


def build_sim_streams(d: Path) -> dict[str, SimStream]:
    """Small sim domains saved by the helper, in each wrapping, plain and Remus."""
    dom = sim.create(d / "src.dom", 16 * sim.PAGE_SIZE, vcpus=2, seed=11)
    digest = sim.digest(dom)
    out: dict[str, SimStream] = {}

    async def save_all() -> None:
        for fmt in SIM_FORMATS:
            await xcsave.save(d / f"{fmt}.img", sim=dom, fmt=fmt)
            sim.set_state(dom, "running")
            out[fmt] = SimStream(fmt, (d / f"{fmt}.img").read_bytes(), fmt, "plain", digest)
        await xcsave.save(
            d / "remus.img", sim=dom, fmt="libxl", stream_type="remus", checkpoints=2
        )
        sim.set_state(dom, "running")
        out["remus"] = SimStream("remus", (d / "remus.img").read_bytes(), "libxl", "remus", digest)

    asyncio.run(save_all())
    return out


@pytest.fixture(scope="module")
def sim_streams(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SimStream]:
    return build_sim_streams(tmp_path_factory.mktemp("hostile-src"))


@pytest.fixture
def target(tmp_path: Path) -> Path:
    return tmp_path / "target.dom"


# ---------------------------------------------------------------- restore: truncation


@pytest.mark.parametrize("name", ["libxc", "libxl", "xl", "remus"])
def test_restore_truncated_everywhere(
    name: str, sim_streams: dict[str, SimStream], target: Path
) -> None:
    """Cut at every record boundary and inside every record: never a crash, never
    a partial domain.  Only a Remus stream cut after a complete checkpoint is
    accepted (failover to that checkpoint, as Xen does)."""
    s = sim_streams[name]
    fields = walk(s.data, s.fmt)
    cuts = cut_points(s.data, fields)
    with helper_as_limit():
        outcomes = restore_many(
            [s.data[:c] for c in cuts], target, fmt=s.fmt, stream_type=s.stream_type
        )
    accepted = [c for c, o in zip(cuts, outcomes, strict=True) if o.accepted]
    if s.stream_type == "plain":
        assert accepted == [], f"truncated plain streams accepted at {accepted}"
        for o in outcomes:
            assert "truncated" in o.message or "ended" in o.message or "no libxc" in o.message, (
                o.message
            )
    else:
        first_cp_end = next(
            f.end for f in fields if f.record == "CHECKPOINT_END" and f.part == "rhdr"
        )
        assert all(c >= first_cp_end for c in accepted), accepted
        assert accepted, "no cut after the first checkpoint failed over"
    # And a cut the stream never notices: none (every byte matters).
    assert len(outcomes) == len(cuts) > 20


@pytest.mark.parametrize("name", ["libxc", "xl"])
def test_restore_truncated_through_a_pipe(
    name: str, sim_streams: dict[str, SimStream], target: Path
) -> None:
    s = sim_streams[name]
    cuts = record_starts(walk(s.data, s.fmt))[1:]
    with helper_as_limit():
        outcomes = restore_many([s.data[:c] for c in cuts], target, fmt=s.fmt, pipe=True)
    assert not any(o.accepted for o in outcomes)


# ---------------------------------------------------------------- restore: bit flips

#: Fields where a flipped bit legitimately still restores: data the sim
#: stores without interpreting (pages, vCPU blobs), values it ignores (TSC,
#: parameters other than the store/console pfns, the HVM header's other
#: fields, the emulator blob, the xl config, the Xen version in the domain
#: header, the ihdr/dhdr/record reserved words, padding).
ACCEPTABLE_FLIPS = {
    "page-data",
    "vcpu-data",
    "body",  # X86_TSC_INFO and friends: opaque to the sim
    "param-value",
    "param-index",
    "hvm-header",
    "hvm-other",
    "emulator-data",
    "emulator-id",
    "xl-config",
    "xl-fields",
    "dhdr",
    "ihdr",
    "padding",
    "count",
    "hvm-desc",
    # a bigger domain than the pages sent: the rest are zero, as unsent pages
    # are (the saver skips zero pages); a smaller one is refused (pfn range)
    "hvm-sim-pages",
    # a pfn that stays valid: the page lands elsewhere (no restorer can tell);
    # page types 1-4 (page-table levels) mean nothing to an HVM-shaped sim
    "pfn-number",
    "pfn-type",
    # a record type with bit 31 set is optional: skipped, as the spec says
    # (a skipped PAGE_DATA leaves its pages zero; that is the stream's word)
    "rhdr-optional",
    "libxl-option-legacy",
    "libxl-emulator-kind",
}
#: Accepted flips there must show in the restored domain (they are its data
#: or its shape); elsewhere they may be ignored.
CHANGES_THE_DOMAIN = {"page-data", "vcpu-data", "hvm-sim-pages", "pfn-number"}


def flip_sample(data: bytes, n: int, seed: int, fields: Sequence[Field] = ()) -> list[int]:
    """n distinct bits to flip: half anywhere, half (given the stream's fields)
    in its structure -- everything but page and vCPU data, which a uniform
    sample of a sim stream would otherwise hit almost every time."""
    rng = random.Random(seed)
    structural = [
        bit
        for f in fields
        if f.part not in ("page-data", "vcpu-data")
        for bit in range(f.start * 8, f.end * 8)
    ]
    picked = set(rng.sample(structural, min(n // 2, len(structural))))
    rest = [b for b in range(len(data) * 8) if b not in picked]
    picked.update(rng.sample(rest, min(n - len(picked), len(rest))))
    return sorted(picked)


def _bit_part(f: Field, bit: int) -> str:
    """Finer than the field, where one bit decides: pfn words and record types."""
    rel = bit - 8 * f.start
    if f.part == "pfns":
        word_bit = rel % 64  # pfn 0-51, reserved 52-59, type 60-63
        return "pfn-number" if word_bit < 52 else "pfn-reserved" if word_bit < 60 else "pfn-type"
    if f.part == "rhdr" and rel == 31:
        return "rhdr-optional"  # bit 31 of the type: an optional record, skipped
    if f.layer == "libxl" and f.record == "header" and rel == 8 * 15 + 1:
        return "libxl-option-legacy"  # "converted from legacy": informational
    if f.layer == "libxl" and f.part == "rhdr" and f.record.startswith("EMULATOR") and rel == 0:
        return "libxl-emulator-kind"  # context <-> xenstore data: the sim skips both
    return f.part


def restore_flips(s: SimStream, bits: Sequence[int], target: Path) -> Counter[str]:
    """Restore each single-bit mutation; returns accepted flips by field."""
    fields = walk(s.data, s.fmt)
    with helper_as_limit():
        # The cap keeps a flip that grows the domain to gigabytes (legitimate:
        # the pages not sent are zero) from costing a digest of all of them.
        outcomes = restore_many(
            [flip(s.data, b) for b in bits],
            target,
            fmt=s.fmt,
            stream_type=s.stream_type,
            max_pages=4096,
        )
    # Remus: whatever breaks a later checkpoint fails over to an earlier one.
    failover_from = (
        next(f.end for f in fields if f.record == "CHECKPOINT_END")
        if s.stream_type == "remus"
        else len(s.data)
    )
    accepted: Counter[str] = Counter()
    for bit, o in zip(bits, outcomes, strict=True):
        if not o.accepted:
            continue
        f = field_at(fields, bit // 8)
        f = dataclasses.replace(f, part=_bit_part(f, bit))
        accepted[f"{f.record}/{f.part}"] += 1
        if bit // 8 >= failover_from:
            continue
        assert f.part in ACCEPTABLE_FLIPS, f"flip of bit {bit} ({f}) accepted"
        if s.stream_type != "plain":
            continue  # a later checkpoint may overwrite what the flip changed
        if f.part in CHANGES_THE_DOMAIN:
            assert o.digest != s.digest, f"flip of bit {bit} ({f}) accepted, domain unchanged"
    return accepted


@pytest.mark.parametrize("name", ["libxc", "libxl", "xl", "remus"])
def test_restore_bit_flips(name: str, sim_streams: dict[str, SimStream], target: Path) -> None:
    s = sim_streams[name]
    bits = flip_sample(s.data, CI_FLIPS, seed=7, fields=walk(s.data, s.fmt))
    accepted = restore_flips(s, bits, target)
    # Most of a stream is page data: flips there are accepted, as data.
    assert accepted, "no flip accepted at all (page data flips should be)"


# ---------------------------------------------------------------- restore: crafted fields


def _sim_parts(data: bytes) -> tuple[bytes, list[bytes], bytes]:
    """A bare libxc sim stream as (ihdr+dhdr, [records...], b"")."""
    head, pos, recs = data[:40], 40, []
    while pos < len(data):
        rtype, length = struct.unpack_from("<II", data, pos)
        end = pos + 8 + _pad(length)
        recs.append(data[pos:end])
        pos = end
        if rtype == 0:
            break
    return head, recs, data[pos:]


def _rtype(r: bytes) -> int:
    return int(struct.unpack_from("<I", r)[0])


def _with(recs: list[bytes], rtype: int, new: bytes | Callable[[bytes], bytes]) -> list[bytes]:
    """recs with the first record of rtype replaced."""
    out, done = [], False
    for r in recs:
        if not done and _rtype(r) == rtype:
            out.append(new(r) if callable(new) else new)
            done = True
        else:
            out.append(r)
    assert done, f"no record 0x{rtype:x}"
    return out


def _before_end(recs: list[bytes], extra: bytes) -> list[bytes]:
    return [*recs[:-1], extra, recs[-1]]


def _hvm_ctx_with(r: bytes, *, nr_pages: int | None = None, nr_vcpus: int | None = None) -> bytes:
    body = bytearray(r[8:])
    p = 0
    while p + 8 <= len(body):
        code, _inst, dlen = struct.unpack_from("<HHI", body, p)
        if code == 0x78:
            if nr_pages is not None:
                struct.pack_into("<Q", body, p + 8 + 16, nr_pages)
            if nr_vcpus is not None:
                struct.pack_into("<I", body, p + 8 + 24, nr_vcpus)
        p += 8 + dlen
        if code == 0:
            break
    return r[:8] + bytes(body)


def crafted_cases(libxc: bytes) -> list[tuple[str, bytes, bool, str]]:
    """(name, stream, accepted?, substring of the rejection) from a bare sim stream."""
    head, recs, _ = _sim_parts(libxc)
    pages = [r for r in recs if _rtype(r) == corpus.PAGE_DATA]
    first = pages[0]
    count = struct.unpack_from("<I", first, 8)[0]
    pfn0 = struct.unpack_from("<Q", first, 16)[0]
    # The records up to the first PAGE_DATA (the static data, STATIC_DATA_END
    # and one batch): a huge record after them is where the body never comes.
    lead = recs[: recs.index(first) + 1]

    def page_rec(words: Sequence[int], ndata: int, count_field: int | None = None) -> bytes:
        body = struct.pack("<II", len(words) if count_field is None else count_field, 0)
        body += b"".join(struct.pack("<Q", w) for w in words) + b"\x5a" * (4096 * ndata)
        return corpus.rec(corpus.PAGE_DATA, body)

    def stream(rs: list[bytes]) -> bytes:
        return head + b"".join(rs)

    big = 128 << 20  # XCS_REC_LENGTH_MAX, libxc's cap too
    c: list[tuple[str, bytes, bool, str]] = [
        ("unmodified", stream(recs), True, ""),
        # record lengths at and past the 128 MiB cap; the body never comes
        (
            "length-at-cap",
            stream([*lead, struct.pack("<II", corpus.X86_TSC_INFO, big)]),
            False,
            "truncated",
        ),
        (
            "length-past-cap",
            stream([*lead, struct.pack("<II", corpus.X86_TSC_INFO, big + 1)]),
            False,
            "exceeds",
        ),
        (
            "length-max-u32",
            stream([*lead, struct.pack("<II", corpus.HVM_CONTEXT, 0xFFFFFFFF)]),
            False,
            "exceeds",
        ),
        (
            "page-length-at-cap",
            stream([*lead, struct.pack("<II", corpus.PAGE_DATA, big)]),
            False,
            "PAGE_DATA",
        ),
        # batch counts: 0, the cap 1024 (valid), past it, huge
        ("count-zero", stream(_with(recs, corpus.PAGE_DATA, page_rec([], 0))), False, "batch"),
        (
            "count-1025",
            stream(_with(recs, corpus.PAGE_DATA, page_rec([pfn0] * 1025, 1025))),
            False,
            "batch of 1025",
        ),
        (
            "count-huge",
            stream(_with(recs, corpus.PAGE_DATA, page_rec([pfn0], 1, count_field=0xFFFFFFFF))),
            False,
            "batch",
        ),
        (
            "count-too-short",
            stream(_with(recs, corpus.PAGE_DATA, page_rec([pfn0], 1, count_field=count + 5))),
            False,
            "PAGE_DATA",
        ),
        # pfns: out of the domain (16 pages), past the engine's page cap,
        # reserved bits, invalid types; duplicates (valid: the later copy wins)
        (
            "pfn-out-of-domain",
            stream(_with(recs, corpus.PAGE_DATA, page_rec([16], 1))),
            False,
            "pfn",
        ),
        (
            "pfn-past-cap",
            stream(_with(recs, corpus.PAGE_DATA, page_rec([1 << 40], 1))),
            False,
            "out of range",
        ),
        (
            "pfn-max",
            stream(_with(recs, corpus.PAGE_DATA, page_rec([(1 << 52) - 1], 1))),
            False,
            "out of range",
        ),
        (
            "pfn-reserved-bits",
            stream(_with(recs, corpus.PAGE_DATA, page_rec([1 << 55], 1))),
            False,
            "reserved",
        ),
        (
            "pfn-bad-type",
            stream(_with(recs, corpus.PAGE_DATA, page_rec([5 << 60], 1))),
            False,
            "type",
        ),
        ("pfn-dup-in-batch", stream(_before_end(recs, page_rec([3, 3], 2))), True, ""),
        ("pfn-xtab-only", stream(_before_end(recs, page_rec([0xF << 60 | 99], 0))), True, ""),
        # shape in HVM_CONTEXT: at and past the caps
        (
            "vcpus-129",
            stream(_with(recs, corpus.HVM_CONTEXT, lambda r: _hvm_ctx_with(r, nr_vcpus=129))),
            False,
            "vCPU",
        ),
        (
            "vcpus-0",
            stream(_with(recs, corpus.HVM_CONTEXT, lambda r: _hvm_ctx_with(r, nr_vcpus=0))),
            False,
            "vCPU",
        ),
        (
            "pages-0",
            stream(_with(recs, corpus.HVM_CONTEXT, lambda r: _hvm_ctx_with(r, nr_pages=0))),
            False,
            "HVM_CONTEXT",
        ),
        (
            "pages-2^24+1",
            stream(
                _with(recs, corpus.HVM_CONTEXT, lambda r: _hvm_ctx_with(r, nr_pages=(1 << 24) + 1))
            ),
            False,
            "pages",
        ),
        (
            "pages-u64-max",
            stream(
                _with(recs, corpus.HVM_CONTEXT, lambda r: _hvm_ctx_with(r, nr_pages=(1 << 64) - 1))
            ),
            False,
            "pages",
        ),
        (
            "pages-below-sent",
            stream(_with(recs, corpus.HVM_CONTEXT, lambda r: _hvm_ctx_with(r, nr_pages=2))),
            False,
            "pfn",
        ),
        (
            "hvm-params-count-huge",
            stream(
                _with(
                    recs,
                    corpus.HVM_PARAMS,
                    corpus.rec(corpus.HVM_PARAMS, struct.pack("<II", 0xFFFFFFF, 0)),
                )
            ),
            False,
            "HVM_PARAMS",
        ),
        # unknown records
        (
            "unknown-mandatory",
            stream(_before_end(recs, corpus.rec(0x13, b"x" * 8))),
            False,
            "unknown mandatory record",
        ),
        (
            "unknown-mandatory-max",
            stream(_before_end(recs, corpus.rec(0x7FFFFFFF))),
            False,
            "unknown mandatory record",
        ),
        (
            "pv-record-in-hvm",
            stream(_before_end(recs, corpus.rec(corpus.X86_PV_INFO, b"\0" * 8))),
            False,
            "not valid",
        ),
        ("unknown-optional", stream(_before_end(recs, corpus.rec(0x80000013, b"opt"))), True, ""),
        (
            "checkpoint-in-plain",
            stream(_before_end(recs, corpus.rec(corpus.CHECKPOINT))),
            False,
            "checkpoint",
        ),
        # padding is not the restorer's business (Xen's does not look either);
        # `xcsave verify` rejects it
        (
            "non-zero-padding",
            stream(_before_end(recs, corpus.rec(0x80000001, b"abc", fill=0xFF))),
            True,
            "",
        ),
        ("no-end", stream(recs[:-1]), False, "truncated"),
        (
            "end-with-length",
            stream([*recs[:-1], corpus.rec(corpus.END, b"12345678")]),
            False,
            "END at offset",
        ),
        ("bytes-after-end", stream(recs) + b"garbage!", True, ""),
    ]
    return c


def test_restore_crafted_fields(sim_streams: dict[str, SimStream], target: Path) -> None:
    cases = crafted_cases(sim_streams["libxc"].data)
    with helper_as_limit():
        outcomes = restore_many([d for _, d, _, _ in cases], target, fmt="libxc", max_pages=4096)
    for (name, _, ok, why), o in zip(cases, outcomes, strict=True):
        assert o.accepted == ok, f"{name}: {o}"
        if not ok:
            assert why in o.message, f"{name}: {o.message!r} lacks {why!r}"


def test_restore_crafted_fields_through_a_pipe(
    sim_streams: dict[str, SimStream], target: Path
) -> None:
    cases = [
        c for c in crafted_cases(sim_streams["libxc"].data) if "cap" in c[0] or "huge" in c[0]
    ]
    with helper_as_limit():
        outcomes = restore_many([d for _, d, _, _ in cases], target, fmt="libxc", pipe=True)
    for (name, _, ok, why), o in zip(cases, outcomes, strict=True):
        assert o.accepted == ok and why in o.message, f"{name}: {o}"


def wrapped_cases(sim_streams: dict[str, SimStream]) -> list[tuple[str, bytes, str, str]]:
    """(name, stream, format, substring of the rejection): the libxl and xl
    layers' lengths, unknown records and headers, all refused."""
    xl = sim_streams["xl"].data
    libxl = sim_streams["libxl"].data
    xl_fields = walk(xl, "xl")
    cfg = next(f for f in xl_fields if f.part == "xl-config")
    libxl_end = libxl[:-8]  # without the final libxl END

    def xl_optlen(n: int) -> bytes:
        return xl[:44] + struct.pack("<I", n) + xl[48:]

    cases = [
        ("xl-optlen-16MiB+1", xl_optlen((16 << 20) + 1), "xl", "exceeds"),
        ("xl-optlen-u32-max", xl_optlen(0xFFFFFFFF), "xl", "exceeds"),
        ("xl-optlen-16MiB", xl_optlen(16 << 20), "xl", "truncated"),
        ("xl-bad-magic", b"Y" + xl[1:], "xl", "magic"),
        ("xl-legacy-flag", xl[:36] + struct.pack("<I", 1) + xl[40:], "xl", "legacy"),
        ("xl-unknown-mflag", xl[:36] + struct.pack("<I", 0x83) + xl[40:], "xl", "flags"),
        ("xl-short-config", xl[: cfg.start + 3], "xl", "truncated"),
        ("libxl-bad-ident", b"\0" + libxl[1:], "libxl", "ident"),
        ("libxl-version-3", libxl[:8] + struct.pack(">I", 3) + libxl[12:], "libxl", "version"),
        ("libxl-options", libxl[:12] + struct.pack(">I", 4) + libxl[16:], "libxl", "options"),
        (
            "libxl-unknown-record",
            libxl_end + corpus.rec(6, b"x") + corpus.rec(0),
            "libxl",
            "not valid",
        ),
        ("libxl-emulator-huge", libxl_end + struct.pack("<II", 3, 1 << 27), "libxl", "truncated"),
        (
            "libxl-emulator-short",
            libxl_end + corpus.rec(3, b"1234") + corpus.rec(0),
            "libxl",
            "too short",
        ),
        ("libxl-end-with-body", libxl_end + corpus.rec(0, b"12345678"), "libxl", "length"),
        ("libxl-no-end", libxl_end, "libxl", "truncated"),
    ]
    return cases


def test_restore_wrapped_fields(sim_streams: dict[str, SimStream], target: Path) -> None:
    """The libxl and xl layers: lengths, unknown records, headers."""
    cases = wrapped_cases(sim_streams)
    with helper_as_limit():
        for name, data, fmt, why in cases:
            o = asyncio.run(restore_one(data, target, fmt=fmt))
            assert not o.accepted, name
            assert why in o.message, f"{name}: {o.message!r} lacks {why!r}"


def test_restore_max_pages_refuses_a_bigger_domain(
    sim_streams: dict[str, SimStream], target: Path
) -> None:
    s = sim_streams["libxc"]
    ok = asyncio.run(restore_one(s.data, target, fmt="libxc", max_pages=16))
    assert ok.accepted and ok.digest == s.digest
    o = asyncio.run(restore_one(s.data, target, fmt="libxc", max_pages=15))
    assert not o.accepted and "ERANGE" in o.message, o.message


def test_restore_garbage_of_every_size(target: Path) -> None:
    rng = random.Random(3)
    inputs = [b"", b"\0", b"\xff" * 7, *(rng.randbytes(n) for n in (8, 40, 41, 4096, 70000))]
    with helper_as_limit():
        for fmt in SIM_FORMATS:
            for o in restore_many(inputs, target, fmt=fmt):
                assert not o.accepted


# ---------------------------------------------------------------- restore: the CLI


@pytest.mark.parametrize(
    ("case", "pipe"),
    [("unmodified", False), ("length-at-cap", True), ("pfn-out-of-domain", False),
     ("unknown-mandatory", True), ("vcpus-129", False), ("no-end", True)],
)  # fmt: skip
def test_restore_cli_one_line(
    case: str, pipe: bool, sim_streams: dict[str, SimStream], tmp_path: Path
) -> None:
    """``xcsave restore - --sim DOM``: one line, no traceback, bounded memory."""
    _, data, ok, why = next(c for c in crafted_cases(sim_streams["libxc"].data) if c[0] == case)
    target = tmp_path / "t.dom"
    run = run_bounded(
        cli_argv("restore", "-", "--sim", target, "--max-pages", "4096"),
        stdin=data,
        stdin_pipe=pipe,
    )
    check_clean(run)
    assert (run.returncode == 0) == ok, run
    if not ok:
        assert run.lines()[0].startswith("xcsave: restore: "), run.stderr
        assert why in run.stderr, run.stderr
        assert _leftovers(target) == []


# ---------------------------------------------------------------- verify and convert

V2_CASES = [c for c in corpus_cases.cases() if c.fmt != "legacy"]
LEGACY_CASES = [c for c in corpus_cases.cases() if c.fmt == "legacy"]


def _write_inputs(tmp: Path, named: Sequence[tuple[str, bytes]]) -> list[Path]:
    paths = []
    for i, (name, data) in enumerate(named):
        p = tmp / f"{i:05d}-{name}"
        p.write_bytes(data)
        paths.append(p)
    return paths


def _mutants(name: str, data: bytes, flips: int, rng: random.Random) -> list[tuple[str, bytes]]:
    """``flips`` random single-bit flips of data and 20 random truncations."""
    bits = rng.sample(range(len(data) * 8), min(flips, len(data) * 8))
    cuts = rng.sample(range(len(data)), min(20, len(data)))
    return [(f"{name}-bit{bit}", flip(data, bit)) for bit in bits] + [
        (f"{name}-cut{cut}", data[:cut]) for cut in cuts
    ]


def verify_mutants(tmp: Path, flips_per_stream: int, seed: int) -> tuple[int, Counter[str]]:
    """Bit flips and truncations of every v2 corpus stream through the verifier."""
    items: list[dict[str, Any]] = []
    rng = random.Random(seed)
    for case in V2_CASES:
        for p in _write_inputs(tmp, _mutants(case.name, case.data, flips_per_stream, rng)):
            items.append({"path": str(p), "fmt": "auto", "stream_type": case.stream_type})
    results = stream_worker("verify", items)
    verdicts: Counter[str] = Counter("valid" if r["ok"] else "invalid" for r in results)
    for item in items:
        os.unlink(item["path"])
    return len(items), verdicts


def test_verify_truncated_everywhere(tmp_path: Path) -> None:
    """Every valid v2 corpus stream cut at every record boundary and inside
    every field: always invalid, one line; a Remus stream cut after a
    complete checkpoint is valid (failover), as Xen's restore would take it."""
    items = []
    for case in V2_CASES:
        if not case.ok:
            continue
        fields = walk(case.data, case.fmt)
        path = tmp_path / case.name
        path.write_bytes(case.data)
        items.append(
            {
                "path": str(path),
                "fmt": case.fmt,
                "stream_type": case.stream_type,
                "cuts": cut_points(case.data, fields),
            }
        )
    results = stream_worker("verify", items)
    assert len(results) > 2000
    for r in results:
        if r["ok"]:
            assert "remus" in r["path"], f"a truncated stream verified: {r}"


def convert_truncations(tmp_path: Path, cut_step: int) -> int:
    """Small legacy streams of each kind cut every cut_step bytes (and at odd
    offsets): every conversion fails with one line and leaves no output, or
    (a Remus stream cut after its first image) fails over.  Returns the count."""
    items = []
    for guest in ("pv", "hvm"):
        for width in (32, 64):
            for checkpoints in (1, 2):
                data = corpus.tiny_legacy(guest, width).build(checkpoints)
                path = tmp_path / f"legacy-{guest}{width}-{checkpoints}"
                path.write_bytes(data)
                items.append(
                    {
                        "path": str(path),
                        "width": width,
                        "guest": guest,
                        "out_fmt": "libxl",
                        "stream_type": "remus" if checkpoints > 1 else "plain",
                        "cuts": sorted(
                            {*range(0, len(data), cut_step), *range(1, len(data), 509)}
                        ),
                    }
                )
    results = stream_worker("convert", items)
    for r in results:
        if r["ok"]:
            assert r["path"].endswith("-2"), f"a truncated legacy stream converted: {r}"
    return len(results)


def test_convert_truncated_everywhere(tmp_path: Path) -> None:
    assert convert_truncations(tmp_path, cut_step=61) > 1000  # stress-faults: every byte


def test_verify_mutated_corpus(tmp_path: Path) -> None:
    n, verdicts = verify_mutants(tmp_path, flips_per_stream=CI_FLIPS // 4, seed=1)
    assert n > 1000 and verdicts["invalid"] > 0


def test_verify_hostile_lengths(tmp_path: Path) -> None:
    """Lengths and pfns that would size an allocation if trusted."""
    hvm = corpus.libxc_hvm(3, pfns=(0, 1))
    head = hvm[:40] + corpus.cpuid_policy() + corpus.msr_policy() + corpus.sde()
    libxl = corpus.libxl_hdr()
    inputs = [
        ("libxc-length-at-cap", head + struct.pack("<II", corpus.HVM_CONTEXT, 128 << 20), "libxc"),
        ("libxc-length-u32", head + struct.pack("<II", corpus.HVM_CONTEXT, 0xFFFFFFFF), "libxc"),
        ("libxc-page-len-u32", head + struct.pack("<II", corpus.PAGE_DATA, 0xFFFFFFF8), "libxc"),
        ("libxl-length-u32", libxl + struct.pack("<II", 2, 0xFFFFFFF0), "libxl"),
        ("libxl-length-wraps", libxl + struct.pack("<II", 1, 0xFFFFFFFD) + b"\0" * 8, "libxl"),
        ("libxl-emulator-u32", libxl + struct.pack("<II", 3, 0xFFFFFFF0) + b"\0" * 8, "libxl"),
        ("pfn-2^30-1", head + corpus.page_data([((1 << 30) - 1, 0)])[:24], "libxc"),
        ("pfn-spread", head + corpus.page_data([(i << 15, 0) for i in range(1024)])[:8 + 8 + 8192],
         "libxc"),
        ("xl-optlen-u32", corpus.XL_MAGIC + struct.pack("<IIII", 0x01020304, 3, 0, 0xFFFFFFF0),
         "xl"),
    ]  # fmt: skip
    items = [
        {"path": str(p), "fmt": fmt, "stream_type": "plain"}
        for p, (_, _, fmt) in zip(
            _write_inputs(tmp_path, [(n, d) for n, d, _ in inputs]), inputs, strict=True
        )
    ]
    for r in stream_worker("verify", items):
        assert not r["ok"], r
        assert any(w in r["message"] for w in ("truncated", "exceeds", "limit", "that long")), r


def convert_mutants(tmp: Path, flips_per_stream: int, seed: int) -> tuple[int, Counter[str]]:
    items: list[dict[str, Any]] = []
    rng = random.Random(seed)
    for case in LEGACY_CASES:
        for p in _write_inputs(tmp, _mutants(case.name, case.data, flips_per_stream, rng)):
            items.append(
                {
                    "path": str(p),
                    "width": case.width or 64,
                    "guest": case.guest or "pv",
                    "out_fmt": "libxl",
                    "stream_type": case.stream_type,
                }
            )
    results = stream_worker("convert", items)
    for item in items:
        os.unlink(item["path"])
    return len(items), Counter("ok" if r["ok"] else "rejected" for r in results)


def test_convert_mutated_legacy(tmp_path: Path) -> None:
    """Every successful conversion of a mutant verifies; every failure is a line."""
    n, verdicts = convert_mutants(tmp_path, flips_per_stream=CI_FLIPS // 4, seed=2)
    assert n > 300 and verdicts["rejected"] > 0


@pytest.mark.parametrize("pipe", [False, True])
def test_verify_and_convert_cli_one_line(tmp_path: Path, pipe: bool) -> None:
    bad = corpus.libxc_hvm(3)[:1000]
    run = run_bounded(cli_argv("verify", "-"), stdin=bad, stdin_pipe=pipe)
    check_clean(run)
    assert run.returncode == 1 and "truncated" in run.stderr
    legacy = next(c for c in LEGACY_CASES if c.name == "legacy-pv").data
    out = tmp_path / "o.img"
    run = run_bounded(
        cli_argv("convert", "-", out, "--width", "64", "--guest", "pv"),
        stdin=legacy[: len(legacy) // 2],
        stdin_pipe=pipe,
    )
    check_clean(run)
    assert run.returncode == 1 and not out.exists()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the helper's boundaries


def helper_run(args: Sequence[str], stdin: bytes = b"") -> Run:
    return run_bounded([str(helper_path()), *args], stdin=stdin, as_limit=None, timeout=30)


HOSTILE_ARGV: list[tuple[list[str], str]] = [
    (["--xcsave-1", "save", "--io-fd", "-3"], "io-fd"),
    (["--xcsave-1", "save", "--io-fd", " -3"], "io-fd"),
    (["--xcsave-1", "save", "--io-fd", "99999999999999999999"], "io-fd"),
    (["--xcsave-1", "save", "--io-fd", "2147483648"], "io-fd"),
    (["--xcsave-1", "save", "--io-fd", "1000"], "not open"),
    (["--xcsave-1", "save", "--io-fd", "1e3"], "io-fd"),
    (["--xcsave-1", "save", "--io-fd", ""], "io-fd"),
    (["--xcsave-1", "save", "--io-fd", "0x"], "io-fd"),
    (["--xcsave-1", "save"], "--io-fd is required"),
    (["--xcsave-1", "save", "--io-fd", "3", "--domid", "-1"], "domid"),
    (["--xcsave-1", "save", "--io-fd", "3", "--domid", "4294967296"], "domid"),
    (["--xcsave-1", "save", "--io-fd", "3", "--cbflags", "-1"], "cbflags"),
    (["--xcsave-1", "save", "--io-fd", "3", "--stream-type", "3"], "stream-type"),
    (["--xcsave-1", "restore", "--io-fd", "3", "--max-pages", str(1 << 41)], "max-pages"),
    (["--xcsave-1", "restore", "--io-fd", "3", "--max-pages", "-1"], "max-pages"),
    (["--xcsave-1", "save", "--io-fd", "3", "--checkpoints", str((1 << 20) + 1)], "checkpoints"),
    (["--xcsave-1", "save", "--io-fd", "3", "--interval-ms", "3600001"], "interval-ms"),
    (["--xcsave-1", "save", "--io-fd", "3", "--copy-threads", "0"], "copy-threads"),
    (["--xcsave-1", "save", "--io-fd", "3", "--copy-threads", "65"], "copy-threads"),
    (["--xcsave-1", "save", "--io-fd", "3", "--copy-threads", "-2"], "copy-threads"),
    (["--xcsave-1", "save", "--io-fd", "3", "--copy-threads", "2x"], "copy-threads"),
    (["--xcsave-1", "restore", "--io-fd", "3", "--idle-timeout-ms", "-1"], "idle-timeout-ms"),
    (["--xcsave-1", "restore", "--io-fd", "3", "--idle-timeout-ms", "86400001"],
     "idle-timeout-ms"),
    (["--xcsave-1", "save", "--io-fd", "3", "--idle-timeout-ms", "1e3"], "idle-timeout-ms"),
    (["--xcsave-1", "restore", "--io-fd", "3", "--legacy-width", "48"], "legacy-width"),
    (["--xcsave-1", "restore", "--io-fd", "3", "--legacy-guest", "hvm\n"], "legacy-guest"),
    (["--xcsave-1", "save", "--io-fd", "3", "--format", "qcow2"], "format"),
    (["--xcsave-1", "save", "--io-fd", "3", "--aux-fd", "-2"], "aux-fd"),
    (["--xcsave-1", "save", "--io-fd", "3", "--aux-fd", "77"], "not open"),
    (["--xcsave-1", "save", "--io-fd", "3", "--bogus", "1"], "unknown"),
    (["--xcsave-1", "save", "--io-fd"], "incomplete"),
    (["--xcsave-1", "save", "--io-fd", "3", "extra"], "unexpected argument"),
    (["--xcsave-1", "copy"], "mode"),
    (["--xcsave-1"], "mode"),
    ([], "mode"),
    (["--frobnicate"], "mode"),
    (["--save-domain", "3", "-1", "1", "0", "0"], "6 arguments"),
    (["--save-domain", "3", "-1", "1", "0", "0", "0", "0"], "6 arguments"),
    (["--save-domain", "-5", "-1", "1", "0", "0", "0"], "io_fd"),
    (["--save-domain", "3", "-1", "1", "0", "0", "7"], "stream_type"),
    (["--save-domain", "3", "-1", "99999999999", "0", "0", "0"], "domid"),
    (["--restore-domain", "3", "-1", "1", "0", "0", "0", "0", "768"], "9 arguments"),
    (["--restore-domain", "3", "-1", "1", "-1", "0", "0", "0", "768", "0"], "store_evtchn"),
    (["--restore-domain", "12345", "-1", "1", "0", "0", "0", "0", "768", "0"], "not open"),
    (["--xcsave-1", "save", "--io-fd", "3", "--sim", "/x", "--xl-config", "/x\n\x1b[2J"],
     ""),  # a valid argv: fails later, in the backend (complete with an error)
]  # fmt: skip


@pytest.mark.parametrize(("args", "why"), HOSTILE_ARGV, ids=lambda v: repr(v)[:60])
def test_helper_refuses_hostile_argv(args: list[str], why: str) -> None:
    """Bad argv: exit 255 and one line on stderr naming the argument (Xen: fail())."""
    run = helper_run(args)
    assert run.returncode >= 0, run
    lines = run.lines()
    if not why:
        return  # argv accepted; the operation itself fails (see the sim tests)
    assert run.returncode == 255, run
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("xcsave-helper: "), run.stderr
    assert why in lines[0], run.stderr


def test_helper_argv_with_control_characters_is_one_line() -> None:
    run = helper_run(["\x01\n\x1b[31mred\r\n"])
    assert run.returncode == 255
    assert len(run.stderr.splitlines()) == 1, repr(run.stderr)
    assert "\x1b" not in run.stderr


@pytest.mark.parametrize("fd", ["0", "1", "2"])
def test_helper_refuses_its_control_pipes_as_the_stream(fd: str) -> None:
    """io_fd 0-2 would mix the migration stream into the protocol pipes."""
    run = helper_run(["--xcsave-1", "save", "--io-fd", fd, "--sim", "/nonexistent"])
    assert run.returncode == 255, run
    assert len(run.lines()) == 1 and "io-fd" in run.stderr, run.stderr
    run = helper_run(["--save-domain", fd, "-1", "1", "0", "0", "0"])
    assert run.returncode == 255 and "io_fd" in run.stderr, run.stderr


def test_helper_reply_pipe_closed_or_garbage(tmp_path: Path) -> None:
    """Replies that never come (EOF) exit 254; short replies too; never a signal."""
    dom = sim.create(tmp_path / "d.dom", 8 * sim.PAGE_SIZE, seed=1)
    out = tmp_path / "o.img"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.set_inheritable(fd, True)
        args = ["--xcsave-1", "save", "--io-fd", str(fd), "--sim", str(dom), "--cbflags", "8"]
        for replies in (b"", b"\x01", b"\x01\x00\x00"):
            proc = subprocess.run(
                [str(helper_path()), *args],
                input=replies,
                capture_output=True,
                pass_fds=(fd,),
                check=False,
                timeout=30,
            )
            assert proc.returncode == 254, proc
            assert len(proc.stderr.splitlines()) == 1, proc.stderr
            assert b"suspend" in proc.stderr
            sim.set_state(dom, "running")
    finally:
        os.close(fd)


def test_helper_found_without_path_and_never_through_a_shell(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bundled helper is found by package location, never via $PATH or a shell."""
    fake = tmp_path / "bin" / "xcsave-helper"
    fake.parent.mkdir()
    marker = tmp_path / "fake-ran"
    fake.write_text(f"#!/bin/sh\ntouch {marker}\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    monkeypatch.setenv("SHELL", str(fake))
    monkeypatch.delenv("XCSAVE_HELPER", raising=False)
    monkeypatch.delenv("XCSAVE_HELPER_WRAPPER", raising=False)
    seen: list[tuple[str, ...]] = []
    real_exec = asyncio.create_subprocess_exec

    async def spy_exec(*argv: Any, **kw: Any) -> Any:
        seen.append(tuple(map(str, argv)))
        assert kw.get("shell") in (None, False)
        return await real_exec(*argv, **kw)

    async def no_shell(*a: Any, **kw: Any) -> Any:
        raise AssertionError("the helper must never be run through a shell")

    monkeypatch.setattr(asyncio, "create_subprocess_exec", spy_exec)
    monkeypatch.setattr(asyncio, "create_subprocess_shell", no_shell)
    dom = sim.create(tmp_path / "d.dom", 8 * sim.PAGE_SIZE, seed=1)
    res = asyncio.run(xcsave.save(tmp_path / "o.img", sim=dom))
    assert res.backend == "sim"
    assert not marker.exists()
    assert len(seen) == 1
    argv0 = Path(seen[0][0])
    assert argv0.is_absolute() and argv0 == helper_path()
    assert argv0.parent == Path(xcsave.__file__).parent


def _fd_targets(pid: int) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return out


@pytest.mark.parametrize("mode", ["save", "restore"])
def test_sim_helper_gets_only_the_fds_it_needs(mode: str, tmp_path: Path) -> None:
    """Seen from /proc while the helper waits for a callback: its pipes, stderr,
    the stream, and what it opened itself (the domain, /dev/null for SIGTERM);
    no other fd of ours, not even an inheritable one."""
    leak_path = tmp_path / "leak-marker"
    leak = os.open(leak_path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.set_inheritable(leak, True)
    dom = sim.create(tmp_path / "d.dom", 8 * sim.PAGE_SIZE, seed=2)
    img = tmp_path / "d.img"
    asyncio.run(xcsave.save(img, sim=dom))
    sim.set_state(dom, "running")
    seen: dict[int, str] = {}
    pids: list[int] = []

    def grab() -> None:
        kids = _helper_children()
        assert len(kids) == 1
        pids.append(kids[0])
        seen.update(_fd_targets(kids[0]))

    def suspend() -> int:
        grab()
        return 1

    def static_data_done(missing: int) -> int:
        grab()
        return 0

    try:
        if mode == "save":
            cbs = xcsave.Callbacks(suspend=suspend)
            asyncio.run(xcsave.save(tmp_path / "o.img", sim=dom, callbacks=cbs))
            # The domain's lock, handed on so that it outlives a killed toolstack.
            allowed = {str(tmp_path / "o.img"), str(dom), str(tmp_path / ".d.dom.lock")}
        else:
            cbs = xcsave.Callbacks(static_data_done=static_data_done)
            asyncio.run(xcsave.restore(img, sim=tmp_path / "r.dom", callbacks=cbs))
            allowed = {str(img), str(tmp_path / ".r.dom.lock")}
    finally:
        os.close(leak)
    assert seen, "the callback never ran"
    assert str(leak_path) not in seen.values()
    assert {0, 1, 2} <= set(seen)
    for fd, what in seen.items():
        if fd <= 2:
            assert what.startswith("pipe:"), (fd, what)
            continue
        ok = (
            what in allowed
            or what == "/dev/null"
            or ".partial." in what
            or (mode == "restore" and what.startswith(f"{tmp_path}/#"))  # O_TMPFILE target
            or (mode == "save" and ".xcsave-tmp." in what)
        )
        assert ok, f"helper fd {fd} -> {what}"


def _helper_children() -> list[int]:
    kids: list[int] = []
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):
            kids += [int(x) for x in Path(f"/proc/self/task/{task}/children").read_text().split()]
    return [k for k in kids if b"xcsave-helper" in _cmdline(k)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


# ---------------------------------------------------------------- replies from a hostile parent


@pytest.fixture(scope="module")
def reply_dom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sim.create(tmp_path_factory.mktemp("replies") / "d.dom", 64 * sim.PAGE_SIZE, seed=4)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    replies=st.lists(st.integers(min_value=-(2**31), max_value=2**31 - 1), max_size=8),
    cut=st.integers(min_value=0, max_value=40),
)
def test_helper_under_random_replies(
    replies: list[int], cut: int, reply_dom: Path, tmp_path: Path
) -> None:
    """A live save helper answered by arbitrary ints (then EOF, possibly mid-int):
    it exits 0 after complete or 254 after EOF, says at most one line, and
    whatever it was told, the source ends running with log-dirty off unless
    the save completed and complete was answered 0, "committed" (then
    suspended, as a finished save leaves it); any other answer, or none, is
    "not committed" and the helper puts the source back."""
    stdin = b"".join(struct.pack("=i", r) for r in replies)[: len(replies) * 4 - cut % 4]
    out = tmp_path / "o.img"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        args = ["--xcsave-1", "save", "--io-fd", str(fd), "--sim", str(reply_dom), "--flags", "1"]
        proc = subprocess.run(
            [str(helper_path()), *args, "--cbflags", str(8 | 2048)],
            input=stdin,
            capture_output=True,
            pass_fds=(fd,),
            check=False,
            timeout=60,
        )
    finally:
        os.close(fd)
    assert proc.returncode in (0, 254), proc
    assert len(proc.stderr.splitlines()) <= 1, proc.stderr
    frames = list(_decode(proc.stdout))
    complete = [f for f in frames if f.name == "complete"]
    info = sim.info(reply_dom)
    assert info["logdirty"] is False, (replies, cut, info)
    asks = [f for f in frames if f.spec.needs_reply]  # each takes the next reply
    answers = len(stdin) // 4
    committed = (
        bool(complete)
        and complete[0].args[0] == 0
        and asks.index(complete[0]) < answers
        and replies[asks.index(complete[0])] == 0
    )
    if committed:
        assert info["state"] == "suspended"
        sim.set_state(reply_dom, "running")
    else:
        assert info["state"] == "running", (replies, cut, info)


def _decode(data: bytes) -> Iterator[proto.Frame]:
    dec = proto.Decoder(proto.XCSAVE_1, "save")
    dec.feed(data)
    yield from dec
