"""Who gets in over the network, and what a peer or a stream can make us do.

- The listener (``migrate.receive``) keeps listening until a peer passes
  authentication (TLS) and starts a stream: rogue clients (garbage, silence,
  a slow trickle, and over TLS a valid stream sent in clear) create nothing
  and never keep the real sender out.
- A bare ``--listen PORT`` binds loopback; direct TCP needs ``--tls-dir`` or
  ``--insecure``.
- Bounds: a stream that claims a huge domain is refused under
  ``--max-memory`` before anything is allocated; a peer that goes silent
  mid-stream fails the other end with ETIMEDOUT, nothing kept.
- ssh: a real OpenSSH server (tests generate its keys): a live migration
  under a workload arrives bit-exact; a wrong client key and a failing
  remote command are one line each, nothing created, the source running.
- ``receive --stdio`` over plain pipes, as sshd may give them.

Nothing here asserts a timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import select
import shlex
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import test_hostile as hostile
import test_migrate
from conftest import LogRecords, helper_pids
from test_migrate import partials, workload, xcsave_argv

import xcsave.sync
from xcsave import corpus, migrate, sim

MiB = 1 << 20


@pytest.fixture
def shm() -> Iterator[Path]:
    """Domain files in memory: test_migrate's fixture."""
    yield from test_migrate.shm.__wrapped__()


# ---------------------------------------------------------------- streams


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes, str]:
    """A small domain saved as libxl (what migrate sends) and as bare libxc, and its digest."""
    d = tmp_path_factory.mktemp("trust-image")
    src = sim.create(d / "src.dom", 6 * MiB, vcpus=1, seed=31)
    xcsave.sync.save(d / "s.libxl", sim=src, fmt="libxl")
    sim.set_state(src, "running")
    xcsave.sync.save(d / "s.libxc", sim=src, fmt="libxc")
    return (d / "s.libxl").read_bytes(), (d / "s.libxc").read_bytes(), sim.digest(src)


def size_bomb(libxc: bytes, nr_pages: int = 1 << 24) -> bytes:
    """A ~6 MB libxc stream whose HVM_CONTEXT claims ``nr_pages`` pages (64 GiB)."""
    head, recs, _ = hostile._sim_parts(libxc)
    recs = hostile._with(
        recs, corpus.HVM_CONTEXT, lambda r: hostile._hvm_ctx_with(r, nr_pages=nr_pages)
    )
    return head + b"".join(recs)


# ---------------------------------------------------------------- a listener in a task


@contextlib.asynccontextmanager
async def listening(
    dst: Path, **kw: Any
) -> AsyncIterator[tuple[tuple[str, int], asyncio.Task[migrate.ReceiveResult]]]:
    ready: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        migrate.receive(listen=("127.0.0.1", 0), sim=dst, on_listening=ready.set_result, **kw)
    )
    try:
        yield await asyncio.wait_for(ready, 30), task
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def rogue(addr: tuple[str, int], how: str, payload: bytes = b"") -> socket.socket:
    """Connect and misbehave; returns the socket, still open (the caller closes it)."""
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    try:
        await loop.sock_connect(s, addr)
    except OSError:
        s.close()
        raise
    if how == "garbage":
        await loop.sock_sendall(s, b"GET / HTTP/1.0\r\n\r\n" + os.urandom(64))
    elif how == "foreign":
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # refused mid-send
            await loop.sock_sendall(s, payload)
    elif how == "trickle":

        async def drip() -> None:
            for b in payload[:64]:
                await asyncio.sleep(0.3)
                with contextlib.suppress(OSError):
                    await loop.sock_sendall(s, bytes([b]))

        asyncio.get_running_loop().create_task(drip())
    return s  # "silence": says nothing


async def hung_up(s: socket.socket) -> bool:
    """Whether the listener dropped this client (EOF after whatever it sent us)."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(30):
            while True:
                data = await loop.sock_recv(s, 4096)
                if not data:
                    return True
    except ConnectionResetError:
        return True


ROGUES = ["garbage", "silence", "trickle", "foreign"]


@pytest.mark.parametrize("how", ROGUES)
async def test_insecure_rogue_client_never_keeps_the_sender_out(
    shm: Path, image: tuple[bytes, bytes, str], how: str, migrate_log: LogRecords
) -> None:
    """A rogue peer connects first; the real sender then migrates, while a
    silent or trickling rogue is still connected (candidates are handled
    concurrently).  --insecure admits anyone who sends a stream, so a valid
    foreign stream *is* taken (that is what the flag means: docs/security.md);
    here it is sent second, after the real one was admitted, and refused."""
    libxl, _libxc, _digest = image
    src = sim.create(shm / "src.dom", 8 * MiB, seed=32)
    dst = shm / "dst.dom"
    async with listening(dst, insecure=True, handshake_timeout=20) as (addr, task):
        bad = None if how == "foreign" else await rogue(addr, how, libxl)
        sent = await migrate.migrate(sim=src, to=addr, insecure=True)
        received = await task
        if how == "foreign":  # after the admission: the listener is closed
            with pytest.raises(ConnectionRefusedError):
                await rogue(addr, how, libxl)
        if bad is not None:
            if how == "garbage":
                assert await hung_up(bad)
            bad.close()
    assert received.fmt == sent.fmt == "libxl"
    assert sim.digest(dst) == sim.digest(src)
    assert sim.info(dst)["state"] == "running"
    if how == "garbage":
        assert migrate_log.messages("refused")
    assert partials(dst) == []


@pytest.mark.parametrize("how", ["silence", "trickle", "garbage"])
async def test_insecure_rogue_is_dropped_after_the_handshake_timeout(
    shm: Path, image: tuple[bytes, bytes, str], how: str, migrate_log: LogRecords
) -> None:
    """Every refused peer is hung up on and logged in one line; nothing is
    created for it; the listener goes on listening."""
    libxl, _libxc, _digest = image
    dst = shm / "dst.dom"
    async with listening(dst, insecure=True, handshake_timeout=0.5) as (addr, task):
        bad = await rogue(addr, how, libxl)
        assert await hung_up(bad)
        bad.close()
        assert not task.done()  # still listening
        assert not dst.exists() and partials(dst) == []
    refusals = migrate_log.messages("refused")
    assert len(refusals) == 1, refusals
    assert "\n" not in refusals[0]
    if how != "garbage":
        assert "ETIMEDOUT" in refusals[0]


async def test_at_most_max_candidates_at_once(shm: Path) -> None:
    """Silent peers beyond MAX_CANDIDATES wait in the backlog, unanswered:
    the banner goes to at most MAX_CANDIDATES of them at a time."""
    dst = shm / "dst.dom"
    n = migrate.MAX_CANDIDATES + 3
    async with listening(dst, insecure=True, handshake_timeout=30) as (addr, _task):
        socks = [await rogue(addr, "silence") for _ in range(n)]
        loop = asyncio.get_running_loop()
        waiting = {asyncio.ensure_future(loop.sock_recv(s, 1)) for s in socks}
        answered: set[asyncio.Future[bytes]] = set()
        async with asyncio.timeout(30):  # the first MAX_CANDIDATES get the banner
            while len(answered) < migrate.MAX_CANDIDATES:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                answered |= done
        # The others stay unanswered while those hold their slots (30 s each):
        # nothing a slow machine could make appear, only a broken limit.
        more, waiting = await asyncio.wait(waiting, timeout=0.5)
        for fut in waiting:
            fut.cancel()
        for s in socks:
            s.close()
    got = [f.result() for f in answered | more]
    assert len(got) == migrate.MAX_CANDIDATES
    assert all(g == migrate.BANNER[:1] for g in got)
    assert not dst.exists()


# ---------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """TLS directories: the receiver's (a certificate for 127.0.0.1) and the
    sender's from one CA; a stranger's from another CA."""
    pytest.importorskip("cryptography", reason="xcsave tls init needs 'cryptography'")
    from xcsave.tlsinit import tls_init

    base = tmp_path_factory.mktemp("tls")
    tls_init(base / "receiver", ["127.0.0.1"])
    tls_init(base / "sender", ["sender.test"], ca_dir=base / "receiver")
    tls_init(base / "stranger", ["127.0.0.1"])
    return {name: base / name for name in ("receiver", "sender", "stranger")}


def tls_without_a_certificate(addr: tuple[str, int], tls_dir: Path) -> bytes:
    """A TLS 1.3 client that trusts the receiver's CA but has no certificate
    of its own: what it reads after the handshake (b"" when refused)."""
    ctx = ssl.create_default_context(cafile=str(tls_dir / "ca-cert.pem"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        with (
            socket.create_connection(addr, timeout=30) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as t,
        ):
            return t.recv(len(migrate.BANNER))
    except (ssl.SSLError, OSError):
        return b""


@pytest.mark.parametrize("how", [*ROGUES, "stranger-cert", "no-cert"])
async def test_tls_rogue_client_never_keeps_the_sender_out(
    shm: Path,
    image: tuple[bytes, bytes, str],
    tls: dict[str, Path],
    how: str,
    migrate_log: LogRecords,
) -> None:
    """Over TLS nobody without a certificate from the CA gets in: garbage,
    silence, a trickle, a valid stream sent in clear, a certificate from
    another CA.  Each is refused (or still waiting) while the real sender
    migrates; nothing is created for them."""
    from xcsave import tls as tlsmod
    from xcsave.errors import TlsError

    libxl, _libxc, _digest = image
    src = sim.create(shm / "src.dom", 8 * MiB, seed=38)
    dst = shm / "dst.dom"
    async with listening(dst, tls_dir=tls["receiver"], handshake_timeout=20) as (addr, task):
        if how == "stranger-cert":
            s = socket.socket()
            s.setblocking(False)
            await asyncio.get_running_loop().sock_connect(s, addr)
            with s, pytest.raises(TlsError):
                await tlsmod.tls_client(
                    s, tls_dir=tls["stranger"], server_name="127.0.0.1", handshake_timeout=10
                )
            bad = None
        elif how == "no-cert":
            assert not await asyncio.to_thread(tls_without_a_certificate, addr, tls["receiver"])
            bad = None
        else:
            bad = await rogue(addr, how, libxl)
            if how in ("garbage", "foreign"):
                assert await hung_up(bad)  # no TLS handshake: refused
                assert not dst.exists() and partials(dst) == []
        sent = await migrate.migrate(sim=src, to=addr, tls_dir=tls["sender"])
        received = await task
        if bad is not None:
            bad.close()
    assert "CN=" in received.peer or "sender.test" in received.peer, received.peer
    assert sent.fmt == received.fmt
    assert sim.digest(dst) == sim.digest(src)
    assert sim.info(dst)["state"] == "running"
    if how in ("garbage", "foreign", "stranger-cert", "no-cert"):
        refusals = migrate_log.messages("refused")
        assert len(refusals) == 1, refusals


async def test_tls_sender_refuses_a_receiver_of_another_ca(
    shm: Path, tls: dict[str, Path]
) -> None:
    from xcsave.errors import TlsError

    src = sim.create(shm / "src.dom", 4 * MiB, seed=39)
    dst = shm / "dst.dom"
    async with listening(dst, tls_dir=tls["stranger"], handshake_timeout=5, accept_timeout=30) as (
        addr,
        task,
    ):
        with pytest.raises(TlsError) as err:
            await migrate.migrate(sim=src, to=addr, tls_dir=tls["sender"], handshake_timeout=5)
        assert not task.done()  # the receiver keeps listening for the right peer
    assert err.value.errno == errno.EACCES, err.value
    assert "\n" not in str(err.value)
    assert sim.info(src)["state"] == "running"
    assert not dst.exists()


@pytest.mark.parametrize("where", ["--tls-dir", "default-dir"])
def test_tls_migration_from_the_command_line(shm: Path, tls: dict[str, Path], where: str) -> None:
    """With --tls-dir, or with neither flag when the default TLS directory
    ($XCSAVE_TLS_DIR here) exists: TLS, and no warning."""
    src = sim.create(shm / "src.dom", 16 * MiB, seed=40)
    dst = shm / "dst.dom"

    def mode(side: str) -> tuple[dict[str, str], list[str | Path]]:
        if where == "--tls-dir":
            return dict(os.environ), ["--tls-dir", tls[side]]
        return {**os.environ, "XCSAVE_TLS_DIR": str(tls[side])}, []

    env, flags = mode("receiver")
    proc = subprocess.Popen(
        xcsave_argv(
            "receive", "--listen", "127.0.0.1:0", *flags, "--sim", dst, "--progress", "none",
        ),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    with proc:
        assert proc.stdout is not None
        port = int(proc.stdout.readline().rsplit(":", 1)[1])
        env, flags = mode("sender")
        r = subprocess.run(
            xcsave_argv(
                "migrate", "--sim", src, "--to", f"127.0.0.1:{port}", *flags,
                "--live", "--progress", "none",
            ),
            capture_output=True, text=True, timeout=120, check=False, env=env,
        )  # fmt: skip
        out, err = proc.communicate(timeout=60)
    assert r.returncode == 0, r.stderr
    assert proc.returncode == 0, err
    assert "insecure" not in r.stderr + err  # no warning: it was TLS
    assert "it runs here" in out
    assert sim.digest(dst) == sim.digest(src)


# ---------------------------------------------------------------- addresses and modes


def test_bare_port_listens_on_loopback(shm: Path) -> None:
    proc = subprocess.Popen(
        xcsave_argv(
            "receive", "--listen", "0", "--insecure", "--sim", shm / "d.dom",
            "--accept-timeout", "30", "--progress", "none",
        ),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert line.startswith("listening on 127.0.0.1:"), line


@pytest.mark.parametrize("cmd", ["receive", "migrate"])
def test_direct_tcp_without_tls_or_insecure_is_a_usage_error(
    shm: Path, tmp_path: Path, cmd: str
) -> None:
    src = sim.create(shm / "src.dom", 1 * MiB)
    argv = (
        ["receive", "--listen", "127.0.0.1:0", "--sim", shm / "d.dom"]
        if cmd == "receive"
        else ["migrate", "--sim", src, "--to", "127.0.0.1:9"]
    )
    env = {**os.environ, "XCSAVE_TLS_DIR": str(tmp_path / "no-such-dir")}
    r = subprocess.run(
        xcsave_argv(*argv), capture_output=True, text=True, timeout=60, check=False, env=env
    )
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert "--tls-dir" in r.stderr and "--insecure" in r.stderr
    assert sim.info(src)["state"] == "running"
    assert not (shm / "d.dom").exists()


def test_insecure_says_so_on_stderr(shm: Path) -> None:
    r = subprocess.run(
        xcsave_argv(
            "receive", "--listen", "127.0.0.1:0", "--insecure", "--sim", shm / "d.dom",
            "--accept-timeout", "0.1", "--progress", "none",
        ),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    warning = r.stderr.splitlines()[0]
    assert "--insecure" in warning and "neither authenticated nor encrypted" in warning


# ---------------------------------------------------------------- bounds


def test_restore_refuses_a_size_bomb_under_max_memory(
    shm: Path, image: tuple[bytes, bytes, str]
) -> None:
    bomb = size_bomb(image[1])
    dst = shm / "bomb.dom"
    r = subprocess.run(
        xcsave_argv("restore", "-", "--sim", dst, "--max-memory", "64M", "--progress", "none"),
        input=bomb, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    err = r.stderr.decode()
    assert r.returncode == 1
    assert len(err.splitlines()) == 1, err
    assert "ERANGE" in err and "16777216 pages" in err
    assert not dst.exists() and partials(dst) == []


def test_restore_from_a_pipe_that_goes_silent_times_out(
    shm: Path, image: tuple[bytes, bytes, str]
) -> None:
    """The pipe path of the idle timeout (poll before each read): half a
    stream, then a writer that holds the pipe open and says nothing."""
    libxc = image[1]
    dst = shm / "dst.dom"
    proc = subprocess.Popen(
        xcsave_argv("restore", "-", "--sim", dst, "--idle-timeout", "0.5", "--progress", "none"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    with proc:
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.write(libxc[: len(libxc) // 2])
        proc.stdin.flush()
        try:
            proc.wait(timeout=60)  # stdin stays open: only the idle timeout ends it
        finally:
            if proc.poll() is None:
                proc.kill()
        text = proc.stderr.read().decode()
    assert proc.returncode == 1
    assert len(text.splitlines()) == 1, text
    assert "ETIMEDOUT" in text
    assert not dst.exists() and partials(dst) == []


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"max_memory": 100}, "less than one page"),
        ({"max_memory": -1}, "must not be negative"),
        ({"idle_timeout": -1.0}, "idle_timeout"),
        ({"idle_timeout": 1e9}, "idle_timeout"),
    ],
)
def test_api_refuses_bad_bounds(shm: Path, kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        xcsave.sync.restore(os.devnull, sim=shm / "d.dom", **kw)
    assert not (shm / "d.dom").exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--idle-timeout", "-1"],
        ["--idle-timeout", "soon"],
        ["--max-memory", "lots"],
        ["--max-memory", "-5M"],
    ],
)
def test_cli_refuses_bad_bounds(shm: Path, flags: list[str]) -> None:
    r = subprocess.run(
        xcsave_argv("receive", "--stdio", "--sim", shm / "d.dom", *flags),
        capture_output=True, text=True, timeout=60, check=False, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert r.returncode == 2
    assert flags[0] in r.stderr
    assert r.stdout == ""


async def _fake_sender(addr: tuple[str, int], payload: bytes, then_silent: bool) -> socket.socket:
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    await loop.sock_connect(s, addr)
    got = b""
    while len(got) < len(migrate.BANNER):
        got += await loop.sock_recv(s, len(migrate.BANNER) - len(got))
    assert got == migrate.BANNER
    await loop.sock_sendall(s, payload)
    if not then_silent:
        s.shutdown(socket.SHUT_WR)
    return s


@pytest.mark.parametrize("limit", ["explicit", "default"])
async def test_receive_refuses_a_size_bomb(
    shm: Path, image: tuple[bytes, bytes, str], limit: str
) -> None:
    """The default bound is the host's memory (or the sim directory's
    filesystem): a stream claiming 64 GiB is refused here too."""
    if limit == "default" and migrate.default_max_memory(shm / "x") >= 64 << 30:
        pytest.skip("this host has 64 GiB or more: the default bound admits the bomb")
    dst = shm / "dst.dom"
    kw: dict[str, Any] = {"max_memory": 64 * MiB} if limit == "explicit" else {}
    async with listening(dst, insecure=True, handshake_timeout=30, **kw) as (addr, task):
        s = await _fake_sender(addr, size_bomb(image[1]), then_silent=True)
        with pytest.raises(migrate.MigrationError) as err:
            await asyncio.wait_for(task, 60)
        s.close()
    assert "ERANGE" in str(err.value) and "nothing was kept here" in str(err.value)
    assert "\n" not in str(err.value)
    assert not dst.exists() and partials(dst) == []


async def test_receiver_times_out_on_a_silent_sender_mid_stream(
    shm: Path, image: tuple[bytes, bytes, str]
) -> None:
    libxl = image[0]
    dst = shm / "dst.dom"
    async with listening(dst, insecure=True, handshake_timeout=30, idle_timeout=0.5) as (
        addr,
        task,
    ):
        s = await _fake_sender(addr, libxl[: len(libxl) // 2], then_silent=True)
        with pytest.raises(migrate.MigrationError) as err:
            await asyncio.wait_for(task, 60)
        s.close()
    assert "ETIMEDOUT" in str(err.value) and "nothing was kept here" in str(err.value)
    assert "\n" not in str(err.value)
    assert not dst.exists() and partials(dst) == []
    assert helper_pids(mode="restore") == []


async def test_sender_times_out_when_the_receiver_stops_reading(shm: Path) -> None:
    """The receiver sends the banner and then reads nothing: once the socket
    buffers are full the sender's helper is blocked; after the idle timeout
    it fails with ETIMEDOUT and the source runs again."""
    src = sim.create(shm / "src.dom", 64 * MiB, seed=33)
    before = sim.digest(src)
    loop = asyncio.get_running_loop()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.setblocking(False)
    conns: list[socket.socket] = []

    async def stalled() -> None:
        conn, _ = await loop.sock_accept(lsock)
        conns.append(conn)
        await loop.sock_sendall(conn, migrate.BANNER)

    server = asyncio.create_task(stalled())
    try:
        with pytest.raises(migrate.MigrationError) as err:
            await asyncio.wait_for(
                migrate.migrate(
                    sim=src, to=lsock.getsockname()[:2], insecure=True, idle_timeout=0.5
                ),
                60,
            )
    finally:
        await server
        for c in conns:
            c.close()
        lsock.close()
    assert "ETIMEDOUT" in str(err.value) and "running here again" in str(err.value)
    assert sim.info(src)["state"] == "running"
    assert sim.digest(src) == before
    assert helper_pids(mode="save") == []


# ---------------------------------------------------------------- receive --stdio over pipes


def test_receive_stdio_over_pipes(shm: Path, image: tuple[bytes, bytes, str]) -> None:
    """sshd may give the remote command pipes, not a socket: the handshake
    and the stream work over them, and stdout carries only the protocol."""
    libxl, _libxc, digest = image
    dst = shm / "dst.dom"
    proc = subprocess.Popen(
        xcsave_argv("receive", "--stdio", "--sim", dst, "--format", "libxl", "-v"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    with proc:
        try:
            assert proc.stdout.read(len(migrate.BANNER)) == migrate.BANNER
            proc.stdin.write(libxl)
            proc.stdin.flush()
            assert proc.stdout.read(len(migrate.READY)) == migrate.READY
            proc.stdin.write(migrate.GO)
            proc.stdin.flush()
            assert proc.stdout.read(len(migrate.REPORT) + 1) == migrate.REPORT + b"\0"
            proc.stdin.close()
            assert proc.stdout.read() == b""  # nothing else, ever
            err = proc.stderr.read().decode()
            assert proc.wait(timeout=60) == 0, err
        finally:
            if proc.poll() is None:
                proc.kill()
    assert "it runs here" in err  # the result went to stderr
    assert sim.digest(dst) == digest
    assert sim.info(dst)["state"] == "running"


def test_receive_stdio_refuses_a_stream_of_another_format(
    shm: Path, image: tuple[bytes, bytes, str]
) -> None:
    """Without --format, --stdio expects libxl (what migrate sends by
    default): a bare libxc stream is refused in one line, nothing created,
    and stdout still carries nothing but the banner."""
    dst = shm / "d.dom"
    r = subprocess.run(
        xcsave_argv("receive", "--stdio", "--sim", dst, "--progress", "none"),
        input=image[1], capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stdout == migrate.BANNER
    err = r.stderr.decode()
    assert len(err.splitlines()) == 1, err
    assert "nothing was kept here" in err
    assert not dst.exists() and partials(dst) == []


# ---------------------------------------------------------------- ssh


@dataclass
class Ssh:
    """A private sshd on the receiver's side of ``net``, and how to migrate to it."""

    server: Any  # xcsave._sshd.SshServer
    net: test_migrate.Net

    def migrate(
        self, src: Path, dst: Path, *extra: str | Path, config: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        ssh = f"ssh -F {config}" if config else self.server.ssh_command
        return subprocess.run(
            self.net.sender(
                "migrate", "--sim", src, "--to", self.server.url, "--ssh", ssh,
                "--remote-command", f"{sys.executable} -P -m xcsave", "--remote-sim", dst,
                "--progress", "none", *extra,
            ),
            capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip


@pytest.fixture(scope="module", params=["loopback", "netns"])
def ssh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ssh]:
    """sshd on loopback, or in the receiver's network namespace (a veth pair
    between two namespaces, as test_migrate's two-host tests)."""
    from xcsave._sshd import SshdUnavailable, sshd

    with contextlib.ExitStack() as stack:
        if request.param == "loopback":
            net = test_migrate.Net("loopback", "127.0.0.1")
        else:
            net = stack.enter_context(test_migrate._namespaces())
        try:
            server = stack.enter_context(
                sshd(
                    tmp_path_factory.mktemp("sshd"),
                    host=net.receiver_ip,
                    netns=net.receiver_ns,
                )
            )
        except SshdUnavailable as e:
            pytest.skip(f"no OpenSSH server to test against: {e}")
        yield Ssh(server, net)


def test_ssh_live_migration_under_load(ssh: Ssh, shm: Path) -> None:
    src = sim.create(shm / "src.dom", 64 * MiB, vcpus=2, seed=34)
    dst = shm / "dst.dom"
    with workload(src):
        r = ssh.migrate(src, dst, "--live", "--json")
    assert r.returncode == 0, r.stderr + ssh.server.log()[-2000:]
    report = json.loads(r.stdout)
    assert report["peer"] == ssh.server.url  # it went over that link
    assert report["rounds"] >= 2  # the workload dirtied pages during round 0
    assert sim.digest(dst) == sim.digest(src)  # src: suspended since the stop-and-copy
    assert sim.info(dst)["state"] == "running"
    assert sim.info(src)["state"] == "suspended"
    assert partials(dst) == []


def test_ssh_wrong_client_key_is_one_line(ssh: Ssh, shm: Path, tmp_path: Path) -> None:
    from xcsave._sshd import keygen

    src = sim.create(shm / "src.dom", 4 * MiB, seed=35)
    before = sim.digest(src)
    config = ssh.server.client_config(keygen(tmp_path / "stranger"), "stranger_config")
    r = ssh.migrate(src, shm / "dst.dom", config=config)
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert f"ssh {ssh.server.user}@{ssh.server.host}: " in r.stderr
    assert "Permission denied" in r.stderr and "exit status 255" in r.stderr
    assert "running here again" in r.stderr
    assert sim.info(src)["state"] == "running"
    assert sim.digest(src) == before
    assert not (shm / "dst.dom").exists()


def test_ssh_remote_failure_reports_the_remote_line(ssh: Ssh, shm: Path) -> None:
    src = sim.create(shm / "src.dom", 4 * MiB, seed=36)
    dst = sim.create(shm / "dst.dom", 4 * MiB, seed=37)  # the target exists there
    theirs = sim.digest(dst)
    r = ssh.migrate(src, dst)
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert "xcsave: receive: " in r.stderr and "EEXIST" in r.stderr  # the remote's own line
    assert sim.info(src)["state"] == "running"
    assert sim.digest(dst) == theirs


def test_ssh_remote_sim_defaults_to_our_domains_name(ssh: Ssh, shm: Path) -> None:
    """A bare domain name here becomes the same name in the remote's own
    $XCSAVE_SIM_DIR (the remote command may set it: it is shlex-split and
    quoted back for the remote shell)."""
    here, there = shm / "here", shm / "there dir"  # a space: the quoting must hold
    here.mkdir()
    there.mkdir()
    src = sim.create(here / "web1", 4 * MiB, seed=42)
    remote = shlex.join(["env", f"XCSAVE_SIM_DIR={there}", sys.executable, "-P", "-m", "xcsave"])
    r = subprocess.run(
        ssh.net.sender(
            "migrate", "--sim", "web1", "--to", ssh.server.url, "--ssh", ssh.server.ssh_command,
            "--remote-command", remote, "--progress", "none",
        ),
        capture_output=True, text=True, timeout=180, check=False,
        env={**os.environ, "XCSAVE_SIM_DIR": str(here)},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert sim.digest(there / "web1") == sim.digest(src)
    assert sim.info(there / "web1")["state"] == "running"


def test_ssh_target_is_checked_before_anything_runs(shm: Path) -> None:
    src = sim.create(shm / "src.dom", 1 * MiB)
    r = subprocess.run(
        xcsave_argv("migrate", "--sim", src, "--to", "ssh://-oProxyCommand=evil"),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 2
    assert "bad ssh target" in r.stderr


# ---------------------------------------------------------------- xcsave bench migrate --transport


@pytest.mark.parametrize("transport", ["insecure", "tls", "ssh"])
def test_bench_migrate_transport_json(shm: Path, transport: str) -> None:
    if transport == "tls":
        pytest.importorskip("cryptography", reason="TLS directories need 'cryptography'")
    r = subprocess.run(
        xcsave_argv(
            "bench", "migrate", "--transport", transport, "--memory", "16M", "--rate", "2000",
            "--repeat", "1", "--json", "--dir", shm,
        ),
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    if data.get("skipped"):
        pytest.skip(data["skipped"])
    assert data["transport"] == transport
    assert set(data["runs"]) == {transport, "insecure"}
    for runs in data["runs"].values():
        assert [run["match"] for run in runs] == [True]  # each copy is bit-exact
    assert set(data["downtime_ms"]) == {transport, "insecure"}
    assert list(shm.iterdir()) == []  # its domains and keys are gone again


# ---------------------------------------------------------------- a real peer goes silent


@pytest.mark.parametrize("silent", ["receiver", "sender"])
def test_a_peer_stopped_mid_stream_times_out_the_other(shm: Path, silent: str) -> None:
    """Real processes over loopback, live under a workload; one end (with its
    helper) is stopped with SIGSTOP mid-stream.  The other fails with
    ETIMEDOUT after --idle-timeout, in one line; once the stopped end goes on
    it fails too.  Nothing is kept at the target, the source runs again."""
    src = sim.create(shm / "src.dom", 64 * MiB, vcpus=2, seed=41)
    dst = shm / "dst.dom"
    quiet = ("--progress", "none", "--idle-timeout", "1")
    receiver = subprocess.Popen(
        xcsave_argv("receive", "--listen", "127.0.0.1:0", "--insecure", "--sim", dst, *quiet),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    sender: subprocess.Popen[str] | None = None
    try:
        assert receiver.stdout is not None
        port = int(receiver.stdout.readline().rsplit(":", 1)[1])
        with workload(src):
            # A policy that never stops copying: the stream is surely flowing.
            sender = subprocess.Popen(
                xcsave_argv(
                    "migrate", "--sim", src, "--to", f"127.0.0.1:{port}", "--insecure", "--live",
                    "--policy", "max-iters:1000000000", *quiet,
                ),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                start_new_session=True,
            )  # fmt: skip
            for _ in range(3000):  # until the restore writes its partial domain
                if partials(dst) or sender.poll() is not None:
                    break
                select.select([], [], [], 0.01)
            assert partials(dst), sender.communicate()[1] if sender.poll() is not None else ""
            stopped, other = (receiver, sender) if silent == "receiver" else (sender, receiver)
            os.killpg(stopped.pid, signal.SIGSTOP)
            try:
                _out, other_err = other.communicate(timeout=60)
            finally:
                os.killpg(stopped.pid, signal.SIGCONT)
            _out, stopped_err = stopped.communicate(timeout=60)
            state_after = sim.info(src)["state"]
    finally:
        for p in (receiver, sender):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    other_lines = test_migrate.without_insecure_warning(other_err).splitlines()
    assert len(other_lines) == 1, other_err
    assert "ETIMEDOUT" in other_lines[0] and "--idle-timeout" in other_lines[0]
    assert (receiver.returncode, sender.returncode) == (1, 1), (other_err, stopped_err)
    assert state_after == "running"  # the source runs again (the guest went on)
    assert not dst.exists() and partials(dst) == []
