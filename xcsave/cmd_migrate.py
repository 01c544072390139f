"""CLI: ``xcsave migrate`` (sender) and ``xcsave receive`` (receiver).

::

    xcsave migrate --sim DOM --to ssh://[USER@]HOST[:PORT] [--remote-sim NAME] --live
    xcsave receive --stdio --sim DOM --format FMT        # what ssh runs on the target

    xcsave receive --listen [HOST:]PORT --sim DOM (--tls-dir DIR | --insecure)
    xcsave migrate --sim DOM --to HOST:PORT (--tls-dir DIR | --insecure) --live

``receive --listen`` prints ``listening on HOST:PORT`` on stdout as soon as
it listens (``--listen HOST:0`` picks a free port; a bare PORT is loopback),
admits the first peer that authenticates and starts a stream, and exits 0
once the received domain runs.  ``receive --stdio`` writes nothing but the
protocol to stdout (results go to stderr).  ``migrate`` exits 0 once the
receiver reports its copy running; ours is then left suspended.  Either
end stopped by SIGTERM or Ctrl-C cleans up like any other failure.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from ._argparse import integer, rate
from .cli import (
    FORMATS,
    add_bounds_flags,
    add_live_flags,
    live_policy,
    throttle_json,
    throttle_text,
)
from .cli_run import (
    Terminated,
    add_logging_flags,
    add_progress_flag,
    add_run_flags,
    renderer,
    run_async,
    run_rendered,
)
from .defaults import HANDSHAKE_TIMEOUT
from .errors import UsageError

if TYPE_CHECKING:
    from .migrate import (
        EventSink,
        MigrationResult,
        NetOptions,
        ReceiveOptions,
        ReceiveResult,
        SendOptions,
    )
    from .progress import Renderer

# asyncio, the API and the extension load when a command runs, not at parse time.

__all__ = [  # the CLI plumbing first lived here: xcsave.cli_run now
    "Terminated",
    "add_logging_flags",
    "add_parsers",
    "add_progress_flag",
    "do_migrate",
    "do_receive",
    "parse_address",
    "renderer",
    "run_async",
]


def parse_address(text: str, *, host_required: bool = True) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6ADDR]:PORT``, or (``host_required=False``) a bare ``PORT``."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]*):(\d+)|(\d+)", text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"bad address {text!r}: expected HOST:PORT")
    host = m.group(1) or m.group(3) or ""
    port = int(m.group(2) or m.group(4) or m.group(5))
    if host_required and not host:
        raise argparse.ArgumentTypeError(f"bad address {text!r}: expected HOST:PORT")
    if not 0 <= port <= 65535 or (host_required and port == 0):
        raise argparse.ArgumentTypeError(f"bad port in {text!r}")
    return host, port


def _listen_address(text: str) -> tuple[str, int]:
    """``[HOST:]PORT``; a bare PORT binds loopback only."""
    host, port = parse_address(text, host_required=False)
    return host or "127.0.0.1", port


def _to_target(text: str) -> tuple[str, int] | str:
    """``ssh://[USER@]HOST[:PORT]`` (kept as text) or ``HOST:PORT``."""
    if text.startswith("ssh://"):
        from .ssh import parse_ssh_url

        try:
            parse_ssh_url(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    return parse_address(text)


def _add_tls_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tls-dir",
        metavar="DIR",
        help="TLS 1.3 with mutual certificates from DIR (ca-cert.pem, cert.pem, key.pem; "
        "default /etc/xcsave/tls or $XCSAVE_TLS_DIR when it exists)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plain TCP: neither authenticated nor encrypted (trusted networks only)",
    )


def _tls_choice(args: argparse.Namespace) -> dict[str, Any]:
    """``tls_dir`` and ``insecure`` for the API, or a usage error naming both options."""
    from .migrate import INSECURE_WARNING, resolve_tls

    if args.tls_dir is not None and args.insecure:
        raise UsageError("give --tls-dir DIR or --insecure, not both")
    try:
        tls = resolve_tls(args.tls_dir, args.insecure)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if tls is None:
        sys.stderr.write(f"xcsave: {INSECURE_WARNING}\n")
        sys.stderr.flush()
    return {"tls_dir": str(tls) if tls is not None else None, "insecure": args.insecure}


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "migrate",
        help="live-migrate a domain over ssh, TLS or (--insecure) plain TCP (sender)",
        description="Send a domain to 'xcsave receive': through ssh (which runs "
        "'xcsave receive --stdio' there), or to a listener over TLS or, with --insecure, "
        "plain TCP.  xl's handshake around the stream, which the helper writes straight "
        "to the channel.",
    )
    p.add_argument("--sim", metavar="DOM", required=True, help="the simulated domain to send")
    p.add_argument(
        "--to",
        metavar="ssh://[USER@]HOST[:PORT] | HOST:PORT",
        required=True,
        type=_to_target,
        help="the receiver: over ssh, or a listener (then --tls-dir or --insecure)",
    )
    p.add_argument(
        "--remote-sim", metavar="NAME", help="ssh: the domain to create there (default: ours)"
    )
    for flag, command, what, example in (  # the commands the ssh transport runs
        ("--ssh", "ssh", "the client command, options included", "; e.g. 'ssh -F cfg'"),
        ("--remote-command", "xcsave", "how to run xcsave there", ""),
    ):
        p.add_argument(
            flag,
            metavar="CMD",
            default=command,
            help=f"ssh: {what} (default {command!r}{example})",
        )
    _add_tls_flags(p)
    add_live_flags(p)
    _add_wire_flags(p)
    p.add_argument("--format", choices=FORMATS, default="libxl", help="stream framing")
    p.add_argument("--timeout", type=float, metavar="S", help="give the helper S seconds")
    p.add_argument(
        "--handshake-timeout",
        type=float,
        metavar="S",
        default=HANDSHAKE_TIMEOUT,
        help=f"seconds to wait for each handshake message (default {HANDSHAKE_TIMEOUT:g})",
    )
    add_bounds_flags(p, max_memory=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_run_flags(p)
    p.set_defaults(func=do_migrate)

    r = sub.add_parser(
        "receive",
        help="receive one migrated domain: on stdin/stdout (ssh) or a listener (receiver)",
        description="Receive one 'xcsave migrate' and run the received domain: over "
        "stdin/stdout (--stdio, what 'migrate --to ssh://' runs), or on a listener that "
        "admits the first peer that authenticates (TLS) and starts a stream.",
    )
    where = r.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--listen",
        metavar="[HOST:]PORT",
        type=_listen_address,
        help="address to bind (only that one; a bare PORT is 127.0.0.1); port 0 picks one",
    )
    where.add_argument(
        "--stdio",
        action="store_true",
        help="the handshake and stream on stdin/stdout (what migrate --to ssh:// runs; "
        "--format as the sender says, default libxl); nothing else is written to stdout",
    )
    _add_tls_flags(r)
    r.add_argument("--sim", metavar="DOM", required=True, help="the domain to create")
    r.add_argument(
        "--format",
        choices=("auto", *FORMATS),
        default="auto",
        help="expected stream framing (auto: from the stream's first bytes)",
    )
    r.add_argument("--timeout", type=float, metavar="S", help="give the helper S seconds")
    r.add_argument(
        "--force",
        action="store_true",
        help="replace an existing DOM (kept as it was unless the received copy starts)",
    )
    r.add_argument(
        "--accept-timeout",
        type=float,
        metavar="S",
        help="give up if no sender is admitted (authenticated, stream started) within S s",
    )
    r.add_argument(
        "--handshake-timeout",
        type=float,
        metavar="S",
        default=HANDSHAKE_TIMEOUT,
        help="seconds to wait for each handshake message, and for a connecting peer to "
        f"authenticate and start its stream (default {HANDSHAKE_TIMEOUT:g})",
    )
    add_bounds_flags(r, max_memory="the host's memory or the sim directory's filesystem")
    r.add_argument(
        "--save-to",
        metavar="FILE",
        help="also write the received stream into FILE (new, 0600; removed on failure): "
        "a plain stream 'xcsave verify' and Xen's verify-stream-v2 read (needs a sender "
        "using the wire: --compress, --channels or --resume)",
    )
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    add_run_flags(r)
    r.set_defaults(func=do_receive)


# ----------------------------------------------------------------- running


def _emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    if args.json or args.progress == "json":
        sys.stdout.write(json.dumps(data, sort_keys=True) + "\n")
    else:
        sys.stdout.write(text + "\n")
    sys.stdout.flush()


def net_options(args: argparse.Namespace, on_event: EventSink) -> NetOptions:
    """The options both ends take (:class:`xcsave.migrate.NetOptions`), from the command line."""
    return {
        "timeout": args.timeout,
        "handshake_timeout": args.handshake_timeout,
        "idle_timeout": args.idle_timeout or None,  # 0: never
        "on_event": on_event,
    }


def _with(args: argparse.Namespace, on_event: EventSink, *names: str) -> dict[str, Any]:
    """:func:`net_options` and the options ``names`` (each the flag's own dest)."""
    return {**net_options(args, on_event), **{n: getattr(args, n) for n in names}}


def send_options(args: argparse.Namespace, on_event: EventSink) -> SendOptions:
    """A sender's options (:class:`xcsave.migrate.SendOptions`), from the command line."""
    return cast("SendOptions", _with(args, on_event, *_SEND))


def receive_options(args: argparse.Namespace, on_event: EventSink) -> ReceiveOptions:
    """A receiver's options (:class:`xcsave.migrate.ReceiveOptions`), from the command line."""
    return cast("ReceiveOptions", _with(args, on_event, "max_memory", "force", "save_to"))


#: The sender's wire options (``_add_wire_flags``): their flags' dests are the API's names.
_SEND = ("compress", "compress_level", "channels", "max_bandwidth", "resume")


def _channels(text: str) -> int:
    from .wire import MAX_CHANNELS

    if not text.isdigit() or not 1 <= int(text) <= MAX_CHANNELS:
        raise argparse.ArgumentTypeError(f"bad channel count {text!r}: expected 1..{MAX_CHANNELS}")
    return int(text)


def _level(text: str) -> int:
    from .wire import MAX_LEVEL

    return integer(1, MAX_LEVEL)(text)


def _add_wire_flags(p: argparse.ArgumentParser) -> None:
    """The sender's wire extensions (issue 14; xcsave receivers only, but for the cap)."""
    p.add_argument(
        "--compress",
        choices=("off", "zstd", "adaptive"),
        default="off",
        help="compress page data on the wire (xcsave receivers only; adaptive: only while "
        "it pays, skipped for incompressible pages or when the CPU, not the link, is slow; "
        "on one channel it measures the link first, and one faster than zstd gets the "
        "stream as it is)",
    )
    p.add_argument(
        "--compress-level",
        type=_level,
        default=0,
        metavar="N",
        help="zstd's level, 1 (fastest) to 19 (default: 3 for zstd; adaptive starts at 1, "
        "tries 3 where the link leaves time, and keeps a level of 3 or more as given)",
    )
    p.add_argument(
        "--channels",
        type=_channels,
        default=1,
        metavar="N",
        help="spread the stream over N connections, each secured like the first "
        "(TCP/TLS to an xcsave receiver; default 1)",
    )
    p.add_argument(
        "--max-bandwidth",
        type=rate(),
        default=0,
        metavar="RATE",
        help="cap the link: 1gbit, 500mbit (bits/s, decimal, as tc writes them) or 100M, "
        "125MB/s (bytes/s, binary: 100M = 100 MiB/s); 0: none (default).  Works towards any "
        "receiver",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="reconnect a channel lost during the live rounds and send only what the "
        "receiver has not confirmed (TCP/TLS to an xcsave receiver)",
    )


def do_migrate(args: argparse.Namespace) -> int:
    from . import migrate

    if isinstance(args.to, str):  # ssh://
        from .ssh import migrate_ssh

        if args.tls_dir is not None or args.insecure:
            raise UsageError("--tls-dir and --insecure are for HOST:PORT; ssh brings its own")

        target: Callable[..., Awaitable[MigrationResult]] = functools.partial(
            migrate_ssh,
            remote_sim=args.remote_sim,
            ssh=args.ssh,
            remote_command=args.remote_command,
        )
    else:
        if args.remote_sim is not None:
            raise UsageError("--remote-sim is for ssh:// targets: the receiver names its domain")
        target = functools.partial(migrate.migrate, **_tls_choice(args))

    def run(rend: Renderer) -> Awaitable[MigrationResult]:
        return target(
            sim=args.sim,
            to=args.to,
            live=args.live,
            policy=live_policy(args),
            fmt=args.format,
            **send_options(args, rend),
        )

    res = run_rendered(args, run)
    _emit(args, migration_json(res), migration_text(res))
    return 0


def _result_json(event: str, res: MigrationResult | ReceiveResult) -> dict[str, Any]:
    """What either side's JSON result starts with."""
    return {"event": event, "domain": res.domain, "peer": res.peer, "format": res.fmt}


def migration_json(res: MigrationResult) -> dict[str, Any]:
    from .progress import policy_round

    st = res.save.stats
    return (
        _result_json("migrated", res)
        | {
            "rounds": st.rounds if st else None,
            "precopy_rounds": [policy_round(ev) for ev in res.save.rounds],
            "pages_per_round": list(res.pages_per_round),
            "pages_sent": st.pages_sent if st else None,
            "bytes": res.bytes,
            "gbps": round(res.gbps, 3),
            "downtime_ms": round(res.downtime_ns / 1e6, 3),
            "seconds": round(res.seconds, 3),
        }
        | ({"throttle": throttle_json(res.save.throttle)} if res.save.throttle else {})
    )


def migration_text(res: MigrationResult) -> str:
    st = res.save.stats
    rounds = f"{st.rounds} round(s), " if st else ""
    return (
        f"migrated {res.domain} to {res.peer}: {rounds}{res.bytes / 2**20:.1f} MiB "
        f"at {res.gbps:.2f} GB/s, downtime {res.downtime_ns / 1e6:.1f} ms "
        "(suspended here until running there); it runs there, ours stays suspended"
        + throttle_text(res.save.throttle)
    )


def do_receive(args: argparse.Namespace) -> int:
    from . import migrate

    if args.accept_timeout is not None and args.accept_timeout <= 0:
        raise UsageError("--accept-timeout must be positive")
    if args.stdio:
        return _receive_stdio(args)
    tls = _tls_choice(args)

    def listening(addr: tuple[str, int]) -> None:
        text = migrate.format_address(addr)
        if args.json or args.progress == "json":
            line = json.dumps({"event": "listening", "host": addr[0], "port": addr[1]})
        else:
            line = f"listening on {text}"
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    res = run_rendered(
        args,
        lambda rend: migrate.receive(
            listen=args.listen,
            sim=args.sim,
            fmt=args.format,
            accept_timeout=args.accept_timeout,
            on_listening=listening,
            **tls,
            **receive_options(args, rend),
        ),
    )
    _emit(args, receive_json(res), receive_text(res))
    return 0


def _receive_stdio(args: argparse.Namespace) -> int:
    """``receive --stdio``: the protocol owns stdin and stdout, everything else goes to stderr.

    fd trick: the protocol's ends are private duplicates of fds 0 and 1;
    then /dev/null is put on fd 0 and stderr on fd 1, so that nothing we
    or a child print can ever land in the stream (a stray line on stdout
    would be read by the sender as the handshake).
    """
    import os

    from . import migrate

    # A pipe cannot be peeked at: the sender says the format (migrate passes
    # --format); without it, libxl, what migrate sends by default.
    fmt = "libxl" if args.format == "auto" else args.format
    if args.tls_dir is not None or args.insecure or args.accept_timeout is not None:
        raise UsageError("--tls-dir, --insecure and --accept-timeout are for --listen")
    sys.stdout.flush()
    rfd = os.dup(0)
    wfd = os.dup(1)
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        args.json = args.json or args.progress == "json"
        res = run_rendered(
            args,
            lambda rend: migrate.receive_stdio(
                sim=args.sim, fmt=fmt, rfd=rfd, wfd=wfd, **receive_options(args, rend)
            ),
            sys.stderr,
        )
    finally:
        os.close(rfd)
        os.close(wfd)
    _emit(args, receive_json(res), receive_text(res))  # stdout is stderr now
    return 0


def receive_json(res: ReceiveResult) -> dict[str, Any]:
    st = res.restore.restore_stats
    return _result_json("received", res) | {
        "pages": st.pages_received if st else None,
        "bytes": st.bytes if st else None,
        "seconds": round(res.seconds, 3),
        "report_lost": res.report_lost,
        "state": "running",
    }


def receive_text(res: ReceiveResult) -> str:
    text = f"received {res.domain} from {res.peer} ({res.fmt} stream): it runs here"
    if res.report_lost:
        text += " (the sender did not get our report: it keeps its copy suspended)"
    return text
