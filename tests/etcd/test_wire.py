"""etcd's API read as etcd 3.4 reads the bytes other clients send: a ``range_end`` sent but
empty (etcd's Node.js client sends one for a range with no end; Go's clients leave it out)
means every key from the key on in a Range and in a Txn that only reads (Go decodes it as an
empty slice, not nil), the key alone in a DeleteRange and in a Txn that writes (etcd encodes
those again for its log, where an empty field is left out). Each case checked against etcd
3.4.23 with these very requests."""

from __future__ import annotations

import grpc
import pytest

from raftfast.proto.etcd import rpc_pb2 as pb
from raftfast.proto.etcd import rpc_pb2_grpc as pb_grpc
from raftfast.tools.localcluster import ProcCluster


@pytest.fixture(scope="module")
def kv(tmp_path_factory):
    with ProcCluster(tmp_path_factory.mktemp("wire"), 1) as cluster:
        cluster.wait_leader()
        with grpc.insecure_channel(cluster.addrs["n1"]) as channel:
            yield pb_grpc.KVStub(channel)


def _fill(kv: pb_grpc.KVStub) -> None:
    kv.DeleteRange(pb.DeleteRangeRequest(key=b"\0", range_end=b"\0"), timeout=10)
    for key in (b"a", b"b", b"c", b"c"):  # (c at version 2)
        kv.Put(pb.PutRequest(key=key, value=b"v"), timeout=10)


def _keys(kv: pb_grpc.KVStub) -> list[bytes]:
    return [x.key for x in kv.Range(pb.RangeRequest(key=b"\0", range_end=b"\0"), timeout=10).kvs]


FROM_B = pb.RangeRequest(key=b"b", range_end=b"")  # range_end sent, empty
VERSION_1_FROM_B = pb.Compare(
    key=b"b", range_end=b"", target=pb.Compare.VERSION, result=pb.Compare.EQUAL, version=1
)


def test_a_range_reads_from_the_key_on_a_delete_the_key_alone(kv):
    _fill(kv)
    assert FROM_B.SerializeToString().endswith(b"\x12\x00")  # (on the wire: field 2, empty)
    assert [x.key for x in kv.Range(FROM_B, timeout=10).kvs] == [b"b", b"c"]
    assert [x.key for x in kv.Range(pb.RangeRequest(key=b"b"), timeout=10).kvs] == [b"b"]
    delete = pb.DeleteRangeRequest(key=b"b", range_end=b"")
    assert kv.DeleteRange(delete, timeout=10).deleted == 1
    assert _keys(kv) == [b"a", b"c"]


def test_a_txn_that_only_reads_reads_from_the_key_on_one_that_writes_the_key_alone(kv):
    _fill(kv)
    read = pb.RequestOp(request_range=FROM_B)
    only_reads = pb.TxnRequest(compare=[VERSION_1_FROM_B], success=[read], failure=[read])
    answer = kv.Txn(only_reads, timeout=10)
    assert not answer.succeeded  # (c is at version 2)
    assert [x.key for x in answer.responses[0].response_range.kvs] == [b"b", b"c"]
    put = pb.RequestOp(request_put=pb.PutRequest(key=b"z", value=b"w"))
    writes = pb.TxnRequest(compare=[VERSION_1_FROM_B], success=[read, put], failure=[read, put])
    answer = kv.Txn(writes, timeout=10)
    assert answer.succeeded
    assert [x.key for x in answer.responses[0].response_range.kvs] == [b"b"]
    _fill(kv)
    delete = pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=b"b", range_end=b""))
    assert (
        kv.Txn(pb.TxnRequest(success=[delete]), timeout=10)
        .responses[0]
        .response_delete_range.deleted
        == 1
    )
    assert _keys(kv) == [b"a", b"c"]
