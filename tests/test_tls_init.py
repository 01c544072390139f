"""``xcsave tls init`` (xcsave.tlsinit): the CA and host certificates.

Files 0600 and the directory 0700 whatever the umask; a planted symlink or
an existing file is refused and left untouched; nothing is made when the
arguments are wrong.  (The channels that use them: tests/test_tls.py.)
"""

from __future__ import annotations

import datetime
import errno
import os
import stat
from pathlib import Path

import pytest

pytest.importorskip("cryptography", reason="xcsave[tls] (cryptography) is not installed")

from xcsave import tlsinit
from xcsave.cli import main as cli_main


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
