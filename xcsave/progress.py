"""Rendering helper events for people and machines (CLI only; never the library).

``bar``   rich progress bars, one per running helper, with helper logs routed
          through rich so they do not tear the bars (stderr must be a TTY);
``plain`` one line per notable event on stderr;
``json``  one JSON object per event per line;
``none``  nothing.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from ._log import logger
from .defaults import PAGE_SIZE
from .events import (
    DoneEvent,
    Event,
    MigrationStatsEvent,
    PolicyEvent,
    ProgressEvent,
    RestoreStatsEvent,
    StatsEvent,
    ThrottleEvent,
)
from .policy import ms_text

MODES = ("auto", "bar", "plain", "json", "none")

log = logger("xcsave.progress")


def _rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_mode(mode: str, stream: IO[str]) -> str:
    if mode != "auto":
        if mode == "bar" and not _rich_available():
            return "plain"
        return mode
    if not stream.isatty():
        return "none"
    return "bar" if _rich_available() else "plain"  # a terminal always sees progress


class Renderer:
    """Callable ``on_event`` sink; use as a context manager around the operation."""

    def __init__(self, mode: str, out: IO[str] | None = None) -> None:
        self.out: IO[str] = out or sys.stderr
        self.mode = resolve_mode(mode, self.out)
        self._progress: Any = None
        self._tasks: dict[str, Any] = {}
        self._round_t0: dict[str, float] = {}
        self._last_plain: dict[str, float] = {}
        self._saved_handlers: list[logging.Handler] | None = None

    def __enter__(self) -> Renderer:
        if self.mode == "bar":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]{task.fields[label]}"),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),  # pages of this round
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=Console(file=self.out),
                transient=False,
            )
            self._progress.start()
            self._route_logging()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._unroute_logging()

    def _route_logging(self) -> None:
        """While bars are drawn, log records print above them on the same console."""
        from rich.logging import RichHandler

        root = logging.getLogger()
        self._saved_handlers = root.handlers[:]
        handler = RichHandler(console=self.console, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.handlers = [handler]

    def _unroute_logging(self) -> None:
        if self._saved_handlers is not None:
            logging.getLogger().handlers = self._saved_handlers
            self._saved_handlers = None

    @property
    def console(self) -> Any:
        """The rich console (for a RichHandler) when bars are drawn, else None."""
        return self._progress.console if self._progress is not None else None

    def __call__(self, ev: Event) -> None:
        try:
            if self.mode == "json":
                self.out.write(json.dumps(ev.asdict(), default=str) + "\n")
                self.out.flush()
            elif self.mode == "plain":
                self._plain(ev)
            elif self.mode == "bar":
                self._bar(ev)
        except BrokenPipeError:
            self._reader_gone()

    def _reader_gone(self) -> None:
        """Whoever read the progress went away (``--progress json | head -2``):
        the progress stops, the job goes on."""
        self.mode = "none"
        log.warning("progress output closed (EPIPE): no more progress, the operation goes on")
        reader_gone(self.out)

    def _label(self, ev: Event) -> str:
        return f"{ev.op} {ev.domain}"

    def _plain(self, ev: Event) -> None:
        key = self._label(ev)
        if isinstance(ev, ProgressEvent):
            now = time.monotonic()
            final = ev.total and ev.done >= ev.total
            if not final and now - self._last_plain.get(key, 0.0) < 1.0:
                return
            self._last_plain[key] = now
            pct = f" {ev.percent:5.1f}%" if ev.percent is not None else ""
            self.out.write(f"{key}: {ev.doing_what} {ev.done}/{ev.total}{pct}\n")
        elif isinstance(ev, PolicyEvent):
            self.out.write(f"{key}: {policy_line(ev)}\n")
        elif isinstance(ev, StatsEvent | RestoreStatsEvent | MigrationStatsEvent):
            self.out.write(f"{key}: {_stats_line(ev)}\n")
        elif isinstance(ev, DoneEvent):
            status = "done" if ev.ok else f"failed: {ev.error}"
            self.out.write(f"{key}: {status} in {ev.elapsed:.2f} s\n")
        elif isinstance(ev, ThrottleEvent):
            self.out.write(
                f"{key}: {ev.actuator} lifted ({ev.restored} put back): the guest ran "
                f"throttled {ev.seconds:.2f} s, at most {ev.max_percent}%, "
                f"{ev.mean_percent:.0f}% on average\n"
            )
        self.out.flush()

    def _bar(self, ev: Event) -> None:
        prog = self._progress
        key = self._label(ev)
        task = self._tasks.get(key)
        if task is None:
            label = f"{ev.op} {Path(ev.domain).name}"  # the path would squeeze the bar
            task = prog.add_task("starting", total=None, label=label, rate="")
            self._tasks[key] = task
        if isinstance(ev, ProgressEvent):
            if ev.doing_what != prog.tasks[task].description:
                # A new round: its own bar, speed and ETA.
                prog.reset(task, description=ev.doing_what, total=ev.total or None)
                self._round_t0[key] = ev.elapsed
            secs = ev.elapsed - self._round_t0.get(key, 0.0)
            rate = f"{ev.done * PAGE_SIZE / secs / 1e9:.2f} GB/s" if secs > 0 and ev.done else ""
            prog.update(task, completed=ev.done, total=ev.total or None, rate=rate)
        elif isinstance(ev, StatsEvent | RestoreStatsEvent):
            prog.update(task, description=_stats_line(ev))
        elif isinstance(ev, MigrationStatsEvent):
            prog.update(task, rate=_stats_line(ev))
        elif isinstance(ev, DoneEvent):
            total = prog.tasks[task].total or 1
            desc = "done" if ev.ok else "failed"
            prog.update(task, description=desc, completed=total if ev.ok else None, total=total)


def reader_gone(stream: IO[str]) -> None:
    """``stream``'s reader went away (EPIPE): write nothing more to it.

    fd trick: the stream's fd is pointed at /dev/null (dup2), so that what
    is still buffered, and the interpreter's final flush of it, go nowhere
    instead of raising EPIPE again ("Exception ignored ... BrokenPipeError"
    at exit).  Python ignores SIGPIPE, so the write raised instead of
    killing us."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return  # not a file: nothing is flushed at exit either
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def write_result(stream: IO[str], line: str) -> None:
    """A command's result line; nobody reading it (``| true``) does not turn
    a done operation into a failure."""
    try:
        stream.write(line + "\n")
        stream.flush()
    except BrokenPipeError:
        reader_gone(stream)


def _decision(d: int) -> str:
    return {-1: "abort", 0: "continue", 1: "stop-and-copy"}.get(d, str(d))


def policy_line(ev: PolicyEvent) -> str:
    """A precopy round, explained (``--progress plain``): what was measured
    before it, what the policy decided and why."""
    known = ev.dirty_count >= 0
    dirty = f"{ev.dirty_count} dirty" if known else "dirty unknown"
    if ev.round_s > 0:
        rates = f"sent {ev.send_rate:.0f} pages/s, " + (
            f"dirtied {ev.dirty_rate:.0f} pages/s, " if known else ""
        )
        d = ev.predicted_downtime_s
        rates += "downtime unknown" if d is None else f"downtime ~{ms_text(d)}"
    else:
        rates = "nothing measured yet"
    line = (
        f"round {ev.iteration}: {dirty}, {ev.total_written} written, {rates} "
        f"-> {_decision(ev.decision)}"
    )
    if ev.reason:
        line += f": {ev.reason}"
    if ev.throttle is not None:
        line += f" [throttle {ev.throttle}%]"
    return line


def policy_round(ev: PolicyEvent) -> dict[str, object]:
    """A precopy round, explained, for a ``--json`` result (``precopy_rounds``
    of save and of migrate): rates in pages/s (0: unknown), the
    predicted downtime in ms (None: not measured), the decision's name."""
    d = ev.predicted_downtime_s
    return {
        "iteration": ev.iteration,
        "total_written": ev.total_written,
        "dirty_count": ev.dirty_count,
        "elapsed_s": round(ev.elapsed, 6),
        "round_s": round(ev.round_s, 6),
        "sent": ev.sent,
        "send_rate": round(ev.send_rate, 1),
        "dirty_rate": round(ev.dirty_rate, 1),
        "predicted_downtime_ms": None if d is None else round(d * 1e3, 3),
        "decision": _decision(ev.decision),
        "reason": ev.reason,
        "throttle": ev.throttle,
    }


def _stats_line(ev: StatsEvent | RestoreStatsEvent | MigrationStatsEvent) -> str:
    if isinstance(ev, MigrationStatsEvent):
        per = "+".join(f"{b / 2**20:.0f}" for b in ev.channel_bytes)
        return (
            f"wire {ev.throughput * 8 / 1e6:.0f} Mbit/s, {ev.bytes_sent / 2**20:.1f} MiB sent "
            f"({per} MiB per channel), x{ev.compression_ratio:.2f} compressed, "
            f"{ev.bytes_remaining / 2**20:.1f} MiB dirty ({ev.dirty_rate:.0f} pages/s), "
            f"downtime ~{ev.expected_downtime_ms:.0f} ms"
        )
    secs = ev.duration_ns / 1e9
    rate = ev.bytes / secs / 1e9 if secs > 0 else 0.0
    if isinstance(ev, RestoreStatsEvent):
        return f"{ev.pages_received} pages, {ev.bytes} bytes received ({rate:.2f} GB/s)"
    return (
        f"{ev.rounds} round(s), {ev.pages_sent} pages, {ev.bytes} bytes "
        f"({rate:.2f} GB/s), stop-and-copy {ev.downtime_ns / 1e6:.1f} ms"
    )
