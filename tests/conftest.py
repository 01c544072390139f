"""Shared pytest fixtures for xcsave's tests.

Each group of fixtures lives in its own clearly marked section; add new
groups below the existing ones rather than inside them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------
# fakexen: the hypervisor stand-in and Xen 4.17's own tools
#
# fakexen.so is preloaded under a helper binary (Debian's stock
# libxl-save-helper, or xcsave's own helper) in place of libxc's
# xc_interface_open/close and xc_domain_save/restore; see
# tests/fakexen/README.md for what it simulates and its FAKEXEN_* knobs.
# xen-utils-4.17 supplies the stock helper and verify-stream-v2; it is
# fetched by tools/fetch-xen-utils.sh unless XCSAVE_XEN_UTILS names an
# unpacked copy.
# ---------------------------------------------------------------------------

FAKEXEN_SRC = REPO_ROOT / "tests" / "fakexen" / "fakexen.c"
FAKEXEN_CFLAGS = [
    "-std=c11",
    "-D_GNU_SOURCE",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-fPIC",
    "-shared",
]
XEN_UTILS_HELPER = Path("usr/lib/xen-4.17/bin/libxl-save-helper")
XEN_UTILS_VERIFY = Path("usr/lib/xen-4.17/bin/verify-stream-v2")
XEN_UTILS_PYTHON = Path("usr/lib/xen-4.17/lib/python")

XenVerify = Callable[[Path | str, str], subprocess.CompletedProcess[str]]


def children(pid: int | None = None) -> list[int]:
    """Direct children of pid (default: this process), zombies included."""
    base = f"/proc/{pid}" if pid else "/proc/self"
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"{base}/task"):
            with contextlib.suppress(OSError):
                kids += [int(x) for x in Path(f"{base}/task/{task}/children").read_text().split()]
    return kids


def helper_pids(parent: int | None = None, mode: str | None = None) -> list[int]:
    """The xcsave helpers among parent's children (default: this process's);
    with ``mode``, only those doing it (``save`` or ``restore``: in their argv)."""
    found = []
    for pid in children(parent):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"xcsave-helper" in cmdline and (mode is None or mode.encode() in cmdline.split(b"\0")):
            found.append(pid)
    return found


def fake_env(fakexen_lib: Path, **knobs: str | int | Path | None) -> dict[str, str]:
    """A copy of os.environ that preloads fakexen with the given knobs.

    Knob names are the FAKEXEN_* variables without the prefix, in any case:
    ``fake_env(lib, fail="memory", errno="EIO", pages=512)``.  A value of
    None leaves the knob unset.  FAKEXEN_* variables inherited from the
    caller's environment are dropped so that a test sees only its own.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKEXEN_")}
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{fakexen_lib} {preload}".strip()
    for name, value in knobs.items():
        if value is not None:
            env["FAKEXEN_" + name.upper()] = str(value)
    return env


def _unavailable(reason: str) -> None:
    # CI must not go green by skipping the tests that need Xen's tools.
    if os.environ.get("CI"):
        pytest.fail(f"xen-utils-4.17 unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"xen-utils-4.17 unavailable: {reason}")


@pytest.fixture(scope="session")
def fakexen_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fakexen.so, compiled once per session with the project's C flags."""
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        pytest.fail(f"cannot build fakexen.so: compiler {cc!r} not found", pytrace=False)
    out = tmp_path_factory.mktemp("fakexen") / "fakexen.so"
    proc = subprocess.run(
        [cc, *FAKEXEN_CFLAGS, "-o", str(out), str(FAKEXEN_SRC), "-lxentoollog"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"fakexen.so does not build:\n{proc.stderr}", pytrace=False)
    return out


@pytest.fixture(scope="session")
def xen_utils_root() -> Path:
    """Root of an unpacked xen-utils-4.17 (the .deb's usr/ lives under it)."""
    override = os.environ.get("XCSAVE_XEN_UTILS")
    if override:
        root = Path(override)
        if not (root / XEN_UTILS_HELPER).is_file():
            _unavailable(f"XCSAVE_XEN_UTILS={override} has no {XEN_UTILS_HELPER}")
        return root

    root = REPO_ROOT / ".cache" / "xen-utils" / "root"
    if not (root / XEN_UTILS_HELPER).is_file():
        proc = subprocess.run(
            ["bash", str(REPO_ROOT / "tools" / "fetch-xen-utils.sh")],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            _unavailable(proc.stderr.strip() or f"fetch-xen-utils.sh exited {proc.returncode}")
        root = Path(proc.stdout.strip())
        if not (root / XEN_UTILS_HELPER).is_file():
            _unavailable(f"fetch-xen-utils.sh printed {root}, which has no {XEN_UTILS_HELPER}")
    return root


@pytest.fixture(scope="session")
def stock_helper(xen_utils_root: Path) -> Path:
    """Debian's xen-4.17 libxl-save-helper binary."""
    return xen_utils_root / XEN_UTILS_HELPER


@pytest.fixture(scope="session")
def xen_verify(xen_utils_root: Path) -> XenVerify:
    """Run Xen's verify-stream-v2 on a regular file: ``xen_verify(path, "libxc")``.

    Returns the CompletedProcess (text, stdout and stderr captured, never
    raising on a non-zero exit).  Use a regular file, not a pipe: the tool
    mistakes short pipe reads for truncation.
    """
    script = xen_utils_root / XEN_UTILS_VERIFY
    pythonpath = str(xen_utils_root / XEN_UTILS_PYTHON)

    def verify(path: Path | str, fmt: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = pythonpath
        return subprocess.run(
            ["python3", str(script), "-v", "-f", fmt, "-i", str(path)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=120,
        )

    return verify


# --------------------------- end of fakexen section ---------------------------


# ---------------------------------------------------------------------------
# tmpfs: a private directory in /dev/shm, for tests whose subject is how
# tmpfs allocates (holes, fallocate, page-cache residency)
# ---------------------------------------------------------------------------


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A fresh 0700 directory on /dev/shm, removed afterwards."""
    import tempfile

    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm (tmpfs): the behaviour under test is tmpfs's")
    d = Path(tempfile.mkdtemp(prefix="xcsave-test-shm-", dir="/dev/shm"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------ end of tmpfs section ------------------------------


# ---------------------------------------------------------------------------
# log records of xcsave.migrate, without pytest's logging plugin (caplog):
# tools/ci-sanitize runs the suite with -p no:logging
# ---------------------------------------------------------------------------


class LogRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, containing: str = "") -> list[str]:
        return [m for r in self.records if containing in (m := r.getMessage())]


@pytest.fixture
def migrate_log() -> Iterator[LogRecords]:
    """Every record logged on ``xcsave.migrate`` (INFO and up) during the test."""
    logger = logging.getLogger("xcsave.migrate")
    handler = LogRecords()
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


# ------------------------- end of log records section -------------------------


@pytest.fixture
def sim_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a CLI run whose domains and locks are this test's
    own (``$XCSAVE_SIM_DIR``, ``$XCSAVE_LOCK_DIR`` under ``tmp_path``)."""
    env = dict(os.environ)
    env["XCSAVE_SIM_DIR"] = str(tmp_path / "sim")
    env["XCSAVE_LOCK_DIR"] = str(tmp_path / "locks")
    return env
