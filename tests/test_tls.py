"""TLS channels (xcsave.tls, the helper's tunnel) and ``xcsave tls init``.

Every refusal is checked the way an attacker would try it: no certificate,
another CA's, an expired one, the wrong server name, plaintext (garbage, or
an xl stream in clear), silence, a trickle, a cut without close_notify.
Each must fail in one line with its errno, leaving no helper and no fd.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import hashlib
import os
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import helper_pids

from xcsave import tls, tlsinit
from xcsave.errors import TlsError

pytest.importorskip("cryptography", reason="xcsave[tls] (cryptography) is not installed")


def _tls_built() -> bool:
    import subprocess

    from xcsave.supervisor import helper_path

    r = subprocess.run([str(helper_path()), "--version"], capture_output=True, check=True)
    return b" tls openssl" in r.stdout


pytestmark = pytest.mark.skipif(
    not _tls_built(), reason="the helper was built without OpenSSL (install libssl-dev)"
)

# Handshake deadline for the refusal tests, seconds. Under a wrapper
# (ci-sanitize runs every helper under valgrind) a good handshake alone takes
# over a second, so the deadline would fire before the refusal it tests.
SHORT = 10.0 if os.environ.get("XCSAVE_HELPER_WRAPPER") else 1.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """TLS directories: a server and a client of one CA, and rogues."""
    root = tmp_path_factory.mktemp("pki")
    out = {
        "server": root / "server",
        "client": root / "client",
        "other": root / "other",
        "expired": root / "expired",
    }
    tlsinit.tls_init(out["server"], ["localhost", "127.0.0.1"])
    tlsinit.tls_init(out["client"], ["client.example"], ca_dir=out["server"])
    tlsinit.tls_init(out["other"], ["client.example"])  # its own CA
    # A client that trusts the server's CA but holds another CA's certificate.
    foreign = out["foreign"] = root / "foreign"
    foreign.mkdir(mode=0o700)
    (foreign / "ca-cert.pem").write_bytes((out["server"] / "ca-cert.pem").read_bytes())
    (foreign / "ca-cert.pem").chmod(0o644)  # whatever the umask
    for name in ("cert.pem", "key.pem"):
        (foreign / name).write_bytes((out["other"] / name).read_bytes())
        (foreign / name).chmod(0o600)
    tlsinit.issue_host(
        out["expired"],
        ["client.example"],
        ca_dir=out["server"],
        days=1,
        not_before=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3),
    )
    return out


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Nothing of a test's tunnels outlives it: no helper, no fd."""
    before = _fds()
    yield
    assert helper_pids() == []
    # An fd opened and closed meanwhile may have been reused; compare sets.
    assert _fds() - before == set()


async def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    loop = asyncio.get_running_loop()
    with socket.socket() as lsn:
        lsn.bind(("127.0.0.1", 0))
        lsn.listen(1)
        lsn.setblocking(False)
        client = socket.socket()
        client.setblocking(False)
        await loop.sock_connect(client, lsn.getsockname())
        server, _ = await loop.sock_accept(lsn)
    return client, server


async def _channels(
    pki: dict[str, Path], client_dir: str = "client", name: str = "127.0.0.1"
) -> tuple[tls.TlsChannel, tls.TlsChannel]:
    c, s = await _tcp_pair()
    return await _channels_over(pki, c, s, client_dir, name)


async def _channels_over(
    pki: dict[str, Path],
    c: socket.socket,
    s: socket.socket,
    client_dir: str = "client",
    name: str = "127.0.0.1",
) -> tuple[tls.TlsChannel, tls.TlsChannel]:
    """Channels over the TCP pair (c, s), which are closed here (the tunnels
    have their own copies)."""
    try:
        return await asyncio.gather(
            tls.tls_client(c, tls_dir=pki[client_dir], server_name=name),
            tls.tls_server(s, tls_dir=pki["server"]),
        )
    finally:
        c.close()
        s.close()


async def _recv_all(sock: socket.socket) -> tuple[int, str]:
    loop = asyncio.get_running_loop()
    h = hashlib.sha256()
    n = 0
    while chunk := await loop.sock_recv(sock, 1 << 20):
        h.update(chunk)
        n += len(chunk)
    return n, h.hexdigest()


async def _send_all(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)
    sock.shutdown(socket.SHUT_WR)


# --------------------------------------------------------------- the channel


@pytest.mark.usefixtures("no_leaks")
async def test_64_mib_each_way_bit_exact(pki: dict[str, Path]) -> None:
    up = os.urandom(64 << 20)
    down = bytes(reversed(up[: 48 << 20])) + os.urandom(16 << 20)
    client, server = await _channels(pki)
    assert client.peer.startswith("CN=localhost (127.0.0.1:")
    assert server.peer.startswith("CN=client.example (127.0.0.1:")
    assert client.version == server.version == "TLSv1.3"
    assert "GCM" in client.cipher or "CHACHA20" in client.cipher
    got = await asyncio.gather(
        _send_all(client.sock, up),
        _send_all(server.sock, down),
        _recv_all(server.sock),
        _recv_all(client.sock),
    )
    assert got[2] == (len(up), hashlib.sha256(up).hexdigest())
    assert got[3] == (len(down), hashlib.sha256(down).hexdigest())
    await asyncio.gather(client.aclose(), server.aclose())
    await client.aclose()  # idempotent
    assert client.error is None
    assert client.stats is not None
    assert (client.stats.sent, client.stats.received) == (len(up), len(down))
    assert server.stats is not None
    assert (server.stats.sent, server.stats.received) == (len(down), len(up))


@pytest.mark.usefixtures("no_leaks")
async def test_one_side_closes_first_the_other_reads_a_clean_eof(pki: dict[str, Path]) -> None:
    client, server = await _channels(pki, name="localhost")
    await asyncio.get_running_loop().sock_sendall(client.sock, b"last words")
    await client.aclose()  # without waiting for the server to close
    assert await _recv_all(server.sock) == (10, hashlib.sha256(b"last words").hexdigest())
    await server.aclose()
    assert server.error is None


@pytest.mark.usefixtures("no_leaks")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_cut_without_close_notify_is_an_error_not_eof(
    pki: dict[str, Path], sig: signal.Signals
) -> None:
    client, server = await _channels(pki)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(server.sock, b"x" * (1 << 20))
    assert await loop.sock_recv(client.sock, 1) == b"x"
    # The server's tunnel dies: its TCP socket closes with no close_notify.
    (pid,) = [p for p in helper_pids(mode="tunnel") if b"server" in _cmdline(p)]
    os.kill(pid, sig)
    n, _ = await _recv_all(client.sock)
    assert n <= (1 << 20) - 1
    # The failure is known before the EOF could be read, and aclose says it.
    assert client.error is not None
    assert client.error.errno == errno.ECONNRESET
    with pytest.raises(TlsError, match="without close_notify") as e:
        await client.aclose()
    assert e.value.errno == errno.ECONNRESET
    _one_line(e.value)
    with pytest.raises(TlsError) as e:
        await server.aclose()
    if sig == signal.SIGTERM:  # a stop: at once, and no close_notify
        assert e.value.errno == errno.ECANCELED
        assert "stopped by SIGTERM" in str(e.value)


@pytest.mark.usefixtures("no_leaks")
async def test_bytes_injected_on_the_path_are_an_error(pki: dict[str, Path]) -> None:
    c, s = await _tcp_pair()
    path = c.dup()  # someone on the path, writing into the client's TCP stream
    try:
        client, server = await _channels_over(pki, c, s)
        path.send(b"\x17\x03\x03\x00\x20" + b"\xee" * 32)  # a forged application record
        assert await _recv_all(server.sock) == (0, hashlib.sha256().hexdigest())
        assert server.error is not None
        assert server.error.errno == errno.EPROTO
        assert "bad record mac" in str(server.error)
        with pytest.raises(TlsError):
            await server.aclose()
        with contextlib.suppress(TlsError):  # it hears an alert, or nothing
            await client.aclose()
    finally:
        path.close()


@pytest.mark.usefixtures("no_leaks")
async def test_aclose_after_the_tunnel_was_cancelled(pki: dict[str, Path]) -> None:
    client, server = await _channels(pki)
    assert client._task is not None
    client._task.cancel()  # as the loop's teardown would
    await asyncio.wait({client._task})  # (else aclose's close could win: a clean end)
    with pytest.raises(TlsError) as e:
        await client.aclose()
    assert e.value.errno == errno.ECANCELED
    with pytest.raises(TlsError):  # its peer saw a cut
        await server.aclose()


async def _until(cond: Callable[[], bool]) -> None:
    """Poll ``cond`` (a look at /proc: nothing to await) until it holds."""
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


@pytest.mark.usefixtures("no_leaks")
async def test_sim_domain_saved_and_restored_through_the_channel(
    pki: dict[str, Path], tmp_path: Path
) -> None:
    """Helpers on both ends of a channel, as a TLS migration has them: the
    save writes its stream into one channel's socket, the restore reads it
    from the other's; the copy is bit-exact."""
    import xcsave
    from xcsave import sim

    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    src = base / f"xcsave-test-tls-{os.getpid()}-src.dom"
    dst = base / f"xcsave-test-tls-{os.getpid()}-dst.dom"
    try:
        sim.create(src, 32 << 20, seed=7)
        client, server = await _channels(pki)
        for ch in (client, server):
            ch.sock.setblocking(True)  # the helpers' engines expect blocking fds
        await asyncio.gather(
            xcsave.save(client.sock.fileno(), sim=src, live=True, fmt="libxl"),
            xcsave.restore(server.sock.fileno(), sim=dst, fmt="libxl"),
        )
        await asyncio.gather(client.aclose(), server.aclose())
        assert sim.digest(dst) == sim.digest(src)
        assert client.stats is not None
        assert server.stats is not None
        assert client.stats.sent == server.stats.received > 1 << 20  # zero pages are not sent
    finally:
        for dom in (src, dst):
            with contextlib.suppress(FileNotFoundError):
                sim.remove(dom)


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


@pytest.mark.usefixtures("no_leaks")
async def test_cancelled_handshake_leaves_nothing(pki: dict[str, Path]) -> None:
    c, s = await _tcp_pair()
    try:
        task = asyncio.create_task(tls.tls_server(s, tls_dir=pki["server"]))
        await _until(lambda: bool(helper_pids(mode="tunnel")))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        c.close()
        s.close()


# --------------------------------------------------------------- refusals


async def _refused(
    server: Awaitable[Any], client: Callable[[], Awaitable[Any]] | None = None
) -> TlsError:
    """The server's TlsError (the client side runs beside it, if given)."""
    other = asyncio.ensure_future(client()) if client else None
    try:
        with pytest.raises(TlsError) as e:
            await server
    finally:
        if other is not None:
            await asyncio.gather(other, return_exceptions=True)
    _one_line(e.value)
    return e.value


def _one_line(e: TlsError) -> None:
    """A refusal, not a crash (an ASan report, a signal), in one line."""
    assert "\n" not in str(e)
    assert "helper then died" not in str(e)


def _rogue_ssl_client(sock: socket.socket, ca: Path, cert_dir: Path | None) -> Callable[[], Any]:
    """A TLS 1.3 client of Python's ssl module, with or without a certificate."""

    def handshake() -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_verify_locations(ca)
        if cert_dir is not None:
            ctx.load_cert_chain(cert_dir / "cert.pem", cert_dir / "key.pem")
        sock.setblocking(True)
        sock.settimeout(SHORT * 5)
        with ctx.wrap_socket(
            sock, server_hostname="localhost", do_handshake_on_connect=False
        ) as s:
            s.do_handshake()
            s.recv(1)  # the server's verdict on our certificate comes after

    async def run() -> None:
        await asyncio.to_thread(handshake)

    return run


@pytest.mark.usefixtures("no_leaks")
async def test_client_without_certificate_is_refused(pki: dict[str, Path]) -> None:
    c, s = await _tcp_pair()
    with c, s:
        e = await _refused(
            tls.tls_server(s, tls_dir=pki["server"], handshake_timeout=5),
            _rogue_ssl_client(c, pki["server"] / "ca-cert.pem", None),
        )
    assert e.errno == errno.EACCES
    assert "TLS handshake with 127.0.0.1:" in str(e)


async def _both_refused(
    pki: dict[str, Path], client_dir: str, name: str = "127.0.0.1"
) -> tuple[TlsError, TlsError]:
    """A handshake both sides must fail: (the client's error, the server's)."""
    c, s = await _tcp_pair()
    with c, s:
        results = await asyncio.gather(
            tls.tls_client(c, tls_dir=pki[client_dir], server_name=name),
            tls.tls_server(s, tls_dir=pki["server"]),
            return_exceptions=True,
        )
    for r in results:
        assert isinstance(r, TlsError), r
        _one_line(r)
    return results[0], results[1]  # type: ignore[return-value]


@pytest.mark.usefixtures("no_leaks")
@pytest.mark.parametrize(
    ("client_dir", "server_says", "client_says"),
    [
        ("foreign", "certificate verify failed", "unknown ca"),
        ("expired", "certificate has expired", "certificate expired"),
    ],
)
async def test_client_certificate_refused_both_sides_know(
    pki: dict[str, Path], client_dir: str, server_says: str, client_says: str
) -> None:
    client_err, server_err = await _both_refused(pki, client_dir)
    assert server_err.errno == client_err.errno == errno.EACCES
    assert server_says in str(server_err)
    assert client_says in str(client_err)


@pytest.mark.usefixtures("no_leaks")
@pytest.mark.parametrize(
    ("client_dir", "name", "client_says"),
    [
        ("other", "127.0.0.1", "certificate verify failed"),  # another CA's server
        ("client", "hostb.example", "hostname mismatch"),  # not the host we dialled
    ],
)
async def test_client_refuses_the_server(
    pki: dict[str, Path], client_dir: str, name: str, client_says: str
) -> None:
    client_err, server_err = await _both_refused(pki, client_dir, name)
    assert client_err.errno == errno.EACCES
    assert client_says in str(client_err)
    assert server_err.errno == errno.EACCES  # it hears the client's alert


@pytest.mark.usefixtures("no_leaks")
@pytest.mark.parametrize(
    ("payload", "delay", "want"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", None, errno.EPROTO, id="garbage"),
        pytest.param(
            b"Xen saved domain, xl format\n \0 \r" + b"\0" * 64, None, errno.EPROTO, id="xl"
        ),
        pytest.param(b"\x16\x03\x01\xff\xff" + b"\x01" * 64, None, errno.EPROTO, id="bomb"),
        pytest.param(b"", None, errno.ETIMEDOUT, id="silent"),
        pytest.param(
            b"\x16\x03\x01\x02\x00\x01" + b"\0" * 200, 0.2, errno.ETIMEDOUT, id="trickle"
        ),
    ],
)
async def test_plaintext_silent_or_trickling_client_refused(
    pki: dict[str, Path], payload: bytes, delay: float | None, want: int
) -> None:
    c, s = await _tcp_pair()
    loop = asyncio.get_running_loop()

    async def rogue() -> None:
        if delay is None:
            await loop.sock_sendall(c, payload)
            await asyncio.sleep(SHORT * 3)
            return
        for b in payload:
            await loop.sock_sendall(c, bytes([b]))
            await asyncio.sleep(delay)

    with c, s:
        feeder = asyncio.create_task(rogue())
        try:
            e = await _refused(tls.tls_server(s, tls_dir=pki["server"], handshake_timeout=SHORT))
        finally:
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
    assert e.errno == want
    if want == errno.ETIMEDOUT:
        assert f"no complete handshake within {SHORT * 1000:.0f} ms" in str(e)


@pytest.mark.usefixtures("no_leaks")
@pytest.mark.parametrize("behaviour", ["silent", "close_after_handshake"])
async def test_rogue_server_refused(pki: dict[str, Path], behaviour: str) -> None:
    """A server that never answers, or one that completes the handshake with
    a good certificate but never accepts ours (no ticket, then close_notify)."""
    c, s = await _tcp_pair()

    def serve() -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki["server"] / "cert.pem", pki["server"] / "key.pem")
        ctx.load_verify_locations(pki["server"] / "ca-cert.pem")
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.num_tickets = 0
        s.setblocking(True)
        s.settimeout(SHORT * 5)
        with ctx.wrap_socket(s, server_side=True) as tls_sock:
            tls_sock.unwrap()

    with c, s:
        rogue = asyncio.ensure_future(asyncio.to_thread(serve)) if behaviour != "silent" else None
        try:
            e = await _refused(
                tls.tls_client(
                    c, tls_dir=pki["client"], server_name="localhost", handshake_timeout=SHORT
                )
            )
        finally:
            c.close()  # the rogue's unwrap() waits for our close_notify or EOF
            if rogue is not None:
                await asyncio.gather(rogue, return_exceptions=True)
    if behaviour == "silent":
        assert e.errno == errno.ETIMEDOUT
    else:
        assert e.errno == errno.ECONNRESET
        assert "the peer closed the connection" in str(e)


@pytest.mark.usefixtures("no_leaks")
async def test_group_readable_key_refused(pki: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "loose"
    tlsinit.tls_init(d, ["localhost"], ca_dir=pki["server"])
    (d / "key.pem").chmod(0o644)
    c, s = await _tcp_pair()
    with c, s:
        e = await _refused(tls.tls_server(s, tls_dir=d, handshake_timeout=SHORT))
    assert e.errno == errno.EPERM
    assert "key.pem: refusing a private key accessible by others (mode 0644" in str(e)


@pytest.mark.usefixtures("no_leaks")
@pytest.mark.parametrize("what", [".", "ca-cert.pem", "cert.pem"])
async def test_tls_dir_or_file_others_can_write_refused(
    pki: dict[str, Path], tmp_path: Path, what: str
) -> None:
    d = tmp_path / "open"
    tlsinit.tls_init(d, ["localhost"], ca_dir=pki["server"])
    (d / what).chmod(0o777 if what == "." else 0o666)
    c, s = await _tcp_pair()
    with c, s:
        e = await _refused(tls.tls_server(s, tls_dir=d, handshake_timeout=SHORT))
    assert e.errno == errno.EPERM
    assert "writable by group or others" in str(e)


@pytest.mark.usefixtures("no_leaks")
async def test_missing_tls_dir_names_the_file(tmp_path: Path) -> None:
    c, s = await _tcp_pair()
    with c, s:
        e = await _refused(tls.tls_client(c, tls_dir=tmp_path / "none", server_name="x"))
    assert e.errno == errno.ENOENT
    assert f"{tmp_path / 'none'}: No such file or directory" in str(e)
    assert "xcsave tls init" in str(e)


def test_default_tls_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XCSAVE_TLS_DIR", raising=False)
    assert tls.default_tls_dir() == Path("/etc/xcsave/tls") == Path(tls.DEFAULT_TLS_DIR)
    monkeypatch.setenv("XCSAVE_TLS_DIR", "/srv/tls")
    assert tls.default_tls_dir() == Path("/srv/tls")


# --------------------------------------------------------------- the benchmark


def test_bench_tls_link_json() -> None:
    import json
    import subprocess
    import sys

    argv = ["bench", "tls-link", "--size", "8M", "--repeat", "1", "--json"]
    r = subprocess.run(
        [sys.executable, "-P", "-m", "xcsave", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["bench"] == "tls-link"
    assert data["bytes"] == 8 << 20
    assert data["version"] == "TLSv1.3"
    assert data["measured"] > 0
    assert data["baseline"] > 0
