"""MVCCStore: the etcd v3 data model (revisions, key metadata, ranges, reads at past revisions,
txns, leases, compaction, history, snapshots) checked against what etcd 3.5 does, and its place
in KVStateMachine (OP_ETCD commands, snapshots, fingerprints)."""

from __future__ import annotations

import random
import struct
import zlib
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from raftfast._accel import crc32c
from raftfast.errors import CorruptionError
from raftfast.etcd import errors
from raftfast.etcd.errors import EtcdError
from raftfast.etcd.mvcc import (
    LIVE_KEY_OVERHEAD,
    MAX_TXN_DEPTH,
    MVCCStore,
    decode,
    encode,
    event_pb,
    kv_pb,
)
from raftfast.kv.commands import OP_ETCD, encode_put
from raftfast.kv.fsm import SNAPSHOT_VERSION, KVStateMachine
from raftfast.proto.etcd import kv_pb2 as mvccpb
from raftfast.proto.etcd import rpc_pb2 as pb

C = pb.Compare
R = pb.RangeRequest
ALL = {"key": b"\x00", "range_end": b"\x00"}  # every key

# -- helpers ----------------------------------------------------------------------------------


def apply(store: MVCCStore, request: Any) -> Any:
    return store.apply(encode(request))


def ok(store: MVCCStore, request: Any) -> Any:
    """Apply ``request``, which must succeed; its response."""
    response = apply(store, request)
    assert not isinstance(response, EtcdError), response
    assert isinstance(response, getattr(pb, type(request).__name__.replace("Request", "Response")))
    return response


def fails(store: MVCCStore, request: Any, error: EtcdError) -> None:
    """Apply ``request``, which must return ``error`` and change nothing."""
    before = store.dump()
    result = apply(store, request)
    assert isinstance(result, EtcdError), result
    assert result == error
    assert store.dump() == before


def put(store: MVCCStore, key: bytes, value: bytes = b"v", **kw: Any) -> pb.PutResponse:
    return ok(store, pb.PutRequest(key=key, value=value, **kw))


def delete(store: MVCCStore, key: bytes, range_end: bytes = b"", **kw: Any):
    return ok(store, pb.DeleteRangeRequest(key=key, range_end=range_end, **kw))


def grant(store: MVCCStore, lease_id: int, ttl: int = 60) -> pb.LeaseGrantResponse:
    return ok(store, pb.LeaseGrantRequest(ID=lease_id, TTL=ttl))


def revoke(store: MVCCStore, lease_id: int) -> pb.LeaseRevokeResponse:
    return ok(store, pb.LeaseRevokeRequest(ID=lease_id))


def compact(store: MVCCStore, revision: int) -> pb.CompactionResponse:
    return ok(store, pb.CompactionRequest(revision=revision))


def get(store: MVCCStore, key: bytes, range_end: bytes = b"", **kw: Any) -> pb.RangeResponse:
    return store.range(pb.RangeRequest(key=key, range_end=range_end, **kw))


def txn(store: MVCCStore, compare=(), success=(), failure=()) -> pb.TxnResponse:
    return ok(store, pb.TxnRequest(compare=compare, success=success, failure=failure))


def read_error(store: MVCCStore, **kw: Any) -> EtcdError:
    with pytest.raises(EtcdError) as info:
        store.range(pb.RangeRequest(**kw))
    return info.value


def kv(rec: mvccpb.KeyValue) -> tuple:
    return (rec.key, rec.value, rec.create_revision, rec.mod_revision, rec.version, rec.lease)


def kvs(response: Any) -> list[tuple]:
    return [kv(rec) for rec in response.kvs]


def keys(response: Any) -> list[bytes]:
    return [rec.key for rec in response.kvs]


def op_put(key: bytes, value: bytes = b"v", **kw: Any) -> pb.RequestOp:
    return pb.RequestOp(request_put=pb.PutRequest(key=key, value=value, **kw))


def op_get(key: bytes, range_end: bytes = b"", **kw: Any) -> pb.RequestOp:
    return pb.RequestOp(request_range=pb.RangeRequest(key=key, range_end=range_end, **kw))


def op_del(key: bytes, range_end: bytes = b"", **kw: Any) -> pb.RequestOp:
    return pb.RequestOp(
        request_delete_range=pb.DeleteRangeRequest(key=key, range_end=range_end, **kw)
    )


def op_txn(compare=(), success=(), failure=()) -> pb.RequestOp:
    return pb.RequestOp(
        request_txn=pb.TxnRequest(compare=compare, success=success, failure=failure)
    )


_CMP_FIELD = {
    C.VERSION: "version",
    C.CREATE: "create_revision",
    C.MOD: "mod_revision",
    C.VALUE: "value",
    C.LEASE: "lease",
}


def cmp(key: bytes, target: int, result: int, operand: Any, range_end: bytes = b"") -> pb.Compare:
    c = pb.Compare(key=key, range_end=range_end, target=target, result=result)
    setattr(c, _CMP_FIELD[target], operand)
    return c


def history_size(store: MVCCStore) -> int:
    """Events the store keeps (a write that changes nothing adds none)."""
    return len(store.events_from(store.compact_revision + 1, 1 << 30)[0])


# -- commands ---------------------------------------------------------------------------------


def test_encode_decode_round_trip() -> None:
    requests = [
        pb.PutRequest(key=b"k", value=b"v", lease=7, prev_kv=True),
        pb.DeleteRangeRequest(key=b"a", range_end=b"b", prev_kv=True),
        pb.TxnRequest(compare=[cmp(b"k", C.VERSION, C.EQUAL, 0)], success=[op_put(b"k")]),
        pb.CompactionRequest(revision=5),
        pb.LeaseGrantRequest(ID=3, TTL=10),
        pb.LeaseRevokeRequest(ID=3),
    ]
    tags = set()
    for request in requests:
        command = encode(request)
        tags.add(command[0])
        assert decode(command) == request
        assert decode(memoryview(command)) == request
    assert len(tags) == len(requests)


@pytest.mark.parametrize("command", [b"", b"\x00", b"\x63abc", b"\x01\xff\xff\xff"])
def test_malformed_commands_are_returned_errors(command: bytes) -> None:
    store = MVCCStore()
    put(store, b"k")
    before = store.dump()
    result = store.apply(command)
    assert isinstance(result, EtcdError)
    assert result.code == grpc.StatusCode.INVALID_ARGUMENT
    assert store.dump() == before


# -- revisions --------------------------------------------------------------------------------


def test_empty_store_is_at_revision_1() -> None:
    store = MVCCStore()
    assert store.revision == 1 and store.compact_revision == 0
    response = get(store, **ALL)
    assert response.header.revision == 1
    assert (response.count, list(response.kvs), response.more) == (0, [], False)
    assert get(store, b"k", revision=1).count == 0


def test_every_write_adds_exactly_one_revision() -> None:
    store = MVCCStore()
    assert put(store, b"a").header.revision == 2
    assert put(store, b"b").header.revision == 3
    assert put(store, b"a", b"v2").header.revision == 4  # an overwrite is a write too
    response = delete(store, b"b")
    assert (response.header.revision, response.deleted) == (5, 1)
    response = txn(store, success=[op_put(b"x"), op_put(b"y"), op_del(b"a")])
    assert response.header.revision == 6  # one revision for the whole txn
    assert [rec.mod_revision for rec in get(store, **ALL).kvs] == [6, 6]
    response = delete(store, b"\x00", b"\x00")  # a range delete: one revision for all keys
    assert (response.header.revision, response.deleted) == (7, 2)
    grant(store, 1)
    put(store, b"l1", lease=1)
    put(store, b"l2", lease=1)
    assert revoke(store, 1).header.revision == 10  # deleting its two keys: one revision
    assert store.revision == 10


def test_writes_that_change_nothing_keep_the_revision() -> None:
    store = MVCCStore()
    put(store, b"a")
    put(store, b"b")
    events = history_size(store)

    def unchanged(response: Any) -> None:
        assert response.header.revision == 3
        assert store.revision == 3
        assert history_size(store) == events

    response = delete(store, b"zz")
    unchanged(response)
    assert response.deleted == 0
    unchanged(delete(store, b"c", b"d"))  # an empty range
    unchanged(delete(store, b"b", b"a"))  # range_end below key
    unchanged(txn(store, [cmp(b"a", C.VERSION, C.EQUAL, 1)], [op_get(b"a")], [op_put(b"x")]))
    unchanged(txn(store))  # an empty txn
    unchanged(txn(store, success=[op_del(b"nope"), op_get(b"\x00", b"\x00")]))
    unchanged(grant(store, 5))
    unchanged(revoke(store, 5))  # a lease without keys
    response = compact(store, 2)  # (it forgets history, but makes no revision)
    assert (response.header.revision, store.revision, store.compact_revision) == (3, 3, 2)


# -- key metadata -----------------------------------------------------------------------------


def test_create_mod_version_across_put_delete_recreate() -> None:
    store = MVCCStore()
    put(store, b"other")  # rev 2
    put(store, b"k", b"1")  # rev 3: created
    assert kvs(get(store, b"k")) == [(b"k", b"1", 3, 3, 1, 0)]
    put(store, b"k", b"2")  # rev 4
    put(store, b"k", b"3")  # rev 5
    assert kvs(get(store, b"k")) == [(b"k", b"3", 3, 5, 3, 0)]
    delete(store, b"k")  # rev 6
    response = get(store, b"k")
    assert (response.count, list(response.kvs)) == (0, [])
    put(store, b"other", b"x")  # rev 7
    put(store, b"k", b"4")  # rev 8: a new generation starts over
    assert kvs(get(store, b"k")) == [(b"k", b"4", 8, 8, 1, 0)]
    put(store, b"k", b"5")
    assert kvs(get(store, b"k")) == [(b"k", b"5", 8, 9, 2, 0)]
    assert kvs(get(store, b"other")) == [(b"other", b"x", 2, 7, 2, 0)]


def test_put_prev_kv() -> None:
    store = MVCCStore()
    response = put(store, b"k", b"1", prev_kv=True)
    assert not response.HasField("prev_kv")  # nothing before
    response = put(store, b"k", b"2", prev_kv=True)
    assert kv(response.prev_kv) == (b"k", b"1", 2, 2, 1, 0)
    response = put(store, b"k", b"3")
    assert not response.HasField("prev_kv")  # not asked for


def test_put_ignore_value_and_ignore_lease() -> None:
    store = MVCCStore()
    grant(store, 7)
    grant(store, 8)
    put(store, b"k", b"old", lease=7)  # rev 2
    put(store, b"k", ignore_value=True, lease=8)  # the value stays, the lease changes
    assert kvs(get(store, b"k")) == [(b"k", b"old", 2, 3, 2, 8)]
    put(store, b"k", b"new", ignore_lease=True)  # the lease stays
    assert kvs(get(store, b"k")) == [(b"k", b"new", 2, 4, 3, 8)]
    put(store, b"k", ignore_value=True, ignore_lease=True)  # a touch: only mod and version
    assert kvs(get(store, b"k")) == [(b"k", b"new", 2, 5, 4, 8)]
    put(store, b"k", b"plain")  # no lease given: the key leaves lease 8
    assert kvs(get(store, b"k")) == [(b"k", b"plain", 2, 6, 5, 0)]
    assert store.leases[8].keys == set()
    fails(store, pb.PutRequest(key=b"absent", ignore_value=True), errors.KEY_NOT_FOUND)
    fails(store, pb.PutRequest(key=b"absent", value=b"v", ignore_lease=True), errors.KEY_NOT_FOUND)


def test_put_errors() -> None:
    store = MVCCStore()
    put(store, b"k")
    fails(store, pb.PutRequest(key=b"", value=b"v"), errors.EMPTY_KEY)
    fails(store, pb.PutRequest(key=b"k", value=b"v", lease=99), errors.LEASE_NOT_FOUND)
    # etcd checks the lease before looking for the key ignore_value needs
    fails(
        store,
        pb.PutRequest(key=b"absent", ignore_value=True, lease=99),
        errors.LEASE_NOT_FOUND,
    )
    assert errors.KEY_NOT_FOUND.message == "etcdserver: key not found"
    assert errors.LEASE_NOT_FOUND.message == "etcdserver: requested lease not found"
    assert errors.LEASE_NOT_FOUND.code == grpc.StatusCode.NOT_FOUND


def test_delete_range_prev_kv_and_count() -> None:
    store = MVCCStore()
    for key in (b"a", b"b/1", b"b/2", b"b/3", b"c"):
        put(store, key, key.upper())  # revs 2..6
    response = delete(store, b"b/", b"b0", prev_kv=True)
    assert response.deleted == 3
    assert response.header.revision == 7
    assert kvs_of(response.prev_kvs) == [
        (b"b/1", b"B/1", 3, 3, 1, 0),
        (b"b/2", b"B/2", 4, 4, 1, 0),
        (b"b/3", b"B/3", 5, 5, 1, 0),
    ]
    events, _ = store.events_from(7)
    assert [(e.key, e.after, e.revision) for e in events] == [
        (b"b/1", None, 7),
        (b"b/2", None, 7),
        (b"b/3", None, 7),
    ]
    response = delete(store, b"a")  # no prev_kv asked
    assert (response.deleted, list(response.prev_kvs)) == (1, [])
    response = delete(store, b"b", b"\x00", prev_kv=True)  # from key
    assert response.deleted == 1 and keys_of(response.prev_kvs) == [b"c"]
    assert get(store, **ALL).count == 0
    fails(store, pb.DeleteRangeRequest(key=b""), errors.EMPTY_KEY)


def kvs_of(records: Any) -> list[tuple]:
    return [kv(rec) for rec in records]


def keys_of(records: Any) -> list[bytes]:
    return [rec.key for rec in records]


# -- ranges -----------------------------------------------------------------------------------

KEYSET = [b"\x00", b"\x01", b"a", b"a/1", b"a/2", b"a/2/x", b"a0", b"ab", b"b", b"\xff"]


@pytest.fixture
def filled() -> MVCCStore:
    store = MVCCStore()
    for key in KEYSET:
        put(store, key, b"v" + key)
    return store


@pytest.mark.parametrize(
    ("key", "range_end", "expected"),
    [
        (b"a", b"", [b"a"]),  # one key
        (b"a/2", b"", [b"a/2"]),
        (b"zz", b"", []),  # absent
        (b"a/", b"a0", [b"a/1", b"a/2", b"a/2/x"]),  # prefix "a/"
        (b"a", b"b", [b"a", b"a/1", b"a/2", b"a/2/x", b"a0", b"ab"]),  # prefix "a"
        (b"a0", b"\x00", [b"a0", b"ab", b"b", b"\xff"]),  # from key
        (b"\x00", b"\x00", KEYSET),  # every key
        (b"\x01", b"\x00", KEYSET[1:]),
        (b"\x00", b"\x01", [b"\x00"]),
        (b"ab", b"ab", []),  # range_end == key: empty
        (b"b", b"a", []),  # range_end below key: empty
        (b"a/2", b"a/2\x00", [b"a/2"]),
    ],
)
def test_range_shapes(filled: MVCCStore, key: bytes, range_end: bytes, expected: list) -> None:
    response = get(filled, key, range_end)
    assert keys(response) == expected
    assert response.count == len(expected)
    assert not response.more
    assert response.header.revision == filled.revision
    assert all(rec.value == b"v" + rec.key for rec in response.kvs)
    # the same at a past revision (through the history), and with a limit
    past = get(filled, key, range_end, revision=filled.revision - 1)
    assert keys(past) == [k for k in expected if k != b"\xff"]
    limited = get(filled, key, range_end, limit=2)
    assert keys(limited) == expected[:2]
    assert (limited.count, limited.more) == (len(expected), len(expected) > 2)


@pytest.mark.parametrize("past", [False, True])
@pytest.mark.parametrize("limit", [0, 1, 3, 9, 10, 11, -1])
def test_range_limit_more_count(filled: MVCCStore, limit: int, past: bool) -> None:
    if past:  # the same keys, read through the history
        revision = filled.revision
        put(filled, b"later")
        delete(filled, b"a")
        kw = {"revision": revision}
    else:
        kw = {}
    response = get(filled, limit=limit, **ALL, **kw)
    n = len(KEYSET) if limit <= 0 else min(limit, len(KEYSET))
    assert keys(response) == KEYSET[:n]
    assert response.count == len(KEYSET)
    assert response.more == (0 < limit < len(KEYSET))


def _sort_store() -> MVCCStore:
    """Four keys whose key, version, create, mod and value orders all differ."""
    store = MVCCStore()
    put(store, b"c", b"z")  # 2
    put(store, b"a", b"y")  # 3
    put(store, b"d", b"x")  # 4
    put(store, b"b", b"w")  # 5
    put(store, b"a", b"m")  # 6
    put(store, b"a", b"m2")  # 7
    put(store, b"d", b"q")  # 8
    put(store, b"a", b"n")  # 9
    put(store, b"c", b"z")  # 10
    put(store, b"c", b"z")  # 11
    assert kvs(get(store, **ALL)) == [
        (b"a", b"n", 3, 9, 4, 0),
        (b"b", b"w", 5, 5, 1, 0),
        (b"c", b"z", 2, 11, 3, 0),
        (b"d", b"q", 4, 8, 2, 0),
    ]
    return store


ASCENDING = {
    R.KEY: b"abcd",
    R.VERSION: b"bdca",
    R.CREATE: b"cadb",
    R.MOD: b"bdac",
    R.VALUE: b"adbc",
}


@pytest.mark.parametrize("target", list(ASCENDING))
@pytest.mark.parametrize("order", [R.NONE, R.ASCEND, R.DESCEND])
def test_range_sort(target: int, order: int) -> None:
    store = _sort_store()
    expected = [bytes((c,)) for c in ASCENDING[target]]
    if order == R.DESCEND:
        expected.reverse()
    # NONE sorts by key; by another target it means ascending (as etcd)
    response = get(store, sort_order=order, sort_target=target, **ALL)
    assert keys(response) == expected
    assert (response.count, response.more) == (4, False)
    # the limit applies after the sort; but with NONE by another target, etcd reads limit + 1
    # keys in key order and sorts those (etcdctl get --sort-by=VERSION --limit 3, no --order)
    response = get(store, sort_order=order, sort_target=target, limit=2, **ALL)
    if order == R.NONE and target != R.KEY:
        first = sorted(expected)[:3]
        assert keys(response) == [k for k in expected if k in first][:2]
    else:
        assert keys(response) == expected[:2]
    assert (response.count, response.more) == (4, True)
    # and the same at a past revision
    revision = store.revision
    put(store, b"e", b"\x00")
    delete(store, b"a")
    response = get(store, sort_order=order, sort_target=target, revision=revision, **ALL)
    assert keys(response) == expected


def test_range_keys_only_and_count_only(filled: MVCCStore) -> None:
    full = get(filled, b"a", b"b")
    response = get(filled, b"a", b"b", keys_only=True)
    assert [r[:1] + r[2:] for r in kvs(response)] == [r[:1] + r[2:] for r in kvs(full)]
    assert all(rec.value == b"" for rec in response.kvs)
    for kw in (
        {},
        {"limit": 2},
        {"limit": 2, "sort_order": R.DESCEND},
        {"limit": 2, "min_mod_revision": 2},
        {"limit": 2, "revision": filled.revision - 1},
    ):
        response = get(filled, b"a", b"b", count_only=True, **kw)
        assert (list(response.kvs), response.count) == ([], 6), kw
        assert not response.more, kw  # etcd: count_only returns no kvs, so never "more"


def test_range_revision_filters() -> None:
    store = MVCCStore()
    for i in range(6):
        put(store, b"k%d" % i)  # k0..k5 created at revisions 2..7
    put(store, b"k1", b"again")  # 8
    put(store, b"k4", b"again")  # 9

    def got(**kw: Any) -> list[bytes]:
        response = get(store, b"k", b"l", **kw)
        assert response.count == 6  # filters do not change the count (as etcd)
        return keys(response)

    assert got(min_mod_revision=8) == [b"k1", b"k4"]
    assert got(max_mod_revision=4) == [b"k0", b"k2"]
    assert got(min_mod_revision=4, max_mod_revision=7) == [b"k2", b"k3", b"k5"]
    assert got(min_create_revision=5) == [b"k3", b"k4", b"k5"]
    assert got(max_create_revision=3) == [b"k0", b"k1"]
    assert got(min_create_revision=3, max_create_revision=5, min_mod_revision=5) == [
        b"k1",
        b"k3",
    ]
    response = get(store, b"k", b"l", min_mod_revision=5, limit=2)
    assert (keys(response), response.more) == ([b"k1", b"k3"], True)
    response = get(store, b"k", b"l", min_mod_revision=8, limit=2)
    assert (keys(response), response.more) == ([b"k1", b"k4"], False)
    assert got(min_mod_revision=100) == []


def test_range_empty_key_is_an_error() -> None:
    assert read_error(MVCCStore(), key=b"") == errors.EMPTY_KEY


def test_unknown_sort_order_or_target_is_refused() -> None:
    store = MVCCStore()
    put(store, b"a")
    for kw in ({"sort_target": 99}, {"sort_order": 7}):
        error = read_error(store, key=b"a", **kw)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        # in a txn: returned (apply never raises), and nothing of the txn stays
        result = apply(store, pb.TxnRequest(success=[op_put(b"b"), op_get(b"a", **kw)]))
        assert isinstance(result, EtcdError) and result.code == grpc.StatusCode.INVALID_ARGUMENT
        assert keys(get(store, **ALL)) == [b"a"] and store.revision == 2


# -- reads at past revisions ------------------------------------------------------------------


def _history_store() -> tuple[MVCCStore, dict[int, list[tuple]]]:
    """A store with puts, overwrites, deletes and re-creates, and the full state (every key)
    as it was at each revision, read when that revision was the newest."""
    store = MVCCStore()
    seen = {1: []}
    steps = [
        lambda: put(store, b"a", b"1"),
        lambda: put(store, b"b", b"1"),
        lambda: put(store, b"a", b"2"),
        lambda: delete(store, b"b"),
        lambda: put(store, b"c", b"1"),
        lambda: txn(store, success=[op_put(b"a", b"3"), op_del(b"c"), op_put(b"d", b"1")]),
        lambda: put(store, b"b", b"2"),  # b re-created
        lambda: delete(store, b"\x00", b"\x00"),  # everything gone
        lambda: put(store, b"a", b"4"),
        lambda: put(store, b"e", b"1"),
    ]
    for step in steps:
        step()
        seen[store.revision] = kvs(get(store, **ALL))
    assert store.revision == 11
    return store, seen


def test_reads_at_every_past_revision() -> None:
    store, seen = _history_store()
    for revision, state in seen.items():
        response = get(store, revision=revision, **ALL)
        assert kvs(response) == state, revision
        assert response.count == len(state)
        assert response.header.revision == store.revision  # the store's, not the one read
        for key in (b"a", b"b", b"c", b"d", b"e"):
            single = kvs(get(store, key, revision=revision))
            assert single == [rec for rec in state if rec[0] == key]
    # some known points
    assert kvs(get(store, b"b", revision=4)) == [(b"b", b"1", 3, 3, 1, 0)]
    assert kvs(get(store, b"b", revision=5)) == []  # deleted at 5
    assert kvs(get(store, b"b", revision=8)) == [(b"b", b"2", 8, 8, 1, 0)]
    assert kvs(get(store, b"a", revision=7)) == [(b"a", b"3", 2, 7, 3, 0)]
    assert kvs(get(store, b"a", revision=9)) == []
    assert kvs(get(store, b"a")) == [(b"a", b"4", 10, 10, 1, 0)]


def test_a_read_at_an_old_revision_walks_the_history_in_parts(monkeypatch) -> None:
    # One walk of millions of revisions held a leader's loop past its election timeout.
    from raftfast.etcd import mvcc

    monkeypatch.setattr(mvcc, "_HISTORY_PART", 3)
    store, seen = _history_store()
    assert store.read_steps(R(key=b"a")) is None  # (the current state: no walk)
    assert store.read_steps(R(key=b"a", revision=store.revision)) is None
    for revision, state in seen.items():
        if revision == store.revision:
            continue
        request = R(revision=revision, **ALL)
        steps = store.read_steps(request)
        items = list(steps)
        newer = store._history[revision + 1 - store._history_base :]
        walked = 0
        parts = 0
        for events in reversed(newer):  # (newest first, a part once it has 3 events)
            walked += len(events)
            if walked >= 3:
                walked, parts = 0, parts + 1
        assert items[:-1] == [None] * parts and items[-1] is not None
        response, records = store.range_records(request, view=items[-1])
        assert [kvs(pb.RangeResponse(kvs=[kv_pb(r) for r in records]))] == [state]
        assert response.count == len(state)
    # the state is taken at the first step: writes made during the walk are not seen
    steps = store.read_steps(R(key=b"a", revision=4))
    assert next(steps) is None
    ok(store, pb.PutRequest(key=b"a", value=b"later"))
    *_, records = steps
    assert [(r.key, r.value) for r in records] == [(b"a", b"2")]
    with pytest.raises(EtcdError):
        store.read_steps(R(key=b"a", revision=store.revision + 1))


@pytest.mark.parametrize("seed", range(40))
def test_a_big_read_in_steps_sees_one_revision_while_the_store_goes_on(monkeypatch, seed):
    # 1,000,000 keys read at once held the loop ~0.2-0.5 s: a read of more than _WALK_PART
    # keys walks the keyspace a part at a time, writes in between, and undoes what changed
    # after its revision. Against the same read of a frozen copy, whatever the writes.
    from raftfast.etcd import mvcc

    rng = random.Random(seed)
    monkeypatch.setattr(mvcc, "_WALK_PART", rng.choice([1, 2, 3, 7]))
    monkeypatch.setattr(mvcc, "_HISTORY_PART", rng.choice([1, 2, 5]))
    store = MVCCStore()
    keys = [b"k%02d" % i for i in range(30)]

    def write() -> None:
        key = rng.choice(keys)
        if rng.random() < 0.3:
            end = rng.choice([b"", key + b"\0", rng.choice(keys)])
            ok(store, pb.DeleteRangeRequest(key=key, range_end=end))
        else:
            ok(store, pb.PutRequest(key=key, value=b"%d" % rng.randrange(100)))

    for _ in range(rng.randrange(20, 80)):
        write()
    lo, hi = sorted(rng.sample(keys, 2))
    request = R(key=lo, range_end=rng.choice([hi, b"\0"]))
    if rng.random() < 0.5:
        request.revision = rng.randrange(store.compact_revision + 1, store.revision + 1)
    if rng.random() < 0.3:
        request.sort_order, request.sort_target = 2, rng.choice([0, 3, 4])  # (a sort)
    steps = store.read_steps(request)
    if steps is None:  # (a small range of the current state: read at once)
        assert store._count(*mvcc.range_of(request.key, request.range_end)) <= mvcc._WALK_PART
        return
    read_at = request.revision or store.revision
    for item in steps:
        if item is not None:
            break
        for _ in range(rng.randrange(0, 4)):
            write()
    response, records = store.range_records(request, view=item)
    response.kvs.extend([kv_pb(rec, request.keys_only) for rec in records])
    # (the same read at once, through the history: as a Txn reads an old revision)
    request.revision = read_at
    assert response.kvs == store.range(request).kvs and response.count == len(records)


def test_a_read_in_steps_ends_compacted_if_its_revision_is_compacted_meanwhile(monkeypatch):
    from raftfast.etcd import mvcc

    monkeypatch.setattr(mvcc, "_WALK_PART", 2)
    store = MVCCStore()
    for i in range(10):
        ok(store, pb.PutRequest(key=b"k%d" % i, value=b"v"))
    steps = store.read_steps(R(key=b"k", range_end=b"l"))
    assert next(steps) is None
    read_at = store.revision
    ok(store, pb.PutRequest(key=b"k1", value=b"new"))
    compact(store, read_at + 1)  # (past the revision read: its undo is gone)
    with pytest.raises(EtcdError) as caught:
        list(steps)
    assert caught.value == errors.COMPACTED


def test_read_revision_errors() -> None:
    store, seen = _history_store()
    future = read_error(store, key=b"a", revision=store.revision + 1)
    assert future == errors.FUTURE_REV
    assert future.code == grpc.StatusCode.OUT_OF_RANGE
    assert future.message == "etcdserver: mvcc: required revision is a future revision"
    compact(store, 6)
    for revision in (1, 2, 5):
        gone = read_error(store, key=b"a", revision=revision)
        assert gone == errors.COMPACTED
    assert gone.code == grpc.StatusCode.OUT_OF_RANGE
    assert gone.message == "etcdserver: mvcc: required revision has been compacted"
    for revision in range(6, store.revision + 1):  # the compact revision itself still reads
        assert kvs(get(store, revision=revision, **ALL)) == seen[revision]
    assert read_error(store, key=b"a", revision=store.revision + 1) == errors.FUTURE_REV


# -- txn --------------------------------------------------------------------------------------


@pytest.fixture
def cmp_store() -> MVCCStore:
    """k: value b"m", create 2, mod 4, version 3, lease 9."""
    store = MVCCStore()
    grant(store, 9)
    put(store, b"k", b"a")  # 2
    put(store, b"other")  # 3
    put(store, b"k", b"m", lease=9)  # 4
    put(store, b"k", b"m", ignore_lease=True)  # 5: version 3
    assert kvs(get(store, b"k")) == [(b"k", b"m", 2, 5, 3, 9)]
    return store


_K = {C.VALUE: b"m", C.CREATE: 2, C.MOD: 5, C.VERSION: 3, C.LEASE: 9}
_BELOW = {C.VALUE: b"l\xff", C.CREATE: 1, C.MOD: 4, C.VERSION: 2, C.LEASE: 8}
_ABOVE = {C.VALUE: b"m\x00", C.CREATE: 3, C.MOD: 6, C.VERSION: 4, C.LEASE: 10}
_RESULTS = {
    # result -> holds when the key's is (equal, greater, less) than the operand
    C.EQUAL: (True, False, False),
    C.NOT_EQUAL: (False, True, True),
    C.GREATER: (False, True, False),
    C.LESS: (False, False, True),
}


@pytest.mark.parametrize("target", list(_K))
@pytest.mark.parametrize("result", list(_RESULTS))
def test_txn_compare_on_a_key(cmp_store: MVCCStore, target: int, result: int) -> None:
    eq, gt, lt = _RESULTS[result]
    for operand, expected in ((_K[target], eq), (_BELOW[target], gt), (_ABOVE[target], lt)):
        response = txn(
            cmp_store,
            [cmp(b"k", target, result, operand)],
            [op_get(b"k")],
            [op_get(b"other")],
        )
        assert response.succeeded == expected, (operand, expected)
        assert keys(response.responses[0].response_range) == [b"k" if expected else b"other"]
    assert cmp_store.revision == 5


@pytest.mark.parametrize(
    ("target", "result", "operand", "expected"),
    [
        (C.VERSION, C.EQUAL, 0, True),  # an absent key has version 0 (etcd's "key missing")
        (C.VERSION, C.GREATER, 0, False),
        (C.CREATE, C.EQUAL, 0, True),
        (C.MOD, C.EQUAL, 0, True),
        (C.MOD, C.LESS, 5, True),
        (C.LEASE, C.EQUAL, 0, True),
        (C.VALUE, C.EQUAL, b"", False),  # a value compare on an absent key always fails
        (C.VALUE, C.NOT_EQUAL, b"x", False),
        (C.VALUE, C.LESS, b"x", False),
    ],
)
def test_txn_compare_on_an_absent_key(
    cmp_store: MVCCStore, target: int, result: int, operand: Any, expected: bool
) -> None:
    response = txn(cmp_store, [cmp(b"absent", target, result, operand)])
    assert response.succeeded == expected
    # the same on a range with no key in it (etcd compares it as one absent key)
    response = txn(cmp_store, [cmp(b"x", target, result, operand, range_end=b"y")])
    assert response.succeeded == expected


def test_txn_compare_on_a_range() -> None:
    store = MVCCStore()
    put(store, b"p/1", b"same")  # 2
    put(store, b"p/2", b"same")  # 3
    put(store, b"q", b"other")  # 4

    def holds(*compares: pb.Compare) -> bool:
        return txn(store, list(compares)).succeeded

    assert holds(cmp(b"p/", C.VALUE, C.EQUAL, b"same", b"p0"))
    assert not holds(cmp(b"p", C.VALUE, C.EQUAL, b"same", b"\x00"))  # q differs
    assert holds(cmp(b"p/", C.VERSION, C.EQUAL, 1, b"p0"))
    assert holds(cmp(b"p/", C.MOD, C.LESS, 4, b"p0"))
    assert not holds(cmp(b"p/", C.MOD, C.LESS, 3, b"p0"))  # p/2's is 3: every key must hold
    assert holds(cmp(b"p/", C.CREATE, C.GREATER, 1, b"p0"))
    assert holds(cmp(b"\x00", C.CREATE, C.GREATER, 0, b"\x00"))  # every key
    assert holds(cmp(b"p/", C.LEASE, C.EQUAL, 0, b"p0"))
    # "nothing under the prefix": a common idiom (create_revision == 0 on an empty range)
    assert holds(cmp(b"r/", C.CREATE, C.EQUAL, 0, b"r0"))
    assert not holds(cmp(b"p/", C.CREATE, C.EQUAL, 0, b"p0"))
    # several compares: all must hold
    assert holds(cmp(b"q", C.VALUE, C.EQUAL, b"other"), cmp(b"p/1", C.VERSION, C.EQUAL, 1))
    assert not holds(cmp(b"q", C.VALUE, C.EQUAL, b"other"), cmp(b"p/1", C.VERSION, C.EQUAL, 2))


def test_txn_branches_and_responses() -> None:
    store = MVCCStore()
    put(store, b"k", b"1")  # 2
    guard = [cmp(b"k", C.VALUE, C.EQUAL, b"1")]
    success = [op_put(b"s", b"yes", prev_kv=True), op_get(b"k"), op_del(b"k", prev_kv=True)]
    failure = [op_put(b"f", b"no")]
    response = txn(store, guard, success, failure)
    assert response.succeeded
    assert response.header.revision == 3
    kinds = [r.WhichOneof("response") for r in response.responses]
    assert kinds == ["response_put", "response_range", "response_delete_range"]
    assert not response.responses[0].response_put.HasField("prev_kv")
    assert kvs(response.responses[1].response_range) == [(b"k", b"1", 2, 2, 1, 0)]
    deleted = response.responses[2].response_delete_range
    assert (deleted.deleted, kvs_of(deleted.prev_kvs)) == (1, [(b"k", b"1", 2, 2, 1, 0)])
    assert keys(get(store, **ALL)) == [b"s"]
    # now the guard fails (k is gone): the failure branch runs
    response = txn(store, guard, success, failure)
    assert not response.succeeded
    assert [r.WhichOneof("response") for r in response.responses] == ["response_put"]
    assert response.header.revision == 4
    assert keys(get(store, **ALL)) == [b"f", b"s"]
    # no compare at all: success
    assert txn(store, [], [op_get(b"s")], [op_get(b"f")]).succeeded


def test_txn_op_headers_hold_the_revision_each_op_saw_as_etcd() -> None:
    store = MVCCStore()
    put(store, b"a", b"1")
    put(store, b"b", b"1")  # 3
    ops = [
        op_get(b"a"),  # before any change: the revision before the txn
        op_del(b"nothing"),  # deleted nothing: the same
        op_put(b"a", b"2"),  # the txn's
        op_get(b"a"),  # after a change: the txn's
        op_del(b"nothing"),  # deleted nothing, after a change: the txn's
        op_del(b"b"),
    ]
    inner = pb.RequestOp(request_txn=pb.TxnRequest(success=[op_get(b"a")]))
    response = txn(store, [], [*ops, inner], [])
    assert response.header.revision == 4
    revisions = [getattr(r, r.WhichOneof("response")).header.revision for r in response.responses]
    assert revisions == [3, 3, 4, 4, 4, 4, 0]  # (a nested txn's own header: empty, as etcd's)
    assert response.responses[-1].response_txn.HasField("header")
    assert response.responses[-1].response_txn.responses[0].response_range.header.revision == 4


def test_txn_delete_from_a_key_then_a_put_after_it() -> None:
    # etcd runs it (its duplicate check takes range_end "\0" literally): the delete, then the
    # put, one revision, and a read of the revision before still sees the old values
    store = MVCCStore()
    put(store, b"k/a", b"1")
    put(store, b"k/b", b"1")  # 3
    response = txn(store, [], [op_del(b"k/", b"\0"), op_put(b"k/b", b"2")], [])
    assert response.header.revision == 4
    assert kvs(get(store, b"k/", b"k0")) == [(b"k/b", b"2", 4, 4, 1, 0)]
    assert [(k, v) for k, v, *_ in kvs(get(store, b"k/", b"k0", revision=3))] == [
        (b"k/a", b"1"),
        (b"k/b", b"1"),
    ]
    events = store.events_at(4)
    assert [(e.key, e.after is not None) for e in events] == [
        (b"k/a", False),
        (b"k/b", False),
        (b"k/b", True),
    ]


def test_txn_range_sees_the_txns_earlier_writes() -> None:
    store = MVCCStore()
    put(store, b"a", b"old")  # 2
    put(store, b"b", b"b")  # 3
    response = txn(
        store,
        success=[
            op_get(b"a"),
            op_put(b"a", b"new"),
            op_get(b"a"),
            op_del(b"b"),
            op_get(b"\x00", b"\x00"),
            op_put(b"c", b"c"),
            op_get(b"\x00", b"\x00", count_only=True),
        ],
    )
    r = [op.response_range for op in response.responses if op.HasField("response_range")]
    assert kvs(r[0]) == [(b"a", b"old", 2, 2, 1, 0)]
    assert kvs(r[1]) == [(b"a", b"new", 2, 4, 2, 0)]
    assert kvs(r[2]) == [(b"a", b"new", 2, 4, 2, 0)]
    assert r[3].count == 2
    assert response.header.revision == 4


def test_txn_range_at_a_revision() -> None:
    """etcd reads a txn's range with a revision at that revision (and checks it first)."""
    store = MVCCStore()
    put(store, b"a", b"1")  # 2
    put(store, b"a", b"2")  # 3
    put(store, b"b", b"1")  # 4
    response = txn(store, success=[op_get(b"a", revision=2), op_get(b"\x00", b"\x00", revision=3)])
    assert kvs(response.responses[0].response_range) == [(b"a", b"1", 2, 2, 1, 0)]
    assert keys(response.responses[1].response_range) == [b"a"]
    # after a write of the same txn: a revision still reads that revision
    response = txn(
        store,
        success=[
            op_put(b"a", b"3"),
            op_del(b"b"),
            op_get(b"\x00", b"\x00", revision=4),
            op_get(b"\x00", b"\x00"),
        ],
    )
    at4, now = (response.responses[i].response_range for i in (2, 3))
    assert kvs(at4) == [(b"a", b"2", 2, 3, 2, 0), (b"b", b"1", 4, 4, 1, 0)]
    assert kvs(now) == [(b"a", b"3", 2, 5, 3, 0)]
    # a future or compacted revision fails the whole txn
    fails(
        store,
        pb.TxnRequest(success=[op_put(b"x"), op_get(b"a", revision=store.revision + 1)]),
        errors.FUTURE_REV,
    )
    compact(store, 4)
    fails(
        store,
        pb.TxnRequest(success=[op_put(b"x"), op_get(b"a", revision=3)]),
        errors.COMPACTED,
    )
    assert keys(txn(store, success=[op_get(b"a", revision=4)]).responses[0].response_range) == [
        b"a"
    ]


def test_nested_txn() -> None:
    store = MVCCStore()
    put(store, b"a", b"1")  # 2
    inner = op_txn(
        [cmp(b"a", C.VALUE, C.EQUAL, b"1")],
        [op_put(b"inner", b"yes"), op_get(b"a")],
        [op_put(b"inner", b"no")],
    )
    response = txn(store, [cmp(b"a", C.VERSION, C.EQUAL, 1)], [op_put(b"outer"), inner])
    assert response.succeeded
    assert response.header.revision == 3  # one revision for every level
    nested = response.responses[1].response_txn
    assert nested.succeeded
    assert [r.WhichOneof("response") for r in nested.responses] == [
        "response_put",
        "response_range",
    ]
    assert kvs(get(store, b"inner")) == [(b"inner", b"yes", 3, 3, 1, 0)]
    assert kvs(get(store, b"outer")) == [(b"outer", b"v", 3, 3, 1, 0)]
    # nested in the failure branch
    response = txn(store, [cmp(b"a", C.VERSION, C.EQUAL, 5)], [], [inner, inner])
    assert not response.succeeded
    assert [r.response_txn.succeeded for r in response.responses] == [True, True]
    assert kvs(get(store, b"inner")) == [(b"inner", b"yes", 3, 4, 3, 0)]


def test_nested_txn_compares_see_the_state_before_the_txn() -> None:
    """etcd chooses every branch (compareToPath) before applying any write of the txn."""
    store = MVCCStore()
    put(store, b"x")  # 2
    inner = op_txn(
        [cmp(b"a", C.VERSION, C.GREATER, 0)], [op_put(b"seen", b"new")], [op_put(b"seen", b"old")]
    )
    response = txn(store, success=[op_put(b"a"), inner])
    assert not response.responses[1].response_txn.succeeded
    assert get(store, b"seen").kvs[0].value == b"old"
    # a put that needs the key (ignore_value) is checked on the state before the txn too
    fails(
        store,
        pb.TxnRequest(
            success=[op_put(b"new"), op_txn(success=[op_put(b"new", ignore_value=True)])]
        ),
        errors.KEY_NOT_FOUND,
    )


def test_failed_txn_changes_nothing() -> None:
    store = MVCCStore()
    grant(store, 1)
    put(store, b"a", b"1")
    lease_missing = pb.TxnRequest(success=[op_put(b"a", b"2"), op_put(b"b", lease=42)])
    fails(store, lease_missing, errors.LEASE_NOT_FOUND)
    nested = pb.TxnRequest(
        success=[op_put(b"a", b"2"), op_del(b"a"), op_txn(success=[op_put(b"c", lease=42)])]
    )
    fails(store, nested, errors.LEASE_NOT_FOUND)
    deep = pb.TxnRequest(
        success=[
            op_put(b"a", b"2"),
            op_txn(
                success=[op_txn([cmp(b"a", C.VERSION, C.EQUAL, 99)], [], [op_put(b"c", lease=42)])]
            ),
        ]
    )
    fails(store, deep, errors.LEASE_NOT_FOUND)
    absent = pb.TxnRequest(
        success=[op_put(b"a", b"2"), op_put(b"missing", ignore_value=True)], failure=[]
    )
    fails(store, absent, errors.KEY_NOT_FOUND)
    # only the branch taken is checked
    response = txn(
        store,
        [cmp(b"a", C.VALUE, C.EQUAL, b"1")],
        [op_put(b"a", b"3", lease=1)],
        [op_put(b"b", lease=42)],
    )
    assert response.succeeded and store.leases[1].keys == {b"a"}
    assert get(store, **ALL).count == 1


def test_txn_nesting_limit() -> None:
    store = MVCCStore()

    def nested(levels: int) -> pb.TxnRequest:
        request = pb.TxnRequest(success=[op_put(b"deep")])
        for _ in range(levels - 1):
            request = pb.TxnRequest(success=[pb.RequestOp(request_txn=request)])
        return request

    assert ok(store, nested(MAX_TXN_DEPTH)).header.revision == 2
    result = apply(store, nested(MAX_TXN_DEPTH + 1))
    assert isinstance(result, EtcdError) and result.code == grpc.StatusCode.INVALID_ARGUMENT
    assert store.revision == 2


# -- leases -----------------------------------------------------------------------------------


def test_lease_grant() -> None:
    store = MVCCStore()
    response = grant(store, 77, ttl=30)
    assert (response.ID, response.TTL, response.header.revision) == (77, 30, 1)
    assert store.leases[77].ttl == 30
    fails(store, pb.LeaseGrantRequest(ID=77, TTL=5), errors.LEASE_EXIST)
    assert errors.LEASE_EXIST.message == "etcdserver: lease already exists"
    fails(store, pb.LeaseGrantRequest(ID=78, TTL=9_000_000_001), errors.LEASE_TTL_TOO_LARGE)
    result = apply(store, pb.LeaseGrantRequest(ID=0, TTL=5))  # the leader picks the id
    assert isinstance(result, EtcdError) and result.code == grpc.StatusCode.INVALID_ARGUMENT
    assert grant(store, 79, ttl=0).TTL >= 1


def test_revoke_deletes_the_keys_of_the_lease_in_one_revision() -> None:
    store = MVCCStore()
    grant(store, 1)
    grant(store, 2)
    put(store, b"k1", lease=1)  # 2
    put(store, b"k2", lease=1)  # 3
    put(store, b"k3", lease=1)  # 4
    put(store, b"k4", lease=2)  # 5
    put(store, b"k5")  # 6
    put(store, b"k2", b"moved")  # 7: k2 leaves lease 1
    put(store, b"k5", lease=1, prev_kv=True)  # 8: k5 joins it
    delete(store, b"k3")  # 9
    assert store.leases[1].keys == {b"k1", b"k5"}
    response = revoke(store, 1)
    assert response.header.revision == 10
    assert keys(get(store, **ALL)) == [b"k2", b"k4"]
    events, next_rev = store.events_from(10)
    assert [(e.key, e.after, e.prev.lease, e.revision) for e in events] == [
        (b"k1", None, 1, 10),
        (b"k5", None, 1, 10),
    ]
    assert next_rev == 11
    assert 1 not in store.leases
    fails(store, pb.LeaseRevokeRequest(ID=1), errors.LEASE_NOT_FOUND)
    fails(store, pb.PutRequest(key=b"k9", lease=1), errors.LEASE_NOT_FOUND)
    # a key moved from lease 2 to lease 3 goes with lease 3
    grant(store, 3)
    put(store, b"k4", lease=3)
    revoke(store, 2)
    assert keys(get(store, **ALL)) == [b"k2", b"k4"]
    revoke(store, 3)
    assert keys(get(store, **ALL)) == [b"k2"]
    # the deleted keys read at a past revision still show their lease
    assert kvs(get(store, b"k1", revision=9)) == [(b"k1", b"v", 2, 2, 1, 1)]


def test_txn_puts_attach_leases() -> None:
    store = MVCCStore()
    grant(store, 5)
    txn(store, success=[op_put(b"a", lease=5), op_put(b"b", lease=5), op_put(b"c")])
    assert store.leases[5].keys == {b"a", b"b"}
    assert revoke(store, 5).header.revision == 3
    assert keys(get(store, **ALL)) == [b"c"]


# -- compaction and history -------------------------------------------------------------------


def test_compaction_errors() -> None:
    store, _ = _history_store()
    fails(store, pb.CompactionRequest(revision=store.revision + 1), errors.FUTURE_REV)
    assert compact(store, 5).header.revision == store.revision
    assert store.compact_revision == 5
    fails(store, pb.CompactionRequest(revision=5), errors.COMPACTED)
    fails(store, pb.CompactionRequest(revision=3), errors.COMPACTED)
    compact(store, store.revision)  # up to the newest revision
    assert kvs(get(store, revision=store.revision, **ALL)) == kvs(get(store, **ALL))
    assert read_error(store, key=b"a", revision=store.revision - 1) == errors.COMPACTED
    put(store, b"z")
    assert keys(get(store, revision=store.revision - 1, **ALL)) == [b"a", b"e"]


def test_compaction_keeps_the_present_and_the_history_after_it() -> None:
    store, seen = _history_store()
    before = kvs(get(store, **ALL))
    compact(store, 7)
    assert kvs(get(store, **ALL)) == before
    for revision in range(7, store.revision + 1):
        assert kvs(get(store, revision=revision, **ALL)) == seen[revision]
    # the writes go on
    put(store, b"f")
    assert store.revision == 12
    assert kvs(get(store, revision=11, **ALL)) == seen[11]


def test_events_from() -> None:
    store, _ = _history_store()
    events, next_rev = store.events_from(2)
    assert next_rev == store.revision + 1
    assert [e.revision for e in events] == [2, 3, 4, 5, 6, 7, 7, 7, 8, 9, 9, 9, 10, 11]
    for e in events:  # an event's records are the key's after and before it
        before = kvs(get(store, e.key, revision=e.revision - 1))
        after = kvs(get(store, e.key, revision=e.revision))
        assert ([kv(kv_pb(e.prev))] if e.prev else []) == before, e
        assert ([kv(kv_pb(e.after))] if e.after else []) == after, e
    # a delete event as etcd sends it: the key and the revision of the delete
    deleted = events[3]
    assert (deleted.key, deleted.after) == (b"b", None)
    ev = event_pb(deleted, with_prev=True)
    assert ev.type == mvccpb.Event.DELETE
    assert (ev.kv.key, ev.kv.mod_revision, ev.kv.value, ev.kv.version) == (b"b", 5, b"", 0)
    assert kv(ev.prev_kv) == (b"b", b"1", 3, 3, 1, 0)
    assert not event_pb(deleted, with_prev=False).HasField("prev_kv")
    ev = event_pb(events[0], with_prev=True)
    assert ev.type == mvccpb.Event.PUT and kv(ev.kv) == (b"a", b"1", 2, 2, 1, 0)
    assert not ev.HasField("prev_kv")  # created: nothing before
    # from a later revision; past the end: nothing yet
    assert [e.revision for e in store.events_from(9)[0]] == [9, 9, 9, 10, 11]
    assert store.events_from(12) == ([], 12)
    assert store.events_from(100)[0] == []
    # whole revisions: never a revision cut in two, and always at least one
    events, next_rev = store.events_from(7, max_events=2)
    assert ([e.revision for e in events], next_rev) == ([7, 7, 7], 8)
    events, next_rev = store.events_from(5, max_events=3)
    assert ([e.revision for e in events], next_rev) == ([5, 6], 7)
    events, next_rev = store.events_from(5, max_events=5)
    assert ([e.revision for e in events], next_rev) == ([5, 6, 7, 7, 7], 8)
    # compacted history
    compact(store, 6)
    for revision in (1, 2, 6):
        with pytest.raises(EtcdError) as info:
            store.events_from(revision)
        assert info.value == errors.COMPACTED
    assert store.events_from(7)[0][0].revision == 7


# -- snapshots --------------------------------------------------------------------------------


def _rich_commands() -> list[bytes]:
    """Commands that leave leases, deletes, history and a compaction behind."""
    reqs: list[Any] = [
        pb.LeaseGrantRequest(ID=11, TTL=30),
        pb.LeaseGrantRequest(ID=12, TTL=40),
        pb.LeaseGrantRequest(ID=13, TTL=50),
    ]
    for i in range(30):
        key = b"key/%02d" % (i % 11)
        reqs.append(
            pb.PutRequest(key=key, value=b"value %d" % i * (i % 4), lease=(11, 0, 12)[i % 3])
        )
        if i % 7 == 3:
            reqs.append(pb.DeleteRangeRequest(key=b"key/%02d" % (i % 5)))
        if i == 20:
            reqs.append(pb.CompactionRequest(revision=15))
    reqs += [
        pb.TxnRequest(
            compare=[cmp(b"key/01", C.VERSION, C.GREATER, 0)],
            success=[op_put(b"t", b"\x00\xff"), op_del(b"key/09")],
        ),
        pb.LeaseRevokeRequest(ID=12),
        pb.PutRequest(key=b"\x00", value=b""),
        pb.PutRequest(key=b"\xff" * 300, value=b"x" * 5000),
    ]
    return [encode(r) for r in reqs]


def _feed(commands: list[bytes]) -> MVCCStore:
    store = MVCCStore()
    for command in commands:
        assert not isinstance(store.apply(command), EtcdError)
    return store


def _same_behaviour(a: MVCCStore, b: MVCCStore) -> None:
    assert (a.revision, a.compact_revision) == (b.revision, b.compact_revision)
    assert (a.size_bytes, a.history_bytes) == (b.size_bytes, b.history_bytes)
    assert {i: (x.ttl, x.keys) for i, x in a.leases.items()} == {
        i: (x.ttl, x.keys) for i, x in b.leases.items()
    }
    for revision in range(max(a.compact_revision, 1), a.revision + 1):
        assert get(a, revision=revision, **ALL) == get(b, revision=revision, **ALL)
    ea, eb = a.events_from(a.compact_revision + 1), b.events_from(b.compact_revision + 1)
    assert [event_pb(e, True) for e in ea[0]] == [event_pb(e, True) for e in eb[0]]
    assert ea[1] == eb[1]


def test_dump_load_round_trip() -> None:
    store = _feed(_rich_commands())
    assert store.compact_revision == 15 and store.leases and store.revision > 30
    data = store.dump()
    twin = MVCCStore.load(data)
    assert twin == store
    assert twin.dump() == data
    _same_behaviour(twin, store)
    # both go on the same way: revoking a lease deletes the same keys
    for s in (store, twin):
        revoke(s, 11)
        put(s, b"after", b"x")
        compact(s, s.revision - 1)
    assert twin.dump() == store.dump()
    _same_behaviour(twin, store)


def test_dump_load_empty_and_fully_compacted() -> None:
    empty = MVCCStore()
    assert MVCCStore.load(empty.dump()) == empty
    _same_behaviour(MVCCStore.load(empty.dump()), empty)
    store = _feed(_rich_commands())
    compact(store, store.revision)  # no history left at all
    twin = MVCCStore.load(store.dump())
    assert twin == store
    _same_behaviour(twin, store)
    put(store, b"k")
    put(twin, b"k")
    assert twin == store


def test_dump_is_deterministic() -> None:
    commands = _rich_commands()
    a, b = _feed(commands), _feed(commands)
    assert a.dump() == b.dump()
    # a frozen copy keeps its state while the store goes on
    frozen = a.frozen()
    data = a.dump()
    assert frozen.dump() == data
    put(a, b"key/01", b"changed")
    revoke(a, 11)
    assert frozen.dump() == data
    assert a.dump() != data
    # a different history gives different bytes, even with the same keys now
    c = _feed(commands + [encode(pb.PutRequest(key=b"t", value=b"\x00\xff"))])
    assert c.dump() != b.dump()


def _reseal(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_load_rejects_corruption() -> None:
    store = _feed(_rich_commands()[:25])
    data = store.dump()
    assert MVCCStore.load(data) == store
    for i in range(len(data)):  # every flipped byte
        damaged = bytearray(data)
        damaged[i] ^= 0x40
        with pytest.raises(CorruptionError):
            MVCCStore.load(bytes(damaged))
    for n in range(len(data)):  # every truncation
        with pytest.raises(CorruptionError):
            MVCCStore.load(data[:n])
    with pytest.raises(CorruptionError):
        MVCCStore.load(data + b"\x00")
    body = data[:-4]
    for n in range(4, len(body)):  # truncated, but with a CRC that matches
        with pytest.raises(CorruptionError):
            MVCCStore.load(_reseal(body[:n]))
    with pytest.raises(CorruptionError):
        MVCCStore.load(_reseal(body + b"\x00"))  # trailing bytes
    with pytest.raises(CorruptionError):
        MVCCStore.load(_reseal(b"RFE2" + body[4:]))  # bad magic


def test_load_rejects_inconsistent_contents() -> None:
    store = MVCCStore()
    put(store, b"KEYA", b"1")
    put(store, b"KEYB", b"2")
    put(store, b"KEYC", b"3")
    body = store.dump()[:-4]
    # keys out of order (in the records; the history holds them too)
    with pytest.raises(CorruptionError):
        MVCCStore.load(_reseal(body.replace(b"KEYB", b"KEYA")))
    # a history that does not end at the store's revision
    revision = struct.unpack_from("<q", body, 4)[0]
    for bad in (revision + 1, revision - 1, 0):
        with pytest.raises(CorruptionError):
            MVCCStore.load(_reseal(body[:4] + struct.pack("<q", bad) + body[12:]))


# -- the model: every revision read equals a full copy of the keyspace kept per revision -------

_KEYS = [b"a", b"a1", b"a2", b"b", b"c"]
_VALUES = [b"", b"x", b"y", b"z"]


def _end(key: bytes, shape: int) -> bytes:
    return (b"", key[:-1] + bytes((key[-1] + 1,)), b"\x00")[shape]


_key = st.sampled_from(_KEYS)
_shape = st.integers(0, 2)  # one key, its prefix, from it on
_put = st.tuples(st.just("put"), _key, st.sampled_from(_VALUES))
_del = st.tuples(st.just("del"), _key, _shape)
_rev = st.one_of(st.just(0), st.just(0), st.integers(1, 14))  # 0: the newest
_get = st.tuples(st.just("get"), _key, _shape, _rev)
_compare = st.tuples(
    _key,
    _shape,
    st.sampled_from([C.VERSION, C.CREATE, C.MOD, C.VALUE]),
    st.sampled_from([C.EQUAL, C.NOT_EQUAL, C.GREATER, C.LESS]),
    st.integers(0, 8),
)
_leaf_ops = st.lists(st.one_of(_put, _del, _get), max_size=4)
_inner_txn = st.tuples(st.just("txn"), st.lists(_compare, max_size=2), _leaf_ops, _leaf_ops)
_ops = st.lists(st.one_of(_put, _del, _get, _inner_txn), max_size=4)
_txn = st.tuples(st.just("txn"), st.lists(_compare, max_size=2), _ops, _ops)
_compact = st.tuples(st.just("compact"), st.integers(0, 100))
_command = st.one_of(_put, _put, _del, _txn, _txn, _compact)


def _to_op(op: tuple) -> pb.RequestOp:
    kind = op[0]
    if kind == "put":
        return op_put(op[1], op[2])
    if kind == "del":
        return op_del(op[1], _end(op[1], op[2]))
    if kind == "get":
        return op_get(op[1], _end(op[1], op[2]), revision=op[3])
    return pb.RequestOp(request_txn=_to_txn(op))


def _to_compare(c: tuple) -> pb.Compare:
    key, shape, target, result, n = c
    operand = _VALUES[n % len(_VALUES)] if target == C.VALUE else n
    return cmp(key, target, result, operand, _end(key, shape))


def _to_txn(t: tuple) -> pb.TxnRequest:
    _, compares, success, failure = t
    return pb.TxnRequest(
        compare=[_to_compare(c) for c in compares],
        success=[_to_op(o) for o in success],
        failure=[_to_op(o) for o in failure],
    )


class Model:
    """The naive model: the whole keyspace (key -> (value, create, mod, version)) copied at
    every revision."""

    def __init__(self) -> None:
        self.states: dict[int, dict[bytes, tuple]] = {1: {}}
        self.revision = 1
        self.compacted = 0

    @staticmethod
    def keys_in(state: dict, key: bytes, shape: int) -> list[bytes]:
        end = _end(key, shape)
        if not end:
            return [key] if key in state else []
        return sorted(k for k in state if k >= key and (end == b"\x00" or k < end))

    def records(self, state: dict, key: bytes, shape: int) -> list[tuple]:
        return [(k, *state[k], 0) for k in self.keys_in(state, key, shape)]

    def compare(self, state: dict, c: tuple) -> bool:
        key, shape, target, result, n = c
        recs = [state[k] for k in self.keys_in(state, key, shape)]
        if not recs:
            if target == C.VALUE:
                return False
            recs = [(b"", 0, 0, 0)]
        index = {C.VALUE: 0, C.CREATE: 1, C.MOD: 2, C.VERSION: 3}[target]
        theirs = _VALUES[n % len(_VALUES)] if target == C.VALUE else n
        for rec in recs:
            mine = rec[index]
            holds = {
                C.EQUAL: mine == theirs,
                C.NOT_EQUAL: mine != theirs,
                C.GREATER: mine > theirs,
                C.LESS: mine < theirs,
            }[result]
            if not holds:
                return False
        return True

    def path(self, state: dict, t: tuple, out: list[bool]) -> None:
        """The branches taken, all chosen on the state before the txn (etcd's
        compareToPath); EtcdError if a range of them names a revision that cannot be read."""
        ok = all(self.compare(state, c) for c in t[1])
        out.append(ok)
        for op in t[2] if ok else t[3]:
            if op[0] == "txn":
                self.path(state, op, out)
            elif op[0] == "get" and op[3] > self.revision:
                raise errors.FUTURE_REV
            elif op[0] == "get" and 0 < op[3] < self.compacted:
                raise errors.COMPACTED

    def run(self, work: dict, t: tuple, path, rev: int, reads: list, changed: list) -> None:
        ok = next(path)
        reads.append(("succeeded", ok))
        for op in t[2] if ok else t[3]:
            kind = op[0]
            if kind == "put":
                prev = work.get(op[1])
                if prev is None:
                    work[op[1]] = (op[2], rev, rev, 1)
                else:
                    work[op[1]] = (op[2], prev[1], rev, prev[3] + 1)
                changed.append(True)
            elif kind == "del":
                for k in self.keys_in(work, op[1], op[2]):
                    del work[k]
                    changed.append(True)
            elif kind == "get":
                read_at = self.states[op[3]] if op[3] else work
                reads.append(self.records(read_at, op[1], op[2]))
            else:
                self.run(work, op, path, rev, reads, changed)

    def apply(self, command: tuple) -> Any:
        """What the store must answer (a revision, reads, an error)."""
        kind = command[0]
        state = self.states[self.revision]
        if kind == "compact":
            if self.revision <= self.compacted:
                return "compacted", self.compacted
            target = self.compacted + 1 + command[1] % (self.revision - self.compacted)
            self.compacted = target
            return "compact", target
        work = dict(state)
        rev = self.revision + 1
        reads: list = []
        changed: list = []
        if kind == "txn":
            path: list[bool] = []
            try:
                self.path(state, command, path)
            except EtcdError as exc:
                return "error", exc
            self.run(work, command, iter(path), rev, reads, changed)
        else:
            self.run(work, ("txn", [], [command], []), iter([True]), rev, reads, changed)
            reads = []
        if changed:
            self.revision = rev
            self.states[rev] = work
        return "ok", self.revision, reads


def _store_reads(response: pb.TxnResponse, out: list) -> None:
    out.append(("succeeded", response.succeeded))
    for r in response.responses:
        which = r.WhichOneof("response")
        if which == "response_range":
            out.append(kvs(r.response_range))
        elif which == "response_txn":
            _store_reads(r.response_txn, out)


def _check_against(store: MVCCStore, model: Model) -> None:
    assert (store.revision, store.compact_revision) == (model.revision, model.compacted)
    for revision in range(1, model.revision + 1):
        if revision < model.compacted:
            assert read_error(store, revision=revision, **ALL) == errors.COMPACTED
            continue
        state = model.states[revision]
        response = get(store, revision=revision, **ALL)
        expected = sorted((k, *rec, 0) for k, rec in state.items())
        assert kvs(response) == expected, revision
        assert response.count == len(expected)
        response = get(store, b"a", b"b", revision=revision, limit=2)
        under = [rec for rec in expected if rec[0].startswith(b"a")]
        assert kvs(response) == under[:2]
        assert (response.count, response.more) == (len(under), len(under) > 2)
        for key in _KEYS:
            assert kvs(get(store, key, revision=revision)) == [r for r in expected if r[0] == key]
    assert read_error(store, revision=model.revision + 1, **ALL) == errors.FUTURE_REV


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(_command, max_size=40))
# a nested txn's compare sees the state before the txn, not the outer txn's put
@example([("txn", [], [("put", b"a", b"x"), ("txn", [(b"a", 0, C.VERSION, C.GREATER, 0)],
          [("put", b"b", b"y")], [("put", b"c", b"z")])], [])])  # fmt: skip
# a range at a revision, after a write of the same txn
@example([("put", b"a", b"x"), ("txn", [], [("put", b"a", b"y"), ("get", b"a", 0, 2)], [])])
def test_matches_a_naive_model(commands: list[tuple]) -> None:
    store, model = MVCCStore(), Model()
    for command in commands:
        expected = model.apply(command)
        kind = command[0]
        if kind == "compact":
            request: Any = pb.CompactionRequest(revision=expected[1])
        elif kind == "txn":
            request = _to_txn(command)
        elif kind == "put":
            request = pb.PutRequest(key=command[1], value=command[2])
        else:
            request = pb.DeleteRangeRequest(key=command[1], range_end=_end(command[1], command[2]))
        response = apply(store, request)
        if expected[0] == "compacted":
            assert response == errors.COMPACTED
            continue
        if expected[0] == "error":
            assert response == expected[1]
            continue
        assert not isinstance(response, EtcdError), response
        if expected[0] == "compact":
            continue
        assert response.header.revision == expected[1]
        if kind == "txn":
            reads: list = []
            _store_reads(response, reads)
            assert reads == expected[2]
    _check_against(store, model)
    # the history replayed on the oldest readable state gives the newest
    start = max(model.compacted, 1)
    state = dict(model.states[start])
    events, next_rev = store.events_from(start + 1, 1 << 30)
    assert next_rev == model.revision + 1
    for e in events:
        if e.after is None:
            del state[e.key]
        else:
            rec = e.after
            state[e.key] = (rec.value, rec.create, rec.mod, rec.version)
    assert state == model.states[model.revision]
    # and a snapshot holds all of it
    twin = MVCCStore.load(store.dump())
    assert twin == store
    _check_against(twin, model)


# -- in the KV state machine ------------------------------------------------------------------

ETCD = bytes((OP_ETCD,))


def etcd_cmd(request: Any) -> bytes:
    return ETCD + encode(request)


def test_fsm_applies_etcd_commands() -> None:
    m = KVStateMachine()
    response = m.apply(1, etcd_cmd(pb.PutRequest(key=b"k", value=b"etcd")))
    assert isinstance(response, pb.PutResponse) and response.header.revision == 2
    assert m.applied_index == 1
    assert m.get(b"k") is None and len(m) == 0  # a namespace of its own
    assert m.apply(2, encode_put(0, 0, b"k", b"kv")) is True
    assert m.get(b"k") == b"kv"
    assert kvs(get(m.etcd, b"k")) == [(b"k", b"etcd", 2, 2, 1, 0)]
    response = m.apply(3, etcd_cmd(pb.LeaseRevokeRequest(ID=5)))
    assert response == errors.LEASE_NOT_FOUND  # returned, not raised
    response = m.apply(4, ETCD + b"\x63garbage")
    assert isinstance(response, EtcdError) and m.applied_index == 4
    results = m.apply_batch(
        5,
        [
            etcd_cmd(pb.TxnRequest(success=[op_put(b"a"), op_put(b"b")])),
            etcd_cmd(pb.DeleteRangeRequest(key=b"\x00", range_end=b"\x00", prev_kv=True)),
        ],
    )
    assert results[0].header.revision == 3
    assert (results[1].header.revision, results[1].deleted) == (4, 3)
    assert m.applied_index == 6
    assert m.size_bytes == m.recount()  # the etcd keyspace counted as applied


def _fsm_with_etcd() -> KVStateMachine:
    m = KVStateMachine()
    commands = [ETCD + c for c in _rich_commands()]
    commands.insert(5, encode_put(1, 1, b"plain", b"kv"))
    for i, command in enumerate(commands, start=1):
        m.apply(i, command)
    return m


def test_fsm_snapshot_carries_the_etcd_keyspace() -> None:
    m = _fsm_with_etcd()
    data = m.dump()
    assert struct.unpack_from("<H", data, 4)[0] == SNAPSHOT_VERSION == 3
    twin = KVStateMachine()
    twin.apply(1, etcd_cmd(pb.PutRequest(key=b"stale")))
    twin.load(data)
    assert twin.etcd == m.etcd
    _same_behaviour(twin.etcd, m.etcd)
    assert twin.fingerprint() == m.fingerprint()
    assert twin.dump() == data
    assert twin.get(b"plain") == b"kv"
    assert twin.size_bytes == m.recount()
    # a frozen copy snapshots the etcd keyspace as of when it was taken
    frozen = m.frozen()
    m.apply(m.applied_index + 1, etcd_cmd(pb.PutRequest(key=b"later")))
    assert frozen.dump() == data
    assert m.dump() != data


def test_fsm_fingerprint_covers_the_etcd_keyspace() -> None:
    a, b = KVStateMachine(), KVStateMachine()
    assert a.fingerprint() == b.fingerprint()
    a.apply(1, etcd_cmd(pb.PutRequest(key=b"k", value=b"1")))
    b.apply(1, etcd_cmd(pb.PutRequest(key=b"k", value=b"2")))
    assert a.fingerprint() != b.fingerprint()
    c = KVStateMachine()
    c.apply(1, etcd_cmd(pb.LeaseGrantRequest(ID=9, TTL=10)))  # a lease only: same revision
    assert c.fingerprint() != KVStateMachine().fingerprint()
    d, e = KVStateMachine(), KVStateMachine()
    for m in (d, e):
        m.apply(1, etcd_cmd(pb.PutRequest(key=b"k")))
        m.apply(2, etcd_cmd(pb.PutRequest(key=b"k")))
    e.apply(3, etcd_cmd(pb.CompactionRequest(revision=2)))  # only the history differs
    d.applied_index = e.applied_index
    assert d.fingerprint() != e.fingerprint()


def test_fsm_loads_version_2_snapshots() -> None:
    m = KVStateMachine()
    m.apply(1, encode_put(1, 1, b"k", b"v"))
    data = m.dump()
    etcd_len = len(MVCCStore().dump())
    body = data[: -4 - 8 - etcd_len]  # without the etcd section and the CRC
    assert data[len(body) : len(body) + 8] == struct.pack("<Q", etcd_len)
    v2 = bytearray(body)
    struct.pack_into("<H", v2, 4, 2)
    v2 += struct.pack("<I", crc32c(bytes(v2)))
    twin = KVStateMachine()
    twin.apply(1, etcd_cmd(pb.PutRequest(key=b"etcd")))
    twin.load(bytes(v2))
    assert twin.get(b"k") == b"v"
    assert twin.etcd == MVCCStore()  # no etcd keyspace in version 2: an empty one
    assert twin.fingerprint() == m.fingerprint()


def test_fsm_rejects_a_corrupt_etcd_section() -> None:
    m = _fsm_with_etcd()
    data = m.dump()
    etcd = m.etcd.dump()
    at = data.index(etcd)
    target = KVStateMachine()
    target.apply(1, etcd_cmd(pb.PutRequest(key=b"mine")))
    before = target.dump()
    for i in (0, 10, len(etcd) // 2, len(etcd) - 1):  # inside the etcd section, outer CRC fixed
        damaged = bytearray(data[:-4])
        damaged[at + i] ^= 0x01
        damaged += struct.pack("<I", crc32c(bytes(damaged)))
        with pytest.raises(CorruptionError):
            target.load(bytes(damaged))
        assert target.dump() == before  # unchanged


# -- what a request may make a node do (the etcd API's checks before proposing) -------------------


def _op(**kw: Any) -> pb.RequestOp:
    return pb.RequestOp(**kw)


def _put_op(key: bytes) -> pb.RequestOp:
    return _op(request_put=pb.PutRequest(key=key, value=b"v"))


def _del_op(key: bytes, range_end: bytes = b"") -> pb.RequestOp:
    return _op(request_delete_range=pb.DeleteRangeRequest(key=key, range_end=range_end))


def _nested(success: list, failure: list = ()) -> pb.RequestOp:
    return _op(request_txn=pb.TxnRequest(success=success, failure=list(failure)))


def test_txn_checks_as_etcd_and_in_bounded_time() -> None:
    from raftfast.etcd.api import MAX_TXN_TOTAL_OPS, _check_txn

    def check(*success: pb.RequestOp) -> None:
        _check_txn(pb.TxnRequest(success=list(success)), 0)

    check(_nested([_put_op(b"a")], [_put_op(b"a")]))  # (one branch runs: etcd allows it)
    check(_nested([_del_op(b"a")], [_put_op(b"a")]))
    # etcd takes a delete's range_end literally there: "from a key" ("\0") and an empty
    # range cover nothing, so these run on etcd (3.4 and 3.5) and must here
    check(_del_op(b"a", b"\0"), _put_op(b"b"))
    check(_del_op(b"\0", b"\0"), _put_op(b"b"))
    check(_del_op(b"a", b"\0"), _nested([_put_op(b"zz")]))
    check(_del_op(b"c", b"a"), _put_op(b"b"))
    for bad in (
        (_put_op(b"a"), _put_op(b"a")),
        (_put_op(b"b"), _del_op(b"a", b"c")),
        (_del_op(b"a", b"zzz"), _nested([_put_op(b"zz")])),  # a delete above a nested put
        (_nested([_put_op(b"a")]), _nested([_put_op(b"a")])),
    ):
        with pytest.raises(EtcdError) as info:
            check(*bad)
        assert info.value == errors.DUPLICATE_KEY
    with pytest.raises(EtcdError) as info:
        check(pb.RequestOp())  # an empty op: etcd's "key not found"
    assert info.value == errors.KEY_NOT_FOUND
    # 117,000 puts nested 4 deep (1.47 MB, under --max-request-bytes) took 0.8 s to check and
    # as long to apply, on every node: an election per request
    big = [
        _nested([_nested([_put_op(bytes([i, j, k])) for k in range(128)]) for j in range(8)])
        for i in range(120)
    ]
    with pytest.raises(EtcdError, match=f"more than {MAX_TXN_TOTAL_OPS}"):
        check(*big)
    check(*big[:3])  # (3 x 8 x 129 + 3: within the bound)


def test_an_answer_too_big_to_send_writes_nothing() -> None:
    # A DeleteRange (or a Txn of puts) with prev_kv over 64 MiB of values was applied, and its
    # answer refused by gRPC: the client was told it failed.
    store = MVCCStore()
    value = b"x" * (1 << 20)
    for i in range(70):
        put(store, b"big/%02d" % i, value)
    before = store.revision
    result = apply(store, pb.DeleteRangeRequest(key=b"big/", range_end=b"big0", prev_kv=True))
    assert isinstance(result, EtcdError) and "too big" in result.message
    txn = pb.TxnRequest(
        success=[
            _op(request_put=pb.PutRequest(key=b"big/%02d" % i, value=b"y", prev_kv=True))
            for i in range(70)
        ]
    )
    result = apply(store, txn)
    assert isinstance(result, EtcdError) and "too big" in result.message
    assert store.revision == before
    assert delete(store, b"big/", b"big0").deleted == 70  # (without prev_kv: nothing to send)


def test_member_urls_name_a_host() -> None:
    from raftfast.etcd.api import _address_of_url

    assert _address_of_url("http://10.0.0.1:2380") == "10.0.0.1:2380"
    assert _address_of_url("https://node-1.example:2380/") == "node-1.example:2380"
    assert _address_of_url("http://[::1]:2380") == "[::1]:2380"
    for bad in ("http://%zz:1", "http://a b:1", "http://:1", "ftp://h:1", "http://h"):
        with pytest.raises(EtcdError) as info:
            _address_of_url(bad)
        assert info.value == errors.MEMBER_BAD_URLS


def test_the_api_reads_an_old_revision_in_parts_with_the_header_of_the_state_read(
    monkeypatch,
) -> None:
    # Writes between the parts are not seen, and the header names the revision the state was
    # taken at (etcd's read transaction), not the store's when the walk ended (a review).
    import asyncio
    import types

    from raftfast.etcd import api as etcd_api
    from raftfast.etcd import mvcc

    monkeypatch.setattr(mvcc, "_HISTORY_PART", 1)
    store = MVCCStore()
    for i in range(5):
        ok(store, pb.PutRequest(key=b"a", value=b"%d" % i))

    class Driver:
        fsm = types.SimpleNamespace(etcd=store)
        raw = types.SimpleNamespace(term=1)

    api = etcd_api.EtcdAPI.__new__(etcd_api.EtcdAPI)
    api.driver, api.cluster_id, api.member_id = Driver(), 1, 1
    api._stepped_reads = asyncio.Semaphore(1)

    async def main() -> tuple[pb.RangeResponse, int]:
        read = asyncio.ensure_future(api._range(R(key=b"a", revision=3, serializable=True)))
        await asyncio.sleep(0)
        taken_at = store.revision
        for _ in range(3):
            ok(store, pb.PutRequest(key=b"a", value=b"later"))
        return await read, taken_at

    response, taken_at = asyncio.run(main())
    assert [(kv.key, kv.value) for kv in response.kvs] == [(b"a", b"1")]
    assert response.header.revision == taken_at < store.revision


class _NoWalk(list):
    """A history that fails the test if walked (read_cost must not)."""

    def __iter__(self):
        raise AssertionError("the history was walked")


def test_read_cost_counts_the_events_since_a_revision_without_walking_the_history() -> None:
    store = MVCCStore()
    for i in range(300):
        put(store, b"k%d" % (i % 7))
    delete(store, b"k", b"l")  # (a revision of 7 events)
    for i in range(50):
        put(store, b"x%d" % i)

    def check(s: MVCCStore, ranges: bool = True) -> None:
        kept = list(s._history)
        s._history = _NoWalk(kept)
        try:
            for rev in (1, 2, s.compact_revision, s.compact_revision + 1, 150, 300, 301, 302):
                if rev <= s.compact_revision and rev > 0:
                    continue
                r = pb.RangeRequest(key=b"k0", revision=rev)
                start = max(rev + 1 - s._history_base, 0)
                since = sum(len(events) for events in kept[start:])
                assert s.events_since(rev) == since, rev
                if ranges and 0 < rev != s.revision:  # (0: the newest revision)
                    assert s.read_cost(r) == s.count_in(b"k0", b"") + since, rev
            assert s.events_since(s.revision) == 0
            assert s.events_since(s.revision + 10) == 0
        finally:
            s._history = kept

    check(store)
    compact(store, 120)
    check(store)
    check(store.frozen(), ranges=False)  # (a snapshot's twin: its history only)
    check(MVCCStore.load(store.dump()))
    compact(store, store.revision)  # (every revision's events dropped)
    check(store)
    put(store, b"y")
    check(store)


def test_live_keys_count_what_they_cost_after_the_history_is_compacted() -> None:
    # After a compaction the quota saw only the live keys' bytes: 1,000,000 keys of 4 bytes
    # were 4 MB to it and ~270 MB of every node. Each counts LIVE_KEY_OVERHEAD besides.
    store = MVCCStore()
    for i in range(50):
        store.apply(encode(pb.PutRequest(key=b"k%02d" % i, value=b"x" * (i % 3))))
    store.apply(encode(pb.DeleteRangeRequest(key=b"k00", range_end=b"k10")))
    store.compact(store.revision)
    live = sum(len(k) + len(r.value) for k, r in store.kvs.items())
    assert store.size_bytes == live + 40 * LIVE_KEY_OVERHEAD
    assert MVCCStore.load(store.dump()).size_bytes == store.size_bytes
