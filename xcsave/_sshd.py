"""A private OpenSSH server for tests and ``xcsave bench migrate --transport ssh``.

:func:`sshd` generates a host key and a client key with ``ssh-keygen``
into a work directory, starts ``sshd -D -e -f CONFIG`` on a loopback
address (or inside a network namespace), and writes a client
configuration that trusts exactly that host key
(``StrictHostKeyChecking yes``) and offers exactly that client key.
``xcsave migrate --ssh "ssh -F DIR/ssh_config" --to ssh://root@ADDR:PORT``
then reaches it.  Not for production: the server accepts the one key it
was given, for the user running it.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import SshdUnavailable

__all__ = ["SshServer", "SshdUnavailable", "sshd"]

_SSHD_PATHS = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
_ALIAS = "xcsave-test-sshd"


@dataclass
class SshServer:
    """A running sshd and what a client needs to reach it."""

    host: str
    port: int
    user: str
    workdir: Path
    proc: subprocess.Popen[bytes]

    @property
    def config(self) -> Path:
        """The client's ``ssh -F`` file (host key pinned, our client key)."""
        return self.workdir / "ssh_config"

    @property
    def ssh_command(self) -> str:
        return f"ssh -F {self.config}"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{self.user}@{host}:{self.port}"

    def log(self) -> str:
        return (self.workdir / "sshd.log").read_text(errors="replace")

    def client_config(self, identity: Path, name: str) -> Path:
        """Another client configuration for the same server, offering ``identity``."""
        path = self.workdir / name
        path.write_text(
            "Host *\n"
            f"  User {self.user}\n"
            f"  IdentityFile {identity}\n"
            "  IdentitiesOnly yes\n"
            "  IdentityAgent none\n"
            f"  HostKeyAlias {_ALIAS}\n"
            f"  UserKnownHostsFile {self.workdir / 'known_hosts'}\n"
            "  GlobalKnownHostsFile /dev/null\n"
            "  StrictHostKeyChecking yes\n"
            "  PasswordAuthentication no\n"
            "  KbdInteractiveAuthentication no\n"
            "  LogLevel ERROR\n"
        )
        return path


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise SshdUnavailable(f"{tool} is missing (apt-get install openssh-client openssh-server)")
    return path


def _find_sshd() -> str:
    for p in (shutil.which("sshd"), *_SSHD_PATHS):
        if p and os.access(p, os.X_OK):
            return p
    raise SshdUnavailable("sshd is missing (apt-get install openssh-server)")


def keygen(path: Path) -> Path:
    """A fresh ed25519 key pair at ``path`` (and ``path.pub``), no passphrase."""
    subprocess.run(  # noqa: S603 - ssh-keygen from $PATH, no shell
        [_need("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
        capture_output=True,
    )
    return path


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_listening(
    host: str, port: int, netns: str | None, proc: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SshdUnavailable(f"sshd exited with status {proc.returncode}")
        if netns is None:
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                if s.connect_ex((host, port)) == 0:
                    return
        else:
            probe = subprocess.run(  # noqa: S603 - fixed argv, no shell
                ["ip", "netns", "exec", netns, "ss", "-Hltn", f"sport = :{port}"],  # noqa: S607
                capture_output=True,
                text=True,
                check=False,
            )
            if probe.stdout.strip():
                return
        time.sleep(0.05)
    raise SshdUnavailable(f"sshd did not listen on {host}:{port} within 20 s")


@contextlib.contextmanager
def sshd(
    workdir: Path, *, host: str = "127.0.0.1", netns: str | None = None
) -> Iterator[SshServer]:
    """Run a private sshd on ``host`` (inside ``netns`` if given) until the block ends.

    Raises :class:`SshdUnavailable` with the reason when it cannot run.
    """
    server_bin = _find_sshd()
    _need("ssh")
    workdir.mkdir(parents=True, exist_ok=True)
    host_key = keygen(workdir / "host_key")
    client_key = keygen(workdir / "client_key")
    auth = workdir / "authorized_keys"
    auth.write_bytes((workdir / "client_key.pub").read_bytes())
    auth.chmod(0o600)
    pub = (workdir / "host_key.pub").read_text().split()
    (workdir / "known_hosts").write_text(f"{_ALIAS} {pub[0]} {pub[1]}\n")
    # privilege separation needs its empty directory (root only)
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    port = 2222 if netns else _free_port(host)
    cfg = workdir / "sshd_config"
    cfg.write_text(
        f"Port {port}\n"
        f"ListenAddress {host}\n"
        f"HostKey {host_key}\n"
        f"PidFile {workdir / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {auth}\n"
        "StrictModes no\n"
        "PermitRootLogin prohibit-password\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        "X11Forwarding no\n"
        "AllowTcpForwarding no\n"
        "PrintMotd no\n"
        "LogLevel VERBOSE\n"
    )
    argv = [server_bin, "-D", "-e", "-f", str(cfg)]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    log = open(workdir / "sshd.log", "wb")  # noqa: SIM115 - lives as long as sshd
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)  # noqa: S603
    server = SshServer(host, port, getpass.getuser(), workdir, proc)
    try:
        try:
            _wait_listening(host, port, netns, proc)
        except SshdUnavailable as e:
            raise SshdUnavailable(f"{e}: {server.log().strip()[-500:]}") from None
        server.client_config(client_key, "ssh_config")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
