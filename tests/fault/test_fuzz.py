"""Fuzzing every decoder of untrusted or durable bytes: packed batches (compiled and pure),
the in-memory log's batch intake, WAL recovery, KV commands and peer messages.

The contract each test checks: a result, or one clear exception type (BatchError, LogError,
ValueError, OverflowError; CorruptionError for WAL recovery; CodecError for peer messages).
Never another exception, never a crash, never a hang (a watchdog kills the run with a traceback
if one example takes too long), and a failed operation leaves the log as it was.

Examples per test: RAFTFAST_FUZZ_EXAMPLES (200 by default; ``make soak`` sets 100000).
"""

from __future__ import annotations

import faulthandler
import os
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from raftfast._batch_py import crc32c
from raftfast._batch_py import encode_batch as py_encode_batch
from raftfast._batch_py import encode_uniform as py_encode_uniform
from raftfast.core.types import HardState, MsgType
from raftfast.errors import BatchError, CorruptionError, LogError
from raftfast.kv.commands import decode, encode_cas, encode_delete, encode_put
from raftfast.limits import MAX_CLIENT_ID, MAX_SEQUENCE
from raftfast.proto import raftfast_pb2 as pb
from raftfast.storage.wal import (
    REC_BATCH,
    REC_COMPACTED,
    REC_HARD_STATE,
    WAL,
    _encode_hard_state,
    _record,
)
from raftfast.transport.codec import CodecError, message_from_pb, message_to_pb

EXAMPLES = int(os.environ.get("RAFTFAST_FUZZ_EXAMPLES", "200"))
WATCHDOG_SECONDS = 60.0  # per example; generous for the pure twin on a loaded machine
fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # ``impls`` only picks a module pair
    ],
)

U64 = (1 << 64) - 1
BATCH_ERRORS = (BatchError, ValueError, OverflowError)
LOG_ERRORS = (BatchError, LogError, ValueError, OverflowError)
SEGMENT = "0000000000000000.wal"


@contextmanager
def watchdog(seconds: float = WATCHDOG_SECONDS) -> Iterator[None]:
    """Dump every thread's traceback and exit if the body hangs (even inside C code)."""
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


# -- strategies ---------------------------------------------------------------------------------


@st.composite
def valid_batches(draw, first=None, min_term: int = 0) -> bytes:
    """A well-formed batch; terms non-decreasing from ``min_term`` (as a leader makes them)."""
    n = draw(st.integers(0, 6))
    payloads = draw(st.lists(st.binary(max_size=24), min_size=n, max_size=n))
    term, terms = min_term, []
    for _ in range(n):
        term += draw(st.integers(0, 2))
        terms.append(min(term, U64))
    types = draw(st.lists(st.integers(0, 255), min_size=n, max_size=n))
    if first is None:
        first = draw(st.one_of(st.integers(0, 50), st.integers(0, U64)))
    return py_encode_batch(first, terms, payloads, types)


MUTATIONS = (
    "flip", "truncate", "extend", "zero", "splice", "count", "first", "term", "length", "fixcrc",
    "fixcrc",
)  # fmt: skip


def mutate(draw, data: bytes, max_steps: int = 4) -> bytes:
    """Damage a batch the ways a bad disk, a bad network or a bad peer could."""
    b = bytearray(data)
    for _ in range(draw(st.integers(1, max_steps))):
        kind = draw(st.sampled_from(MUTATIONS))
        if kind == "flip" and b:
            pos = draw(st.integers(0, len(b) - 1))
            b[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del b[draw(st.integers(0, len(b))) :]
        elif kind == "extend":
            b += draw(st.binary(min_size=1, max_size=16))
        elif kind == "zero" and b:
            lo = draw(st.integers(0, len(b) - 1))
            hi = draw(st.integers(lo, min(len(b), lo + 16)))
            b[lo:hi] = bytes(hi - lo)
        elif kind == "splice" and b:
            lo = draw(st.integers(0, len(b) - 1))
            hi = draw(st.integers(lo, len(b)))
            at = draw(st.integers(0, len(b)))
            b[at:at] = b[lo:hi]
        elif kind == "count" and len(b) >= 8:
            value = draw(st.one_of(st.integers(0, 8), st.integers(0, 0xFFFFFFFF)))
            struct.pack_into("<I", b, 4, value)
        elif kind == "first" and len(b) >= 16:
            value = draw(st.one_of(st.integers(0, 60), st.integers(0, U64)))
            struct.pack_into("<Q", b, 8, value)
        elif kind in ("term", "length") and len(b) >= 33:
            entries = (len(b) - 20) // 13
            i = draw(st.integers(0, max(entries - 1, 0)))
            off = 20 + 13 * i
            if kind == "term" and off + 8 <= len(b):
                struct.pack_into(
                    "<Q", b, off, draw(st.one_of(st.integers(0, 5), st.integers(0, U64)))
                )
            elif kind == "length" and off + 13 <= len(b):
                struct.pack_into("<I", b, off + 9, draw(st.integers(0, 0xFFFFFFFF)))
        elif kind == "fixcrc" and len(b) >= 20:
            # A consistent CRC, so the structural checks behind it are reached too.
            struct.pack_into("<I", b, 16, crc32c(bytes(b[20:]), crc32c(bytes(b[:16]))))
    return bytes(b)


@st.composite
def mutated(draw, data: bytes, max_steps: int = 4) -> bytes:
    return mutate(draw, data, max_steps)


@st.composite
def mutated_batches(draw) -> bytes:
    return mutate(draw, draw(valid_batches()))


any_batch_bytes = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda b: b"RFB1" + b),
    mutated_batches(),
    valid_batches(),
)


# -- packed batches -----------------------------------------------------------------------------


@fuzz
@given(data=any_batch_bytes)
def test_batch_decoders_return_or_raise_a_clear_error(impls, data):
    with watchdog():
        for arg in (data, bytearray(data), memoryview(data)):
            try:
                first, terms, types, payloads = impls.batch.decode_batch(arg)
            except BATCH_ERRORS:
                with pytest.raises(BATCH_ERRORS):
                    impls.batch.batch_info(arg)
                continue
            assert impls.batch.batch_info(arg) == (first, len(terms))
            # The format is canonical: whatever decodes re-encodes to the very same bytes.
            assert impls.batch.encode_batch(first, terms, payloads, types) == data


# -- the in-memory log's intake of batches --------------------------------------------------------


def snapshot(log) -> tuple:
    first, last = log.first_index, log.last_index
    entries = log.slice(first, last + 1)
    return (first, last, log.last_term, log.nbytes, len(log), log.term_at(first - 1), entries)


def build_log(impls, first: int, prev_term: int, chunks: list[tuple[int, int]]):
    log = impls.log.EntryLog(first, prev_term)
    term = prev_term
    for step, n in chunks:
        term += step
        log.append(term, [b"e%d" % i for i in range(n)])
    return log


@fuzz
@given(
    first=st.integers(1, 20),
    prev_term=st.integers(0, 3),
    chunks=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4)), max_size=4),
    kind=st.sampled_from(["valid", "mutated", "mutated", "noise"]),
    offset=st.integers(-6, 2),  # where the batch starts relative to the log's end
    term_shift=st.integers(-2, 2),
    start_how=st.sampled_from(["default", "next", "near", "far"]),
    data=st.data(),
)
def test_log_batch_intake_returns_or_raises_and_never_half_applies(
    impls, first, prev_term, chunks, kind, offset, term_shift, start_how, data
):
    log = build_log(impls, first, prev_term, chunks)
    bfirst = max(log.last_index + 1 + offset, 0)
    min_term = max(log.last_term + term_shift, 0)
    if kind == "noise":
        batch = data.draw(st.binary(max_size=120))
    else:
        batch = data.draw(valid_batches(first=bfirst, min_term=min_term))
        if kind == "mutated":
            batch = data.draw(mutated(batch))
    start = {
        "default": None,
        "next": log.last_index + 1,
        "near": log.last_index + 1 + data.draw(st.integers(-3, 3)),
        "far": data.draw(st.sampled_from([0, -1, U64, U64 + 1, 1 << 62])),
    }[start_how]
    before = snapshot(log)
    with watchdog():
        try:
            conflict = log.find_conflict(batch)
        except LOG_ERRORS:
            pass
        else:
            bfirst, bcount = impls.batch.batch_info(batch)
            assert conflict <= bfirst + bcount
        assert snapshot(log) == before  # find_conflict only reads

        try:
            new_last = log.append_batch(batch, start)
        except LOG_ERRORS:
            assert snapshot(log) == before  # a refused batch changes nothing
            return
    assert new_last == log.last_index >= before[1]
    terms = impls.batch.decode_batch(log.slice(log.first_index, log.last_index + 1))[1]
    assert all(a <= b for a, b in zip(terms, terms[1:], strict=False))
    assert (not terms or terms[0] >= before[5]) and len(terms) == len(log)


# -- WAL recovery ---------------------------------------------------------------------------------


def recover(directory: str):
    """Open the WAL in ``directory``: its recovered (hard state, entries), or CorruptionError."""
    with WAL.open(directory, fsync=False) as wal:
        state = wal.recovered()
        log = state.log
        entries = log.slice(log.first_index, log.last_index + 1) if len(log) else b""
        return state.hard_state, log.first_index, log.last_index, log.last_term, entries


def check_recovery(segments: list[bytes]) -> None:
    """Segments 0.. written as files: recovery opens or raises CorruptionError, and opening
    again (after any torn tail was cut) finds exactly the same state."""
    with tempfile.TemporaryDirectory() as d, watchdog():
        for seq, data in enumerate(segments):
            with open(os.path.join(d, f"{seq:016x}.wal"), "wb") as f:
                f.write(data)
        try:
            first = recover(d)
        except CorruptionError as exc:
            assert exc.path and exc.offset >= 0, exc
            assert exc.path in str(exc) and f"byte offset {exc.offset}" in str(exc), exc
            return
        assert recover(d) == first


hard_states = st.builds(
    HardState,
    st.one_of(st.integers(0, 10), st.integers(0, U64)),
    st.text(max_size=8),
    st.one_of(st.integers(0, 30), st.integers(0, U64)),
)


@st.composite
def records(draw) -> list[bytes]:
    """A mostly plausible sequence of CRC-valid records (content may still be nonsense)."""
    out = [b"".join(_record(REC_HARD_STATE, _encode_hard_state(draw(hard_states))))]
    next_index = draw(st.integers(1, 5))
    term = draw(st.integers(0, 3))
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["batch", "batch", "batch", "hs", "compact", "raw"]))
        if kind == "batch":
            first = max(next_index + draw(st.integers(-3, 1)), 0)
            batch = draw(valid_batches(first=first, min_term=term))
            if draw(st.booleans()):
                batch = mutate(draw, batch, max_steps=2)
            try:
                count = struct.unpack_from("<I", batch, 4)[0] if len(batch) >= 8 else 0
            except struct.error:
                count = 0
            next_index = first + count
            rec = _record(REC_BATCH, batch) if batch else None
            if rec is None:
                continue
        elif kind == "hs":
            rec = _record(REC_HARD_STATE, _encode_hard_state(draw(hard_states)))
        elif kind == "compact":
            index = draw(
                st.one_of(
                    st.integers(0, next_index + 2),
                    st.integers(0, U64),
                    st.sampled_from([(1 << 62) - 2, (1 << 62) - 1, 1 << 62, U64]),
                )
            )
            rec = _record(REC_COMPACTED, struct.pack("<QQ", index, draw(st.integers(0, U64))))
        else:  # a CRC-valid record of any type with any payload
            rtype = draw(st.integers(0, 255))
            payload = draw(st.binary(max_size=40))
            crc = crc32c(payload, crc32c(bytes((rtype,))))
            rec = [struct.pack("<IIB", len(payload), crc, rtype), payload]
        out.append(b"".join(rec))
    return out


@st.composite
def segment_files(draw) -> list[bytes]:
    recs = draw(records())
    # Split the records into one or two segments; a later segment opens with a hard state.
    if len(recs) > 2 and draw(st.booleans()):
        cut = draw(st.integers(1, len(recs) - 1))
        hs = b"".join(_record(REC_HARD_STATE, _encode_hard_state(HardState())))
        segs = [b"".join(recs[:cut]), hs + b"".join(recs[cut:])]
    else:
        segs = [b"".join(recs)]
    if draw(st.booleans()):  # then damage the bytes too
        i = draw(st.integers(0, len(segs) - 1))
        segs[i] = mutate(draw, segs[i], max_steps=3)
    return segs


@fuzz
@given(data=st.binary(max_size=400))
def test_wal_recovery_of_arbitrary_bytes(data):
    check_recovery([data])


def _rec(rtype: int, payload: bytes) -> bytes:
    return b"".join(_record(rtype, payload))


_HS0 = _rec(REC_HARD_STATE, _encode_hard_state(HardState()))


@fuzz
@given(segs=segment_files())
# Found by this test: an intact compaction record whose index puts the log's start outside
# EntryLog's range raised ValueError/OverflowError instead of CorruptionError; and the message
# for an empty older segment did not name its byte offset.
@example(segs=[_HS0 + _rec(REC_COMPACTED, struct.pack("<QQ", U64, 0))])
@example(segs=[_HS0 + _rec(REC_COMPACTED, struct.pack("<QQ", 1 << 62, 1))])
@example(segs=[b"", _HS0])
def test_wal_recovery_of_mutated_segments(segs):
    check_recovery(segs)


# -- KV commands ----------------------------------------------------------------------------------


@st.composite
def commands(draw) -> bytes:
    cid = draw(st.one_of(st.integers(0, 5), st.integers(0, MAX_CLIENT_ID)))
    seq = draw(st.one_of(st.integers(0, 5), st.integers(0, MAX_SEQUENCE)))
    key = draw(st.binary(max_size=16))
    value = draw(st.binary(max_size=16))
    kind = draw(st.sampled_from(["put", "delete", "cas"]))
    if kind == "put":
        payload = encode_put(cid, seq, key, value)
    elif kind == "delete":
        payload = encode_delete(cid, seq, key)
    else:
        payload = encode_cas(cid, seq, key, draw(st.none() | st.binary(max_size=16)), value)
    return mutate(draw, payload, max_steps=2) if draw(st.booleans()) else payload


def reencode(op, cid, seq, key, expected, value) -> bytes:
    if op == 1:
        return encode_put(cid, seq, key, value)
    if op == 2:
        return encode_delete(cid, seq, key)
    return encode_cas(cid, seq, key, expected, value)


@fuzz
@given(payload=st.one_of(st.binary(max_size=80), commands()))
def test_kv_command_decode_returns_or_raises_value_error(payload):
    with watchdog():
        try:
            fields = decode(payload)
        except ValueError:
            return
    assert fields[0] in (1, 2, 3)
    assert reencode(*fields) == payload  # a command has exactly one encoding


# -- peer messages --------------------------------------------------------------------------------

u64s = st.one_of(st.integers(0, 20), st.integers(0, U64))
names = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=6)
raft_messages = st.builds(
    pb.RaftMessage,
    type=st.one_of(st.sampled_from([int(t) for t in MsgType]), st.integers(0, 2**32 - 1)),
    src=names,
    dst=names,
    term=u64s,
    index=u64s,
    log_term=u64s,
    entries=st.one_of(st.binary(max_size=40), mutated_batches()),
    commit=u64s,
    reject=st.booleans(),
    hint=u64s,
    context=u64s,
)


@fuzz
@given(p=raft_messages)
def test_message_from_pb_returns_a_message_or_raises_codec_error(p):
    with watchdog():
        try:
            m = message_from_pb(p)
        except CodecError:
            assert p.type not in {int(t) for t in MsgType}
            return
    assert message_to_pb(m) == p  # nothing is lost or invented on the way in
    assert pb.RaftMessage.FromString(p.SerializeToString()) == p


@fuzz
@given(data=st.one_of(st.binary(max_size=200), raft_messages.map(lambda p: p.SerializeToString())))
def test_peer_wire_bytes_decode_or_raise(data):
    with watchdog():
        for cls in (pb.RaftMessage, pb.Frame):
            try:
                msg = cls.FromString(data)
            except DecodeError:
                continue
            msgs = [msg] if cls is pb.RaftMessage else list(msg.messages)
            for p in msgs:
                try:
                    message_from_pb(p)
                except CodecError:
                    pass


def test_examples_setting_is_read_from_the_environment():
    assert fuzz.max_examples == EXAMPLES >= 1
    assert py_encode_uniform(1, 1, [b"x"])  # the pure twin is importable in every run
