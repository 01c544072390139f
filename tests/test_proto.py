"""The message table and the sans-I/O codec, pinned to Xen 4.17's wire facts."""

from __future__ import annotations

import dataclasses
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xcsave import proto
from xcsave.errors import ProtocolError

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- the table


def test_xen_417_numbers_match_the_417_table() -> None:
    # facts §1.6: implicit numbering from 1 in table order since 4.14
    expected = [
        "log",
        "progress",
        "suspend",
        "postcopy",
        "checkpoint",
        "wait_checkpoint",
        "switch_qemu_logdirty",
        "static_data_done",
        "restore_results",
        "complete",
    ]
    got = [proto.XEN_417.by_number[n].name for n in range(1, 11)]
    assert got == expected
    assert set(proto.XEN_417.by_number) == set(range(1, 11))


def test_reply_rules_match_417() -> None:
    needs = {m.name for m in proto.TABLE if m.needs_reply}
    assert needs == {
        "suspend",
        "postcopy",
        "checkpoint",
        "wait_checkpoint",
        "switch_qemu_logdirty",
        "static_data_done",
        "complete",
        "precopy_policy",
    }


def test_typical_417_cbflags() -> None:
    # facts §1.6 "Typical 4.17 cbflags"
    d = proto.XEN_417
    assert proto.cbflags_for(d, {"suspend", "switch_qemu_logdirty"}) == 136
    assert (
        proto.cbflags_for(d, {"suspend", "postcopy", "checkpoint", "switch_qemu_logdirty"}) == 184
    )
    assert proto.cbflags_for(d, {"static_data_done", "restore_results"}) == 768
    assert proto.cbflags_for(d, {"static_data_done", "restore_results", "checkpoint"}) == 800
    # precopy_policy exists only in xcsave-1
    assert proto.cbflags_for(d, {"precopy_policy"}) == 0
    assert proto.cbflags_for(proto.XCSAVE_1, {"precopy_policy"}) == 1 << 11


@pytest.mark.parametrize(
    ("name", "values", "body_len"),
    [
        # facts §1.6/§1.9: body sizes confirmed against the real 4.17 helper
        ("suspend", (), 2),
        ("postcopy", (), 2),
        ("checkpoint", (), 2),
        ("wait_checkpoint", (), 2),
        ("switch_qemu_logdirty", (7, 1), 10),
        ("static_data_done", (1,), 6),
        ("restore_results", (0xFEFFC, 0xFEFFF), 18),
        ("complete", (-1, 5), 10),
        ("log", (1, 0, "libxl-save-helper", "starting save"), 50),
        ("progress", ("xc", "Frames iteration 0", 512, 1024), 48),
    ],
)
def test_fixed_body_sizes(name: str, values: tuple[int | str, ...], body_len: int) -> None:
    frame = proto.encode(proto.XEN_417, name, *values)
    (length,) = struct.unpack_from("=H", frame)
    assert length == body_len == len(frame) - 2


def test_complete_eio_bytes_are_pinned() -> None:
    # The example: complete(-1, EIO) in xen-4.17
    assert proto.encode(proto.XEN_417, "complete", -1, 5).hex() == "0a000a00ffffffff05000000"
    assert proto.encode(proto.XEN_417, "complete", 0, 0).hex() == "0a000a000000000000000000"


def test_switch_qemu_logdirty_bytes_are_pinned() -> None:
    # facts §1.9: "len=10 switch_qemu_logdirty 07000000 01000000"
    assert proto.encode(proto.XEN_417, "switch_qemu_logdirty", 7, 1).hex() == (
        "0a0007000700000001000000"
    )


def test_xcsave1_uses_u32_lengths_and_carries_big_frames() -> None:
    text = "x" * 100_000  # over xen-4.17's 64 KiB limit
    frame = proto.encode(proto.XCSAVE_1, "log", 5, 0, "ctx", text)
    (length,) = struct.unpack_from("=I", frame)
    assert length == len(frame) - 4
    with pytest.raises(ProtocolError, match="exceeds"):
        proto.encode(proto.XEN_417, "log", 5, 0, "ctx", text)
    dec = proto.Decoder(proto.XCSAVE_1, max_frame=1 << 20)
    dec.feed(_hello() + frame)
    frames = list(dec)
    assert frames[1].args[3] == text


def test_reply_is_a_bare_native_int() -> None:
    assert proto.encode_reply(1) == struct.pack("=i", 1)
    assert len(proto.encode_reply(-1)) == 4


def test_precopy_policy_only_in_xcsave1() -> None:
    with pytest.raises(ProtocolError, match="does not exist"):
        proto.encode(proto.XEN_417, "precopy_policy", 0, 0, 0)
    frame = proto.encode(proto.XCSAVE_1, "precopy_policy", 2, 1000, 37)
    dec = proto.Decoder(proto.XCSAVE_1, "save")
    dec.feed(_hello() + frame)
    frames = list(dec)
    assert frames[1].asdict() == {"iteration": 2, "total_written": 1000, "dirty_count": 37}


# ---------------------------------------------------------------- decoder


def _hello(mode: str = "save") -> bytes:
    return proto.encode(
        proto.XCSAVE_1, "hello", proto.PROTO_VERSION, proto.TABLE_HASH, "sim", mode
    )


def test_hello_must_come_first_and_match_the_table() -> None:
    dec = proto.Decoder(proto.XCSAVE_1)
    dec.feed(proto.encode(proto.XCSAVE_1, "suspend"))
    with pytest.raises(ProtocolError, match="expected hello"):
        list(dec)
    dec = proto.Decoder(proto.XCSAVE_1)
    dec.feed(proto.encode(proto.XCSAVE_1, "hello", 1, proto.TABLE_HASH ^ 1, "sim", "save"))
    with pytest.raises(ProtocolError, match="another message table"):
        list(dec)
    dec = proto.Decoder(proto.XCSAVE_1)
    dec.feed(proto.encode(proto.XCSAVE_1, "hello", 99, proto.TABLE_HASH, "sim", "save"))
    with pytest.raises(ProtocolError, match="version 99"):
        list(dec)


def test_oversized_length_is_rejected_before_buffering() -> None:
    dec = proto.Decoder(proto.XCSAVE_1, max_frame=1024)
    dec.feed(struct.pack("=I", 1 << 30))  # only the prefix: the body never arrives
    with pytest.raises(ProtocolError, match="exceeds"):
        list(dec)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (struct.pack("=H", 99), "unknown message number 99"),
        (struct.pack("=H", 10) + b"\0" * 7, "truncated"),
        (struct.pack("=H", 10) + b"\0" * 9, "trailing"),
        (struct.pack("=HIII", 1, 5, 0, 0), "not NUL-terminated"),  # empty STRING
        (struct.pack("=HIII", 1, 5, 0, 3) + b"abc", "not NUL-terminated"),
        (struct.pack("=HIII", 1, 5, 0, 500) + b"abc", "overruns"),
        (struct.pack("=H", 0), "unknown message number 0"),  # hello is not in xen-4.17
        (b"\x01", "too short"),
    ],
)
def test_malformed_frames_raise(body: bytes, match: str) -> None:
    dec = proto.Decoder(proto.XEN_417)
    dec.feed(struct.pack("=H", len(body)) + body)
    with pytest.raises(ProtocolError, match=match):
        list(dec)


def test_mode_filters_messages() -> None:
    dec = proto.Decoder(proto.XEN_417, "save")
    dec.feed(proto.encode(proto.XEN_417, "static_data_done", 0))
    with pytest.raises(ProtocolError, match="not a save-side"):
        list(dec)
    dec = proto.Decoder(proto.XEN_417, "restore")
    dec.feed(proto.encode(proto.XEN_417, "switch_qemu_logdirty", 1, 1))
    with pytest.raises(ProtocolError, match="not a restore-side"):
        list(dec)


def test_tunnel_mode_takes_its_messages_only() -> None:
    hello = proto.encode(
        proto.XCSAVE_1, "hello", proto.PROTO_VERSION, proto.TABLE_HASH, "tls", "tunnel"
    )
    peer = proto.encode(proto.XCSAVE_1, "tls_peer", "CN=b", "192.0.2.7:4000", "TLSv1.3", "X")
    stats = proto.encode(proto.XCSAVE_1, "tunnel_stats", 1, 2, 0, 3)
    dec = proto.Decoder(proto.XCSAVE_1, "tunnel")
    dec.feed(hello + peer + stats + proto.encode(proto.XCSAVE_1, "complete", 0, 0))
    assert [f.name for f in dec] == ["hello", "tls_peer", "tunnel_stats", "complete"]
    dec = proto.Decoder(proto.XCSAVE_1, "tunnel")
    dec.feed(hello + proto.encode(proto.XCSAVE_1, "suspend"))
    with pytest.raises(ProtocolError, match="not a tunnel message"):
        list(dec)
    dec = proto.Decoder(proto.XCSAVE_1, "save")
    dec.feed(proto.encode(proto.XCSAVE_1, "hello", 1, proto.TABLE_HASH, "sim", "save") + peer)
    with pytest.raises(ProtocolError, match="not a save-side"):
        list(dec)


_U32 = st.integers(0, 2**32 - 1)
_I32 = st.integers(-(2**31), 2**31 - 1)
_U64 = st.integers(0, 2**64 - 1)
_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40
)
_VALUES: dict[str, st.SearchStrategy[object]] = {
    "u16": st.integers(0, 2**16 - 1),
    "u32": _U32,
    "uint": _U32,
    "u64": _U64,
    "ulong": _U64,
    "pfn": _U64,
    "i32": _I32,
    "int": _I32,
    "i64": st.integers(-(2**63), 2**63 - 1),
    "STRING": _TEXT,
    "BLOCK": st.binary(max_size=64),
    "U64S": st.lists(_U64, max_size=8).map(tuple),
}


@st.composite
def _messages(draw: st.DrawFn, dialect: proto.Dialect) -> tuple[str, tuple[object, ...]]:
    specs = [m for m in proto.TABLE if m.number(dialect) is not None and m.name != "hello"]
    spec = draw(st.sampled_from(specs))
    return spec.name, tuple(draw(_VALUES[a.type]) for a in spec.args)


@pytest.mark.parametrize("dialect", [proto.XEN_417, proto.XCSAVE_1], ids=lambda d: d.name)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_roundtrip_at_arbitrary_chunk_boundaries(
    dialect: proto.Dialect, data: st.DataObject
) -> None:
    msgs = data.draw(st.lists(_messages(dialect), min_size=1, max_size=8))
    wire = b"".join(proto.encode(dialect, n, *v) for n, v in msgs)  # type: ignore[arg-type]
    if dialect.hello:
        wire = _hello() + wire
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    dec = proto.Decoder(dialect)
    got: list[proto.Frame] = []
    prev = 0
    for c in [*cuts, len(wire)]:
        dec.feed(wire[prev:c])
        got.extend(dec)
        prev = c
    if dialect.hello:
        assert got[0].name == "hello"
        got = got[1:]
    assert [(f.name, f.args) for f in got] == list(msgs)
    assert dec.buffered == 0


@pytest.mark.parametrize("dialect", [proto.XEN_417, proto.XCSAVE_1], ids=lambda d: d.name)
@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=300))
def test_garbage_raises_only_protocol_error(dialect: proto.Dialect, garbage: bytes) -> None:
    dec = proto.Decoder(dialect, max_frame=4096)
    dec.feed(garbage)
    try:
        list(dec)
    except ProtocolError:
        pass


# ---------------------------------------------------------------- C header


def test_generated_header_is_fresh() -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "xcsave.proto",
            "--emit-c",
            "--check",
            str(ROOT / "csrc/xcsave_msgs.h"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr


def test_stale_header_is_detected(tmp_path: Path) -> None:
    stale = tmp_path / "xcsave_msgs.h"
    stale.write_text(proto.emit_c_header().replace("XCS_MSG_STATS = 12", "XCS_MSG_STATS = 13"))
    r = subprocess.run(
        [sys.executable, "-m", "xcsave.proto", "--emit-c", "--check", str(stale)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 1
    assert "stale" in r.stderr


def test_header_carries_the_table_hash() -> None:
    text = (ROOT / "csrc/xcsave_msgs.h").read_text()
    assert f"#define XCS_PROTO_HASH 0x{proto.TABLE_HASH:016x}ULL" in text


def test_restore_has_its_own_stats_message() -> None:
    """A save ends with stats, a restore with restore_stats; neither takes the other's."""
    save_stats = proto.encode(proto.XCSAVE_1, "stats", 2, 10, 1, 4096, 5, 9, (8, 2))
    restore_stats = proto.encode(proto.XCSAVE_1, "restore_stats", 3, 10, 4096, 9)
    dec = proto.Decoder(proto.XCSAVE_1, "save")
    dec.feed(_hello("save") + save_stats)
    assert list(dec)[1].asdict()["pages_per_round"] == (8, 2)
    dec.feed(restore_stats)
    with pytest.raises(ProtocolError, match="restore_stats is not a save-side message"):
        list(dec)
    dec = proto.Decoder(proto.XCSAVE_1, "restore")
    dec.feed(_hello("restore") + restore_stats)
    assert list(dec)[1].asdict() == {
        "checkpoints": 3,
        "pages_received": 10,
        "bytes": 4096,
        "duration_ns": 9,
    }
    dec.feed(save_stats)
    with pytest.raises(ProtocolError, match="stats is not a restore-side message"):
        list(dec)


@pytest.mark.parametrize("size", [1, 7, 9, 15])
def test_u64s_of_a_partial_u64_is_refused(size: int) -> None:
    frame = proto.encode(proto.XCSAVE_1, "stats", 1, 1, 0, 1, 0, 1, b"\xff" * size)
    dec = proto.Decoder(proto.XCSAVE_1, "save")
    dec.feed(_hello("save") + frame)
    with pytest.raises(ProtocolError, match="pages_per_round is not a whole number of u64s"):
        list(dec)


def test_u64s_size_bomb_is_refused_before_buffering() -> None:
    # A pages_per_round claiming 4 GiB inside a small frame: an overrun, not an allocation.
    body = struct.pack("=H", 12) + struct.pack("=IQQQQQ", 1, 1, 0, 1, 0, 1)
    body += struct.pack("=I", 0xFFFFFFF8)
    dec = proto.Decoder(proto.XCSAVE_1, "save")
    dec.feed(_hello("save") + struct.pack("=I", len(body)) + body)
    with pytest.raises(ProtocolError, match="overruns the frame"):
        list(dec)


# ------------------------------------------------- the table past the codec


def _run_emit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xcsave.proto", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_generated_python_module_is_fresh() -> None:
    r = _run_emit("--emit-py", "--check", str(ROOT / "xcsave/_msgs.py"))
    assert r.returncode == 0, r.stderr


def test_stale_python_module_is_detected(tmp_path: Path) -> None:
    stale = tmp_path / "_msgs.py"
    stale.write_text(proto.emit_py_module().replace("pages_received", "pages_sent"))
    r = _run_emit("--emit-py", "--check", str(stale))
    assert r.returncode == 1
    assert "stale" in r.stderr
    assert "--emit-py" in r.stderr


def test_one_emitter_at_a_time() -> None:
    assert _run_emit("--emit-c", "--emit-py").returncode == 2
    assert _run_emit().returncode == 2


def test_reply_columns_are_complete() -> None:
    for m in proto.TABLE:
        # Every question has the helper's answer for "stopped" ...
        assert (m.stopped is not None) == m.needs_reply, m.name
        # ... and every callback's question the caller's "fine".
        assert (m.ok is not None) == (m.callback and m.needs_reply), m.name


def test_callbacks_are_the_callback_rows() -> None:
    from xcsave.supervisor import Callbacks

    rows = [m.name for m in proto.TABLE if m.callback]
    # The questions in table order, then restore_results (only told): the
    # order the fields had before they were generated.
    assert [f.name for f in dataclasses.fields(Callbacks)] == [
        *(n for n in rows if proto.message(n).needs_reply),
        "restore_results",
    ]
    everything = Callbacks(**dict.fromkeys(rows, lambda *a: None))
    assert everything.installed() == frozenset(rows)
    assert Callbacks().installed() == frozenset()


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _pynames(name: str) -> list[str]:
    return [a.pyname for a in proto.message(name).args]


def test_events_and_records_carry_the_message_args() -> None:
    import xcsave.events
    import xcsave.supervisor
    from xcsave.policy import PrecopyStats

    for m in proto.TABLE:
        if m.event:
            cls = getattr(xcsave.events, m.event)
            assert m.event in xcsave.events.__all__
            assert cls.kind == m.name
            assert _fields(cls) == ["op", "domain", *_pynames(m.name)], m.name
        if m.record:
            cls = getattr(xcsave.supervisor, m.record)
            assert _fields(cls) == _pynames(m.name), m.name
            assert m.record in xcsave.supervisor.__all__
    # The hand-written events of a message start with its args, in order.
    assert _fields(xcsave.events.ProgressEvent)[2:6] == _pynames("progress")
    assert _fields(xcsave.events.PolicyEvent)[2:5] == _pynames("precopy_policy")
    assert _fields(PrecopyStats)[:3] == _pynames("precopy_policy")


def test_every_message_has_exactly_one_handler() -> None:
    from xcsave import supervisor

    # (the parent's own messages are sent with HelperRun.send, never handled)
    assert set(supervisor._HANDLERS) == {m.name for m in proto.TABLE if not m.from_parent}
    # Every message's own handler is for a message of the table (a renamed
    # row leaves none behind) ...
    own = {n.removeprefix("_on_") for n in vars(supervisor.HelperRun) if n.startswith("_on_")}
    generic = {"callback", "event"}
    assert own - generic <= {m.name for m in proto.TABLE}
    # ... and a row that no handler fits is refused at import.
    with pytest.raises(TypeError, match="no handler for message 'bogus'"):
        supervisor._handler(proto.MessageSpec("bogus", None, 99, "s", ()))


def test_every_message_is_sent_by_the_helper() -> None:
    """A message added to the table is carried through to the C side too."""
    sources = list((ROOT / "csrc").rglob("*.c"))
    text = "\n".join(p.read_text() for p in sources)
    header = (ROOT / "csrc/xcsave_msgs.h").read_text()
    lists = {side: f"XCS_{side}_CALLBACKS(" for side in ("SAVE", "RESTORE")}
    for side, use in lists.items():
        assert use in text, f"no backend installs the {side.lower()} callbacks"
    for m in proto.TABLE:
        if m.from_parent:  # the other way round: the helper reads it
            assert f"XCS_MSG_{m.name.upper()}" in text, f"the helper never reads {m.name}"
            assert f"xcs_stub_{m.name}(" not in header
            continue
        sent = re.search(rf"\bxcs_(stub|tramp)_{m.name}\b", text) is not None
        listed = m.callback and f"    X({m.name}, " in header
        assert sent or listed, f"the helper never sends {m.name}"


def test_header_lists_callbacks_and_stopped_replies() -> None:
    header = proto.emit_c_header()
    for m in proto.TABLE:
        if m.needs_reply:
            assert f"[XCS_MSG_{m.name.upper()}] = {m.stopped}," in header
        for side, flag in (("SAVE", "s"), ("RESTORE", "r")):
            block = header.split(f"#define XCS_{side}_CALLBACKS(X)")[1].split("\n\n")[0]
            assert (f"X({m.name}, {m.name.upper()})" in block) == (m.callback and flag in m.flags)
