"""The helper protocol: ONE message table, both dialects, a sans-I/O codec.

This is xcsave's ``libxl_save_msgs_gen.pl``.  Every message the helper can send
is one row of :data:`TABLE`; both the Python side (this module's
:class:`Decoder` and :func:`encode`) and the helper's C encoders
(``csrc/xcsave_msgs.h``, emitted by ``python -m xcsave.proto --emit-c``) are
generated from it, so the two sides cannot drift apart.

Wire format (both dialects, host byte order, no padding):

    helper -> parent   LEN | u16 msgtype | args...      LEN counts msgtype+args
    parent -> helper   a bare native int, only as the reply to a message that
                       needs one (at most one outstanding)

``xen-4.17``
    byte-exact with Xen 4.17's ``libxl-save-helper``: LEN is a u16 (bodies
    under 64 KiB), message numbers 1..10 in the 4.17 table order, no
    handshake.
``xcsave-1``
    xcsave's own: LEN is a u32, the helper's first frame is ``hello``
    (protocol version, a hash of this table, backend, mode) and the table
    adds ``precopy_policy``, a save's ``stats`` and a restore's
    ``restore_stats``, and the TLS tunnel's ``tls_peer`` (the handshake
    succeeded: who the peer is) and ``tunnel_stats``.

Argument types (LP64 sizes): ``u16``/``u32``/``u64``/``i32``/``i64`` as
named; ``uint``/``int`` are C's 4-byte ``unsigned``/``int``; ``ulong`` is C's
``unsigned long`` and ``pfn`` is ``xen_pfn_t`` (both native, 8 bytes on
x86_64); ``STRING`` is a u32 length followed by that many bytes ending in a
NUL; ``BLOCK`` is a u32 length followed by that many bytes; ``U64S`` is a
BLOCK of native u64s (decoded as a tuple of ints; C passes a pointer and a
count).

Flags, as in Xen's generator: ``s``/``r`` the message occurs in save /
restore (xcsave's own ``t``: in a TLS tunnel run, see ``xcsave.tls``; ``w``: in
a wire pump run; ``k``: in a one-shot ``sched-cap`` run, see ``xcsave.throttle``;
``l``: in a log-dirty sampling run, ``xcsave plan``; ``p``: sent by the parent on
the helper's stdin, unasked), ``c``
it is a callback of the caller's, ``x`` whether the caller installed it
travels in ``cbflags`` bit ``1 << number``, ``W``/``A`` it needs a reply
(synchronous / asynchronous on the parent side; the same on the wire).

Past the codec the table goes on (none of it travels on the wire, so none
of it is in the hash): ``ok`` is the reply a caller's callback that returns
None stands for ("fine"), ``stopped`` the reply the helper assumes when it is
stopped while waiting (the callback failed), ``pack`` the type a callback
gets its arguments in, ``event`` the :mod:`xcsave.events` class a message
becomes, and an argument written ``wire=py`` has another name in Python.
``python -m xcsave.proto --emit-py`` writes ``xcsave/_msgs.py`` from it (the
caller's :class:`~xcsave.supervisor.Callbacks`, the stats records and the
message events); ``--emit-c`` the helper's stubs, trampolines, callback
lists and stopped replies.  A test fails when either file is stale.
"""

from __future__ import annotations

import argparse
import hashlib
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NamedTuple

from .defaults import XEN_DIRTY_THRESHOLD, XEN_MAX_ITERS
from .errors import ProtocolError

__all__ = [
    "DIALECTS",
    "MODE_FLAGS",
    "PROTO_VERSION",
    "TABLE",
    "TABLE_HASH",
    "XCSAVE_1",
    "XEN_417",
    "Arg",
    "Decoder",
    "Dialect",
    "Frame",
    "MessageSpec",
    "cbflags_for",
    "emit_c_header",
    "emit_py_module",
    "encode",
    "encode_reply",
    "message",
]

#: Both must match in hello.  The hash covers every change to the wire
#: table (rows, numbers, flags, argument types and names), so a row added or
#: changed is refused by it alone; bump the version only when an unchanged
#: table starts to mean something else on the wire.
PROTO_VERSION: Final = 1

# type name -> (struct code, size); "ulong" and "pfn" follow the host ABI.
_ULONG = "Q" if struct.calcsize("@L") == 8 else "I"
_SCALARS: Final[dict[str, str]] = {
    "u16": "H",
    "u32": "I",
    "u64": "Q",
    "i32": "i",
    "i64": "q",
    "uint": "I",
    "int": "i",
    "ulong": _ULONG,
    "pfn": "Q",
}
_C_TYPES: Final[dict[str, str]] = {
    "u16": "uint16_t",
    "u32": "uint32_t",
    "u64": "uint64_t",
    "i32": "int32_t",
    "i64": "int64_t",
    "uint": "unsigned int",
    "int": "int",
    "ulong": "unsigned long",
    "pfn": "uint64_t",
    "STRING": "const char *",
    "BLOCK": "const void *",
    "U64S": "const uint64_t *",
}
#: Argument types whose values are variable-length (a u32 byte count first).
_VAR_TYPES: Final = ("STRING", "BLOCK", "U64S")


#: A helper run's mode -> the flag of the messages it may send.
MODE_FLAGS: Final[dict[str, str]] = {
    "save": "s",
    "restore": "r",
    "tunnel": "t",
    "wire-send": "w",
    "wire-recv": "w",
    "sched-cap": "k",
    "logdirty": "l",
}
#: The largest parent->helper message body (wire_rate's is 10 bytes).
PARENT_MSG_MAX: Final = 4096


@dataclass(frozen=True, slots=True)
class Arg:
    """One typed argument of a message."""

    name: str
    type: str
    py: str = ""  # its name in Python when not ``name`` (a C name such as errnoval)
    note: str = ""  # a comment for the generated Python field

    @property
    def code(self) -> str:
        return _SCALARS[self.type]

    @property
    def is_var(self) -> bool:
        return self.type in _VAR_TYPES

    @property
    def pyname(self) -> str:
        return self.py or self.name


@dataclass(frozen=True, slots=True)
class MessageSpec:
    """One row of the table."""

    name: str
    xen: int | None  # number in xen-4.17, None if absent
    xcs: int  # number in xcsave-1
    flags: str
    args: tuple[Arg, ...]
    ok: int | None = None  # reply of a callback that returned None ("fine")
    stopped: int | None = None  # the helper's reply when stopped while waiting
    pack: str | None = None  # a callback gets its args as one of these (xcsave.policy)
    event: str | None = None  # the xcsave.events class the message becomes
    record: str | None = None  # the RunResult record it also is (xcsave.supervisor)
    doc: str = ""  # one line for the generated classes

    def allowed(self, mode: str | None) -> bool:
        """Whether a helper run in ``mode`` may send it (None: any message at all)."""
        return mode is None or (not self.from_parent and MODE_FLAGS[mode] in self.flags)

    @property
    def from_parent(self) -> bool:
        """Sent by the parent to the helper (``p``), never the other way."""
        return "p" in self.flags

    @property
    def needs_reply(self) -> bool:
        return "W" in self.flags or "A" in self.flags

    @property
    def callback(self) -> bool:
        return "c" in self.flags

    @property
    def flagged(self) -> bool:
        """Whether its presence travels in ``cbflags``."""
        return "x" in self.flags

    def number(self, dialect: Dialect) -> int | None:
        return self.xen if dialect.name == XEN_417.name else self.xcs

    def cbflag(self, dialect: Dialect) -> int:
        num = self.number(dialect)
        if not self.flagged or num is None:
            return 0
        return 1 << num


def _row(
    name: str,
    xen: int | None,
    xcs: int,
    flags: str,
    args: str = "",
    *,
    ok: int | None = None,
    stopped: int | None = None,
    pack: str | None = None,
    event: str | None = None,
    record: str | None = None,
    doc: str = "",
    notes: dict[str, str] | None = None,
) -> MessageSpec:
    """One row; ``args`` is "type name type name=pyname ..."."""
    words = args.split()
    pairs = []
    for t, n in zip(words[0::2], words[1::2], strict=True):
        wire, _, py = n.partition("=")
        pairs.append(Arg(wire, t, py, (notes or {}).get(py or wire, "")))
    return MessageSpec(name, xen, xcs, flags, tuple(pairs), ok, stopped, pack, event, record, doc)


#: THE table.  Xen 4.17's ten messages keep their numbers in both dialects.
#: ok/stopped: see the module docstring (suspend, postcopy and wait_checkpoint
#: are fine at 1 and fail at 0; checkpoint's 0 ends the checkpoints; the
#: others are fine at 0 and fail at -1, precopy_policy's -1 is ABORT and
#: complete's -1 "the caller did not commit").
TABLE: Final[tuple[MessageSpec, ...]] = (
    # name                  xen  xcs  flags    args
    _row("hello",           None, 0, "srtwkl",
         "u32 version u64 table_hash STRING backend STRING mode"),
    _row("log",             1,   1,  "srtwkl",
         "u32 level u32 errnoval=errno STRING context STRING formatted=message",
         event="LogEvent", doc="A helper log line (also sent to the ``xcsave.helper`` logger).",
         notes={"level": "xentoollog level 1..9", "errno": "-1 when none"}),
    _row("progress",        2,   2,  "sr",
         "STRING context STRING doing_what ulong done ulong total"),
    _row("suspend",         3,   3,  "srcxA", ok=1, stopped=0),
    _row("postcopy",        4,   4,  "srcxA", ok=1, stopped=0),
    _row("checkpoint",      5,   5,  "srcxA", ok=0, stopped=0),
    _row("wait_checkpoint", 6,   6,  "srcxA", ok=1, stopped=0),
    _row("switch_qemu_logdirty", 7, 7, "scxA", "u32 domid uint enable", ok=0, stopped=-1),
    _row("static_data_done", 8,  8,  "rcxW",   "uint missing", ok=0, stopped=-1),
    _row("restore_results", 9,   9,  "rcx",    "pfn store_gfn pfn console_gfn"),
    _row("complete",        10,  10, "srtwklW",   "int retval int errnoval", stopped=-1),
    _row("precopy_policy",  None, 11, "scxW",  "u32 iteration u64 total_written i64 dirty_count",
         ok=0, stopped=-1, pack="PrecopyStats"),
    _row("stats",           None, 12, "s",
         "u32 rounds u64 pages_sent u64 zero_pages u64 bytes u64 downtime_ns u64 duration_ns "
         "U64S pages_per_round",
         event="StatsEvent", record="Stats", doc="A save's final statistics (xcsave-1 ``stats``).",
         notes={"rounds": "precopy rounds, the stop-and-copy one included",
                "zero_pages": "pages found all-zero (not sent)",
                "bytes": "stream bytes written"}),
    _row("tls_peer",        None, 13, "t",
         "STRING subject STRING address STRING version STRING cipher",
         event="TlsPeerEvent",
         doc="A TLS tunnel's handshake succeeded: the authenticated peer (``tls_peer``).",
         notes={"subject": 'the peer certificate\'s subject, RFC 2253 ("CN=hostb")',
                "address": '"192.0.2.7:4000"', "version": '"TLSv1.3"',
                "cipher": '"TLS_AES_256_GCM_SHA384"'}),
    _row("tunnel_stats",    None, 14, "t",
         "u64 sent u64 received u64 discarded u64 duration_ns",
         event="TunnelStatsEvent", doc="A TLS tunnel's byte counts at its end (``tunnel_stats``).",
         notes={"sent": "plaintext bytes we sent to the peer",
                "received": "plaintext bytes from the peer handed to our socket",
                "discarded": "bytes from the peer after our side had closed"}),
    _row("restore_stats",   None, 15, "r",
         "u32 checkpoints u64 pages_received u64 bytes u64 duration_ns",
         event="RestoreStatsEvent", record="RestoreStats",
         doc="A restore's final statistics (xcsave-1 ``restore_stats``).",
         notes={"checkpoints": "complete checkpoints applied (remus; 0 for a plain stream)",
                "bytes": "stream bytes read"}),
    _row("wire_stats",      None, 16, "w",
         "u64 stream_bytes u64 wire_bytes u64 frames u64 frames_compressed u64 rate_limit "
         "u64 blocked_ns u64 duration_ns U64S channel_bytes",
         event="WireStatsEvent",
         doc="A wire pump's figures, every 500 ms and at its end (``wire_stats``).",
         notes={"stream_bytes": "plain stream bytes read (send) / written (recv)",
                "wire_bytes": "bytes on the channels, frame headers included",
                "frames_compressed": "DATA frames sent (or received) zstd-compressed",
                "rate_limit": "the cap in force, bytes/s (0: none)",
                "blocked_ns": "time spent waiting for the channels or the cap",
                "channel_bytes": "wire bytes per channel, in channel order"}),
    _row("wire_lost",       None, 17, "w",
         "u32 channel int errnoval=errno STRING why",
         event="WireLostEvent", doc="A wire channel failed (``wire_lost``).",
         notes={"why": '"EOF", "connection reset", "idle for 5000 ms"'}),
    _row("wire_rate",       None, 18, "wp", "u64 bytes_per_s",
         doc="The parent's new cap for a wire-send pump (0: none; sent on its stdin)."),
    _row("sched_cap",       None, 19, "k", "u32 sched_id u32 vcpus u32 weight u32 cap",
         event="SchedCapEvent",
         doc="A domain's scheduler and credit2 cap before a ``sched-cap`` run (``sched_cap``).",
         notes={"sched_id": "xen/domctl.h's XEN_SCHEDULER_* (6: credit2)",
                "vcpus": "the domain's vCPUs (max_vcpu_id + 1)",
                "cap": "percent of one pCPU for the whole domain (0: none)"}),
    _row("logdirty_on",     None, 23, "l", "u64 nr_pages",
         event="LogdirtyOnEvent",
         doc="The log-dirty helper turned log-dirty on (``logdirty_on``): it must go off again.",
         notes={"nr_pages": "the domain's pages (its highest gpfn + 1)"}),
    _row("logdirty_sample", None, 24, "l",
         "u32 index u64 dirty u64 union_pages u64 interval_ns",
         event="LogdirtySampleEvent",
         doc="One take of the dirty log while planning (``logdirty_sample``).",
         notes={"dirty": "pages the log named since the previous take",
                "union_pages": "distinct pages named since log-dirty went on",
                "interval_ns": "time since the previous take"}),
    _row("logdirty_off",    None, 25, "l",
         event="LogdirtyOffEvent",
         doc="The log-dirty helper turned log-dirty off again (``logdirty_off``)."),
)  # fmt: skip

_BY_NAME: Final[dict[str, MessageSpec]] = {m.name: m for m in TABLE}


def message(name: str) -> MessageSpec:
    """The table row called ``name`` (KeyError if there is none)."""
    return _BY_NAME[name]


def _table_hash() -> int:
    canon = ";".join(
        f"{m.name}/{m.xen}/{m.xcs}/{m.flags}/" + ",".join(f"{a.type} {a.name}" for a in m.args)
        for m in TABLE
    )
    return int.from_bytes(hashlib.sha256(canon.encode()).digest()[:8], "big")


#: A hash of the table; the helper sends the one it was built with in ``hello``.
TABLE_HASH: Final = _table_hash()


@dataclass(frozen=True, slots=True)
class Dialect:
    """How frames are delimited and numbered."""

    name: str
    len_code: str  # struct code of the length prefix
    max_body: int  # largest body the wire can express
    hello: bool  # helper's first frame is hello
    by_number: dict[int, MessageSpec] = field(default_factory=dict, compare=False, repr=False)

    @property
    def len_size(self) -> int:
        return struct.calcsize("=" + self.len_code)


XEN_417: Final = Dialect("xen-4.17", "H", 0xFFFF, hello=False)
XCSAVE_1: Final = Dialect("xcsave-1", "I", 0xFFFFFFFF, hello=True)
DIALECTS: Final[dict[str, Dialect]] = {XEN_417.name: XEN_417, XCSAVE_1.name: XCSAVE_1}
for _d in DIALECTS.values():
    for _m in TABLE:
        _n = _m.number(_d)
        if _n is not None:
            _d.by_number[_n] = _m


#: One decoded argument: an int, a STRING (str), a BLOCK (bytes) or U64S (ints).
Value = int | str | bytes | tuple[int, ...]


class Frame(NamedTuple):
    """One decoded helper message: its row and its argument values in order.

    A NamedTuple, not a dataclass: one is built per frame on the control
    path, and a tuple is five times cheaper to make than a frozen dataclass.
    """

    spec: MessageSpec
    args: tuple[Value, ...]

    @property
    def name(self) -> str:
        return self.spec.name

    def asdict(self) -> dict[str, Value]:
        return {a.name: v for a, v in zip(self.spec.args, self.args, strict=True)}


def cbflags_for(dialect: Dialect, names: set[str] | frozenset[str]) -> int:
    """The ``cbflags`` word announcing the callbacks called ``names``."""
    flags = 0
    for n in names:
        flags |= _BY_NAME[n].cbflag(dialect)
    return flags


def encode(dialect: Dialect, name: str, *values: Value) -> bytes:
    """Encode one helper->parent frame (used by tests and Python fakes)."""
    spec = _BY_NAME[name]
    num = spec.number(dialect)
    if num is None:
        raise ProtocolError(f"message {name!r} does not exist in dialect {dialect.name}")
    if len(values) != len(spec.args):
        raise ProtocolError(f"{name} takes {len(spec.args)} arguments, got {len(values)}")
    parts = [struct.pack("=H", num)]
    for arg, v in zip(spec.args, values, strict=True):
        if arg.type == "STRING":
            raw = v.encode() if isinstance(v, str) else bytes(v)
            parts.append(struct.pack("=I", len(raw) + 1) + raw + b"\0")
        elif arg.type == "U64S" and isinstance(v, tuple):
            parts.append(struct.pack(f"=I{len(v)}Q", 8 * len(v), *v))
        elif arg.is_var:  # BLOCK, or raw bytes for a U64S (tests send odd sizes)
            raw = v.encode() if isinstance(v, str) else bytes(v)
            parts.append(struct.pack("=I", len(raw)) + raw)
        else:
            parts.append(struct.pack("=" + arg.code, v))
    body = b"".join(parts)
    if len(body) > dialect.max_body:
        raise ProtocolError(f"{name} frame of {len(body)} bytes exceeds {dialect.name}'s limit")
    return struct.pack("=" + dialect.len_code, len(body)) + body


def encode_reply(value: int) -> bytes:
    """A parent->helper reply: one bare native int."""
    return struct.pack("=i", value)


REPLY_SIZE: Final = struct.calcsize("=i")
_U16: Final = struct.Struct("=H")
_U32: Final = struct.Struct("=I")
_EMPTY: Final = struct.Struct("=")
_LAYOUTS: dict[str, tuple[struct.Struct | Arg, ...]] = {}


def _layout(spec: MessageSpec) -> tuple[struct.Struct | Arg, ...]:
    """How to parse a body: runs of scalars merged into one Struct, var args as themselves.

    Built once per message (the decoder's hot path is one or two unpack_from
    calls per frame, not one per argument).
    """
    steps = _LAYOUTS.get(spec.name)
    if steps is None:
        out: list[struct.Struct | Arg] = []
        codes = ""
        for arg in spec.args:
            if arg.is_var:
                if codes:
                    out.append(struct.Struct("=" + codes))
                    codes = ""
                out.append(arg)
            else:
                codes += arg.code
        if codes:
            out.append(struct.Struct("=" + codes))
        steps = _LAYOUTS[spec.name] = tuple(out)
    return steps


#: How a refusal names a mode's messages ("is not a save-side message").
_MODE_WORDS: Final[dict[str, str]] = {
    "save": "save-side",
    "restore": "restore-side",
    "tunnel": "tunnel",
    "wire-send": "wire",
    "wire-recv": "wire",
    "sched-cap": "sched-cap",
    "logdirty": "log-dirty sampling",
}


class Decoder:
    """Sans-I/O decoder of helper->parent frames, msgpack ``feed()`` style.

    ``feed(data)`` buffers bytes; iterating yields every complete :class:`Frame`.
    Anything malformed, unknown, oversized or out of place for ``mode`` raises
    :class:`~xcsave.errors.ProtocolError`; a frame is never silently dropped
    (libxl ignores its decoder's verdict; we do not).  Lengths are checked
    against ``max_frame`` before any body is buffered.
    """

    def __init__(
        self, dialect: Dialect, mode: str | None = None, max_frame: int = 1 << 20
    ) -> None:
        if mode is not None and mode not in MODE_FLAGS:
            modes = ", ".join(repr(m) for m in MODE_FLAGS)
            raise ValueError(f"mode must be one of {modes} or None, not {mode!r}")
        self.dialect = dialect
        self.mode = mode
        self.max_frame = min(max_frame, dialect.max_body)
        # Frames are parsed in place; _pos is where the next one starts and
        # consumed bytes are dropped once per feed, not once per frame.
        self._buf = bytearray()
        self._pos = 0
        self._need_hello = dialect.hello
        self._lenfmt = struct.Struct("=" + dialect.len_code)
        # Per message number, for this dialect and mode: the row, its parse
        # steps, and for all-scalar rows the one Struct of the whole body.
        self._plans: dict[
            int, tuple[MessageSpec, tuple[struct.Struct | Arg, ...], struct.Struct | None]
        ] = {}
        self._refused: dict[int, str] = {}
        for num, spec in dialect.by_number.items():
            if not spec.allowed(mode):
                self._refused[num] = (
                    f"{spec.name} is a parent->helper message"
                    if spec.from_parent
                    else f"{spec.name} is not a {_MODE_WORDS[mode or '']} message"
                )
            else:
                steps = _layout(spec)
                whole = (
                    steps[0] if len(steps) == 1 and isinstance(steps[0], struct.Struct) else None
                )
                self._plans[num] = (spec, steps, _EMPTY if not steps else whole)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf) - self._pos

    def __iter__(self) -> Iterator[Frame]:
        return self

    def __next__(self) -> Frame:
        buf, pos, lenfmt = self._buf, self._pos, self._lenfmt
        start = pos + lenfmt.size
        if len(buf) < start:
            raise StopIteration
        (length,) = lenfmt.unpack_from(buf, pos)
        if length > self.max_frame:
            raise ProtocolError(f"frame length {length} exceeds the limit of {self.max_frame}")
        if length < 2:
            raise ProtocolError(f"frame length {length} is too short for a message number")
        end = start + length
        if len(buf) < end:
            raise StopIteration
        self._pos = end
        return self._parse(buf, start, end)

    def _parse(self, body: bytearray, start: int, end: int) -> Frame:
        (num,) = _U16.unpack_from(body, start)
        plan = self._plans.get(num)
        if plan is None:
            why = self._refused.get(num)
            if why is None:
                raise ProtocolError(f"unknown message number {num} in dialect {self.dialect.name}")
            self._check_order(self.dialect.by_number[num])
            raise ProtocolError(why)
        spec, steps, whole = plan
        if self._need_hello or spec.name == "hello":
            self._check_order(spec)
        off = start + 2
        values: tuple[Value, ...]
        if whole is not None:  # all scalars: one unpack of an exact size
            if end - off != whole.size:
                if end - off < whole.size:
                    raise ProtocolError(f"{spec.name}: truncated after {end - start} bytes")
                raise ProtocolError(f"{spec.name}: {end - off - whole.size} trailing bytes")
            values = whole.unpack_from(body, off)
        else:
            values = self._parse_var(spec, steps, body, off, end)
        frame = Frame(spec, values)
        if spec.name == "hello":
            self._check_hello(frame)
        return frame

    def _check_order(self, spec: MessageSpec) -> None:
        if self._need_hello and spec.name != "hello":
            raise ProtocolError(f"expected hello as the first frame, got {spec.name}")
        if not self._need_hello and spec.name == "hello":
            raise ProtocolError("hello received twice")
        self._need_hello = False

    @staticmethod
    def _parse_var(
        spec: MessageSpec,
        steps: tuple[struct.Struct | Arg, ...],
        body: bytearray,
        off: int,
        end: int,
    ) -> tuple[Value, ...]:
        values: list[Value] = []
        for step in steps:
            if isinstance(step, struct.Struct):  # a run of scalars: one unpack
                if off + step.size > end:
                    raise ProtocolError(f"{spec.name}: truncated after {off} bytes")
                values.extend(step.unpack_from(body, off))
                off += step.size
                continue
            if off + 4 > end:
                raise ProtocolError(f"{spec.name}: truncated length of {step.name}")
            (n,) = _U32.unpack_from(body, off)
            off += 4
            if n > end - off:
                raise ProtocolError(f"{spec.name}: {step.name} of {n} bytes overruns the frame")
            if step.type == "STRING":
                if n == 0 or body[off + n - 1] != 0:
                    raise ProtocolError(f"{spec.name}: {step.name} is not NUL-terminated")
                values.append(body[off : off + n - 1].decode("utf-8", errors="replace"))
            elif step.type == "U64S":
                if n % 8:
                    raise ProtocolError(f"{spec.name}: {step.name} is not a whole number of u64s")
                values.append(struct.unpack_from(f"={n // 8}Q", body, off))
            else:
                values.append(bytes(body[off : off + n]))
            off += n
        if off != end:
            raise ProtocolError(f"{spec.name}: {end - off} trailing bytes")
        return tuple(values)

    @staticmethod
    def _check_hello(frame: Frame) -> None:
        version, table_hash = frame.args[0], frame.args[1]
        assert isinstance(version, int)  # u32
        assert isinstance(table_hash, int)  # u64
        if version != PROTO_VERSION:
            raise ProtocolError(
                f"helper speaks xcsave protocol version {version}, expected {PROTO_VERSION}"
            )
        if table_hash != TABLE_HASH:
            raise ProtocolError(
                f"helper was built from another message table "
                f"(hash {table_hash:#018x}, expected {TABLE_HASH:#018x}); rebuild xcsave"
            )


# --------------------------------------------------------------------------- C


def _c_ident(name: str) -> str:
    return name.upper()


#: Argument types a generated C trampoline can take (the library's own are its).
_PLAIN_C: Final = ("u16", "u32", "u64", "i32", "i64", "uint", "int")


def _trampoline(m: MessageSpec) -> bool:
    return m.callback and m.pack is None and all(a.type in _PLAIN_C for a in m.args)


def _c_define_list(name: str, items: list[MessageSpec]) -> list[str]:
    """``#define name(X)`` expanding to X(name, NAME) for each message, in order."""
    lines = [f"#define {name}(X) \\"]
    lines += [f"    X({m.name}, {_c_ident(m.name)}) \\" for m in items]
    lines[-1] = lines[-1].removesuffix(" \\")
    return lines


def _c_stub(m: MessageSpec) -> list[str]:
    """xcs_stub_<name>(args...): the message's args as xcs_arg, sent (or asked)."""
    params: list[str] = []
    body: list[str] = []
    for a in m.args:
        params.append(f"{_C_TYPES[a.type]} {a.name}")
        if a.type == "STRING":
            body.append(f"XCS_STR({a.name})")
        elif a.type == "BLOCK":
            params.append(f"uint32_t {a.name}_len")
            body.append(f"XCS_VAR({a.name}, {a.name}_len)")
        elif a.type == "U64S":
            params.append(f"uint32_t {a.name}_count")
            body.append(f"XCS_VAR({a.name}, {a.name}_count * (uint32_t)sizeof(uint64_t))")
        else:
            body.append(f"XCS_FIXED({a.name})")
    ret, call = ("int", "return xcs_ask") if m.needs_reply else ("void", "xcs_send")
    return [
        f"static inline {ret} xcs_stub_{m.name}({', '.join(params) or 'void'})",
        "{",
        f"    const struct xcs_arg a[] = {{{', '.join(body)}}};",
        f"    {call}(XCS_MSG_{_c_ident(m.name)}, a, {len(body)});",
        "}",
        "",
    ]


def _c_trampoline(m: MessageSpec) -> list[str]:
    ret = "int" if m.needs_reply else "void"
    params = [f"{_C_TYPES[a.type]} {a.name}" for a in m.args]
    names = ", ".join(a.name for a in m.args)
    return [
        f"static inline {ret} xcs_tramp_{m.name}({', '.join([*params, 'void *data'])})",
        "{",
        "    (void)data;",
        f"    {'return ' if m.needs_reply else ''}xcs_stub_{m.name}({names});",
        "}",
        "",
    ]


def emit_c_header() -> str:
    """The helper's generated marshalling code (``csrc/xcsave_msgs.h``)."""
    numbers = "\n".join(
        f"    {{{', '.join(str(-1 if m.number(d) is None else m.number(d)) for m in TABLE)}}},"
        f" /* {d.name} */"
        for d in (XEN_417, XCSAVE_1)
    )
    rows = "".join(f"    XCS_MSG_{_c_ident(m.name)} = {i},\n" for i, m in enumerate(TABLE))
    names = ", ".join(f'"{m.name}"' for m in TABLE)
    flags = "".join(
        f"#define XCS_CBFLAG_{_c_ident(m.name)} (1u << {m.xcs})\n" for m in TABLE if m.flagged
    )
    from_parent = ", ".join("1" if m.from_parent else "0" for m in TABLE)
    stopped = "".join(
        f"    [XCS_MSG_{_c_ident(m.name)}] = {m.stopped},\n" for m in TABLE if m.needs_reply
    )
    out = f"""\
/* AUTOGENERATED by python -m xcsave.proto --emit-c  DO NOT EDIT */
/* Source of truth: the message table in xcsave/proto.py. */
#ifndef XCSAVE_MSGS_H
#define XCSAVE_MSGS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "msg_stub.h"

#define XCS_PROTO_VERSION {PROTO_VERSION}
#define XCS_PROTO_HASH 0x{TABLE_HASH:016x}ULL

/* Xen's default precopy policy, from xcsave/defaults.py (the one place). */
#define XCS_XEN_MAX_ITERS {XEN_MAX_ITERS}
#define XCS_XEN_DIRTY_THRESHOLD {XEN_DIRTY_THRESHOLD}

enum xcs_dialect {{ XCS_DIALECT_XEN_417 = 0, XCS_DIALECT_XCSAVE_1 = 1 }};

/* Row indices of the table (not wire numbers). */
enum xcs_msg {{
{rows}\
    XCS_MSG_COUNT = {len(TABLE)}
}};

/* Wire number per dialect; -1 where the dialect lacks the message. */
static const int xcs_msg_numbers[2][XCS_MSG_COUNT] = {{
{numbers}
}};

static const char *const xcs_msg_names[XCS_MSG_COUNT] = {{
    {names}
}};

/* Messages the parent sends on our stdin unasked (the table's p flag). */
static const unsigned char xcs_msg_from_parent[XCS_MSG_COUNT] = {{
    {from_parent}
}};
#define XCS_PARENT_MSG_MAX {PARENT_MSG_MAX}

/* cbflags bits: 1 << wire number (the same in both dialects). */
{flags}
/*
 * The reply to a message that needs one, once the parent is stopping the
 * helper (it will never answer): the callback failed (0 where 0 fails it,
 * -1 elsewhere: precopy_policy's ABORT, complete's "not committed").
 */
static const int xcs_msg_stopped_reply[XCS_MSG_COUNT] = {{
{stopped}\
}};

/*
 * The caller's callbacks of each side, X(name, NAME) in table order: a
 * backend installs its trampoline for each one flagged in cbflags
 * (libxenguest's save_callbacks/restore_callbacks name them the same).
 */
"""
    lines = out.split("\n")[:-1]
    for side, flag in (("SAVE", "s"), ("RESTORE", "r")):
        lines += _c_define_list(
            f"XCS_{side}_CALLBACKS", [m for m in TABLE if m.callback and flag in m.flags]
        )
        lines.append("")
    # The questions without arguments are all alike: one macro (msg_stub.h)
    # writes their stub and trampoline.
    bare = [m for m in TABLE if not m.args and m.needs_reply]
    assert all(_trampoline(m) for m in bare), "a bare question that is no callback"
    lines += [
        "/*",
        " * Provided by the helper (helper_main.c), for the stubs below:",
        " *   xcs_send(m, a, n)   frame message m's n args (in order) and send it;",
        " *   xcs_ask(m, a, n)    the same, then wait for the parent's int reply.",
        " */",
        "void xcs_send(enum xcs_msg m, const struct xcs_arg *a, size_t n);",
        "int xcs_ask(enum xcs_msg m, const struct xcs_arg *a, size_t n);",
        "",
        "/*",
        " * Stubs: xcs_stub_<name>(args...) sends the message (and returns the",
        " * reply where it needs one).  The questions without arguments get",
        " * theirs and their trampoline from XCS_BARE_QUESTION (msg_stub.h).",
        " */",
        *_c_define_list("XCS_BARE_QUESTIONS", bare),
        "XCS_BARE_QUESTIONS(XCS_BARE_QUESTION)",
        "",
    ]
    for m in TABLE:
        if m not in bare and not m.from_parent:
            lines += _c_stub(m)
    lines += [
        "/*",
        " * Trampolines: a callback of the backend's library (args..., void *data)",
        " * relayed as its message, the reply its value.  Only for callbacks whose",
        " * arguments are plain C integers; a backend writes the others (their",
        " * types are the library's: xen_pfn_t, struct precopy_stats).",
        " */",
    ]
    for m in TABLE:
        if _trampoline(m) and m not in bare:
            lines += _c_trampoline(m)
    lines.append("#endif /* XCSAVE_MSGS_H */")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- Python

_PY_TYPES: Final[dict[str, str]] = {
    "STRING": "str",
    "BLOCK": "bytes",
    "U64S": "tuple[int, ...]",
}


def _py_type(a: Arg) -> str:
    return _PY_TYPES.get(a.type, "int")


def _py_fields(m: MessageSpec) -> list[str]:
    out = []
    for a in m.args:
        note = f"  # {a.note}" if a.note else ""
        out.append(f"    {a.pyname}: {_py_type(a)}{note}")
    return out


def _py_values(m: MessageSpec) -> list[str]:
    return [f"cast({_py_type(a)}, a[{i}])" for i, a in enumerate(m.args)]


def _py_call(indent: str, callee: str, values: list[str]) -> list[str]:
    """``return callee(values)`` as ruff format writes it (one line if it fits)."""
    line = f"{indent}return {callee}({', '.join(values)})"
    if len(line) <= 99:
        return [line]
    return [f"{indent}return {callee}(", *(f"{indent}    {v}," for v in values), f"{indent})"]


def _py_callback_type(m: MessageSpec) -> str:
    params = m.pack or ", ".join("int" for _ in m.args)
    return f"Callable[[{params}], {'Answer' if m.needs_reply else 'object'}]"


def _py_class(
    head: str,
    doc: str,
    body: list[str],
    *,
    decorator: str | None = "@dataclass(frozen=True, slots=True)",
) -> list[str]:
    """``class head:`` with its docstring and body, as ruff format writes it."""
    return [
        "",
        "",
        *([decorator] if decorator else []),
        f"class {head}:",
        f'    """{doc}"""',
        *(["", *body] if body else []),
    ]


def emit_py_module() -> str:
    """The Python side past the codec (``xcsave/_msgs.py``)."""
    # The questions in table order, then what the caller is only told
    # (restore_results): Callbacks' field order since before the table.
    callbacks = sorted((m for m in TABLE if m.callback), key=lambda m: not m.needs_reply)
    records = [m for m in TABLE if m.record]
    events = [m for m in TABLE if m.event]
    packs = [m for m in TABLE if m.pack]
    names = sorted(
        ["CALLBACKS", "EVENTS", "Answer", "Args", "CallbackFn", "Callbacks", "Reply"]
        + [m.record for m in records if m.record]
        + [m.event for m in events if m.event]
        + [f"pack_{m.name}" for m in packs],
        key=lambda n: (not n.isupper(), not n[0].isupper(), n),  # ruff's RUF022 order
    )
    out: list[str] = []
    w = out.append
    w("# AUTOGENERATED by python -m xcsave.proto --emit-py  DO NOT EDIT")
    w("# Source of truth: the message table in xcsave/proto.py.")
    w('"""The message table past the codec: callbacks, statistics, message events.')
    w("")
    w("Generated from :data:`xcsave.proto.TABLE` (``python -m xcsave.proto --emit-py``);")
    w("a test fails when this file is stale.  Import these from xcsave.supervisor")
    w("and xcsave.events, which re-export them.")
    w('"""')
    w("")
    w("from __future__ import annotations")
    w("")
    w("from collections.abc import Awaitable, Callable")
    w("from dataclasses import dataclass")
    w("from typing import Any, Final, Self, cast")
    w("")
    w("from ._event import Event")
    policy_names = sorted({"Decision", "Verdict", *(m.pack for m in packs if m.pack)})
    w(f"from .policy import {', '.join(policy_names)}")
    w("from .proto import Value")
    w("")
    w("__all__ = [")
    for n in names:
        w(f'    "{n}",')
    w("]")
    w("")
    w("#: A frame's argument values, in table order.")
    w("Args = tuple[Value, ...]")
    w("#: A callback's reply (Xen semantics, an int; True/False are 1/0; None: fine;")
    w("#: precopy_policy's may be a Verdict, a Decision with its reason).")
    w("Reply = int | bool | Decision | Verdict | None")
    w("Answer = Reply | Awaitable[Reply]")
    w("CallbackFn = Callable[..., Answer]")
    w("")
    w("#: The callbacks a caller may install: the questions, then restore_results.")
    w("CALLBACKS: Final = (")
    for m in callbacks:
        w(f'    "{m.name}",')
    w(")")
    w("")
    w("")
    w("@dataclass")
    w("class Callbacks:")
    w('    """The caller\'s callbacks.  Each may be sync or async; None = not installed.')
    w("")
    w("    Their return value is the reply to the helper (Xen semantics, an int;")
    w('    ``True``/``False`` are 1/0; ``None`` means "fine": the table\'s ``ok``).')
    w("    Installed callbacks are announced to the helper in ``cbflags`` exactly as")
    w("    libxl does; ``restore_results`` is told, not asked (its value is ignored).")
    w('    """')
    w("")
    for m in callbacks:
        sig = f"  # ({', '.join(a.pyname for a in m.args)})" if m.args and not m.pack else ""
        w(f"    {m.name}: {_py_callback_type(m)} | None = None{sig}")
    w("")
    w("    def installed(self) -> frozenset[str]:")
    w('        """The names of the callbacks set (announced in ``cbflags``)."""')
    w("        return frozenset(name for name in CALLBACKS if getattr(self, name) is not None)")
    for m in packs:
        w("")
        w("")
        w(f"def pack_{m.name}(a: Args) -> {m.pack}:")
        w(f'    """The {m.name} callback\'s one argument."""')
        out.extend(_py_call("    ", m.pack or "", _py_values(m)))
    # A message both kept as a record and emitted as an event declares its
    # fields once, in a slot-less base both classes are built on.
    shared = {m.name for m in records if m.event}
    if records:
        out += _py_class(
            "_Record",
            "A record's constructor from its message's argument values.",
            [
                "    __slots__ = ()",
                "",
                "    @classmethod",
                "    def from_args(cls, a: Args) -> Self:",
                "        return cls(*cast(tuple[Any, ...], a))  # typed by the codec",
            ],
            decorator=None,
        )
    for m in records:
        if m.name in shared:
            doc = f"The fields of :class:`{m.record}` and :class:`{m.event}`."
            body = ["    __slots__ = ()", *_py_fields(m)]
            out += _py_class(f"_{m.record}Fields", doc, body, decorator="@dataclass(frozen=True)")
    for m in records:
        if m.name in shared:
            out += _py_class(f"{m.record}(_{m.record}Fields, _Record)", m.doc, [])
        else:
            out += _py_class(f"{m.record}(_Record)", m.doc, _py_fields(m))
    for m in events:
        kind = f'kind="{m.name}"'
        if m.name in shared:
            out += _py_class(f"{m.event}(_{m.record}Fields, Event, {kind})", m.doc, [])
        else:
            out += _py_class(f"{m.event}(Event, {kind})", m.doc, _py_fields(m))
    w("")
    w("")
    w("#: Message name -> the event it becomes: (op, domain, args) -> event.")
    w("EVENTS: Final[dict[str, Callable[[str, str, Args], Event]]] = {")
    for m in events:
        w(f'    "{m.name}": {m.event}.from_frame,')
    w("}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xcsave.proto", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--emit-c", action="store_true", help="print the helper's C header")
    parser.add_argument(
        "--emit-py", action="store_true", help="print the Python module xcsave/_msgs.py"
    )
    parser.add_argument(
        "--check", metavar="FILE", help="with --emit-*: exit 1 if FILE differs (stale)"
    )
    parser.add_argument("--hash", action="store_true", help="print the table hash")
    args = parser.parse_args(argv)
    if args.hash:
        sys.stdout.write(f"0x{TABLE_HASH:016x}\n")
        return 0
    if args.emit_c == args.emit_py:
        parser.error("give one of --emit-c, --emit-py or --hash")
    text = emit_c_header() if args.emit_c else emit_py_module()
    if args.check:
        current = Path(args.check).read_text() if Path(args.check).exists() else ""
        if current != text:
            flag = "--emit-c" if args.emit_c else "--emit-py"
            sys.stderr.write(
                f"{args.check} is stale: regenerate with python -m xcsave.proto {flag}\n"
            )
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
