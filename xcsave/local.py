"""Local pairs: both ends of a migration in this process (:func:`migrate_local`).

The same helpers and the same xl handshake as over TCP
(:func:`xcsave.migrate.migrate_on` and :func:`~xcsave.migrate.receive_on`),
on a socketpair, with the stream on a pipe beside it (or on the socketpair
itself).  The one local migration of xcsave: ``xcsave demo``, ``xcsave
bench`` and the fault tests all run this.  Its failure rule is stricter than
the network's: with both ends here, nothing is ever in doubt (see
:func:`_settle_local`); exactly one copy runs at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Unpack

from . import api
from . import lock as _lock
from . import sim as simdom
from ._log import logger
from .defaults import CHANNELS
from .errors import MigrationError, MigrationInDoubt
from .migrate import MigrationResult, NetOptions, ReceiveResult, migrate_on, receive_on
from .policy import Policy

__all__ = ["CHANNELS", "migrate_local"]

log = logger(__name__)


@contextlib.contextmanager
def _owned_fd(fd: int | None) -> Iterator[int | None]:
    """Close ``fd`` (if any) when the block ends, however it ends."""
    try:
        yield fd
    finally:
        if fd is not None:
            os.close(fd)


@_lock.holding("src", "dst", resolve=simdom.resolve)
async def migrate_local(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    live: bool = True,
    policy: Policy | None = None,
    fmt: str = "libxl",
    channel: str = "pipe",
    **net: Unpack[NetOptions],
) -> tuple[MigrationResult, ReceiveResult]:
    """Both ends in this process: the same helpers and handshake as TCP.

    The handshake goes over a socketpair.  With ``channel="pipe"`` (the
    default) the stream goes over a pipe beside it: the sender's helper
    vmsplices its pages into the pipe and the receiver's splices page runs
    out of it into the target, so a byte is copied once, into the target.
    ``channel="socket"`` sends the stream over the socketpair itself,
    exactly as over TCP.

    Each side closes its ends when it fails, so the other side sees it and
    cleans up on its own (nothing is cancelled): a receiver whose sender is
    gone reads EOF, a sender whose receiver is gone gets EPIPE.  Raises the
    sender's error first (it says where the domain runs), else the
    receiver's.  Never in doubt: with both ends here, a failure or a
    cancellation after the sender's GO is settled by looking at the
    receiver's copy (see :func:`_settle_local`), so exactly one copy runs.
    With a shared ``supervisor``, its ``max_parallel`` must allow two
    helpers per pair in flight, or the pairs could starve each other.
    """
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}: expected one of {CHANNELS}")
    src_path, dst_path = simdom.resolve(src), simdom.resolve(dst)
    before = simdom.state(src_path)  # also: FileNotFoundError for a domain that does not exist
    api.check_replace(dst_path, False)  # before either side starts: settling reads dst
    a, b = socket.socketpair()
    # Blocking, close-on-exec: the supervisor hands each helper its end alone.
    rfd, wfd = os.pipe() if channel == "pipe" else (None, None)

    async def send_side() -> MigrationResult:
        with a, _owned_fd(wfd):
            return await migrate_on(
                a, sim=src, live=live, policy=policy, fmt=fmt, stream=wfd, **net
            )

    async def receive_side() -> ReceiveResult:
        with b, _owned_fd(rfd):
            return await receive_on(b, sim=dst, fmt=fmt, stream=rfd, **net)

    sent: MigrationResult | BaseException | None = None
    received: ReceiveResult | BaseException | None = None
    try:
        sent, received = await asyncio.gather(send_side(), receive_side(), return_exceptions=True)
    finally:
        # On cancellation gather has cancelled both sides and waited for them.
        if not isinstance(sent, MigrationResult):
            settled = _settle_local(src_path, before, dst_path)
            if isinstance(sent, MigrationInDoubt):
                sent = MigrationError(f"{sent}; {settled}", errno=sent.errno)
    for r in (sent, received):
        if isinstance(r, BaseException):
            raise r
    assert isinstance(sent, MigrationResult)
    assert isinstance(received, ReceiveResult)
    return sent, received


def _settle_local(src: Path, before: str, dst: Path) -> str:
    """After a local migration that did not succeed: exactly one copy runs.

    Over TCP a sender that gave GO and then lost the link cannot know whether
    the receiver started its copy, so it leaves its own suspended (in doubt).
    Here both ends are in this process and have finished: if the receiver's
    copy runs it is the one, else the source is put back as it was.
    """
    try:
        runs = simdom.state(dst) == "running"
    except OSError:
        runs = False  # removed by the receiver: it never ran
    if runs:
        log.warning("%s runs; %s stays suspended", dst, src)
        return f"settled here: {dst} runs, {src} stays suspended"
    state = simdom.put_back(src, before)
    return f"settled here: {dst} never ran, so {src} is {state} here again"
