"""How every ``xcsave`` command runs: its loop, its signals, its progress and logging flags.

:func:`run_async` is the one way a command runs the library's coroutines:
SIGTERM and SIGINT cancel the operation, so that it cleans up as after any
failure (the helper is stopped and reaped, the domain put back, nothing
left under the final name), and the command ends as :class:`Terminated`
("terminated by SIGTERM", exit 1) or KeyboardInterrupt ("interrupted",
130), one line on stderr (``xcsave.cli.report_failure``).  Once the
operation has succeeded, a stop signal can no longer turn that success into
a failure (:func:`defer_signals`).  :func:`renderer` and the flag helpers
are the ``--progress``/``-v``/``--log-level`` every command shares.

Light on purpose (no asyncio, no API at import): the parsers of every
command import it.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import Terminated
from .progress import MODES

if TYPE_CHECKING:
    from .progress import Renderer

__all__ = [
    "LOG_LEVELS",
    "Terminated",
    "add_logging_flags",
    "add_progress_flag",
    "defer_signals",
    "renderer",
    "restore_signals",
    "run_async",
    "run_rendered",
    "signals_deferred",
]

T = TypeVar("T")

#: ``--log-level`` choices (the global option's and each command's).
LOG_LEVELS = ("debug", "info", "warning", "error")


def add_logging_flags(p: argparse.ArgumentParser) -> None:
    """``-v``/``--log-level`` after the subcommand too (SUPPRESS: the global ones win if unset)."""
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more logging (-v info, -vv debug), shown above the progress bars",
    )
    p.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=argparse.SUPPRESS,
        help="logging level (default: quiet; failures are one line)",
    )


def add_progress_flag(p: argparse.ArgumentParser) -> None:
    """``--progress MODE``, the same for every command: ``auto`` is bars on a
    terminal and nothing elsewhere (a script gets the result line, and
    asks for ``plain`` lines or ``json`` events when it wants them)."""
    p.add_argument(
        "--progress",
        choices=MODES,
        default="auto",
        help="auto: bars on a terminal, nothing otherwise; plain: a line per event; "
        "json: one event per line",
    )


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """``--progress`` and the logging flags: what a command that runs an operation takes."""
    add_progress_flag(p)
    add_logging_flags(p)


def renderer(args: argparse.Namespace, out: Any = None) -> Renderer:
    """The command's progress renderer (``--progress``, see :func:`add_progress_flag`).
    Events go to ``out``, else stdout for ``--progress json`` and stderr otherwise."""
    from .progress import Renderer

    stream = out if out is not None else (sys.stdout if args.progress == "json" else sys.stderr)
    return Renderer(args.progress, stream)


def run_async(make: Callable[[], Awaitable[T]]) -> T:
    """``asyncio.run`` where SIGTERM and Ctrl-C cancel the command, so that it cleans up.

    Ends as :class:`Terminated` (SIGTERM) or KeyboardInterrupt (Ctrl-C), with
    any note the operation left on the cancellation (e.g. a migration
    interrupted in its final handshake says where the domain may run).
    """
    import asyncio
    import signal

    restore_signals()  # a previous run's deferral (a benchmark runs several)

    async def main() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        got: list[signal.Signals] = []

        def on_signal(sig: signal.Signals) -> None:
            got.append(sig)
            task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            # The loop's handlers stand: a stop signal held back while the
            # loop was built (below) is delivered now, to on_signal.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            result = await make()
            # Done (committed): a signal from here on must not turn the
            # success into "interrupted" (see defer_signals).
            defer_signals()
            return result
        except asyncio.CancelledError as e:
            if not got:
                raise
            notes = "; ".join(getattr(e, "__notes__", []))
            if got[0] == signal.SIGTERM:
                raise Terminated(
                    f"terminated by SIGTERM: {notes}" if notes else "terminated by SIGTERM"
                ) from None
            if notes:
                raise Terminated(f"interrupted: {notes}") from None
            raise KeyboardInterrupt from None
        finally:
            # The outcome is decided (a result, a failure, "interrupted"): a
            # stop signal from here on is discarded, so that the command
            # says what happened instead of a KeyboardInterrupt raised while
            # the loop is torn down or the line is written.
            defer_signals()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            signals_deferred()

    # Signal trick: the stop signals are blocked until main() has put the
    # loop's handlers in place.  A Ctrl-C that landed while asyncio.run was
    # still building the loop raised KeyboardInterrupt inside its
    # constructor: a half-built loop whose __del__ printed a traceback, and
    # a main() never awaited.  Blocked, the signal waits for on_signal.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return asyncio.run(main())
    finally:
        if not _saved_handlers:  # main() never ran: nothing discards them
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def run_rendered(
    args: argparse.Namespace, make: Callable[[Renderer], Awaitable[T]], out: Any = None
) -> T:
    """:func:`run_async` of ``make(rend)``, ``rend`` the command's renderer
    (:func:`renderer`: its events to ``out``), closed when the run ends."""
    with renderer(args, out) as rend:
        return run_async(lambda: make(rend))


# ----------------------------------------------------------------- commit point

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_deferring: list[bool] = []  # [True] between defer_signals and signals_deferred
_saved_handlers: dict[int, Any] = {}


def defer_signals() -> None:
    """The operation has succeeded (its result is committed): from now until
    the command has reported it, SIGINT and SIGTERM must not turn that success
    into "interrupted".  Blocked here, while the event loop's handlers still
    stand (a signal now would only cancel a finished task); ignored by
    :func:`signals_deferred` once those are removed; put back by
    :func:`restore_signals` when the command returns.  So a command either
    fails and says so, with nothing committed, or succeeds and says so."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    _deferring[:] = [True]


def signals_deferred() -> None:
    """After the loop's signal handlers are gone: ignore the stop signals
    (which discards any that arrived since :func:`defer_signals`), unblock."""
    if not _deferring:
        return
    _deferring.clear()
    for sig in _STOP_SIGNALS:
        _saved_handlers.setdefault(sig, signal.getsignal(sig))
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def restore_signals() -> None:
    """The handlers :func:`signals_deferred` replaced, back (a no-op if none)."""
    while _saved_handlers:
        sig, handler = _saved_handlers.popitem()
        signal.signal(sig, handler)
