"""Migration over ssh, as ``xl migrate`` does it.

``xcsave migrate --sim DOM --to ssh://[USER@]HOST[:PORT]`` runs the system's
``ssh`` (its configuration, keys and agent) with the remote command
``xcsave receive --stdio --sim NAME --format FMT``, and speaks xl's
handshake and sends the stream through it.  ssh gets one end of a
socketpair as both its stdin and its stdout, so the sender's side is
exactly :func:`xcsave.migrate.migrate_on` on the other end: the handshake
with the socket's own recv/send, the stream written by the helper straight
into the socket.  ssh carries the bytes, authenticates both hosts and
encrypts; what it says on stderr goes to the log and, when the migration
fails, into its one-line error (``ssh root@h: Permission denied
(publickey)``, or the remote receiver's own error line).

``-o BatchMode=yes`` (never prompt: there is no terminal to prompt on, the
bytes on stdin are the stream), ``-T`` (no pty: the channel stays 8-bit
clean) and ``-e none`` (no escape character) come after the user's ``--ssh``
command, so its own options (``-F``, ``-i``, ``-o``) apply as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Unpack

from . import api
from . import migrate as mig
from . import sim as simdom
from ._log import logger
from .defaults import HANDSHAKE_TIMEOUT, IDLE_TIMEOUT
from .errors import MigrationError, error_text
from .policy import Policy

__all__ = ["SshTarget", "migrate_ssh", "parse_ssh_url", "remote_receive_argv", "ssh_argv"]

log = logger(__name__)

#: How long ssh may take to exit after our end of the channel is closed.
EXIT_GRACE: Final = 10.0
#: ssh's stderr lines kept for the error message.
_KEEP: Final = 20


@dataclass(frozen=True)
class SshTarget:
    """``ssh://[USER@]HOST[:PORT]``."""

    host: str
    user: str | None = None
    port: int | None = None

    @property
    def destination(self) -> str:
        """What ssh is given: ``[USER@]HOST``."""
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{self.user + '@' if self.user else ''}{host}" + (
            f":{self.port}" if self.port else ""
        )


_URL = re.compile(
    r"ssh://(?:(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]*)@)?"
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_][A-Za-z0-9._-]*))"
    r"(?::(?P<port>\d{1,5}))?/?"
)


def parse_ssh_url(text: str) -> SshTarget:
    """``ssh://[USER@]HOST[:PORT]`` (``[V6ADDR]`` for an IPv6 host); ValueError otherwise.

    User and host are restricted to the characters names have, so that
    neither can be read by ssh as an option (a leading ``-``) or smuggle
    shell syntax into anything.
    """
    m = _URL.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"bad ssh target {text!r}: expected ssh://[USER@]HOST[:PORT]")
    port = int(m.group("port")) if m.group("port") else None
    if port is not None and not 0 < port <= 65535:
        raise ValueError(f"bad port in {text!r}")
    return SshTarget(m.group("v6") or m.group("host"), m.group("user"), port)


def remote_receive_argv(
    remote_command: str,
    *,
    sim: str,
    fmt: str,
    idle_timeout: float | None,
    handshake_timeout: float | None,
    max_memory: int | None = None,
) -> list[str]:
    """The far side's ``xcsave receive --stdio ...`` (before quoting)."""
    argv = [*shlex.split(remote_command), "receive", "--stdio", "--sim", sim, "--format", fmt]
    argv += ["--progress", "none", "--idle-timeout", f"{idle_timeout or 0:g}"]
    if handshake_timeout is not None:
        argv += ["--handshake-timeout", f"{handshake_timeout:g}"]
    if max_memory is not None:
        argv += ["--max-memory", str(max_memory)]
    return argv


def ssh_argv(ssh: str, target: SshTarget, remote: Sequence[str]) -> list[str]:
    """``ssh`` (shlex-split, the user's options kept) + ours + the quoted remote command.

    The remote command is one argument, quoted with :func:`shlex.join`: sshd
    hands it to the remote user's shell, which parses it again.
    """
    argv = [*shlex.split(ssh), "-o", "BatchMode=yes", "-T", "-e", "none"]
    if target.port:
        argv += ["-p", str(target.port)]
    return [*argv, "--", target.destination, shlex.join(remote)]


class _SshStderr:
    """Reads ssh's stderr as it comes: each line to the log, the last ones kept."""

    def __init__(self, stream: asyncio.StreamReader, target: SshTarget) -> None:
        self.lines: list[str] = []
        self.target = target
        self.task = asyncio.create_task(self._pump(stream))

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            if text:
                log.info("ssh %s: %s", self.target.destination, text)
                self.lines = [*self.lines[-(_KEEP - 1) :], text]

    def last(self) -> str | None:
        return self.lines[-1] if self.lines else None


async def _end_ssh(proc: asyncio.subprocess.Process, err: _SshStderr) -> int | None:
    """Wait for ssh to exit (our end is closed: it sees EOF), killing it if it lingers."""
    try:
        async with asyncio.timeout(EXIT_GRACE):
            rc = await proc.wait()
            await err.task
            return rc
    except TimeoutError:
        log.warning("ssh %s did not exit; killing it", err.target.destination)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if not err.task.done():
            err.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await err.task
    return None


async def migrate_ssh(
    *,
    sim: str | os.PathLike[str],
    to: SshTarget | str,
    remote_sim: str | None = None,
    ssh: str = "ssh",
    remote_command: str = "xcsave",
    live: bool = True,
    policy: Policy | None = None,
    fmt: str = "libxl",
    **net: Unpack[mig.SendOptions],
) -> mig.MigrationResult:
    """Migrate ``sim`` to ``to`` (``ssh://[USER@]HOST[:PORT]``) through ``ssh``.

    The far side runs ``REMOTE_COMMAND receive --stdio --sim REMOTE_SIM
    --format FMT`` (``remote_sim`` defaults to our domain's name).  Results
    and failures are those of :func:`xcsave.migrate.migrate_on`; a failure's
    message starts with what ssh (or the remote receiver) said on stderr.
    """
    target = parse_ssh_url(to) if isinstance(to, str) else to
    if net.get("compress", "off") != "off" or net.get("channels", 1) != 1 or net.get("resume"):
        raise ValueError(
            "--compress, --channels and --resume need a TCP or TLS transport "
            "(xcsave receive --listen); over ssh only --max-bandwidth applies"
        )
    if fmt not in api.FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected one of {api.FORMATS}")
    src = simdom.resolve(sim)
    simdom.state(src)  # FileNotFoundError (ENOENT) before anything runs
    remote = remote_receive_argv(
        remote_command,
        sim=remote_sim or src.name,
        fmt=fmt,
        idle_timeout=net.get("idle_timeout", IDLE_TIMEOUT),
        handshake_timeout=net.get("handshake_timeout", HANDSHAKE_TIMEOUT),
    )
    argv = ssh_argv(ssh, target, remote)
    log.info("migrate %s: running %s", src, shlex.join(argv))
    ours, theirs = socket.socketpair()
    with ours:
        try:
            # ssh's stdin and stdout are one socket: our handshake and the
            # helper's stream go through it both ways.  Its own session
            # (start_new_session): Ctrl-C reaches us, and we end ssh.
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=theirs.fileno(),
                stdout=theirs.fileno(),
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as e:
            raise MigrationError(
                f"migrate {src} to {target}: cannot run {argv[0]}: {error_text(e)}; "
                f"{src} is untouched",
                errno=e.errno,
            ) from e
        finally:
            theirs.close()
        assert proc.stderr is not None
        err = _SshStderr(proc.stderr, target)
        try:
            result = await mig.migrate_on(
                ours, sim=src, live=live, policy=policy, fmt=fmt, peer=str(target), **net
            )
        except MigrationError as e:
            ours.close()  # ssh sees EOF, the remote receiver fails and cleans up
            rc = await _end_ssh(proc, err)
            said = err.last()
            if said is None and rc is None:
                raise
            status = f"exit status {rc}" if rc is not None else "killed"
            raise type(e)(
                f"ssh {target.destination}: {said or 'no message'} ({status}); {e}",
                errno=e.errno,
            ) from e
        except BaseException:
            ours.close()
            await _end_ssh(proc, err)
            raise
        ours.close()
        rc = await _end_ssh(proc, err)
        if rc != 0:
            log.warning(
                "migrate %s: the domain runs at %s, but ssh ended with %s: %s",
                src,
                target,
                f"exit status {rc}" if rc is not None else "a kill",
                err.last() or "no message",
            )
        return result
