"""CLI: ``xcsave tls init DIR --host NAME ...`` (certificates for TLS channels)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .cli import UsageError


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("tls", help="certificates for TLS migration channels")
    ts = p.add_subparsers(dest="tls_command", metavar="TLSCOMMAND", required=True)
    i = ts.add_parser(
        "init",
        help="make a CA (or use one) and a host certificate in DIR",
        description=(
            "Make DIR (0700) with ca-cert.pem, cert.pem and key.pem for NAME, signed by "
            "a new CA whose key (ca-key.pem) stays in DIR, or by the CA in --ca CA_DIR "
            "(DIR then gets its ca-cert.pem, never its key), or by the CA already in DIR. "
            "Files are 0600; nothing existing is overwritten without --force."
        ),
    )
    i.add_argument("dir", metavar="DIR", help="the TLS directory to make (e.g. /etc/xcsave/tls)")
    i.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="NAME",
        help="a DNS name or IP address peers will dial (repeat for more; the first is the CN)",
    )
    i.add_argument("--ca", metavar="CA_DIR", help="issue from the CA in CA_DIR (its ca-key.pem)")
    i.add_argument("--days", type=int, default=365, help="validity of the host certificate")
    i.add_argument("--force", action="store_true", help="replace DIR's host certificate")
    i.set_defaults(func=_init)


def _init(args: argparse.Namespace) -> int:
    from . import tlsinit

    if args.days < 1:
        raise UsageError(f"--days must be at least 1, not {args.days}")
    try:
        files = tlsinit.tls_init(
            args.dir, args.host, ca_dir=args.ca, days=args.days, force=args.force
        )
    except RuntimeError as e:  # the cryptography package is missing
        sys.stderr.write(f"xcsave: tls init: {e}\n")
        return 1
    for f in files:
        sys.stdout.write(f"{f}\n")
    return 0
