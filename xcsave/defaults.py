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
    "PAGE_SIZE",
    "SHM_DIR",
    "SIM_DIR",
    "XEN_DIRTY_THRESHOLD",
    "XEN_MAX_ITERS",
    "shm_dir",
]

#: Guest page size (bytes).
PAGE_SIZE: Final = 4096

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
