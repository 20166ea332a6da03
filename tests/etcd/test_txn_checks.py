"""Txns checked and answered as etcd 3.4 does (a differential hunt against it):

* a Txn whose operations are all serializable Ranges (or that has none) is answered by the
  member asked, from its own state, proposing nothing (etcd's ``isTxnSerializable``): it was
  handed to the leader, and on a member cut off from it timed out;
* a Txn Range at a negative revision below the first one kept (the compaction's; -1 before
  any) refuses the whole Txn as compacted (etcd's ``checkRequestRange``): it read the current
  revision and applied. Refused before it is proposed, never in the apply: nodes of two
  releases apply the same committed entry the same way during a rolling upgrade;
* a Txn with two problems is refused for its puts' first (a lease not found, a key that
  ignore_value/ignore_lease needs), then for its ranges' revisions (etcd's ``checkRequests``
  over the branches taken, once with checkRequestPut, then with checkRequestRange): it was
  checked an operation at a time.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from raftfast.etcd import errors
from raftfast.etcd.api import MAX_TXN_READ_KEYS, EtcdAPI
from raftfast.etcd.errors import EtcdError
from raftfast.etcd.mvcc import MVCCStore, encode
from raftfast.proto.etcd import rpc_pb2 as pb


class _Transport:
    def __init__(self) -> None:
        self.forwarded: list[str] = []

    async def forward(self, leader: str, method: str, request: bytes, timeout: float):
        self.forwarded.append(method)
        raise errors.TIMEOUT  # (a leader this member cannot reach)


def _node(store: MVCCStore, leader: bool) -> SimpleNamespace:
    """What EtcdAPI uses of a node: the leader (proposals applied at once), or a follower
    whose leader never answers."""

    async def propose(commands: list[bytes]) -> list[Any]:
        return [store.apply(command[1:]) for command in commands]

    async def leader_soon(_timeout: float) -> str:
        return "n1"

    return SimpleNamespace(
        id="n1" if leader else "n2",
        settings=SimpleNamespace(
            cluster_id="default",
            max_request_bytes=1 << 20,
            auto_compaction_mode="revision",
            auto_compaction_retention="0",
        ),
        fsm=SimpleNamespace(etcd=store),
        quota=None,
        propose=propose,
        stopping=False,
        is_leader=leader,
        raw=SimpleNamespace(leader="n1", term=2),
        leader_soon=leader_soon,
        election_timeout_s=0.5,
        transport=_Transport(),
        applied_index=0,
    )


def _call(node: SimpleNamespace, method: str, request: Any, timeout: float = 3.0) -> Any:
    async def main() -> Any:
        return await EtcdAPI(node).handle(method, request, timeout)  # type: ignore[arg-type]

    return asyncio.run(asyncio.wait_for(main(), 30))


def _apply(store: MVCCStore, request: Any) -> Any:
    result = store.apply(encode(request))
    if isinstance(result, EtcdError):
        raise result
    return result


def _store(*keys: bytes) -> MVCCStore:
    store = MVCCStore()
    for key in keys:
        _apply(store, pb.PutRequest(key=key, value=b"v-" + key))
    return store


def _get(key: bytes, **kw: Any) -> pb.RequestOp:
    return pb.RequestOp(request_range=pb.RangeRequest(key=key, **kw))


def _put(key: bytes, **kw: Any) -> pb.RequestOp:
    return pb.RequestOp(request_put=pb.PutRequest(key=key, **kw))


def _absent(key: bytes) -> pb.Compare:
    return pb.Compare(key=key, target=pb.Compare.VERSION, result=pb.Compare.EQUAL, version=0)


# -- serializable txns: answered by the member asked ---------------------------------------------


def test_a_txn_of_serializable_ranges_is_answered_by_a_follower_from_its_own_state():
    store = _store(b"a", b"b")
    follower = _node(store, leader=False)
    txn = pb.TxnRequest(
        compare=[_absent(b"zz")],
        success=[_get(b"a", serializable=True), _get(b"\0", range_end=b"\0", serializable=True)],
        failure=[_get(b"b", serializable=True)],
    )
    answer = _call(follower, "KV/Txn", txn)
    assert follower.transport.forwarded == []  # (it was handed to the leader)
    assert answer.succeeded and answer.header.revision == store.revision == 3
    first, everything = (r.response_range for r in answer.responses)
    assert [kv.value for kv in first.kvs] == [b"v-a"] and everything.count == 2
    assert first.header.revision == 3
    assert answer.header.member_id == EtcdAPI(follower).member_id  # type: ignore[arg-type]
    # as the leader's apply answers it (the same txn through the log, nothing written)
    applied = _apply(_store(b"a", b"b"), txn)
    for mine, theirs in zip(answer.responses, applied.responses, strict=True):
        assert mine.response_range.kvs == theirs.response_range.kvs
        assert mine.response_range.header.revision == theirs.response_range.header.revision
    # no operation at all: serializable too (etcd's isTxnSerializable), compares read here
    bare = _call(follower, "KV/Txn", pb.TxnRequest(compare=[_absent(b"a")]))
    assert not bare.succeeded and list(bare.responses) == []
    assert follower.transport.forwarded == [] and store.revision == 3


def test_a_txn_that_reads_linearizably_or_writes_still_goes_to_the_leader():
    for txn in (
        pb.TxnRequest(success=[_get(b"a", serializable=True), _get(b"b")]),
        pb.TxnRequest(failure=[_get(b"a", serializable=True), _put(b"c", value=b"1")]),
    ):
        follower = _node(_store(b"a"), leader=False)
        with pytest.raises(EtcdError):  # (its leader never answers)
            _call(follower, "KV/Txn", txn, timeout=1.0)
        assert follower.transport.forwarded[:1] == ["KV/Txn"]


def test_a_serializable_txn_is_checked_as_the_leader_checks_one():
    store = _store(*(b"k/%06d" % n for n in range(MAX_TXN_READ_KEYS + 1)))
    follower = _node(store, leader=False)
    everything = pb.TxnRequest(success=[_get(b"k/", range_end=b"k0", serializable=True)])
    with pytest.raises(EtcdError, match="the txn would read"):
        _call(follower, "KV/Txn", everything)
    _apply(store, pb.CompactionRequest(revision=store.revision))
    old = pb.TxnRequest(success=[_get(b"k/", revision=2, serializable=True)])
    with pytest.raises(EtcdError) as raised:
        _call(follower, "KV/Txn", old)
    assert raised.value == errors.COMPACTED
    assert follower.transport.forwarded == []


# -- a negative revision in a txn's range --------------------------------------------------------


def _reads_at(revision: int, serializable: bool = False, **kw: Any) -> pb.TxnRequest:
    return pb.TxnRequest(
        success=[_get(b"a", revision=revision, serializable=serializable), *kw.get("then", [])]
    )


def test_a_txn_range_at_a_negative_revision_below_the_first_kept_is_refused_as_compacted():
    store = _store(b"a")
    for serializable in (False, True):
        leader = _node(store, leader=True)
        # never compacted: the first revision kept is -1, so -1 reads the current one
        answer = _call(leader, "KV/Txn", _reads_at(-1, serializable))
        assert [kv.value for kv in answer.responses[0].response_range.kvs] == [b"v-a"]
        for revision in (-2, -(2**62)):
            for txn in (
                _reads_at(revision, serializable),
                _reads_at(revision, then=[_put(b"b", value=b"1")]),
            ):
                with pytest.raises(EtcdError) as raised:
                    _call(leader, "KV/Txn", txn)
                assert raised.value == errors.COMPACTED
    assert store.revision == 2  # (nothing was written)
    # a nested txn's range on the path taken, and only there
    nested = pb.TxnRequest(
        compare=[_absent(b"a")],
        success=[pb.RequestOp(request_txn=_reads_at(-5))],
        failure=[pb.RequestOp(request_txn=_reads_at(-1)), _put(b"b", value=b"1")],
    )
    assert not _call(_node(store, leader=True), "KV/Txn", nested).succeeded
    assert store.revision == 3
    nested.compare[0].version = 1  # (the branch that reads at -5)
    with pytest.raises(EtcdError) as raised:
        _call(_node(store, leader=True), "KV/Txn", nested)
    assert raised.value == errors.COMPACTED
    # once compacted, any negative revision
    _apply(store, pb.CompactionRequest(revision=store.revision))
    for serializable in (False, True):
        with pytest.raises(EtcdError) as raised:
            _call(_node(store, leader=True), "KV/Txn", _reads_at(-1, serializable))
        assert raised.value == errors.COMPACTED
    assert store.revision == 3


def test_the_apply_of_a_logged_txn_range_at_a_negative_revision_is_unchanged():
    # (a log written by an earlier release holds such entries: every release applies them
    # alike, reading the current revision)
    store = _store(b"a")
    _apply(store, pb.CompactionRequest(revision=2))
    answer = _apply(store, _reads_at(-2, then=[_put(b"b", value=b"1")]))
    assert answer.succeeded and store.revision == 3
    assert [kv.value for kv in answer.responses[0].response_range.kvs] == [b"v-a"]


# -- which problem a txn is refused for ----------------------------------------------------------


def test_a_txn_is_refused_for_its_puts_before_its_ranges_revisions():
    store = _store(b"a", b"b", b"c")
    _apply(store, pb.CompactionRequest(revision=3))
    cases = [
        # (the ops of the branch taken, the error etcd 3.4 answers)
        ([_get(b"a", revision=2), _put(b"a", value=b"1", lease=77)], errors.LEASE_NOT_FOUND),
        ([_put(b"a", value=b"1", lease=77), _get(b"a", revision=2)], errors.LEASE_NOT_FOUND),
        ([_get(b"a", revision=10**9), _put(b"none", ignore_value=True)], errors.KEY_NOT_FOUND),
        ([_get(b"a", revision=10**9), _put(b"none", ignore_lease=True)], errors.KEY_NOT_FOUND),
        # a nested txn's range before a put of the outer one
        (
            [
                pb.RequestOp(request_txn=pb.TxnRequest(success=[_get(b"a", revision=2)])),
                _put(b"b", value=b"1", lease=77),
            ],
            errors.LEASE_NOT_FOUND,
        ),
        # within one put: the key first (etcd's checkRequestPut)
        ([_put(b"none", ignore_value=True, lease=77)], errors.KEY_NOT_FOUND),
        # ranges alone: the first of them
        ([_get(b"a", revision=10**9), _get(b"a", revision=2)], errors.FUTURE_REV),
    ]
    for ops, expected in cases:
        txn = pb.TxnRequest(compare=[_absent(b"zz")], success=ops)
        before = store.revision
        result = store.apply(encode(txn))
        assert result == expected, (ops, result)
        with pytest.raises(EtcdError) as raised:
            _call(_node(store, leader=True), "KV/Txn", txn)
        assert raised.value == expected
        assert store.revision == before
