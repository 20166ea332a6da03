"""Requests through etcd's API that are well formed and within every limit, but whose work
held a node's loop for seconds (a hunt over 500,000-1,000,000 keys; the default election
timeout is 300-450 ms): a DeleteRange of every key (2-3 s on every node, elections), a
count of 1,000,000 keys (read one by one), a Range of 400 MB (built, then refused by gRPC),
a snapshot (the keyspace copied: 0.87 s per million keys), a Txn reading 300,000 keys (0.7 s
on every node). Unit level: the real MVCCStore
and EtcdAPI methods, a fake node."""

from __future__ import annotations

import asyncio
import functools
import gc
import random
import time
from operator import attrgetter
from types import SimpleNamespace
from typing import Any

import pytest
from sortedcontainers import SortedDict

from raftfast.etcd import mvcc
from raftfast.etcd.api import MAX_DELETE_KEYS, MAX_RANGE_ANSWER_BYTES, MAX_TXN_READ_KEYS, EtcdAPI
from raftfast.etcd.errors import EtcdError
from raftfast.etcd.mvcc import MVCCStore, Record, encode
from raftfast.proto.etcd import rpc_pb2 as pb
from tests.loop_gaps import longest_gap


def _store(count: int, prefix: bytes = b"k/", value: bytes = b"v") -> MVCCStore:
    store = MVCCStore()
    for i in range(count):
        key = prefix + b"%07d" % i
        store.kvs[key] = Record(key, value, 2, 2, 1, 0)
    store.revision = 2
    return store


class _Counting(SortedDict):
    """A keyspace that counts the records read from it."""

    reads = 0

    def __getitem__(self, key: bytes) -> Any:
        _Counting.reads += 1
        return super().__getitem__(key)


def _api(store: MVCCStore) -> Any:
    """What EtcdAPI's write and range use of a node: proposals applied at once."""

    async def propose(commands: list[bytes]) -> list[Any]:
        return [store.apply(command[1:]) for command in commands]

    fake = SimpleNamespace(
        store=store,
        driver=SimpleNamespace(quota=None, propose=propose),
        header=lambda rev=None: pb.ResponseHeader(revision=store.revision if rev is None else rev),
        _check_lease_room=lambda request: None,
    )
    fake._check_work = lambda request: EtcdAPI._check_work(fake, request)
    fake._read = lambda request: EtcdAPI._read(fake, request)
    fake._stepped_reads = asyncio.Semaphore(2)
    return fake


def _write(store: MVCCStore, request: Any) -> Any:
    return asyncio.run(EtcdAPI.write(_api(store), request))


def test_a_write_that_would_delete_too_many_keys_is_refused_before_it_is_proposed():
    store = _store(MAX_DELETE_KEYS + 1)
    everything = pb.DeleteRangeRequest(key=b"\0", range_end=b"\0")
    with pytest.raises(EtcdError, match=f"delete {MAX_DELETE_KEYS + 1} keys"):
        _write(store, everything)
    deletes = [
        pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=b"k/", range_end=b"k/%07d" % n))
        for n in (MAX_DELETE_KEYS // 2, MAX_DELETE_KEYS // 2 + 1)
    ]
    nested = pb.TxnRequest(failure=[pb.RequestOp(request_txn=pb.TxnRequest(success=deletes))])
    with pytest.raises(EtcdError, match="delete the range in parts"):
        _write(store, nested)  # (every branch counts: ~MAX_DELETE_KEYS + 1 in all)
    assert len(store.kvs) == MAX_DELETE_KEYS + 1 and store.revision == 2  # nothing proposed
    half = pb.RequestOp(
        request_delete_range=pb.DeleteRangeRequest(key=b"k/", range_end=b"k/0040000")
    )
    either = pb.TxnRequest(success=[half], failure=[half])  # (one branch runs: 40,000)
    assert _write(store, either).succeeded
    store = _store(MAX_DELETE_KEYS + 1)
    part = pb.DeleteRangeRequest(key=b"k/", range_end=b"k/%07d" % MAX_DELETE_KEYS)
    assert _write(store, part).deleted == MAX_DELETE_KEYS
    assert _write(store, everything).deleted == 1


def _range_op(**fields: Any) -> pb.RequestOp:
    fields = {"key": b"k/", "range_end": b"k0", **fields}
    return pb.RequestOp(request_range=pb.RangeRequest(**fields))


def test_a_txn_that_would_read_too_many_keys_is_refused_before_it_is_proposed():
    store = _store(MAX_TXN_READ_KEYS + 1)
    flag = pb.RequestOp(request_put=pb.PutRequest(key=b"flag", value=b"1"))
    everything = pb.Compare(key=b"k/", range_end=b"k0", target=pb.Compare.VERSION, version=0)
    for txn in (
        pb.TxnRequest(success=[_range_op()]),
        pb.TxnRequest(success=[flag, _range_op(keys_only=True)]),
        pb.TxnRequest(failure=[_range_op(sort_order=pb.RangeRequest.DESCEND, limit=1)]),
        pb.TxnRequest(success=[_range_op(min_mod_revision=1, limit=1)]),  # (a filter reads all)
        pb.TxnRequest(compare=[everything], success=[flag]),
        pb.TxnRequest(success=[pb.RequestOp(request_txn=pb.TxnRequest(compare=[everything]))]),
    ):
        with pytest.raises(EtcdError, match=f"read {MAX_TXN_READ_KEYS + 1} keys") as caught:
            _write(store, txn)
        assert "in pages" in str(caught.value)
    assert b"flag" not in store.kvs and store.revision == 2  # nothing proposed
    half = _range_op(range_end=b"k/%07d" % (MAX_TXN_READ_KEYS // 2))
    for txn in (
        pb.TxnRequest(success=[flag, _range_op(limit=10)]),  # (reads 11 records)
        pb.TxnRequest(success=[_range_op(count_only=True)]),  # (counted by bisection)
        pb.TxnRequest(success=[half, half]),
        pb.TxnRequest(success=[half], failure=[half]),  # (one branch runs)
    ):
        assert _write(store, txn).succeeded
    assert b"flag" in store.kvs
    few = b"k/%07d" % 10
    old = pb.TxnRequest(success=[_range_op(range_end=few, revision=2)])  # (+ the history since)
    assert _write(store, old).succeeded  # (the flag's put since: one event)
    # One revision of MAX_TXN_READ_KEYS + 1 events since (applied as an old log's would be):
    # counted by its events, not as one revision.
    store.apply(encode(pb.DeleteRangeRequest(key=b"k/", range_end=b"k0")))
    with pytest.raises(EtcdError, match="in pages"):
        _write(store, old)


def test_a_count_reads_no_record_whatever_its_order():
    store = _store(0)
    store.kvs = _Counting(_store(20_000).kvs)
    store.revision = 2
    for sort in ({}, {"sort_order": 2, "sort_target": 4}, {"limit": 5, "sort_order": 1}):
        _Counting.reads = 0
        request = pb.RangeRequest(key=b"k/", range_end=b"k0", count_only=True, **sort)
        response = store.range(request)
        assert response.count == 20_000 and not response.kvs and not response.more
        assert _Counting.reads == 0, sort
    filtered = pb.RangeRequest(key=b"k/", range_end=b"k0", count_only=True, min_mod_revision=3)
    assert store.range(filtered).count == 20_000  # (a filter reads them: as before)


def test_a_range_whose_answer_could_not_be_sent_is_refused_before_it_is_built():
    store = _store(70, value=b"x" * (1 << 20))  # (70 MiB)
    fake = _api(store)
    request = pb.RangeRequest(key=b"k/", range_end=b"k0", serializable=True)
    with pytest.raises(EtcdError, match="read the range in parts") as caught:
        asyncio.run(EtcdAPI._range(fake, request))
    assert str(MAX_RANGE_ANSWER_BYTES) in str(caught.value)
    request.limit = 60
    assert len(asyncio.run(EtcdAPI._range(fake, request)).kvs) == 60
    request.limit, request.keys_only = 0, True
    assert len(asyncio.run(EtcdAPI._range(fake, request)).kvs) == 70


def test_a_txn_charges_a_count_as_before_the_shortcut():
    # A count in a Txn is charged its keys against the Txn's read budget, as when it read
    # them all: the same log entry must fail (or not) on a node of either release.
    from raftfast.etcd.mvcc import _RECORD_COST, MAX_TXN_READ_BYTES

    store = _store(MAX_TXN_READ_BYTES // _RECORD_COST)  # (its count alone passes the budget)
    count = pb.RangeRequest(key=b"k/", range_end=b"k0", count_only=True)
    flag = pb.PutRequest(key=b"flag", value=b"1")
    txn = pb.TxnRequest(success=[pb.RequestOp(request_put=flag), pb.RequestOp(request_range=count)])
    assert isinstance(store.apply(encode(txn)), EtcdError)
    assert b"flag" not in store.kvs and store.revision == 2
    assert store.range(count).count == MAX_TXN_READ_BYTES // _RECORD_COST  # (outside: a count)


def test_a_frozen_store_dumps_as_the_store_did_then():
    store = _store(1_000)
    store.apply(encode(pb.PutRequest(key=b"k/0000005", value=b"new")))
    frozen = store.frozen()
    then = store.dump()
    store.apply(encode(pb.DeleteRangeRequest(key=b"k/", range_end=b"k0")))
    assert frozen.dump() == then and store.dump() != then


def test_a_grant_past_the_most_leases_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Leases had no bound: the leader's lessor looks at each when the set changes and every
    # 0.1 s (100,000 were granted at only ~700 a second; millions would hold its loop).
    from raftfast.etcd import api as etcd_api

    monkeypatch.setattr(etcd_api, "MAX_LEASES", 3)
    store = MVCCStore()
    fake = SimpleNamespace(
        store=store, driver=SimpleNamespace(settings=SimpleNamespace(max_request_bytes=1 << 20))
    )
    for lease_id in (1, 2, 3):
        EtcdAPI.check_request(fake, "Lease/LeaseGrant", pb.LeaseGrantRequest(ID=lease_id, TTL=60))
        store.apply(encode(pb.LeaseGrantRequest(ID=lease_id, TTL=60)))
    with pytest.raises(EtcdError, match="holds 3 leases") as caught:
        EtcdAPI.check_request(fake, "Lease/LeaseGrant", pb.LeaseGrantRequest(ID=4, TTL=60))
    assert caught.value.code.name == "RESOURCE_EXHAUSTED"
    store.apply(encode(pb.LeaseRevokeRequest(ID=2)))
    EtcdAPI.check_request(fake, "Lease/LeaseGrant", pb.LeaseGrantRequest(ID=4, TTL=60))


def test_a_sort_in_steps_is_the_stable_sort_of_everything(monkeypatch):
    monkeypatch.setattr(mvcc, "_WALK_PART", 7)
    rng = random.Random(5)
    records = [Record(b"k%03d" % i, bytes([rng.randrange(4)]), 2, 2, 1, 0) for i in range(100)]
    for reverse in (False, True):
        steps = mvcc._sorted_steps(list(records), attrgetter("value"), reverse)
        pauses = 0
        try:
            while True:
                assert next(steps) is None
                pauses += 1
        except StopIteration as done:
            got = done.value
        # (ties keep key order, as one sort of everything would)
        assert got == sorted(records, key=attrgetter("value"), reverse=reverse)
        assert pauses >= 100 // 7


def test_a_range_of_many_keys_sorted_or_filtered_holds_the_loop_no_step_long():
    # 300,000 keys read at once through etcd's API: sorted by value (~0.2 s at once), filtered
    # (~0.1 s), or made into one message (its KeyValues set off full collections of the
    # cycle collector, each walking the keyspace); three such reads at once cost a hunt's
    # leader its term. Now a part at a time, the answer as bytes made in parts.
    n = 300_000
    store = MVCCStore()
    for i in range(n):
        key = b"k/%07d" % i
        store.kvs[key] = Record(key, b"%07d" % (i * 7919 % n), 2 + i % 5, 2 + i % 5, 1, 0)
    store.revision = 7
    fake = _api(store)
    for extra in (
        {},
        {"sort_order": pb.RangeRequest.DESCEND, "sort_target": pb.RangeRequest.VALUE},
        {"min_mod_revision": 4, "keys_only": True},
    ):
        request = pb.RangeRequest(key=b"k/", range_end=b"k0", serializable=True, **extra)
        once = float("inf")
        for _ in range(2):  # what the answer takes at once, serialized (as it was answered)
            t = time.perf_counter()
            expected = store.range(request)
            expected.SerializeToString()
            once = min(once, time.perf_counter() - t)
        # at once, the reads held the loop 0.05-0.15 s (~1/10 to 1/5 of all that); in
        # steps ~0.002-0.007 s: the best of three runs (a busy machine's pauses out)
        gap = float("inf")
        for _ in range(3):
            gc.collect()
            step, answer = asyncio.run(
                longest_gap(functools.partial(EtcdAPI._range, fake, request))
            )
            gap = min(gap, step)
            got = pb.RangeResponse.FromString(answer) if isinstance(answer, bytes) else answer
            assert got.kvs == expected.kvs and got.count == expected.count, extra
            assert got.header.revision == 7 and not got.more
            if gap < once / 20:
                break
        assert gap < once / 20, (extra, gap, once)
