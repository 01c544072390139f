"""Spawn helpers, pump their frames, drive callbacks, judge how they ended.

This is xcsave's ``libxl_save_callout.c``.  One :class:`HelperRun` is one
helper process doing one save or restore; many run at once from one event
loop (:class:`Supervisor` bounds how many).  The migration stream's fd goes
to the helper by number (``pass_fds``) and is never read or written here:
only control frames cross the pipes.

Policy for judging the end of a run, in Xen's order: a non-zero exit status
or a signal (:class:`HelperDied`), a restore without ``restore_results``
("exited without providing results"), no ``complete`` ("exited without
signalling completion"), then ``complete`` with ``retval != 0``
(:class:`HelperFailed`).  Stopping a helper (cancellation, timeout, a
callback that raised) is SIGTERM, a grace period, then SIGKILL; the process
is always reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import inspect
import logging
import os
import shlex
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

from . import proto
from ._log import logger
from ._msgs import (
    EVENTS,
    CallbackFn,
    Callbacks,
    Reply,
    RestoreStats,
    Stats,
    pack_precopy_policy,
)
from .errors import (
    BackendUnavailable,
    CallbackError,
    HelperDied,
    HelperFailed,
    HelperTimeout,
    ProtocolError,
)
from .events import DoneEvent, Event, LogEvent, PolicyEvent, ProgressEvent, ThrottleEvent
from .policy import Curve, Decision, Verdict, as_verdict

if TYPE_CHECKING:
    from .throttle import Throttle

__all__ = [
    "HELPER_NAME",
    "CallbackFn",
    "Callbacks",
    "HelperRun",
    "HelperSpec",
    "Reply",
    "RestoreStats",
    "RunResult",
    "Stats",
    "Supervisor",
    "helper_path",
]

log = logger(__name__)

_R = TypeVar("_R")  # what a callback's answer is converted to (_Run._call)
helper_log = logger("xcsave.helper")

HELPER_NAME: Final = "xcsave-helper"
STOP_GRACE_S: Final = 5.0
READ_CHUNK: Final = 1 << 16

#: xentoollog level -> logging level (one table, as STYLE asks).
XTL_LEVELS: Final[dict[int, int]] = {
    1: logging.DEBUG,  # DEBUG
    2: logging.DEBUG,  # VERBOSE
    3: logging.DEBUG,  # DETAIL
    4: logging.INFO,  # PROGRESS
    5: logging.INFO,  # INFO
    6: logging.INFO,  # NOTICE
    7: logging.WARNING,  # WARN
    8: logging.ERROR,  # ERROR
    9: logging.CRITICAL,  # CRITICAL
}


def helper_path() -> Path:
    """The helper to run: ``$XCSAVE_HELPER``, else the one bundled in the package.

    Never a ``$PATH`` lookup.  Raises :class:`FileNotFoundError` naming the
    package when the bundled helper is missing (a source tree never built).
    """
    override = os.environ.get("XCSAVE_HELPER")
    if override:
        return Path(override)
    path = Path(str(resources.files("xcsave") / HELPER_NAME))
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the xcsave package has no {HELPER_NAME}; "
            "install it with 'pip install .' (or set XCSAVE_HELPER)"
        )
    return path


@dataclass(frozen=True)
class HelperSpec:
    """Everything needed to start one helper run."""

    mode: str  # "save" | "restore" | "tunnel" (xcsave.tls) | "wire-send" | "wire-recv"
    dialect: proto.Dialect
    args: tuple[str, ...]  # argv after the helper's path
    pass_fds: tuple[int, ...]
    domain: str  # for logs and events: "domid 7" or a sim path
    domid: int | None = None
    backend: str | None = None  # expected in hello (xcsave-1)
    helper: Path | None = None  # default: helper_path()
    #: Called with the helper's pid once it is reaped, if the run failed in any
    #: way (even SIGKILL): undo what only the helper could have undone.
    on_failure: Callable[[int], object] | None = None
    #: Commits the operation's result (a save's image: fsync + rename), run
    #: synchronously when the helper reports ``complete`` with success and
    #: before the reply to it.  xcsave-1: the reply says whether it did (0,
    #: else -1) and a helper that gets no reply (we died) or -1 puts its
    #: source back.  If it raises, the run raises that exception; once it
    #: returned, the run succeeds whatever happens next (see :meth:`HelperRun.run`).
    on_commit: Callable[[], object] | None = None
    #: Auto-converge's actuator (:mod:`xcsave.throttle`): a policy's
    #: ``Verdict.throttle`` is applied through it before the reply.  The
    #: caller that built it lifts it (the run never does).
    throttle: Throttle | None = None


@dataclass
class RunResult:
    """How a helper run ended (only ever returned when it succeeded)."""

    retval: int
    errno: int
    returncode: int
    pid: int
    backend: str | None = None
    store_gfn: int | None = None
    console_gfn: int | None = None
    stats: Stats | None = None  # a save's (xcsave-1)
    restore_stats: RestoreStats | None = None  # a restore's (xcsave-1)
    elapsed: float = 0.0
    logs: list[LogEvent] = field(default_factory=list)
    #: auto-converge's effect on the guest, once lifted (None: never throttled)
    throttle: ThrottleEvent | None = None
    rounds: list[PolicyEvent] = field(default_factory=list)  # each precopy decision, explained


def _wrapper_argv() -> list[str]:
    """``XCSAVE_HELPER_WRAPPER`` (e.g. "valgrind -q --error-exitcode=99"), split."""
    return shlex.split(os.environ.get("XCSAVE_HELPER_WRAPPER", ""))


class HelperRun:
    """One helper process: spawn, pump frames, dispatch, judge the end."""

    def __init__(
        self,
        spec: HelperSpec,
        callbacks: Callbacks | None = None,
        on_event: Callable[[Event], object] | None = None,
        max_frame: int = 1 << 20,
    ) -> None:
        self.spec = spec
        self.cb = callbacks or Callbacks()
        self.on_event = on_event
        self.decoder = proto.Decoder(spec.dialect, spec.mode, max_frame=max_frame)
        self.proc: asyncio.subprocess.Process | None = None
        self._t0 = 0.0
        self._curve = Curve()  # the precopy rounds, for the policy and its events
        self._completed: tuple[int, int] | None = None
        self._committed = False  # on_commit returned: the run has succeeded
        self._commit_error: Exception | None = None
        self._results: tuple[int, int] | None = None
        self._stats: Stats | None = None
        self._restore_stats: RestoreStats | None = None
        self._backend: str | None = None
        self._logs: list[LogEvent] = []
        self._rounds: list[PolicyEvent] = []
        self._stderr_tail: list[str] = []
        self._log: logging.LoggerAdapter[logging.Logger] | None = None
        self._reply_fd = -1  # our end of the helper's stdin
        self._frame_fd = -1  # our end of the helper's stdout
        self._reading = False
        self._eof = False
        self._pending: asyncio.Future[None] | None = None  # an async callback
        self._done: asyncio.Future[None] | None = None

    # -- public ------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def run(self, timeout: float | None = None) -> RunResult:
        """Run the helper to the end; raise a precise exception if it failed.

        Once ``on_commit`` has returned, the result is committed and the run
        succeeds: a cancellation, timeout or error while the helper exits
        after that is logged, the helper is still reaped, and the success is
        returned (raising would report a committed save as failed).
        """
        try:
            await self._spawn()
            try:
                async with asyncio.timeout(timeout):
                    await self._pump()
            except BaseException as e:
                if self._committed:
                    return await self._after_commit(e)
                if isinstance(e, TimeoutError):
                    await self.stop()
                    raise HelperTimeout(
                        f"{self._what()} timed out after {timeout} s; helper stopped",
                        **self._ids(),
                    ) from e
                # CancelledError, CallbackError, ProtocolError, ...: never leave it running.
                await self.stop()
                raise
            return self._judge()
        except BaseException:
            if self.spec.on_failure is not None and self.proc is not None:
                try:
                    self.spec.on_failure(self.proc.pid)
                except Exception:
                    log.exception("cleanup after the failed %s", self._what())
            raise

    async def _after_commit(self, e: BaseException) -> RunResult:
        """The run was interrupted (``e``) after its commit: reap the helper,
        which has its reply and only exits now, and report the success."""
        log.info("%s committed; %r while its helper exits is ignored", self._what(), e)
        proc = self.proc
        assert proc is not None
        while proc.returncode is None:
            # asyncio trick: the shield keeps the wait going when the
            # awaiting task is cancelled (again); the loop waits once more.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(proc.wait())
        self._close_pipes(reader=True)
        return self._committed_result(proc.returncode)

    def _committed_result(self, rc: int) -> RunResult:
        """The success of a committed run: nothing may turn it into a failure."""
        res = self._result(rc)
        try:
            self._emit(DoneEvent(self.spec.mode, self.spec.domain, True, "", res.elapsed))
        except Exception:  # on_event's: the operation itself has succeeded
            log.exception("%s committed; its on_event raised", self._what())
        return res

    def send(self, name: str, *args: proto.Value) -> bool:
        """Send the helper an unasked message (the table's ``p`` rows: ``wire_rate``).

        One xcsave-1 frame written to its stdin with one ``os.write()``: a
        frame is far smaller than a pipe's atomic write (``PIPE_BUF``), and
        the helper reads its stdin whenever it waits.  False if the helper
        is not running (not started, stopped or gone).
        """
        spec = proto.message(name)
        if not spec.from_parent:
            raise ProtocolError(f"{name} is not a message the parent sends")
        frame = proto.encode(self.spec.dialect, name, *args)
        if self._reply_fd < 0 or self._completed is not None or self.proc is None:
            return False  # not started, stopped, or complete seen: nobody reads it
        try:
            os.write(self._reply_fd, frame)
        except BlockingIOError:
            # The helper has stopped reading (it is ending): nobody to tell.
            return False
        except (BrokenPipeError, ConnectionResetError):
            log.debug("helper %s closed its stdin before %s", self.pid, name)
            return False
        return True

    async def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM, wait up to ``grace`` seconds, SIGKILL; always reap."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            # No reply will come now: EOF tells a helper blocked in a reply
            # read so (xcsave-helper then fails that callback and cleans up;
            # Xen's helper exits 254) instead of waiting for the SIGKILL.
            self._close_pipes()
            try:
                await asyncio.shield(asyncio.wait_for(proc.wait(), grace))
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        # Reap even when cancelled again while waiting: shield the wait.
        await asyncio.shield(proc.wait())
        self._close_pipes()

    # -- internals ----------------------------------------------------------

    def _what(self) -> str:
        return f"{self.spec.mode} of {self.spec.domain}"

    def _ids(self) -> dict[str, Any]:
        return {"domid": self.spec.domid, "pid": self.pid, "helper": str(self._helper())}

    def _helper(self) -> Path:
        return self.spec.helper or helper_path()

    async def _spawn(self) -> None:
        argv = [*_wrapper_argv(), str(self._helper()), *self.spec.args]
        log.debug("spawning %s", shlex.join(argv))
        self._t0 = time.monotonic()
        # The control pipes are ours, not asyncio's streams: frames are read
        # by _readable() straight from the fd and replies written with one
        # os.write() (see _pump).  Both parent ends are close-on-exec (os.pipe
        # default) and non-blocking; the child's ends stay blocking (O_NONBLOCK
        # belongs to each end's open file description, not to the pipe).
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        os.set_blocking(in_w, False)
        os.set_blocking(out_r, False)
        self._reply_fd, self._frame_fd = in_w, out_r
        # close_fds stays True: the helper gets the control pipes, stderr and
        # exactly the fds in pass_fds, nothing else of ours.
        spawning = asyncio.ensure_future(
            asyncio.create_subprocess_exec(
                *argv,
                stdin=in_r,
                stdout=out_w,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=self.spec.pass_fds,
            )
        )
        try:
            self.proc = await asyncio.shield(spawning)
            self._log = logging.LoggerAdapter(
                helper_log, {"domain": self.spec.domain, "helper_pid": self.proc.pid}
            )
        except asyncio.CancelledError:
            # Cancelled while the helper was being started: it may already
            # run (and have touched the domain).  Finish starting it, so that
            # it is stopped and reaped, and on_failure gets its pid, like any
            # other cancelled run; asyncio would otherwise SIGKILL it unseen.
            with contextlib.suppress(Exception):
                self.proc = await spawning
            if self.proc is not None:
                await self.stop()
            raise
        finally:
            # The child's ends: it has its own copies (or never started).
            # Without this the helper's exit would never show as EOF here.
            os.close(in_r)
            os.close(out_w)
            if self.proc is None or self._log is None:
                self._close_pipes(reader=True)  # failed or stopped: no _pump

    def _close_pipes(self, *, reader: bool = False) -> None:
        """Close our end of the reply pipe (the helper sees EOF); with
        ``reader``, stop reading frames and close that end too."""
        if self._reply_fd >= 0:
            os.close(self._reply_fd)
            self._reply_fd = -1
        if reader and self._frame_fd >= 0:
            self._pause_reading()
            os.close(self._frame_fd)
            self._frame_fd = -1

    # -- the frame pump -----------------------------------------------------
    #
    # A Protocol-style reader without the Protocol: the loop calls
    # _readable() when the helper's stdout has bytes; they are decoded and
    # every frame is handled right there, synchronous callbacks included, and
    # a reply goes back with one os.write() -- no task switch, no stream
    # buffer, no drain() on the round trip.  A callback that returns an
    # awaitable pauses reading (remove_reader) until a task has awaited it
    # and replied; frames keep their order.  _pump() only waits for the end.

    async def _pump(self) -> None:
        proc = self.proc
        assert proc is not None
        assert proc.stderr is not None
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        stderr_task = asyncio.create_task(self._drain_stderr(proc.stderr))
        try:
            self._resume_reading()
            await self._done
            if self.decoder.buffered:
                raise ProtocolError(
                    f"{self._what()}: helper stdout ended inside a frame "
                    f"({self.decoder.buffered} bytes of it)"
                )
            await proc.wait()
            await stderr_task
        finally:
            self._close_pipes(reader=True)
            for task in (self._pending, stderr_task):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    def _resume_reading(self) -> None:
        if not self._reading and self._frame_fd >= 0:
            asyncio.get_running_loop().add_reader(self._frame_fd, self._readable)
            self._reading = True

    def _pause_reading(self) -> None:
        if self._reading:
            asyncio.get_running_loop().remove_reader(self._frame_fd)
            self._reading = False

    def _finish(self, exc: BaseException | None = None) -> None:
        self._pause_reading()
        if self._done is not None and not self._done.done():
            if exc is None:
                self._done.set_result(None)
            else:
                self._done.set_exception(exc)

    def _readable(self) -> None:
        try:
            data = os.read(self._frame_fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            self._finish(e)
            return
        if not data:
            self._eof = True
            self._pause_reading()
        else:
            self.decoder.feed(data)
        self._process()

    def _process(self) -> None:
        """Handle every complete frame, until one needs to await."""
        try:
            while self._pending is None:
                frame = next(self.decoder, None)
                if frame is None:
                    break
                later = self._dispatch(frame)
                if later is not None:
                    self._pause_reading()
                    self._pending = asyncio.ensure_future(later)
                    self._pending.add_done_callback(self._resumed)
        except Exception as e:  # ProtocolError, CallbackError, on_event's
            self._finish(e)
            return
        if self._pending is None and self._eof:
            self._finish()

    def _resumed(self, task: asyncio.Future[None]) -> None:
        self._pending = None
        if task.cancelled():
            self._finish(asyncio.CancelledError())
        elif (exc := task.exception()) is not None:
            self._finish(exc)
        elif not (self._done is None or self._done.done()):
            if not self._eof:
                self._resume_reading()
            self._process()

    async def _drain_stderr(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            if not line:
                continue
            self._stderr_tail = [*self._stderr_tail[-4:], line]
            if self._log:
                self._log.warning("stderr: %s", line)

    def _emit(self, ev: Event) -> None:
        if self.on_event is not None:
            self.on_event(ev)

    def _reply(self, value: int) -> None:
        """One reply, one write: 4 bytes into a pipe the helper drains before
        it asks again, so it never fills (EAGAIN cannot happen)."""
        if self._reply_fd < 0:
            return  # stopped: the helper has been told with EOF
        try:
            os.write(self._reply_fd, proto.encode_reply(value))
        except (BrokenPipeError, ConnectionResetError):
            # The helper died while we answered; its exit status tells why.
            log.debug("helper %s closed its stdin before our reply", self.pid)

    def _call(
        self,
        spec: proto.MessageSpec,
        fn: Callable[..., Any],
        *args: Any,
        convert: Callable[[proto.MessageSpec, object], _R] | None = None,
    ) -> _R | Awaitable[_R]:
        """The callback's answer (``convert``-ed; by default the reply int), or
        an awaitable of it for an async callback."""
        conv = cast(Callable[[proto.MessageSpec, object], _R], convert or self._reply_value)
        try:
            value = fn(*args)
        except Exception as e:
            raise self._callback_raised(spec.name, e) from e
        if inspect.isawaitable(value):
            return self._await_callback(spec, value, conv)
        return conv(spec, value)

    async def _await_callback(
        self,
        spec: proto.MessageSpec,
        pending: Awaitable[Any],
        convert: Callable[[proto.MessageSpec, object], _R],
    ) -> _R:
        try:
            value = await pending
        except Exception as e:
            raise self._callback_raised(spec.name, e) from e
        return convert(spec, value)

    def _callback_raised(self, name: str, e: Exception) -> CallbackError:
        return CallbackError(
            f"{self._what()}: the {name} callback raised {type(e).__name__}: {e}",
            **self._ids(),
        )

    def _reply_value(self, spec: proto.MessageSpec, value: object) -> int:
        if value is None:
            return spec.ok or 0  # the table's "fine"
        if isinstance(value, int):  # bool and IntEnum included
            return int(value)
        raise CallbackError(
            f"{self._what()}: the {spec.name} callback returned {value!r}, not an int",
            **self._ids(),
        )

    def _then(
        self, value: _R | Awaitable[_R], then: Callable[[_R], None]
    ) -> Awaitable[None] | None:
        """``then(answer)`` now, or once the async callback has answered."""
        if not inspect.isawaitable(value):
            then(value)
            return None
        pending = value

        async def later() -> None:
            then(await pending)

        return later()

    def _dispatch(self, frame: proto.Frame) -> Awaitable[None] | None:
        """Handle one frame; an awaitable when an async callback must finish
        (and reply) before the next frame is handled."""
        return _HANDLERS[frame.spec.name](self, frame)

    # One handler per message of the table (_HANDLERS, built below): the
    # message's own _on_<name>, else the generic one its row calls for.

    def _on_hello(self, frame: proto.Frame) -> None:
        _version, _hash, backend, mode = frame.args
        self._backend = str(backend)
        if mode != self.spec.mode:
            raise ProtocolError(f"helper says it is doing a {mode!s}, expected a {self.spec.mode}")
        if self.spec.backend and self._backend != self.spec.backend:
            raise BackendUnavailable(
                f"helper runs backend {self._backend!r}, expected {self.spec.backend!r}"
            )

    def _on_log(self, frame: proto.Frame) -> None:
        ev = LogEvent.from_frame(self.spec.mode, self.spec.domain, frame.args)
        if ev.errno == 0xFFFFFFFF:  # a u32 on the wire; the helper's -1
            ev = LogEvent(ev.op, ev.domain, ev.level, -1, ev.context, ev.message)
        self._logs.append(ev)
        if self._log:
            self._log.log(
                XTL_LEVELS.get(ev.level, logging.WARNING), "%s: %s", ev.context, ev.message
            )
        self._emit(ev)

    def _on_progress(self, frame: proto.Frame) -> None:
        context, doing_what, done, total = frame.args
        self._emit(
            ProgressEvent(
                self.spec.mode,
                self.spec.domain,
                str(context),
                str(doing_what),
                _int(done),
                _int(total),
                time.monotonic() - self._t0,
            )
        )

    def _on_precopy_policy(self, frame: proto.Frame) -> Awaitable[None] | None:
        fn = self.cb.precopy_policy
        if fn is None:
            raise ProtocolError("helper asked precopy_policy, which was not installed")
        st = self._curve.add(pack_precopy_policy(frame.args), time.monotonic() - self._t0)
        op, dom = self.spec.mode, self.spec.domain

        def decided(v: Verdict) -> Awaitable[None] | None:
            self._rounds.append(
                PolicyEvent(
                    op,
                    dom,
                    **asdict(st),  # the figures the policy was asked with, by name
                    decision=int(v.decision),
                    reason=v.reason,
                    throttle=v.throttle,
                    predicted_downtime_s=st.predicted_downtime_s,
                )
            )
            self._emit(self._rounds[-1])
            acting = self._throttle(v)
            if acting is None:
                self._reply(int(v.decision))
                return None

            async def then_reply() -> None:
                await acting
                self._reply(int(v.decision))

            return then_reply()

        answer = self._call(frame.spec, fn, st, convert=self._verdict)
        if not inspect.isawaitable(answer):
            return decided(answer)
        pending = answer

        async def later() -> None:
            acting = decided(await pending)
            if acting is not None:
                await acting

        return later()

    def _throttle(self, v: Verdict) -> Awaitable[None] | None:
        """Apply the verdict's throttle (before the reply: the next round
        runs throttled); None when there is nothing to wait for."""
        act = self.spec.throttle
        if act is not None and v.decision != Decision.CONTINUE:
            act.stopped()  # the guest stops (or the save ends): its clock stops
        if v.throttle is None:
            return None
        if act is None:
            log.warning("%s: the policy asks a throttle; this run has none", self._what())
            return None
        if v.throttle == act.percent:
            return None
        percent = v.throttle

        async def throttled() -> None:
            try:
                await act.set(percent)
            except Exception as e:
                raise CallbackError(
                    f"{self._what()}: auto-converge could not throttle the guest"
                    f" {percent}%: {type(e).__name__}: {e}",
                    **self._ids(),
                ) from e

        return throttled()

    def _verdict(self, spec: proto.MessageSpec, value: object) -> Verdict:
        try:
            return as_verdict(value)
        except (TypeError, ValueError) as e:
            raise CallbackError(
                f"{self._what()}: the {spec.name} callback: {e}", **self._ids()
            ) from e

    def _on_callback(self, frame: proto.Frame) -> Awaitable[None] | None:
        """A callback the helper waits for: its value is the reply."""
        name = frame.spec.name
        fn = getattr(self.cb, name, None)
        if fn is None:
            # libxl would never be asked: the cbflags bit was clear.
            raise ProtocolError(f"helper asked {name}, which was not installed")
        return self._then(self._call(frame.spec, fn, *frame.args), self._reply)

    def _on_complete(self, frame: proto.Frame) -> None:
        retval, errnoval = frame.args
        self._completed = (_int(retval), _int(errnoval))
        self._reply(self._commit())

    def _on_restore_results(self, frame: proto.Frame) -> Awaitable[None] | None:
        store, console = frame.args
        self._results = (_int(store), _int(console))
        if self.cb.restore_results is None:
            return None
        # Its value is not a reply (the helper does not wait), but an async
        # one is awaited before the next frame all the same.
        fn = self.cb.restore_results
        return self._then(self._call(frame.spec, fn, *self._results), lambda _: None)

    def _on_stats(self, frame: proto.Frame) -> None:
        self._stats = Stats.from_args(frame.args)
        self._on_event(frame)

    def _on_restore_stats(self, frame: proto.Frame) -> None:
        self._restore_stats = RestoreStats.from_args(frame.args)
        self._on_event(frame)

    def _on_event(self, frame: proto.Frame) -> None:
        """A message that is only news: its event (the table's event column)."""
        self._emit(EVENTS[frame.spec.name](self.spec.mode, self.spec.domain, frame.args))

    def _commit(self) -> int:
        """Run ``on_commit`` for a successful ``complete``; the reply to it.

        Synchronous, inside the frame's handling: nothing else runs between
        the commit and the reply.  xcsave-1: 0 committed (or nothing to
        commit), -1 the commit failed (the helper then puts the source back).
        xen-4.17: always 0, as libxl replies (Xen's helper ignores it).
        """
        assert self._completed is not None
        ok = 0
        if self._completed[0] == 0 and self.spec.on_commit is not None:
            try:
                self.spec.on_commit()
                self._committed = True
            except Exception as e:  # raised by _judge once the helper is reaped
                self._commit_error = e
                ok = -1
        return 0 if self.spec.dialect is proto.XEN_417 else ok

    def _result(self, rc: int) -> RunResult:
        proc = self.proc
        assert proc is not None
        retval, err = self._completed or (0, 0)
        return RunResult(
            retval=retval,
            errno=err,
            returncode=rc,
            pid=proc.pid,
            backend=self._backend,
            store_gfn=self._results[0] if self._results else None,
            console_gfn=self._results[1] if self._results else None,
            stats=self._stats,
            restore_stats=self._restore_stats,
            elapsed=time.monotonic() - self._t0,
            logs=self._logs,
            rounds=self._rounds,
        )

    def _judge(self) -> RunResult:
        proc = self.proc
        assert proc is not None
        assert proc.returncode is not None
        rc = proc.returncode
        ids = self._ids()
        elapsed = time.monotonic() - self._t0
        tail = f": {self._stderr_tail[-1]}" if self._stderr_tail else ""
        last_error = next(
            (ev for ev in reversed(self._logs) if ev.level >= 8), None
        )  # ERROR or worse
        if self._committed:
            if rc != 0:  # after its reply: nothing of the operation is left to fail
                log.warning("%s committed; its helper then exited with %d", self._what(), rc)
            return self._committed_result(rc)
        if self._commit_error is not None:
            msg = f"{self._what()}: the commit failed: {self._commit_error}"
            self._emit(DoneEvent(self.spec.mode, self.spec.domain, False, msg, elapsed))
            raise self._commit_error
        if rc != 0:
            if rc == 254:
                msg = f"{self._what()}: helper exited because its reply pipe closed"
            else:
                msg = f"{self._what()}: helper died"
            if last_error is not None:
                msg += f": {last_error.message}"
            else:
                msg += tail
            self._emit(DoneEvent(self.spec.mode, self.spec.domain, False, msg, elapsed))
            raise HelperDied(msg, returncode=rc, **ids)
        if self.spec.mode == "restore" and self._results is None:
            msg = f"{self._what()}: helper exited without providing results"
            self._emit(DoneEvent(self.spec.mode, self.spec.domain, False, msg, elapsed))
            raise HelperDied(msg, returncode=rc, **ids)
        if self._completed is None:
            msg = f"{self._what()}: helper exited without signalling completion"
            self._emit(DoneEvent(self.spec.mode, self.spec.domain, False, msg, elapsed))
            raise HelperDied(msg, returncode=rc, **ids)
        retval, err = self._completed
        if retval != 0:
            msg = f"{self._what()} failed"
            if last_error is not None:
                msg += f": {last_error.context}: {last_error.message}"
            if self._rounds and self._rounds[-1].decision == Decision.ABORT:
                msg += f" ({self._rounds[-1].reason})" if self._rounds[-1].reason else ""
            exc = HelperFailed(msg, retval=retval, errno=err, **ids)
            self._emit(DoneEvent(self.spec.mode, self.spec.domain, False, str(exc), elapsed))
            raise exc
        self._emit(DoneEvent(self.spec.mode, self.spec.domain, True, "", elapsed))
        return self._result(rc)


Handler = Callable[[HelperRun, proto.Frame], Awaitable[None] | None]


def _int(value: proto.Value) -> int:
    """A scalar argument (the decoder made it an int)."""
    assert isinstance(value, int)
    return value


def _handler(spec: proto.MessageSpec) -> Handler:
    """The message's own ``_on_<name>``, else what its row calls for.

    A row no handler fits fails here, at import: a message added to the
    table is carried through or nothing runs.
    """
    own: Handler | None = getattr(HelperRun, f"_on_{spec.name}", None)
    if own is not None:
        return own
    if spec.callback and spec.needs_reply:
        return HelperRun._on_callback
    if spec.event is not None:
        return HelperRun._on_event
    raise TypeError(f"xcsave.supervisor has no handler for message {spec.name!r}")


#: Message name -> its handler, for every row of the table the helper sends
#: (the decoder refuses the others: those the parent sends, ``HelperRun.send``).
_HANDLERS: Final[dict[str, Handler]] = {
    m.name: _handler(m) for m in proto.TABLE if not m.from_parent
}


# ----------------------------------------------------------------- argv build


def xen_save_args(
    io_fd: int, domid: int, *, xcflags: int, cbflags: int, stream_type: int = 0, recv_fd: int = -1
) -> tuple[str, ...]:
    """Xen 4.17's ``--save-domain`` argv (libxl_save_callout.c's layout)."""
    return ("--save-domain", *map(str, (io_fd, recv_fd, domid, xcflags, cbflags, stream_type)))


def xen_restore_args(
    io_fd: int,
    domid: int,
    *,
    cbflags: int,
    store_evtchn: int = 0,
    store_domid: int = 0,
    console_evtchn: int = 0,
    console_domid: int = 0,
    stream_type: int = 0,
    send_back_fd: int = -1,
) -> tuple[str, ...]:
    """Xen 4.17's ``--restore-domain`` argv."""
    numbers: tuple[int, ...] = (io_fd, send_back_fd, domid, store_evtchn, store_domid)
    numbers += (console_evtchn, console_domid, cbflags, stream_type)  # libxl_save_callout.c
    return ("--restore-domain", *map(str, numbers))


def xcs_args(
    mode: str, backend: str, io_fd: int, options: Mapping[str, object]
) -> tuple[str, ...]:
    """xcsave-1 argv: ``--xcsave-1 MODE --backend B --io-fd N --opt value ...``."""
    out = ["--xcsave-1", mode, "--backend", backend, "--io-fd", str(io_fd)]
    for key, value in options.items():
        if value is None or value is False:
            continue
        out += [f"--{key.replace('_', '-')}", str(int(value) if value is True else value)]
    return tuple(out)


# ----------------------------------------------------------------- supervisor


class Supervisor:
    """Runs many helper operations from one event loop, ``max_parallel`` at a time.

    ::

        async with Supervisor(max_parallel=8) as sup:
            async with asyncio.TaskGroup() as tg:
                for spec in specs:
                    tg.create_task(sup.run(spec))

    Leaving the ``async with`` block stops (SIGTERM, grace, SIGKILL) and reaps
    any helper still running.
    """

    def __init__(self, max_parallel: int | None = None) -> None:
        self.max_parallel = max_parallel or (os.cpu_count() or 2) * 4
        self._sem = asyncio.Semaphore(self.max_parallel)
        self._running: set[HelperRun] = set()

    async def __aenter__(self) -> Supervisor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        runs = list(self._running)
        await asyncio.gather(*(r.stop() for r in runs), return_exceptions=True)

    @property
    def running(self) -> int:
        return len(self._running)

    async def run(
        self,
        spec: HelperSpec,
        callbacks: Callbacks | None = None,
        *,
        on_event: Callable[[Event], object] | None = None,
        timeout: float | None = None,
    ) -> RunResult:
        async with self._sem:
            run = HelperRun(spec, callbacks, on_event)
            self._running.add(run)
            try:
                return await run.run(timeout)
            finally:
                self._running.discard(run)


def high_fd(fd: int) -> tuple[int, bool]:
    """An fd number > 2 for ``fd`` (dup'ing it if needed, as libxl does).

    The helper's fds 0-2 are its control pipes and stderr, so a stream on
    0, 1 or 2 (``-`` on the command line) must move.  Returns ``(fd, owned)``;
    the caller closes it when ``owned``.
    """
    if fd > 2:
        return fd, False
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3), True
