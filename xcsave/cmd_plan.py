"""CLI: ``xcsave plan``: measure a domain's dirty log, predict its live migration.

::

    xcsave plan (--sim DOM | --domid N) [--link RATE] [--policy P]
                [--sample-seconds S] [--max-downtime MS] [--json]

Samples the dirty log for ``--sample-seconds`` (log-dirty on, then off
again whatever happens), prints the profile (dirty rate, working set), and
for ``--link RATE`` (what the stream will get, e.g. the ``--max-bandwidth``
the migration will run with: ``1gbit``, ``100M``) the predicted rounds,
total time and downtime under ``--policy``, with a go / no-go and why.
Without ``--link`` only the profile is printed: the plan cannot know the
network the migration will cross, and guessing one would make the
prediction a guess too.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ._argparse import integer, rate, seconds
from .cli import _say, parse_policy_spec
from .cli_run import add_run_flags, run_rendered
from .defaults import DOM_HELP, MAX_DOMID, PAGE_SIZE
from .predict import DEFAULT_MAX_DOWNTIME_S, Plan
from .sample import DEFAULT_SECONDS, MAX_SECONDS, MIN_SECONDS

__all__ = ["add_parsers", "describe"]


#: ``--link RATE``: wire.parse_rate's grammar (``1gbit``, ``100M``), a page a second at least.
_link = rate(PAGE_SIZE, "a link must carry at least one page a second")


def _sample_seconds(text: str) -> float:
    v = seconds()(text)
    if not MIN_SECONDS <= v <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"{text}: must be from {MIN_SECONDS:g} to {MAX_SECONDS:g} seconds"
        )
    return v


#: ``xcsave plan --help``'s description.
DESCRIPTION = (
    "Sample the dirty log for a few seconds (log-dirty is off again afterwards), then "
    "predict the live migration's rounds, total time and downtime over --link under "
    "--policy, with a go / no-go verdict."
)


def add_parsers(sub: Any) -> None:
    help_ = "measure a domain's dirty rate and predict its live migration"
    p = sub.add_parser("plan", help=help_, description=DESCRIPTION)
    dom = p.add_mutually_exclusive_group(required=True)
    dom.add_argument("--sim", metavar="DOM", help=DOM_HELP)
    dom.add_argument("--domid", type=integer(0, MAX_DOMID), metavar="N", help="a Xen domain id")
    p.add_argument(
        "--link",
        type=_link,
        metavar="RATE",
        help="what the migration stream will get: 1gbit, 500mbit (bits/s) or 100M (bytes/s); "
        "without it only the profile is printed",
    )
    p.add_argument(
        "--policy",
        type=parse_policy_spec,
        default=parse_policy_spec("xen"),
        metavar="POLICY",
        help="the precopy policy the migration will run, as save's --policy (default: xen)",
    )
    p.add_argument(
        "--sample-seconds",
        type=_sample_seconds,
        default=DEFAULT_SECONDS,
        metavar="S",
        help="how long to sample the dirty log",
    )
    p.add_argument(
        "--max-downtime",
        type=integer(1, 3_600_000),
        default=round(DEFAULT_MAX_DOWNTIME_S * 1000),
        metavar="MS",
        help="go only if the predicted downtime is within MS milliseconds",
    )
    p.add_argument("--helper", metavar="PATH", help="helper executable (default: bundled)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    add_run_flags(p)
    p.set_defaults(func=_plan)


def _plan(args: argparse.Namespace) -> int:
    from . import api

    spec = args.policy
    res = run_rendered(
        args,
        lambda rend: api.plan(
            sim=args.sim,
            domid=args.domid,
            on_event=rend,
            link=args.link,
            max_downtime=args.max_downtime / 1000,
            make_policy=spec.make,
            policy_name=spec.text,
            seconds=args.sample_seconds,
            helper=args.helper,
        ),
    )
    # On stdout, unless --progress json's events are there (cli._say's rule).
    if args.json:
        _say(args, json.dumps(res.as_dict(), sort_keys=True))
    else:
        _say(args, "\n".join(describe(res)))
    return 0


def describe(res: Plan) -> list[str]:
    """The plan, for people."""
    pr = res.profile
    mib = pr.memory_pages * PAGE_SIZE >> 20
    lines = [
        f"{res.domain}: {pr.memory_pages} pages ({mib} MiB), sampled {pr.seconds:.1f} s "
        f"in {len(pr.samples)} intervals",
        f"  dirty rate    {pr.dirty_rate:,.0f} pages/s "
        f"({pr.dirty_rate * PAGE_SIZE / 1e6:,.1f} MB/s)",
        f"  working set   {pr.working_set:,} pages ({pr.union:,} written in the sample)",
    ]
    p = res.prediction
    if p is None or res.link_bytes_per_s is None:
        lines.append("  no --link RATE given: no prediction (the plan cannot know the network)")
        return lines
    lines.append(
        f"over {res.link_bytes_per_s / 1e6:,.1f} MB/s ({p.link:,.0f} pages/s), "
        f"policy {res.policy}:"
    )
    for r in p.rounds:
        what = "stop-and-copy" if r.decision == "STOP_AND_COPY" else f"round {r.iteration}"
        if r.decision == "ABORT":
            lines.append(f"  abort before round {r.iteration}: {r.reason}")
            continue
        note = f"  ({r.reason})" if r.reason else ""
        lines.append(f"  {what:<14}{r.pages:>10,} pages {r.seconds:>9.3f} s{note}")
    if p.downtime_s is not None:
        lines.append(f"  predicted total {p.total_s:.2f} s, downtime {p.downtime_s * 1e3:.0f} ms")
    lines.append(p.why)
    return lines
