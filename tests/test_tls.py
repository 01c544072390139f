"""TLS channels (xcsave.tls, the helper's tunnel) and ``xcsave tls init``.

Every refusal is checked the way an attacker would try it: no certificate,
another CA's, an expired one, the wrong server name, plaintext (garbage, or
an xl stream in clear), silence, a trickle, a cut without close_notify.
Each must fail in one line with its errno, leaving no helper and no fd.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import hashlib
import os
import signal
import socket
import ssl
import stat
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import helper_pids

from xcsave import tls, tlsinit
from xcsave.cli import main as cli_main
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

SHORT = 1.0  # handshake deadline for the refusal tests, seconds


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
async def test_cut_without_close_notify_is_an_error_not_eof(pki: dict[str, Path]) -> None:
    client, server = await _channels(pki)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(server.sock, b"x" * (1 << 20))
    assert await loop.sock_recv(client.sock, 1) == b"x"
    # The server's tunnel dies: its TCP socket closes with no close_notify.
    (pid,) = [p for p in helper_pids(mode="tunnel") if b"server" in _cmdline(p)]
    os.kill(pid, signal.SIGKILL)
    n, _ = await _recv_all(client.sock)
    assert n <= (1 << 20) - 1
    # The failure is known before the EOF could be read, and aclose says it.
    assert client.error is not None
    assert client.error.errno == errno.ECONNRESET
    with pytest.raises(TlsError, match="without close_notify") as e:
        await client.aclose()
    assert e.value.errno == errno.ECONNRESET
    _one_line(e.value)
    with pytest.raises(TlsError):
        await server.aclose()


async def _until(cond: Callable[[], bool]) -> None:
    """Poll ``cond`` (a look at /proc: nothing to await) until it holds."""
    for _ in range(1000):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


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
        sock.settimeout(5)
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
        assert "no complete handshake within 1000 ms" in str(e)


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
async def test_missing_tls_dir_names_the_file(tmp_path: Path) -> None:
    c, s = await _tcp_pair()
    with c, s:
        e = await _refused(tls.tls_client(c, tls_dir=tmp_path / "none", server_name="x"))
    assert e.errno == errno.ENOENT
    assert "none/ca-cert.pem" in str(e)
    assert "xcsave tls init" in str(e)


def test_default_tls_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XCSAVE_TLS_DIR", raising=False)
    assert tls.default_tls_dir() == Path("/etc/xcsave/tls") == Path(tls.DEFAULT_TLS_DIR)
    monkeypatch.setenv("XCSAVE_TLS_DIR", "/srv/tls")
    assert tls.default_tls_dir() == Path("/srv/tls")


# --------------------------------------------------------------- tls init


def test_tls_init_modes_under_umask_000(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        files = tlsinit.tls_init(tmp_path / "a", ["a.example", "192.0.2.7"])
        tlsinit.tls_init(tmp_path / "b", ["b.example"], ca_dir=tmp_path / "a")
    finally:
        os.umask(old)
    assert [f.name for f in files] == ["ca-cert.pem", "ca-key.pem", "cert.pem", "key.pem"]
    for d in ("a", "b"):
        assert stat.S_IMODE((tmp_path / d).stat().st_mode) == 0o700
    for f in [*(tmp_path / "a").iterdir(), *(tmp_path / "b").iterdir()]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert not (tmp_path / "b" / "ca-key.pem").exists()  # the CA key stays home
    assert (tmp_path / "b" / "ca-cert.pem").read_bytes() == (
        tmp_path / "a" / "ca-cert.pem"
    ).read_bytes()


def test_tls_init_certificate_fields(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    tlsinit.tls_init(tmp_path, ["hosta.example", "192.0.2.7", "2001:db8::1"], days=30)
    cert = x509.load_pem_x509_certificate((tmp_path / "cert.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hosta.example"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == [
        "192.0.2.7",
        "2001:db8::1",
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=29) < life <= datetime.timedelta(days=30)


@pytest.mark.parametrize("name", ["key.pem", "cert.pem", "ca-key.pem"])
def test_tls_init_refuses_a_planted_symlink(tmp_path: Path, name: str) -> None:
    d = tmp_path / "tls"
    d.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (d / name).symlink_to(victim)
    # EEXIST where we would create the file, ELOOP where we would read a CA key.
    with pytest.raises(OSError, match=r"already there|refusing a symlink") as e:
        tlsinit.tls_init(d, ["a"])
    assert e.value.errno in (errno.EEXIST, errno.ELOOP)
    assert victim.read_bytes() == b"precious"
    assert (d / name).is_symlink()
    assert [p.name for p in d.iterdir()] == [name]  # nothing made beside it


def test_tls_init_refuses_a_symlinked_or_open_directory(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(PermissionError, match="symlink"):
        tlsinit.tls_init(tmp_path / "link", ["a"])
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by group or others"):
        tlsinit.tls_init(loose, ["a"])
    assert list(real.iterdir()) == list(loose.iterdir()) == []


def test_tls_init_never_overwrites_without_force(tmp_path: Path) -> None:
    tlsinit.tls_init(tmp_path / "a", ["a"])
    key = (tmp_path / "a" / "key.pem").read_bytes()
    with pytest.raises(FileExistsError):
        tlsinit.tls_init(tmp_path / "a", ["a"])
    assert (tmp_path / "a" / "key.pem").read_bytes() == key
    tlsinit.tls_init(tmp_path / "a", ["a"], force=True)
    assert (tmp_path / "a" / "key.pem").read_bytes() != key
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "ca-cert.pem",
        "ca-key.pem",
        "cert.pem",
        "key.pem",
    ]


def test_tls_init_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["tls", "init", str(tmp_path / "a"), "--host", "a.example"]) == 0
    assert capsys.readouterr().out.split() == [
        str(tmp_path / "a" / n) for n in ("ca-cert.pem", "ca-key.pem", "cert.pem", "key.pem")
    ]
    args = ["tls", "init", str(tmp_path / "b"), "--host", "b", "--ca", str(tmp_path / "a")]
    assert cli_main(args) == 0
    capsys.readouterr()
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "EEXIST" in err
    assert cli_main(["tls", "init", str(tmp_path / "c"), "--host", "no good"]) == 2
    assert "bad --host 'no good'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert (
        cli_main(["tls", "init", str(tmp_path / "d"), "--host", "d", "--ca", "/nonexistent"]) == 1
    )
    assert "ENOENT" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


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
