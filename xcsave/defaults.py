"""xcsave's defaults, each written once (no imports: the CLI's parsers read them too).

The C side gets the precopy policy's from the generated header
(``csrc/xcsave_msgs.h``: ``XCS_XEN_MAX_ITERS``, ``XCS_XEN_DIRTY_THRESHOLD``,
emitted by ``python -m xcsave.proto --emit-c`` from these).
"""

from __future__ import annotations

import os
from typing import Final

__all__ = [
    "CHANNELS",
    "HANDSHAKE_TIMEOUT",
    "IDLE_TIMEOUT",
    "MAX_COPY_THREADS",
    "MAX_DOMID",
    "MAX_SEED",
    "PAGE_SIZE",
    "SHM_DIR",
    "SIM_DIR",
    "SIM_MAX_MEMORY",
    "SIM_MAX_VCPUS",
    "U32_MAX",
    "XEN_DIRTY_THRESHOLD",
    "XEN_MAX_ITERS",
    "shm_dir",
]

#: Guest page size (bytes).
PAGE_SIZE: Final = 4096

#: A simulated domain's limits (csrc/core/simdom.h XCS_SIM_MAX_VCPUS and
#: XCS_SIM_MAX_PAGES; tests/test_cli_numbers.py checks they agree with the
#: extension's ``SIM_MAX_VCPUS``/``SIM_MAX_PAGES``).
SIM_MAX_VCPUS: Final = 128
SIM_MAX_MEMORY: Final = (1 << 24) * PAGE_SIZE  # 64 GiB
#: Seeds are u64 in the native code.
MAX_SEED: Final = (1 << 64) - 1
U32_MAX: Final = (1 << 32) - 1
#: The last ordinary Xen domain id (DOMID_FIRST_RESERVED - 1).
MAX_DOMID: Final = 0x7FEF
#: Copy threads of a sim save (XCS_MAX_COPY_THREADS in csrc/core/xcs_engine.h).
MAX_COPY_THREADS: Final = 64

#: Xen's default precopy policy (libxc 4.17): stop and copy after this many
#: rounds, or as soon as fewer than :data:`XEN_DIRTY_THRESHOLD` pages are dirty.
XEN_MAX_ITERS: Final = 5
XEN_DIRTY_THRESHOLD: Final = 50

#: How long to wait for each message of xl's migration handshake (seconds).
HANDSHAKE_TIMEOUT: Final = 60.0
#: Idle timeout of restore, receive and migrate once the stream has started
#: (seconds past the last byte).
IDLE_TIMEOUT: Final = 10.0

#: Memory-backed scratch space: demos' and benchmarks' domains live there.
SHM_DIR: Final = "/dev/shm"
#: Where a bare domain name lives unless ``$XCSAVE_SIM_DIR`` says otherwise.
SIM_DIR: Final = f"{SHM_DIR}/xcsave"

#: The help line of every DOM argument and --sim option.
DOM_HELP: Final = (
    f"a simulated domain: a path, or a bare name kept in $XCSAVE_SIM_DIR (default {SIM_DIR})"
)

#: How a local migration (:func:`xcsave.local.migrate_local`) carries the stream.
CHANNELS: Final = ("pipe", "socket")


def shm_dir() -> str | None:
    """:data:`SHM_DIR` where this machine has it, else None (the system's temp dir)."""
    return SHM_DIR if os.path.isdir(SHM_DIR) else None


#: What a new simulated domain's pages hold (docs/sim-format.md, "Contents of
#: a new domain"); the first is the default.  ``mixed``: by page, from the
#: seed, 35% zero, 40% compressible (text, page tables, kernel-like records),
#: 25% random.
SIM_FILLS = ("classic", "random", "zero", "text", "mixed")
