"""
xcsave native fast paths (simulated domains, stream tools)
"""
from __future__ import annotations
import typing
import typing_extensions
__all__: list[str] = ['BACKENDS', 'FORMATS', 'SIM_MAX_PAGES', 'SIM_MAX_VCPUS', 'SKELETON_BODY_MAX', 'STREAM_TYPES', 'convert_legacy', 'engine_restore', 'engine_save', 'rename_noreplace', 'scan', 'sim_create', 'sim_digest', 'sim_dirty', 'sim_info', 'sim_logdirty_take', 'sim_remove', 'sim_set_logdirty', 'sim_set_state', 'sim_set_throttle', 'skeleton_digest', 'skeleton_make', 'skeleton_page', 'skeleton_walk', 'sniff_format']
def convert_legacy(in_fd: typing.SupportsInt | typing.SupportsIndex, out_fd: typing.SupportsInt | typing.SupportsIndex, width: typing.SupportsInt | typing.SupportsIndex, guest: str, fmt: str = 'libxc', xl_in: bool = False, xl_out: bool = False, stream_type: str = 'plain', skip_qemu: bool = False) -> dict[str, typing.Any]:
    """
    Convert a legacy (pre-4.6) stream to v3; returns statistics.
    """
def engine_restore(fd: typing.SupportsInt | typing.SupportsIndex, path: str, wrap: str = 'libxc', max_pages: typing.SupportsInt | typing.SupportsIndex = 0, *, stream_type: str = 'plain', checkpoint: typing.Any = None) -> dict[str, typing.Any]:
    """
    Restore a sim domain from fd in-process; reads exactly the stream.  checkpoint() -> 1 go on / 2 failover / 0 error (remus).
    """
def engine_save(fd: typing.SupportsInt | typing.SupportsIndex, path: str, live: bool = False, wrap: str = 'libxc', max_iters: typing.SupportsInt | typing.SupportsIndex = 0, dirty_threshold: typing.SupportsInt | typing.SupportsIndex = 0, *, stream_type: str = 'plain', checkpoints: typing.SupportsInt | typing.SupportsIndex = 0, interval_ms: typing.SupportsInt | typing.SupportsIndex = 0, send_zero_pages: bool = False, xl_config: typing.Any = None, policy: typing.Any = None, suspend: typing.Any = None, checkpoint: typing.Any = None, copy_threads: typing.SupportsInt | typing.SupportsIndex = 1) -> dict[str, typing.Any]:
    """
    Save a sim domain to fd in-process (tests, benchmarks); returns the stats (max_iters, dirty_threshold 0: Xen's default policy).  policy(iteration, total_written, dirty_count) -> -1/0/1, suspend() -> bool, checkpoint() -> int.  copy_threads > 1 writes PAGE_DATA into a regular file with that many threads (stats: threaded_bytes, copy_threads).
    """
def rename_noreplace(src: str, dst: str) -> None:
    """
    Rename src to dst atomically; EEXIST if dst exists (renameat2 RENAME_NOREPLACE).
    """
def scan(src: typing.Any, fmt: str = 'auto', stream_type: str = 'plain', width: typing.SupportsInt | typing.SupportsIndex = 0, guest: str = '', allow_trailing: bool = False) -> dict[str, typing.Any]:
    """
    Scan and verify a migration stream (fd or path); returns the report dict.
    """
def sim_create(path: str, nr_pages: typing.SupportsInt | typing.SupportsIndex, vcpus: typing.SupportsInt | typing.SupportsIndex = 1, seed: typing.SupportsInt | typing.SupportsIndex = 0, *, replace: bool = False, cancelled: typing.Any = None, fill: str = 'classic') -> None:
    """
    Create a simulated domain file with seeded, guest-like memory (EEXIST if one is there, unless replace).  Signal handlers run and cancelled() -> bool is asked between steps: an exception or True stops it (InterruptedError), the temporary removed.
    """
def sim_digest(path: str) -> str:
    """
    Hex digest of memory + vCPU state + shape (docs/sim-format.md).
    """
def sim_dirty(path: str, rate: typing.SupportsInt | typing.SupportsIndex, duration: typing.SupportsFloat | typing.SupportsIndex, seed: typing.SupportsInt | typing.SupportsIndex = 0, *, fill: str = '') -> int:
    """
    Dirty pages at rate pages/s (0 = flat out) for duration s while the domain runs, with content of that fill ("": the domain's own); returns pages written.
    """
def sim_info(path: str) -> dict[str, typing.Any]:
    """
    Header of a simulated domain as a dict.
    """
def sim_logdirty_take(path: str, union: typing_extensions.Buffer) -> int:
    """
    Take the dirty log (fetch and clear) and OR it into union (a writable buffer of the bitmap's size); returns the pages taken (EINVAL if log-dirty is off).
    """
def sim_remove(path: str) -> None:
    """
    Remove a simulated domain.
    """
def sim_set_logdirty(path: str, enable: bool) -> None:
    """
    Turn log-dirty on (clearing the bitmap) or off.
    """
def sim_set_state(path: str, state: str) -> None:
    """
    Set running/paused/suspended; leaving running waits for writers.
    """
def sim_set_throttle(path: str, percent: typing.SupportsInt | typing.SupportsIndex) -> None:
    """
    Set the throttle: the percent (0..99) of its time the guest is kept from running (sim dirty writes that much less; 0 lifts it).
    """
def skeleton_digest(page: bytes) -> int:
    """
    A page's skeleton digest (XXH64, seed 0).
    """
def skeleton_make(fd: typing.SupportsInt | typing.SupportsIndex, fmt: str = 'auto', stream_type: str = 'plain') -> tuple[bytes, dict[str, typing.Any]]:
    """
    The skeleton body of the stream in the regular file fd, and what the walk found.
    """
def skeleton_page(digest: typing.SupportsInt | typing.SupportsIndex) -> bytes:
    """
    The page a skeleton inflates for a digest.
    """
def skeleton_walk(body: bytes, fmt: str, stream_type: str = 'plain', out_fd: typing.SupportsInt | typing.SupportsIndex = -1) -> dict[str, typing.Any]:
    """
    Walk a skeleton body (out_fd: write the inflated stream there); what it found.
    """
def sniff_format(head: bytes) -> str | None:
    """
    The format a stream's first bytes announce: xl, libxl, libxc, legacy (no magic), or None under 8 bytes.
    """
BACKENDS: str
FORMATS: tuple[str, ...] = ('auto', 'xl', 'libxl', 'libxc', 'legacy')
SIM_MAX_PAGES: int = 16777216
SIM_MAX_VCPUS: int = 128
SKELETON_BODY_MAX: int = 134217728
STREAM_TYPES: tuple[str, ...] = ('plain', 'remus', 'colo')
