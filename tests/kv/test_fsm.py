"""The KV state machine: command encoding, apply semantics, exactly-once dedup, determinism."""

from __future__ import annotations

import io
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raftfast.etcd.errors import EtcdError
from raftfast.etcd.mvcc import MVCCStore
from raftfast.etcd.mvcc import encode as etcd_encode
from raftfast.kv.commands import (
    OP_CAS,
    OP_DELETE,
    OP_ETCD,
    OP_PUT,
    decode,
    encode_cas,
    encode_delete,
    encode_put,
    encode_put_many,
    pack_pairs,
    unpack_pairs,
)
from raftfast.kv.fsm import KEY_OVERHEAD, KVStateMachine
from raftfast.limits import MAX_CLIENT_ID, MAX_SEQUENCE
from raftfast.proto.etcd import rpc_pb2 as pb

# -- encoding ---------------------------------------------------------------------------------


def test_encoding_round_trips() -> None:
    assert decode(encode_put(7, 9, b"k", b"v")) == (OP_PUT, 7, 9, b"k", None, b"v")
    assert decode(encode_put(0, 0, b"k", b"")) == (OP_PUT, 0, 0, b"k", None, b"")
    assert decode(encode_delete(1, 2, b"key")) == (OP_DELETE, 1, 2, b"key", None, b"")
    assert decode(encode_cas(3, 4, b"k", b"old", b"new")) == (OP_CAS, 3, 4, b"k", b"old", b"new")
    assert decode(encode_cas(3, 4, b"k", None, b"new")) == (OP_CAS, 3, 4, b"k", None, b"new")
    # expecting b"" is not the same as expecting absence
    assert decode(encode_cas(3, 4, b"k", b"", b"x"))[4] == b""
    top = MAX_SEQUENCE
    assert decode(encode_put(top, top, b"\x00" * 3, b"\xff"))[1:3] == (top, top)


def test_encoding_layout_is_little_endian() -> None:
    payload = encode_put(1, 2, b"ab", b"xyz")
    assert payload == struct.pack("<BQQI", 1, 1, 2, 2) + b"ab" + b"xyz"
    cas = encode_cas(1, 2, b"k", b"e", b"v")
    assert cas == struct.pack("<BQQI", 3, 1, 2, 1) + b"k" + struct.pack("<BI", 0, 1) + b"ev"


def test_encoding_rejects_out_of_range_ids() -> None:
    with pytest.raises(ValueError):
        encode_put(-1, 0, b"k", b"v")
    with pytest.raises(ValueError):
        encode_delete(0, 1 << 64, b"k")
    with pytest.raises(ValueError):
        encode_put(0, MAX_SEQUENCE + 1, b"k", b"v")  # the dedup table holds sequences < 2**63
    with pytest.raises(ValueError):
        encode_put(MAX_CLIENT_ID + 1, 1, b"k", b"v")


@pytest.mark.parametrize("seq", [1 << 63, (1 << 64) - 1])
def test_a_sequence_the_snapshot_cannot_hold_is_a_no_op_and_snapshots_still_work(seq) -> None:
    # Issue 11: a Put with sequence 2**64-1 (or 2**63) was applied; the next snapshot packed it
    # as a signed 64-bit field and the node died, again on every restart (the log replays it).
    # Such a command can only come from a log written before the API checked the range.
    m = KVStateMachine()
    old = struct.pack("<BQQI", OP_PUT, 5, seq, 1) + b"k" + b"v"
    with pytest.raises(ValueError):
        decode(old)
    assert m.apply(1, old) is None and m.malformed == 1 and m.get(b"k") is None
    assert m.apply(2, encode_put(5, MAX_SEQUENCE, b"k", b"v")) is True
    copy = KVStateMachine()
    copy.load(m.dump())
    assert copy.fingerprint() == m.fingerprint()
    assert copy.apply(3, encode_put(5, MAX_SEQUENCE, b"k", b"w")) is True  # a retry: no change
    assert copy.get(b"k") == b"v"


@given(
    client=st.integers(0, MAX_CLIENT_ID),
    seq=st.integers(0, MAX_SEQUENCE),
    key=st.binary(max_size=40),
    value=st.binary(max_size=40),
    expected=st.none() | st.binary(max_size=40),
)
@settings(max_examples=200, deadline=None)
def test_encoding_round_trip_property(
    client: int, seq: int, key: bytes, value: bytes, expected: bytes | None
) -> None:
    assert decode(encode_put(client, seq, key, value)) == (OP_PUT, client, seq, key, None, value)
    assert decode(encode_delete(client, seq, key)) == (OP_DELETE, client, seq, key, None, b"")
    got = decode(encode_cas(client, seq, key, expected, value))
    assert got == (OP_CAS, client, seq, key, expected, value)


# -- apply semantics --------------------------------------------------------------------------


def test_put_get_delete() -> None:
    m = KVStateMachine()
    assert m.apply(1, encode_put(0, 0, b"a", b"1")) is True
    assert m.get(b"a") == b"1"
    assert m.apply(2, encode_put(0, 0, b"a", b"2")) is True
    assert m.get(b"a") == b"2" and len(m) == 1
    assert m.apply(3, encode_delete(0, 0, b"a")) is True
    assert m.apply(4, encode_delete(0, 0, b"a")) is False  # already gone
    assert m.get(b"a") is None and len(m) == 0
    assert m.applied_index == 4


def test_empty_value_is_a_value() -> None:
    m = KVStateMachine()
    m.apply(1, encode_put(0, 0, b"k", b""))
    assert m.get(b"k") == b"" and b"k" in m


def test_cas_present_and_absent() -> None:
    m = KVStateMachine()
    assert m.apply(1, encode_cas(0, 0, b"k", b"x", b"v")) is False  # absent, expected a value
    assert m.apply(2, encode_cas(0, 0, b"k", b"", b"v")) is False  # b"" is not "absent"
    assert m.get(b"k") is None
    assert m.apply(3, encode_cas(0, 0, b"k", None, b"v1")) is True  # create if absent
    assert m.apply(4, encode_cas(0, 0, b"k", None, b"v2")) is False  # now present
    assert m.apply(5, encode_cas(0, 0, b"k", b"wrong", b"v2")) is False
    assert m.get(b"k") == b"v1"
    assert m.apply(6, encode_cas(0, 0, b"k", b"v1", b"v2")) is True
    assert m.get(b"k") == b"v2"
    assert m.scan(b"", 0) == [(b"k", b"v2")]


def test_apply_batch_applies_consecutive_commands() -> None:
    # (no-op and configuration entries never reach a state machine: the node applies them)
    m = KVStateMachine()
    out = m.apply_batch(10, [encode_put(0, 0, b"a", b"1"), encode_delete(0, 0, b"zz"), b"junk"])
    assert out == [True, False, None]
    assert m.applied_index == 12
    assert m.malformed == 1
    assert m.apply_batch(13, []) == [] and m.applied_index == 12


# -- malformed payloads -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x01",
        struct.pack("<BQQI", 1, 0, 0, 10) + b"short",  # key length beyond the payload
        struct.pack("<BQQI", 9, 0, 0, 1) + b"k",  # unknown op
        struct.pack("<BQQI", 2, 0, 0, 1) + b"k" + b"extra",  # DELETE with trailing bytes
        struct.pack("<BQQI", 3, 0, 0, 1) + b"k",  # CAS without its fields
        struct.pack("<BQQI", 3, 0, 0, 1) + b"k" + struct.pack("<BI", 2, 0),  # bad flag
        struct.pack("<BQQI", 3, 0, 0, 1) + b"k" + struct.pack("<BI", 1, 3) + b"abc",
        struct.pack("<BQQI", 3, 0, 0, 1) + b"k" + struct.pack("<BI", 0, 99) + b"abc",
    ],
)
def test_malformed_payload_is_a_counted_no_op(payload: bytes) -> None:
    m = KVStateMachine()
    m.apply(1, encode_put(5, 1, b"keep", b"me"))
    before = m.fingerprint()
    assert m.apply(2, payload) is None
    assert m.malformed == 1 and m.applied_index == 2
    assert m.fingerprint() == before
    with pytest.raises(ValueError):
        decode(payload)


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_random_bytes_never_crash_apply(payload: bytes) -> None:
    m = KVStateMachine()
    result = m.apply(1, payload)
    if payload[:1] == b"\x06":  # an etcd API command: its response, or its error
        assert isinstance(result, EtcdError) or result.header.revision >= 1
        return
    assert result in (True, False, None)
    assert m.applied_index == 1


# -- exactly-once -----------------------------------------------------------------------------


def test_retry_returns_cached_result_without_reapplying() -> None:
    m = KVStateMachine()
    assert m.apply(1, encode_delete(9, 1, b"k")) is False
    assert m.apply(2, encode_put(9, 2, b"k", b"v1")) is True
    assert m.apply(3, encode_put(8, 1, b"k", b"other")) is True  # another client
    # client 9 retries seq 1 (DELETE): cached False, and the key written since is untouched
    assert m.apply(4, encode_delete(9, 1, b"k")) is False
    assert m.get(b"k") == b"other"
    # a retried PUT does not overwrite the newer value
    assert m.apply(5, encode_put(9, 2, b"k", b"v1")) is True
    assert m.get(b"k") == b"other"


def test_retry_of_cas_keeps_first_answer() -> None:
    m = KVStateMachine()
    assert m.apply(1, encode_cas(4, 1, b"lock", None, b"me")) is True
    assert m.apply(2, encode_cas(4, 1, b"lock", None, b"me")) is True  # retry: still "won"
    assert m.apply(3, encode_cas(5, 1, b"lock", None, b"you")) is False
    assert m.get(b"lock") == b"me"


def test_pipelined_out_of_order_sequences_apply_once_each() -> None:
    m = KVStateMachine()
    for idx, seq in enumerate([3, 1, 2, 5, 4, 2, 5], start=1):
        m.apply(idx, encode_put(1, seq, b"k%d" % seq, b"%d" % idx))
    assert [v for _, v in m.scan(b"k", 0)] == [b"2", b"3", b"1", b"5", b"4"]


def test_client_id_zero_is_never_deduplicated() -> None:
    m = KVStateMachine()
    assert m.apply(1, encode_cas(0, 7, b"k", None, b"a")) is True
    assert m.apply(2, encode_cas(0, 7, b"k", None, b"a")) is False
    assert m.client_count == 0


def test_sequences_below_the_window_are_not_reapplied() -> None:
    m = KVStateMachine(dedup_window=4)
    for seq in range(1, 11):
        m.apply(seq, encode_put(1, seq, b"k", b"%d" % seq))
    assert m.apply(11, encode_delete(1, 3, b"k")) is False  # too old: DELETE answers False
    assert m.apply(12, encode_cas(1, 2, b"k", b"10", b"x")) is False  # too old: CAS False
    assert m.apply(13, encode_put(1, 1, b"k", b"old")) is True  # too old PUT: True, no write
    assert m.get(b"k") == b"10"
    # inside the window (7..10) the cached results still answer
    assert m.apply(14, encode_put(1, 7, b"k", b"7")) is True and m.get(b"k") == b"10"
    # the table stays bounded however far the client goes
    for seq in range(11, 1000):
        m.apply(seq + 100, encode_put(1, seq, b"k", b"x"))
    assert len(m._clients[1].results) <= 2 * 4 + 1


def test_idle_clients_are_evicted_in_lru_order() -> None:
    m = KVStateMachine(max_clients=3)
    for cid in (1, 2, 3):
        m.apply(cid, encode_delete(cid, 1, b"k"))
    m.apply(4, encode_delete(1, 2, b"k"))  # client 1 is now the most recently active
    m.apply(5, encode_put(4, 1, b"k", b"v"))  # evicts client 2, the least recently active
    assert m.client_count == 3
    assert m.apply(6, encode_delete(1, 1, b"k")) is False  # still remembered: cached False
    assert m.get(b"k") == b"v"
    # client 3 is evicted next (by client 2's return); client 2's retry runs again
    assert m.apply(7, encode_delete(2, 1, b"k")) is True
    assert m.get(b"k") is None


def test_the_results_all_clients_hold_are_bounded_the_same_on_every_replica(monkeypatch) -> None:
    # 100,000 made-up client ids of 4,096+ writes each: hundreds of millions of results, tens
    # of GB on every node (a hostile hunt). Past MAX_RESULTS in all, the least recently active
    # clients go; what is counted is what a snapshot keeps, so a replica restored from one
    # forgets the same clients as one that applied every entry.
    from raftfast import dedup

    monkeypatch.setattr(dedup, "MAX_RESULTS", 20)
    live = KVStateMachine(dedup_window=8)
    restored = None
    index = 0
    for cid in range(1, 11):
        seqs = [*range(1, 13), 40, 38, 39, 41, 42, 43, 44]  # (in order, a jump, out of order)
        for seq in seqs:
            index += 1
            command = encode_put(cid, seq, b"k%d" % cid, b"v%d" % seq)
            live.apply(index, command)
            if restored is not None:
                restored.apply(index, command)
            held = sum(len(w.results) for w in live._clients.values())
            assert live._clients.held == held <= 20
            assert all(s > w.max_seq - 8 for w in live._clients.values() for s in w.results)
        if cid == 4:  # (a replica that starts from a snapshot here)
            out = io.BytesIO()
            live.snapshot(out)
            restored = KVStateMachine(dedup_window=8)
            restored.restore(io.BytesIO(out.getvalue()))
            assert restored._clients.held == live._clients.held
    assert list(live._clients)[-1] == 10 and live.client_count < 10  # (the oldest forgotten)
    assert restored is not None and restored.fingerprint() == live.fingerprint()
    assert list(restored._clients) == list(live._clients)
    assert live.frozen()._clients.held == live._clients.held
    assert live.apply(index + 1, encode_put(10, 44, b"k10", b"again")) is True  # (cached)
    assert live.get(b"k10") == b"v44"


# -- scan -------------------------------------------------------------------------------------


def test_scan_order_prefix_limit() -> None:
    m = KVStateMachine()
    keys = [b"b", b"a/2", b"a/10", b"a/1", b"c", b"a", b"a\xff", b"ab"]
    for i, k in enumerate(keys, start=1):
        m.apply(i, encode_put(0, 0, k, k.upper()))
    assert [k for k, _ in m.scan(b"", 0)] == sorted(keys)
    assert m.scan(b"a/", 0) == [(b"a/1", b"A/1"), (b"a/10", b"A/10"), (b"a/2", b"A/2")]
    assert [k for k, _ in m.scan(b"a", 3)] == [b"a", b"a/1", b"a/10"]
    assert m.scan(b"a/", -1) == m.scan(b"a/", 0)
    assert m.scan(b"zz", 0) == [] and m.scan(b"", 1) == [(b"a", b"A")]


def test_scan_index_tracks_adds_and_deletes() -> None:
    m = KVStateMachine()
    model: dict[bytes, bytes] = {}
    idx = 0
    for round_ in range(6):
        # few changes (replayed into the index) and many (index rebuilt)
        n = 5 if round_ % 2 == 0 else 400
        for i in range(n):
            idx += 1
            key = b"k%03d" % ((i * 7 + round_) % 500)
            if i % 3 == 0 and key in model:
                m.apply(idx, encode_delete(0, 0, key))
                del model[key]
            else:
                m.apply(idx, encode_put(0, 0, key, b"%d" % idx))
                model[key] = b"%d" % idx
        # delete and re-add the same key between scans
        idx += 2
        m.apply(idx - 1, encode_delete(0, 0, b"k000"))
        m.apply(idx, encode_cas(0, 0, b"k000", None, b"again"))
        model[b"k000"] = b"again"
        assert m.scan(b"", 0) == sorted(model.items())
        assert m.scan(b"k01", 0) == sorted(i for i in model.items() if i[0].startswith(b"k01"))


# -- determinism ------------------------------------------------------------------------------

_keys = st.sampled_from([b"a", b"b", b"c", b"ab", b"b/1"])
_vals = st.binary(max_size=3)
_ids = st.tuples(st.integers(0, 3), st.integers(0, 12))


@st.composite
def _command(draw: st.DrawFn) -> tuple[int, bytes]:
    (cid, seq), key = draw(_ids), draw(_keys)
    kind = draw(st.integers(0, 6))
    if kind == 5:  # an etcd API write: a put or a delete of the same small keys
        request = draw(
            st.sampled_from([pb.PutRequest(key=key, value=b"v"), pb.DeleteRangeRequest(key=key)])
        )
        return 0, bytes([OP_ETCD]) + etcd_encode(request)
    if kind == 6:  # an etcd command with a malformed body
        return 0, bytes([OP_ETCD]) + draw(st.binary(max_size=8))
    if kind == 0:
        return 0, encode_put(cid, seq, key, draw(_vals))
    if kind == 1:
        return 0, encode_delete(cid, seq, key)
    if kind == 2:
        return 0, encode_cas(cid, seq, key, draw(st.none() | _vals), draw(_vals))
    if kind == 3:
        return draw(st.sampled_from([1, 2])), draw(st.binary(max_size=4))
    return 0, draw(st.binary(max_size=30))  # malformed (almost always)


class _Model:
    """A naive reference: full history per client, no eviction (window/clients not exceeded).

    Commands whose first byte is OP_ETCD belong to the etcd keyspace, a namespace of its own
    (checked against its own model in tests/etcd/test_mvcc.py): here they go to a store of
    the model's, and must leave the KV keyspace alone."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.seen: dict[tuple[int, int], bool] = {}
        self.etcd = MVCCStore()

    def apply(self, etype: int, payload: bytes) -> object:
        if etype != 0:
            return None
        if payload[:1] == bytes([OP_ETCD]):
            return self.etcd.apply(memoryview(payload)[1:])
        try:
            op, cid, seq, key, expected, value = decode(payload)
        except ValueError:
            return None
        if cid and (cid, seq) in self.seen:
            return self.seen[(cid, seq)]
        if op == OP_PUT:
            self.data[key], result = value, True
        elif op == OP_DELETE:
            result = self.data.pop(key, None) is not None
        else:
            result = (
                self.data.get(key) == expected if expected is not None else key not in self.data
            )
            if result:
                self.data[key] = value
        if cid:
            self.seen[(cid, seq)] = result
        return result


@given(st.lists(_command(), max_size=60), st.integers(1, 4))
@settings(max_examples=150, deadline=None)
def test_replicas_fed_the_same_entries_end_identical(
    commands: list[tuple[int, bytes]], split: int
) -> None:
    one, two, model = KVStateMachine(), KVStateMachine(), _Model()
    types = [t for t, _ in commands]
    payloads = [p for _, p in commands]
    res_one = [one.apply(i + 1, p) if t == 0 else None for i, (t, p) in enumerate(commands)]
    # the other replica applies the same entries in differently sized batches, scanning between
    res_two: list[object] = []
    for start in range(0, len(commands), split):
        for i in range(start, min(start + split, len(commands))):
            # runs of commands; the other entries are the node's (no-ops, configurations)
            res_two += two.apply_batch(i + 1, [payloads[i]]) if types[i] == 0 else [None]
        two.scan(b"", 0)
    expected = [model.apply(t, p) for t, p in commands]
    assert res_one == res_two == expected
    assert one.fingerprint() == two.fingerprint()
    assert one.scan(b"", 0) == two.scan(b"", 0) == sorted(model.data.items())
    assert one.etcd == two.etcd == model.etcd
    assert one.malformed == two.malformed
    assert one.applied_index == two.applied_index  # (the last command's index)


# -- PUT_MANY ---------------------------------------------------------------------------------


def test_put_many_is_one_atomic_exactly_once_write() -> None:
    m = KVStateMachine()
    m.apply(1, encode_put(7, 1, b"b", b"old"))
    pairs = pack_pairs([(b"a", b"1"), (b"b", b"2"), (b"c", b""), (b"a", b"last")])
    assert m.apply(2, encode_put_many(7, 2, pairs)) is True
    assert (m.get(b"a"), m.get(b"b"), m.get(b"c")) == (b"last", b"2", b"")  # later pairs win
    assert [k for k, _ in m.scan(b"", 100)] == [b"a", b"b", b"c"]  # each new key indexed once
    m.apply(3, encode_put(7, 3, b"a", b"newer"))
    # A retry of the same group (same client, same sequence) changes nothing.
    assert m.apply(4, encode_put_many(7, 2, pairs)) is True
    assert m.get(b"a") == b"newer"


@pytest.mark.parametrize(
    "pairs",
    [
        b"junk",
        pack_pairs([(b"k", b"v")])[:-1],  # truncated
        pack_pairs([(b"", b"v")]),  # empty key
    ],
)
def test_malformed_put_many_is_a_counted_no_op(pairs: bytes) -> None:
    m = KVStateMachine()
    assert m.apply(1, encode_put_many(1, 1, pairs)) is None
    assert m.malformed == 1 and m.scan(b"", 100) == []


def test_unpack_pairs_refuses_an_odd_count() -> None:
    from raftfast._accel import encode_uniform

    with pytest.raises(ValueError, match="odd number"):
        unpack_pairs(encode_uniform(0, 0, [b"k", b"v", b"k2"]))
    assert unpack_pairs(pack_pairs([(b"k", b"v")])) == ([b"k"], [b"v"])


def _exact_size(m: KVStateMachine) -> int:
    return sum(len(k) + len(v) + KEY_OVERHEAD for k, v in m.scan(b"", 0))


@given(
    commands=st.lists(
        st.tuples(
            st.sampled_from(["put", "delete", "cas", "cas-absent", "put_many"]),
            st.sampled_from([b"a", b"bb", b"ccc"]),
            st.binary(max_size=6),
        ),
        max_size=40,
    )
)
@settings(max_examples=200, deadline=None)
def test_size_bytes_is_exact_but_after_put_many_never_under(commands) -> None:
    # What the quota counts. PUT_MANY counts every pair as new (cheap, and never under);
    # recount(), a snapshot or a restore make it exact again.
    m = KVStateMachine()
    many = False
    for i, (kind, key, value) in enumerate(commands, 1):
        if kind == "put":
            m.apply(i, encode_put(0, 0, key, value))
        elif kind == "delete":
            m.apply(i, encode_delete(0, 0, key))
        elif kind.startswith("cas"):
            expected = None if kind == "cas-absent" else value[:1]
            m.apply(i, encode_cas(0, 0, key, expected, value))
        else:
            m.apply(i, encode_put_many(0, 0, pack_pairs([(key, value), (b"a", value)])))
            many = True
        if not many:
            assert m.size_bytes == _exact_size(m)
        assert m.size_bytes >= _exact_size(m)
    m.dump()
    assert m.size_bytes == _exact_size(m) == m.recount()


def test_a_subclass_apply_is_used_by_apply_batch_and_huge_limits_still_apply() -> None:
    class Counting(KVStateMachine):
        calls = 0

        def apply(self, index: int, payload: bytes) -> bool | None:
            Counting.calls += 1
            return super().apply(index, payload)

    machine = Counting()
    assert machine.apply_batch(1, [encode_put(1, 1, b"k", b"v"), encode_put(1, 2, b"j", b"w")])
    assert Counting.calls == 2 and machine.get(b"k") == b"v" and machine.applied_index == 2
    # (limits past what the compiled apply takes: the Python path, the same results)
    big = KVStateMachine(dedup_window=1 << 64, max_clients=1 << 64)
    assert big.apply_batch(1, [encode_put(1, 1, b"k", b"v"), encode_put(1, 1, b"k", b"x")]) == [
        True,
        True,
    ]
    assert big.get(b"k") == b"v"  # (the second is a duplicate: not applied)
