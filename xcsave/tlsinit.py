"""``xcsave tls init``: a CA and host certificates for TLS channels (xcsave.tls).

Made with the ``cryptography`` package (``pip install 'xcsave[tls]'``), never
by hand.  A TLS directory holds::

    ca-cert.pem   the CA every peer's certificate must be signed by
    ca-key.pem    the CA's key: only in the directory that made the CA
    cert.pem      this host's certificate (SAN: each --host, as a DNS name
                  or an IP address; EKU serverAuth + clientAuth)
    key.pem       this host's key

Two hosts share a CA: ``xcsave tls init A --host a`` makes a CA and a's
certificate in A; ``xcsave tls init B --host b --ca A`` issues b's from A's
CA into B (B gets ca-cert.pem, never ca-key.pem); ``init A`` again on a
directory that holds a CA key issues from it.  Copy B to host b (scp -rp).

Every file is created 0600 whatever the umask, with O_EXCL|O_NOFOLLOW (a
planted symlink or an existing file is refused, EEXIST) in a directory
created 0700 (a symlink, another owner's or a group/world-writable one is
refused, EPERM); an existing host certificate is replaced only with
``force=True``, by a rename.  Keys are ECDSA P-256.
"""

from __future__ import annotations

import datetime
import errno as errno_mod
import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING, Final

from .files import create_private, private_dir

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["CA_DAYS", "issue_host", "make_ca", "tls_init"]

CA_CERT: Final = "ca-cert.pem"
CA_KEY: Final = "ca-key.pem"
HOST_CERT: Final = "cert.pem"
HOST_KEY: Final = "key.pem"
#: The CA outlives the host certificates it issues.
CA_DAYS: Final = 3650


def _crypto() -> None:
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "xcsave tls init needs the 'cryptography' package: pip install 'xcsave[tls]'"
        ) from None


def _write(path: Path, data: bytes, *, replace: bool = False) -> None:
    """``data`` into a new private file at ``path`` (with ``replace``: beside
    it, then renamed over it)."""
    target = path.with_name(f".{path.name}.{os.getpid()}.tmp") if replace else path
    fd = create_private(target)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(target)
        raise
    os.close(fd)
    if replace:
        os.replace(target, path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _validity(
    days: int, not_before: datetime.datetime | None
) -> tuple[datetime.datetime, datetime.datetime]:
    if days < 1:
        raise ValueError(f"--days must be at least 1, not {days}")
    start = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    return start, start + datetime.timedelta(days=days)


def _certificate(
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    start: datetime.datetime,
    end: datetime.datetime,
    *,
    ca: bool,
) -> x509.CertificateBuilder:
    """What a CA's and a host's certificates share: a CA signs certificates
    (no CA below it), a host signs its handshakes."""
    from cryptography import x509

    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )


def make_ca(
    directory: str | os.PathLike[str],
    name: str,
    *,
    days: int = CA_DAYS,
    not_before: datetime.datetime | None = None,
) -> Path:
    """A new CA in ``directory`` (ca-cert.pem + ca-key.pem); returns the directory."""
    _crypto()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    d = private_dir(directory)
    key = _new_key()
    start, end = _validity(days, not_before)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"xcsave CA {name}")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        _certificate(subject, subject, key, start, end, ca=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_all(d, [(CA_KEY, _key_pem(key)), (CA_CERT, _cert_pem(cert))])
    return d


def _write_all(d: Path, files: list[tuple[str, bytes]], *, replace: bool = False) -> None:
    """Each (name, data) into ``d``; on failure, the new ones written so far are removed."""
    done: list[Path] = []
    try:
        for name, data in files:
            _write(d / name, data, replace=replace)
            done.append(d / name)
    except BaseException:
        if not replace:
            for p in done:
                p.unlink(missing_ok=True)
        raise


def _san(host: str) -> x509.GeneralName:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(c.isspace() or c in "/\\@:" for c in host) or len(host) > 253:
        raise ValueError(f"bad --host {host!r}: expected a DNS name or an IP address")
    return x509.DNSName(host)


def issue_host(
    directory: str | os.PathLike[str],
    hosts: list[str],
    *,
    ca_dir: str | os.PathLike[str] | None = None,
    days: int = 365,
    not_before: datetime.datetime | None = None,
    force: bool = False,
) -> Path:
    """cert.pem + key.pem for ``hosts`` in ``directory``, signed by the CA in
    ``ca_dir`` (default: ``directory``'s own); copies ca-cert.pem over if the
    CA is elsewhere.  EEXIST if a host certificate is there and not ``force``."""
    _crypto()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not hosts:
        raise ValueError("give at least one --host")
    names = [_san(h) for h in hosts]
    start, end = _validity(days, not_before)
    # The CA first (DIR is made only if there is something to put in it);
    # DIR's own CA is read once DIR has been checked.
    d = Path(directory) if ca_dir is not None else private_dir(directory)
    ca = Path(ca_dir) if ca_dir is not None else d
    ca_key = serialization.load_pem_private_key(_read(ca / CA_KEY), password=None)
    ca_cert_pem = _read(ca / CA_CERT)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca / CA_KEY}: not an ECDSA key made by xcsave tls init")
    d = private_dir(d)
    exists = _host_cert_there(d, force)
    key = _new_key()
    cert = (
        _certificate(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]),
            ca_cert.subject,
            key,
            start,
            min(end, ca_cert.not_valid_after_utc),
            ca=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    if ca != d:
        existing = _read(d / CA_CERT) if os.path.lexists(d / CA_CERT) else None
        if existing is not None and existing != ca_cert_pem and not force:
            raise FileExistsError(
                errno_mod.EEXIST,
                "another CA's certificate is already there (replace it with --force)",
                str(d / CA_CERT),
            )
        if existing != ca_cert_pem:
            _write(d / CA_CERT, ca_cert_pem, replace=existing is not None)
    _write_all(d, [(HOST_KEY, _key_pem(key)), (HOST_CERT, _cert_pem(cert))], replace=exists)
    return d


def _host_cert_there(d: Path, force: bool) -> bool:
    """Whether cert.pem or key.pem is there (a symlink, even dangling, counts);
    EEXIST unless ``force``."""
    there = next((d / n for n in (HOST_CERT, HOST_KEY) if os.path.lexists(d / n)), None)
    if there is not None and not force:
        raise FileExistsError(
            errno_mod.EEXIST,
            "a host certificate is already there (replace it with --force)",
            str(there),
        )
    return there is not None


def _read(path: Path) -> bytes:
    """A PEM file of a CA directory, not through a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno_mod.ELOOP:
            raise OSError(errno_mod.ELOOP, "refusing a symlink", str(path)) from None
        raise
    with os.fdopen(fd, "rb") as f:
        return f.read(1 << 20)


def tls_init(
    directory: str | os.PathLike[str],
    hosts: list[str],
    *,
    ca_dir: str | os.PathLike[str] | None = None,
    days: int = 365,
    force: bool = False,
) -> list[Path]:
    """What ``xcsave tls init`` does: a CA in ``directory`` unless ``ca_dir``
    is given or one is there already, then the host certificate; returns
    the files of ``directory``."""
    if not hosts:
        raise ValueError("give at least one --host")
    for h in hosts:
        _san(h)
    d = Path(directory)
    _host_cert_there(d, force)  # before a new CA is made in d
    if ca_dir is None and not os.path.lexists(d / CA_KEY):
        if os.path.lexists(d / CA_CERT):
            raise FileExistsError(
                errno_mod.EEXIST,
                "a CA certificate without its key is there (issue from its CA with --ca CA_DIR)",
                str(d / CA_CERT),
            )
        make_ca(d, hosts[0])
    issue_host(d, hosts, ca_dir=ca_dir, days=days, force=force)
    return sorted(p for p in d.iterdir() if p.name.endswith(".pem"))
