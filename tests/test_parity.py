"""Property tests: the compiled modules and their pure twins agree on every input.

"Agree" means the same return value, or an exception of the same type.  Example counts are modest
by default; set RAFTFAST_HYPOTHESIS_EXAMPLES for a longer run.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if os.environ.get("RAFTFAST_PUREPYTHON"):
    pytest.skip(
        "RAFTFAST_PUREPYTHON is set: no compiled modules to compare", allow_module_level=True
    )

# Without RAFTFAST_PUREPYTHON a missing build must fail loudly, so no importorskip here.
from raftfast import _batch, _batch_py, _log, _log_py  # noqa: E402

EXAMPLES = int(os.environ.get("RAFTFAST_HYPOTHESIS_EXAMPLES", "200"))
parity = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

U64 = (1 << 64) - 1


def outcome(fn, *args):
    """("ok", result) or ("raise", exception type), so two implementations can be compared."""
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # noqa: BLE001 - the type is the result being compared
        return ("raise", type(exc))


def same(name, *args):
    """Call ``name`` in both batch modules and assert identical outcomes."""
    got = outcome(getattr(_batch, name), *args)
    want = outcome(getattr(_batch_py, name), *args)
    assert got == want, (name, args)
    return got


# Mostly valid values, sometimes just outside the field.
u64s = st.one_of(st.integers(0, 1000), st.integers(0, U64), st.sampled_from([-1, U64 + 1, 1 << 70]))
u8s = st.one_of(st.integers(0, 255), st.sampled_from([-1, 256]))
payload_st = st.binary(max_size=40)
payload_lists = st.lists(payload_st, max_size=12)


# -- batch functions --------------------------------------------------------------------------


@parity
@given(
    data=st.binary(max_size=300),
    crc=st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from([-1, 1 << 32])),
)
def test_crc32c(data, crc):
    same("crc32c", data, crc)
    same("crc32c", bytearray(data))


@parity
@given(first=u64s, payloads=payload_lists, data=st.data())
def test_encode_decode(first, payloads, data):
    n = len(payloads)
    extra = data.draw(st.sampled_from([0, 0, 0, 1]))  # sometimes a length mismatch
    terms = data.draw(st.lists(u64s, min_size=n + extra, max_size=n + extra))
    types = data.draw(st.one_of(st.none(), st.lists(u8s, min_size=n, max_size=n)))
    result = same("encode_batch", first, terms, payloads, types)
    if result[0] == "ok":
        encoded = result[1]
        assert same("decode_batch", encoded) == ("ok", (first, terms, types or [0] * n, payloads))
        assert same("batch_info", encoded) == ("ok", (first, n))
        all_types = types or [0] * n
        etype = all_types[0] if n else 2
        expected = [(first + i, p) for i, p in enumerate(payloads) if all_types[i] == etype]
        assert same("entries_of_type", encoded, etype) == ("ok", expected)


@parity
@given(first=u64s, term=u64s, payloads=payload_lists, etype=u8s)
def test_encode_uniform(first, term, payloads, etype):
    result = same("encode_uniform", first, term, payloads, etype)
    if result[0] == "ok":
        assert same("decode_batch", result[1])[0] == "ok"


@parity
@given(data=st.binary(max_size=120))
def test_decode_random_bytes(data):
    same("decode_batch", data)
    same("batch_info", data)
    same("decode_batch", b"RFB1" + data)  # get past the magic check
    same("batch_info", bytearray(b"RFB1" + data))
    same("entries_of_type", b"RFB1" + data, 2)
    same("entries_of_type", data, 300)


def _valid_batch(draw):
    payloads = draw(st.lists(payload_st, max_size=6))
    terms = draw(st.lists(st.integers(0, U64), min_size=len(payloads), max_size=len(payloads)))
    types = draw(st.lists(st.integers(0, 255), min_size=len(payloads), max_size=len(payloads)))
    return _batch_py.encode_batch(draw(st.integers(0, U64)), terms, payloads, types)


@st.composite
def mutated_batches(draw):
    data = bytearray(_valid_batch(draw))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "extend", "count", "length", "fixcrc"]))
        if kind == "flip" and data:
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif kind == "extend":
            data += draw(st.binary(min_size=1, max_size=20))
        elif kind == "count" and len(data) >= 8:
            struct.pack_into("<I", data, 4, draw(st.integers(0, 0xFFFFFFFF)))
        elif kind == "length" and len(data) >= 33:
            struct.pack_into("<I", data, 29, draw(st.integers(0, 0xFFFFFFFF)))
        elif kind == "fixcrc" and len(data) >= 20:
            # A consistent CRC, so structural checks behind it are exercised too.
            crc = _batch_py.crc32c(data[20:], _batch_py.crc32c(data[:16]))
            struct.pack_into("<I", data, 16, crc)
    return bytes(data)


@parity
@given(data=mutated_batches())
def test_decode_mutated_batches(data):
    same("decode_batch", data)
    same("batch_info", memoryview(data))


@parity
@given(
    sizes=st.lists(st.integers(0, 50), max_size=30),
    max_bytes=st.integers(-2, 120),
    max_count=st.integers(-2, 8),
)
def test_chunk_payloads(sizes, max_bytes, max_count):
    same("chunk_payloads", [b"x" * n for n in sizes], max_bytes, max_count)


@parity
@given(
    values=st.lists(st.one_of(st.integers(0, 1000), st.integers(-(1 << 70), 1 << 70)), max_size=9)
)
def test_commit_index(values):
    same("commit_index", values)
    same("commit_index", tuple(values))


# -- EntryLog ---------------------------------------------------------------------------------

HUGE = st.sampled_from([-(1 << 70), 1 << 70])


def mostly(common, rare):
    """``common`` nine times in ten, else ``rare`` (one_of alone would pick them evenly)."""
    return st.tuples(st.sampled_from([True] * 9 + [False]), common, rare).map(
        lambda t: t[1] if t[0] else t[2]
    )


# Positions are drawn relative to the live log (see _at / _near_end) so that most operations
# land on the interesting edges instead of far outside it.
at = mostly(st.integers(-2, 14), HUGE)  # first_index + k
near_end = mostly(st.integers(-4, 2), HUGE)  # last_index + 1 + k
term_step = mostly(st.integers(0, 2), st.sampled_from([-1, -(1 << 70), 1 << 70]))
log_payloads = st.lists(st.binary(max_size=24), max_size=8)
log_type = mostly(st.integers(0, 255), st.sampled_from([-1, 256]))

OPS = {
    "append": st.tuples(term_step, log_payloads, log_type),
    "append_batch": st.tuples(
        mostly(st.integers(-4, 0), near_end),
        st.lists(st.integers(0, 2), max_size=8),
        st.sampled_from(["default", "next", "next", "near"]),
        mostly(st.just(False), st.just(True)),
    ),
    "find_conflict": st.tuples(
        near_end,
        st.lists(st.integers(0, 2), max_size=8),
        st.none(),
        mostly(st.just(False), st.just(True)),
    ),
    "truncate_after": st.tuples(at),
    "compact": st.tuples(at),
    "term_at": st.tuples(at),
    "entry": st.tuples(at),
    "slice": st.tuples(
        mostly(st.integers(-1, 6), at), st.integers(-1, 6), mostly(st.integers(0, 60), st.just(-1))
    ),
    "find_conflict_by_term": st.tuples(at, term_step),
    "reset": st.tuples(st.integers(-1, 30), st.integers(-1, 5)),
}
WEIGHTS = {"append": 6, "append_batch": 4, "find_conflict": 2, "slice": 3}
ops = st.sampled_from([name for name in OPS for _ in range(WEIGHTS.get(name, 1))]).flatmap(
    lambda name: OPS[name].map(lambda args: (name, *args))
)


def _at(log, k):
    return k if abs(k) > 1000 else log.first_index + k


def _near_end(log, k):
    return k if abs(k) > 1000 else log.last_index + 1 + k


def _apply(log, batch_mod, op):
    """Run one operation; return ("ok", result) or ("raise", type)."""
    name, *args = op
    if name == "append":
        step, payloads, etype = args
        return outcome(log.append, log.last_term + step, payloads, etype)
    if name in ("append_batch", "find_conflict"):
        k, steps, how, bad = args
        first = min(max(_near_end(log, k), 0), U64)
        # Terms start just below the log's last term so both matches and conflicts occur.
        terms, term = [], max(log.last_term - 1, 0)
        for step in steps:
            term += step
            terms.append(term)
        batch = batch_mod.encode_batch(first, terms, [b"p%d" % t for t in terms])
        if bad:
            batch = batch[:-1]
        if name == "find_conflict":
            return outcome(log.find_conflict, batch)
        start = {"default": None, "next": log.last_index + 1, "near": _near_end(log, k + 1)}[how]
        return outcome(log.append_batch, batch, start)
    if name == "reset":
        return outcome(log.reset, *args)
    if name == "slice":
        k, width, max_bytes = args
        lo = _at(log, k)
        return outcome(log.slice, lo, lo + width, max_bytes)
    if name == "find_conflict_by_term":
        k, step = args
        return outcome(log.find_conflict_by_term, _at(log, k), log.last_term + step - 1)
    (k,) = args
    return outcome(getattr(log, name), _at(log, k))


def _snapshot(log):
    first, last = log.first_index, log.last_index
    return (
        first,
        last,
        log.last_term,
        log.nbytes,
        len(log),
        log.term_at(first - 1),
        log.slice(first, last + 1),
    )


@parity
@given(start=st.integers(1, 5), prev_term=st.integers(0, 3), script=st.lists(ops, max_size=40))
def test_entry_log_operation_sequences(start, prev_term, script):
    compiled = _log.EntryLog(start, prev_term)
    pure = _log_py.EntryLog(start, prev_term)
    for step, op in enumerate(script):
        got = _apply(compiled, _batch, op)
        want = _apply(pure, _batch_py, op)
        assert got == want, (step, op)
        assert _snapshot(compiled) == _snapshot(pure), (step, op)


# -- the KV state machine's plain writes (raftfast._store.apply_writes) ------------------------

from raftfast import _store, _store_py, dedup  # noqa: E402
from raftfast.kv.commands import encode_cas, encode_delete, encode_put  # noqa: E402

_CLIENT_IDS = st.sampled_from([0, 1, 2, 3, 4, (1 << 63) - 1])
_SEQS = st.one_of(st.integers(0, 40), st.sampled_from([(1 << 63) - 1, 1 << 63, (1 << 64) - 1]))
_KEYS = st.sampled_from([b"", b"a", b"b", b"key-c", b"\x00" * 3])


def _raw_header(op: int, client_id: int, seq: int, key: bytes) -> bytes:
    # (encode_* refuse ids out of range: a crafted log need not)
    return struct.pack("<BQQI", op, client_id, seq, len(key)) + key


_commands = st.one_of(
    st.builds(encode_put, _CLIENT_IDS, st.integers(0, 40), _KEYS, st.binary(max_size=8)),
    st.builds(encode_delete, _CLIENT_IDS, st.integers(0, 40), _KEYS),
    st.builds(
        lambda op, c, s, k, tail: _raw_header(op, c, s, k) + tail,
        st.sampled_from([1, 2, 3, 4, 0, 9]),
        st.integers(0, U64),
        _SEQS,
        _KEYS,
        st.binary(max_size=6),
    ),
    st.builds(encode_cas, _CLIENT_IDS, st.integers(0, 40), _KEYS, st.none(), st.binary(max_size=4)),
    st.binary(max_size=30),  # (mostly too short or an unknown op: not theirs)
)


def _applied(module, commands, window, max_clients, max_results, lowered_at):
    """Every command through ``module.apply_writes``; one it leaves is skipped (the state
    machine's), and what each call returned is kept. ``dedup.MAX_RESULTS`` (read by both) is
    lowered to ``max_results`` after the first ``lowered_at`` commands: a table over it, as
    one restored from an older snapshot can be."""
    store, clients, results, stops = module.KeyStore(), dedup.ClientTable(), [], []
    i = 0
    while i < len(commands):
        dedup.MAX_RESULTS = max_results if i >= lowered_at else 10**6
        end = len(commands) if i >= lowered_at else lowered_at
        i = module.apply_writes(store, clients, commands[:end], i, window, max_clients, results)
        if i == end and end < len(commands):
            continue
        stops.append(i)
        results.append("left")
        i += 1
    table = [(cid, w.max_seq, sorted(w.results.items())) for cid, w in clients.items()]
    return results, stops, store.size_bytes, len(store), sorted(store.items()), table, clients.held


@parity
@given(
    commands=st.lists(_commands, max_size=60),
    window=st.integers(1, 6),
    max_clients=st.integers(1, 4),
    max_results=st.integers(1, 12),
    lowered_at=st.integers(0, 60),
)
def test_apply_writes(commands, window, max_clients, max_results, lowered_at):
    saved = dedup.MAX_RESULTS  # (all clients' results held)
    try:
        got = _applied(_store, commands, window, max_clients, max_results, lowered_at)
        want = _applied(_store_py, commands, window, max_clients, max_results, lowered_at)
    finally:
        dedup.MAX_RESULTS = saved
    assert got == want


def test_apply_writes_refuses_a_start_outside_the_payloads():
    for module in (_store, _store_py):
        for start in (-1, 3, -(1 << 40)):
            with pytest.raises(IndexError):
                module.apply_writes(
                    module.KeyStore(), dedup.ClientTable(), [b"", b""], start, 8, 8, []
                )
        assert module.apply_writes(module.KeyStore(), dedup.ClientTable(), [b""], 1, 8, 8, []) == 1
