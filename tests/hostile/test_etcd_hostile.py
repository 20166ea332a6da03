"""Hostile input on etcd's v3 API (raftfast.etcd) against a real 3-node cluster (plain mode):
every method of KV, Watch, Lease, Cluster and Maintenance, sent to the leader and to a follower
(which hands leader work over Peer.Forward), with extreme values (0, -1, -2**63, 2**63-1,
2**64-1), unknown enum values, empty, huge and over-limit keys and values, nested and huge
Txns, garbage bytes, thousands of watchers, and hypothesis-generated requests.

Every error must be a clear one: a status other than INTERNAL or UNKNOWN whose message starts
with "etcdserver:" (or gRPC's own RESOURCE_EXHAUSTED for a message past its size limit). After
the barrage every node runs, serves, and holds the same keyspace (HashKV at one revision); a
node killed and started again gets its state back (its snapshot and WAL hold every value the
API accepted). Each test here once found a hole; their comments say which.

    RAFTFAST_HOSTILE_EXAMPLES=2000 pytest tests/hostile     (what `make soak` runs)
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from google.protobuf.internal.encoder import _VarintBytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raftfast.etcd.api import MAX_LEASE_KEYS, member_id
from raftfast.proto.etcd import rpc_pb2 as pb
from raftfast.proto.etcd import rpc_pb2_grpc as pb_grpc
from raftfast.tools.localcluster import wait_for

from .harness import Trio, rss_bytes, running

EXAMPLES = int(os.environ.get("RAFTFAST_HOSTILE_EXAMPLES", "200"))
SOAK = EXAMPLES > 200
CRASHES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
T = 30.0  # seconds any call may take (generous: a loaded 2-core machine)
MAX_REQUEST = 1536 * 1024  # the nodes' --max-request-bytes (the default)
I64 = [0, 1, -1, -(2**63), 2**63 - 1]
U64 = [0, 1, 2**63 - 1, 2**63, 2**64 - 1]
ENUMS = [0, 1, 2, 3, 4, 5, -1, 2**31 - 1, -(2**31)]
ROLES = ["leader", "follower"]
EXTREME_LEASES = [-(2**63), -1, 2**63 - 1]

hostile = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not SOAK,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> Iterator[Trio]:
    with running(tmp_path_factory.mktemp("etcd-hostile"), ["--snapshot-entries", "300"]) as t:
        yield t


class Etcd:
    """etcd stubs for one node."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.kv = pb_grpc.KVStub(channel)
        self.watch = pb_grpc.WatchStub(channel)
        self.lease = pb_grpc.LeaseStub(channel)
        self.cluster = pb_grpc.ClusterStub(channel)
        self.maintenance = pb_grpc.MaintenanceStub(channel)


def etcd(trio: Trio, nid: str) -> Etcd:
    return Etcd(trio.channels[nid])


def node(trio: Trio, role: str) -> str:
    return trio.leader() if role == "leader" else trio.follower()


def clear(call: Callable[[], object]) -> object | grpc.RpcError:
    """Run a call: its answer, or its error, which must be a clear one."""
    try:
        return call()
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
        assert code not in CRASHES, (code, details)
        assert details.startswith("etcdserver:") or code == grpc.StatusCode.RESOURCE_EXHAUSTED, (
            code,
            details,
        )
        return exc


def refused(call: Callable[[], object], code: grpc.StatusCode, text: str = "") -> str:
    answer = clear(call)
    assert isinstance(answer, grpc.RpcError), f"accepted: {answer}"
    assert answer.code() == code, (answer.code(), answer.details())
    assert text in answer.details(), answer.details()
    return answer.details()


def served(trio: Trio) -> None:
    """Every node runs, and answers a put and a get through the etcd API."""
    trio.alive()
    for nid in trio.ids:
        e = etcd(trio, nid)
        key = b"served/" + nid.encode()
        e.kv.Put(pb.PutRequest(key=key, value=b"ok"), timeout=T)
        got = e.kv.Range(pb.RangeRequest(key=key), timeout=T)
        assert [kv.value for kv in got.kvs] == [b"ok"], nid


def revision(trio: Trio, nid: str) -> int:
    got = etcd(trio, nid).kv.Range(pb.RangeRequest(key=b"-", serializable=True), timeout=T)
    return got.header.revision


def assert_agree(trio: Trio) -> int:
    """Every node reaches the leader's revision and has the same keyspace there (HashKV)."""
    leader = trio.leader()
    rev = etcd(trio, leader).kv.Range(pb.RangeRequest(key=b"-"), timeout=T).header.revision
    hashes = {}
    for nid in trio.ids:
        wait_for(f"{nid} at revision {rev}", lambda n=nid: revision(trio, n) >= rev, timeout=60)
        got = etcd(trio, nid).maintenance.HashKV(pb.HashKVRequest(revision=rev), timeout=T)
        hashes[nid] = (got.hash, got.compact_revision)
    assert len(set(hashes.values())) == 1, hashes
    return rev


def nested_txn(depth: int) -> bytes:
    """A Txn ``depth`` levels deep, encoded by hand (protobuf's Python objects refuse to be
    built past its parse limit)."""
    data = pb.TxnRequest(
        success=[pb.RequestOp(request_put=pb.PutRequest(key=b"deep"))]
    ).SerializeToString()
    for _ in range(depth - 1):
        op = b"\x22" + _VarintBytes(len(data)) + data  # RequestOp.request_txn
        data = b"\x12" + _VarintBytes(len(op)) + op  # TxnRequest.success
    return data


def send_raw(channel: grpc.Channel, path: str, streaming: bool, data: bytes) -> object:
    """``data`` as the request of method ``path`` (as one message of its stream)."""
    if streaming:
        return list(channel.stream_stream(path)(iter([data]), timeout=T))
    return channel.unary_unary(path)(data, timeout=T)


# -- garbage -----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_garbage_bytes_get_invalid_argument_on_every_method(trio, role):
    # Bytes that are no message were answered UNKNOWN ("Unexpected DecodeError") by every
    # method, and INTERNAL by Watch; so was a Txn nested past protobuf's depth limit.
    e = etcd(trio, node(trio, role))
    garbage = [b"\xff\xff\xff", b"\x0a\xff", b"\x08" + b"\xff" * 11]
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            payloads = garbage + (
                [nested_txn(60), nested_txn(5000)] if method.name == "Txn" else []
            )
            for data in payloads:
                details = refused(
                    lambda p=path, m=method, d=data: send_raw(e.channel, p, m.client_streaming, d),
                    grpc.StatusCode.INVALID_ARGUMENT,
                )
                assert "malformed" in details, (path, details)
    served(trio)


# -- KV ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_extreme_numbers_in_kv_requests(trio, role):
    e = etcd(trio, node(trio, role))
    kv = e.kv
    kv.DeleteRange(pb.DeleteRangeRequest(key=b"n/", range_end=b"n0"), timeout=T)
    kv.Put(pb.PutRequest(key=b"n/a", value=b"v"), timeout=T)
    for v in I64:
        for serializable in (False, True):
            r = pb.RangeRequest(key=b"n/", range_end=b"n0", serializable=serializable)
            for field in ("revision", "limit", "min_mod_revision", "max_mod_revision"):
                setattr(r, field, v)
                clear(lambda r=r: kv.Range(r, timeout=T))
                r.ClearField(field)
            for field in ("min_create_revision", "max_create_revision"):
                setattr(r, field, v)
                clear(lambda r=r: kv.Range(r, timeout=T))
                r.ClearField(field)
        clear(lambda v=v: kv.Compact(pb.CompactionRequest(revision=v), timeout=T))
        clear(lambda v=v: kv.Put(pb.PutRequest(key=b"n/a", lease=v), timeout=T))
        compare = pb.Compare(key=b"n/a", version=v, result=pb.Compare.GREATER)
        clear(lambda c=compare: kv.Txn(pb.TxnRequest(compare=[c]), timeout=T))
    # A limit of 2**63-1 was INTERNAL at the leader, UNKNOWN at a follower (islice's bound);
    # in a Txn the write was refused.
    got = kv.Range(pb.RangeRequest(key=b"n/", range_end=b"n0", limit=2**63 - 1), timeout=T)
    assert [x.key for x in got.kvs] == [b"n/a"] and not got.more
    op = pb.RequestOp(request_range=pb.RangeRequest(key=b"n/", range_end=b"n0", limit=2**63 - 1))
    put = pb.RequestOp(request_put=pb.PutRequest(key=b"n/b"))
    got = kv.Txn(pb.TxnRequest(success=[op, put]), timeout=T)
    assert [x.key for x in got.responses[0].response_range.kvs] == [b"n/a"]
    refused(
        lambda: kv.Range(pb.RangeRequest(key=b"n/", revision=2**63 - 1), timeout=T),
        grpc.StatusCode.OUT_OF_RANGE,
    )
    refused(
        lambda: kv.Compact(pb.CompactionRequest(revision=2**63 - 1), timeout=T),
        grpc.StatusCode.OUT_OF_RANGE,
    )
    served(trio)


@pytest.mark.parametrize("role", ROLES)
def test_unknown_enum_values_in_kv_requests(trio, role):
    kv = etcd(trio, node(trio, role)).kv
    kv.Put(pb.PutRequest(key=b"e/a", value=b"v"), timeout=T)
    for value in ENUMS:
        r = pb.RangeRequest(key=b"e/", range_end=b"e0", sort_order=value, sort_target=value)
        clear(lambda r=r: kv.Range(r, timeout=T))
        txn = pb.TxnRequest(success=[pb.RequestOp(request_range=r)])
        clear(lambda t=txn: kv.Txn(t, timeout=T))
        for result, target in [(value, 0), (0, value)]:
            compare = pb.Compare(key=b"e/a", result=result, target=target, version=1)
            txn = pb.TxnRequest(compare=[compare])
            answer = clear(lambda t=txn: kv.Txn(t, timeout=T))
            if value not in range(4 if result == value else 5):
                # (an unknown compare result or target was taken, and compared false)
                assert isinstance(answer, grpc.RpcError), (result, target)
                assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT
    served(trio)


@pytest.mark.parametrize("role", ROLES)
def test_empty_huge_and_odd_keys_and_values(trio, role):
    kv = etcd(trio, node(trio, role)).kv
    empty = grpc.StatusCode.INVALID_ARGUMENT
    refused(lambda: kv.Put(pb.PutRequest(key=b""), timeout=T), empty, "key is not provided")
    refused(lambda: kv.Range(pb.RangeRequest(key=b""), timeout=T), empty)
    refused(lambda: kv.DeleteRange(pb.DeleteRangeRequest(key=b""), timeout=T), empty)
    kv.Put(pb.PutRequest(key=b"\0", value=b"nul"), timeout=T)
    assert kv.Range(pb.RangeRequest(key=b"\0"), timeout=T).kvs[0].value == b"nul"
    for end in (b"a", b"\x01", b"\0\0"):  # range_end < key: nothing
        assert not kv.Range(pb.RangeRequest(key=b"b", range_end=end), timeout=T).kvs
        assert (
            kv.DeleteRange(pb.DeleteRangeRequest(key=b"b", range_end=end), timeout=T).deleted == 0
        )
    # the largest value a request may hold, and one byte more
    room = MAX_REQUEST - 16
    while pb.PutRequest(key=b"big", value=b"v" * (room + 1)).ByteSize() <= MAX_REQUEST:
        room += 1
    kv.Put(pb.PutRequest(key=b"big", value=b"v" * room), timeout=T)
    assert len(kv.Range(pb.RangeRequest(key=b"big"), timeout=T).kvs[0].value) == room
    over = pb.PutRequest(key=b"big", value=b"v" * (room + 1))
    refused(lambda: kv.Put(over, timeout=T), empty, "request is too large")
    refused(lambda: kv.Put(pb.PutRequest(key=b"k" * (MAX_REQUEST + 1)), timeout=T), empty)
    # past gRPC's own limit on the port (64 MiB): its RESOURCE_EXHAUSTED
    huge = pb.PutRequest(key=b"huge", value=b"h" * (65 << 20))
    refused(lambda: kv.Put(huge, timeout=T), grpc.StatusCode.RESOURCE_EXHAUSTED)
    served(trio)


@pytest.mark.parametrize("role", ROLES)
def test_txns_with_many_ops_duplicates_and_deep_nesting(trio, role):
    kv = etcd(trio, node(trio, role)).kv
    bad = grpc.StatusCode.INVALID_ARGUMENT

    def puts(n: int, prefix: bytes = b"t/") -> list[pb.RequestOp]:
        return [pb.RequestOp(request_put=pb.PutRequest(key=prefix + b"%d" % i)) for i in range(n)]

    assert kv.Txn(pb.TxnRequest(success=puts(128)), timeout=T).succeeded
    refused(lambda: kv.Txn(pb.TxnRequest(success=puts(129)), timeout=T), bad, "too many")
    refused(lambda: kv.Txn(pb.TxnRequest(failure=puts(10_000)), timeout=T), bad, "too many")
    many = [pb.Compare(key=b"t/0")] * 129
    refused(lambda: kv.Txn(pb.TxnRequest(compare=many), timeout=T), bad, "too many")
    twice = puts(1) * 2
    refused(lambda: kv.Txn(pb.TxnRequest(success=twice), timeout=T), bad, "duplicate key")
    txn = trio.channels[node(trio, role)].unary_unary("/etcdserverpb.KV/Txn")
    assert pb.TxnResponse.FromString(txn(nested_txn(16), timeout=T)).succeeded
    refused(lambda: txn(nested_txn(17), timeout=T), bad, "nested")
    refused(lambda: txn(nested_txn(50), timeout=T), bad, "nested")
    served(trio)


def test_a_txn_of_a_hundred_thousand_puts_and_deletes_is_checked_at_once(trio):
    # Its duplicate-key check compared every put with every delete: a 1.4 MB request of 65,536
    # puts and 65,536 deletes kept the event loop of the node it reached busy for hours. Then
    # a 1.47 MB txn of 117,000 puts took 0.8 s to check and as long to apply on every node (an
    # election each time): a txn holds at most 4,096 operations in all now.
    kv = etcd(trio, trio.follower()).kv

    def txn_of(mids: int) -> pb.TxnRequest:
        txn = pb.TxnRequest()
        for half, op in enumerate(("request_put", "request_delete_range")):
            for i in range(mids):
                mid = txn.success.add().request_txn
                for j in range(16):
                    inner = mid.success.add().request_txn
                    for k in range(8):
                        key = b"p%06d" % (((i * 16) + j) * 8 + k) if not half else b"z"
                        getattr(inner.success.add(), op).key = key
        # (the last op puts a key the first one put: refused, once all was looked at)
        last = txn.success[-1].request_txn.success[-1].request_txn.success[-1]
        last.request_put.key = b"p000000"
        return txn

    huge = txn_of(64)  # (16,384 puts and deletes)
    assert huge.ByteSize() < MAX_REQUEST
    for txn, refusal in ((huge, "more than 4096"), (txn_of(14), "duplicate key")):
        started = time.monotonic()
        refused(lambda t=txn: kv.Txn(t, timeout=T), grpc.StatusCode.INVALID_ARGUMENT, refusal)
        assert time.monotonic() - started < 20
    served(trio)


def test_a_nested_txn_cannot_make_every_node_read_gigabytes(trio):
    # 1,024 ranges over the keyspace in one 10 KB txn (8 nested txns of 128) made every node
    # build their answers in apply: seconds per thousand keys, gigabytes for a 1.4 MB request.
    kv = etcd(trio, trio.leader()).kv
    value = b"r" * 2048
    for i in range(0, 1024, 128):
        ops = [
            pb.RequestOp(request_put=pb.PutRequest(key=b"read/%04d" % (i + j), value=value))
            for j in range(128)
        ]
        kv.Txn(pb.TxnRequest(success=ops), timeout=T)
    everything = pb.RequestOp(request_range=pb.RangeRequest(key=b"\0", range_end=b"\0"))
    txn = pb.TxnRequest()
    for _ in range(8):
        txn.success.add().request_txn.success.extend([everything] * 128)
    before = revision(trio, trio.leader())
    for nid in (trio.leader(), trio.follower()):
        started = time.monotonic()
        refused(
            lambda n=nid: etcd(trio, n).kv.Txn(txn, timeout=T),
            grpc.StatusCode.INVALID_ARGUMENT,
            "the txn would read",  # (counted before it is proposed: MAX_TXN_READ_KEYS)
        )
        assert time.monotonic() - started < 20
    assert revision(trio, trio.leader()) == before  # (nothing of it applied)
    kv.DeleteRange(pb.DeleteRangeRequest(key=b"read/", range_end=b"read0"), timeout=T)
    served(trio)


# -- Watch -------------------------------------------------------------------------------------


class Stream:
    """A Watch stream: requests sent as they come, answers collected on a thread."""

    def __init__(self, e: Etcd) -> None:
        self._requests: list[pb.WatchRequest | None] = []
        self._more = threading.Condition()
        self.answers: list[pb.WatchResponse] = []
        self.error: grpc.RpcError | None = None
        self._call = e.watch.Watch(self._iterate(), timeout=120)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _iterate(self) -> Iterator[pb.WatchRequest]:
        i = 0
        while True:
            with self._more:
                self._more.wait_for(lambda i=i: len(self._requests) > i)
                request = self._requests[i]
            if request is None:
                return
            yield request
            i += 1

    def _read(self) -> None:
        try:
            for answer in self._call:
                self.answers.append(answer)
        except grpc.RpcError as exc:
            self.error = exc

    def send(self, *requests: pb.WatchRequest | None) -> None:
        with self._more:
            self._requests.extend(requests)
            self._more.notify_all()

    def wait(self, what: str, check: Callable[[list[pb.WatchResponse]], bool]) -> None:
        def ready() -> bool:
            assert self.error is None, (self.error.code(), self.error.details())
            return check(self.answers)

        wait_for(what, ready, timeout=60)

    def close(self) -> None:
        self.send(None)
        self._call.cancel()
        self._reader.join(timeout=10)


def create(**fields) -> pb.WatchRequest:
    return pb.WatchRequest(create_request=pb.WatchCreateRequest(**fields))


def cancel(watch_id: int) -> pb.WatchRequest:
    return pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=watch_id))


@pytest.mark.parametrize("role", ROLES)
def test_hostile_watch_requests(trio, role):
    nid = node(trio, role)
    e = etcd(trio, nid)
    stream = Stream(e)
    try:
        requests = [
            create(key=b"w/a", watch_id=-1),
            create(key=b"w/a", watch_id=-(2**63)),
            create(key=b"w/a", watch_id=2**63 - 1),
            create(key=b"w/a", watch_id=2**63 - 1),  # (in use)
            create(key=b"w/a", start_revision=-1),
            create(key=b"w/a", start_revision=-(2**63)),
            create(key=b"w/a", start_revision=2**63 - 1),
            create(key=b""),
            create(key=b"w/b", range_end=b"w/a"),
            create(key=b"\0", range_end=b"\0", filters=[0, 1, 2, -1, 2**31 - 1]),
            create(key=b"w/" + b"k" * MAX_REQUEST),  # (bigger than a request may be)
            cancel(-1),
            cancel(2**63 - 2),
            pb.WatchRequest(progress_request=pb.WatchProgressRequest()),
            pb.WatchRequest(),
            create(key=b"w/a"),
        ]
        stream.send(*requests)
        creates = sum(r.HasField("create_request") for r in requests)
        stream.wait("every create answered", lambda a: sum(r.created for r in a) >= creates)
        refusals = [r.cancel_reason for r in stream.answers if r.created and r.canceled]
        assert all(reason.startswith(("etcdserver:", "mvcc:")) for reason in refusals), refusals
        # 2 negative ids, 1 in use, 2 negative starts, 1 empty range (etcd's), 1 big
        assert len(refusals) == 7, refusals
        assert "mvcc: watcher range is empty" in refusals
        assert any("too large" in reason for reason in refusals)
        live = {r.watch_id for r in stream.answers if r.created and not r.canceled}
        assert 2**63 - 1 in live
        # the stream still works: the last watcher (and the \0 one) see a put
        e.kv.Put(pb.PutRequest(key=b"w/a", value=b"seen"), timeout=T)
        stream.wait(
            "the put seen", lambda a: any(ev.kv.value == b"seen" for r in a for ev in r.events)
        )
        # a watch of the empty key is one of key "\0", as etcd's (it watched nothing)
        e.kv.Put(pb.PutRequest(key=b"\0", value=b"zero"), timeout=T)
        stream.wait("key \\0 seen", lambda a: any(ev.kv.key == b"\0" for r in a for ev in r.events))
        e.kv.DeleteRange(pb.DeleteRangeRequest(key=b"\0"), timeout=T)
        # thousands of watchers: 10,000 on one stream, the next one refused
        first = len(stream.answers)
        stream.send(*[create(key=b"w/many/%d" % i) for i in range(10_000)])
        stream.wait(
            "10,000 creates answered", lambda a: sum(r.created for r in a[first:]) >= 10_000
        )
        answers = [r for r in stream.answers[first:] if r.created]
        assert sum(not r.canceled for r in answers) == 10_000 - len(live)
        assert all("at most 10000" in r.cancel_reason for r in answers if r.canceled)
    finally:
        stream.close()
    served(trio)


def test_a_watcher_far_behind_catches_up(trio):
    # Events of many revisions went out in one WatchResponse: past 64 MiB gRPC refused to send
    # it, the stream died, and a watcher that far behind could never catch up.
    leader = trio.leader()
    kv = etcd(trio, leader).kv
    value = b"b" * (MAX_REQUEST - 64)
    start = kv.Put(pb.PutRequest(key=b"behind", value=value), timeout=T).header.revision
    for _ in range(23):  # (with prev_kv: 3 MB an event, 69 MB)
        kv.Put(pb.PutRequest(key=b"behind", value=value), timeout=T)
    follower = trio.follower()
    stream = Stream(etcd(trio, follower))
    try:
        stream.send(create(key=b"behind", start_revision=start, prev_kv=True))
        stream.wait("24 events", lambda a: sum(len(r.events) for r in a) >= 24)
        revisions = [ev.kv.mod_revision for r in stream.answers for ev in r.events]
        assert revisions == list(range(start, start + 24))
    finally:
        stream.close()
    kv.DeleteRange(pb.DeleteRangeRequest(key=b"behind"), timeout=T)
    served(trio)


def test_a_client_that_never_reads_its_watch_answers_is_held_back(trio):
    # A Watch stream read requests as fast as they came while its answers waited: a client
    # that only wrote (400,000 refused creates) grew the node by 300 MB, without bound.
    nid = trio.follower()
    pid = trio.cluster.procs[nid].pid
    before = rss_bytes(pid)
    sent = []
    done = threading.Event()

    def requests() -> Iterator[pb.WatchRequest]:
        bad = create(key=b"x" * 1000, watch_id=-1)
        for _ in range(200_000):
            sent.append(1)
            yield bad
        done.set()

    call = etcd(trio, nid).watch.Watch(requests(), timeout=120)
    try:
        # nothing read: once the node's outbox and the transport's windows are full, the
        # client's sends block
        stalled = []

        def stuck() -> bool:
            stalled.append(len(sent))
            return len(stalled) > 5 and stalled[-1] == stalled[-6]

        wait_for("the client's sends to block", stuck, timeout=60, every=0.2)
        assert not done.is_set() and len(sent) < 200_000, len(sent)
        assert rss_bytes(pid) - before < 100 << 20, (before, rss_bytes(pid))
    finally:
        call.cancel()
    served(trio)


# -- Lease -------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_extreme_lease_requests(trio, role):
    lease = etcd(trio, node(trio, role)).lease
    kv = etcd(trio, node(trio, role)).kv
    for v in I64:
        clear(lambda v=v: lease.LeaseGrant(pb.LeaseGrantRequest(TTL=v), timeout=T))
        clear(lambda v=v: lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=v), timeout=T))
        clear(
            lambda v=v: lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=v, keys=True), timeout=T)
        )
    refused(
        lambda: lease.LeaseGrant(pb.LeaseGrantRequest(TTL=9_000_000_001), timeout=T),
        grpc.StatusCode.OUT_OF_RANGE,
        "too large lease TTL",
    )
    # leases with the extreme ids, keys on them
    offset = ROLES.index(role)
    for lease_id in (-(2**63) + offset, -1 - offset, 2**63 - 1 - offset):
        granted = lease.LeaseGrant(pb.LeaseGrantRequest(ID=lease_id, TTL=9_000_000_000), timeout=T)
        assert (granted.ID, granted.TTL) == (lease_id, 9_000_000_000)
        kv.Put(pb.PutRequest(key=b"leased/%d" % lease_id, lease=lease_id), timeout=T)
        refused(
            lambda i=lease_id: lease.LeaseGrant(pb.LeaseGrantRequest(ID=i, TTL=5), timeout=T),
            grpc.StatusCode.FAILED_PRECONDITION,
            "lease already exists",
        )
    ids = [-1, 0, 2**63 - 1, -(2**63), -1 - offset] * 200
    answers = list(
        lease.LeaseKeepAlive(iter(pb.LeaseKeepAliveRequest(ID=i) for i in ids), timeout=60)
    )
    assert len(answers) == len(ids)
    live = {a.ID for a in answers if a.TTL}
    assert -1 - offset in live and 0 not in live
    assert len(lease.LeaseLeases(pb.LeaseLeasesRequest(), timeout=T).leases) >= 3
    served(trio)


def test_a_lease_holds_at_most_max_lease_keys(trio):
    # 500,000 keys on one lease: its revoke held every node's loop 4 s (elections), and each
    # LeaseTimeToLive(keys) 0.7 s (a 6 MB answer). A lease now holds at most MAX_LEASE_KEYS.
    leader, follower = etcd(trio, trio.leader()), etcd(trio, trio.follower())
    lease_id = leader.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=600), timeout=T).ID
    keys = [b"full/%05d" % i for i in range(MAX_LEASE_KEYS)]

    def puts(some: list[bytes]) -> list[pb.RequestOp]:
        return [pb.RequestOp(request_put=pb.PutRequest(key=k, lease=lease_id)) for k in some]

    almost = MAX_LEASE_KEYS - 50
    for first in range(0, almost, 128):  # (128 puts a txn branch, etcd's default)
        last = min(first + 128, almost)
        assert leader.kv.Txn(pb.TxnRequest(success=puts(keys[first:last])), timeout=T).succeeded
    # A Txn whose own puts would take it past the bound (the review: 4 + 100 made 104 of 5).
    over = [b"over/%03d" % i for i in range(100)]
    refused(
        lambda: leader.kv.Txn(pb.TxnRequest(failure=puts(over)), timeout=T),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "keys",
    )
    assert leader.kv.Txn(pb.TxnRequest(success=puts(keys[almost:])), timeout=T).succeeded
    one_more = pb.PutRequest(key=b"full/more", value=b"v", lease=lease_id)
    nested = pb.TxnRequest(
        failure=[
            pb.RequestOp(request_txn=pb.TxnRequest(success=[pb.RequestOp(request_put=one_more)]))
        ]
    )
    for kv in (leader.kv, follower.kv):  # (a follower hands the put to the leader)
        refused(
            lambda kv=kv: kv.Put(one_more, timeout=T), grpc.StatusCode.RESOURCE_EXHAUSTED, "keys"
        )
        refused(lambda kv=kv: kv.Txn(nested, timeout=T), grpc.StatusCode.RESOURCE_EXHAUSTED, "keys")
    # A key it holds may be written again; other leases and no lease are as before.
    leader.kv.Put(pb.PutRequest(key=keys[0], value=b"again", lease=lease_id), timeout=T)
    leader.kv.Put(pb.PutRequest(key=b"full/more", value=b"v"), timeout=T)
    answer = leader.lease.LeaseTimeToLive(
        pb.LeaseTimeToLiveRequest(ID=lease_id, keys=True), timeout=T
    )
    assert sorted(answer.keys) == keys
    leader.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=lease_id), timeout=T)
    left = leader.kv.Range(pb.RangeRequest(key=b"full/", range_end=b"full0"), timeout=T)
    assert [kv.key for kv in left.kvs] == [b"full/more"]
    served(trio)


# -- Cluster and Maintenance -------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_member_changes_with_bad_urls_and_unknown_ids(trio, role):
    nid = node(trio, role)
    cluster = etcd(trio, nid).cluster
    bad_urls = [
        [],
        [""],
        ["", ""],
        ["garbage"],
        ["http://"],
        ["http://:1"],
        ["http://h:0"],
        ["http://h:65536"],
        ["http://h:-1"],
        ["http://h:99999999999999999999"],
        ["ftp://h:1"],
        ["unix:///tmp/x"],
        ["http://[::1:2380"],
        ["http://a b:1"],
        ["http://\0:1"],
        ["http://" + "x" * 5000 + ":1"],
        ["http://h:1/path"],
        ["http://h:1?query"],
        ["http://user:pw@h:1"],
        ["http://h:1", "http://h:2"],
    ]
    for urls in bad_urls:
        refused(
            lambda u=urls: cluster.MemberAdd(pb.MemberAddRequest(peerURLs=u), timeout=T),
            grpc.StatusCode.INVALID_ARGUMENT,
            "member URLs are invalid",
        )
    # Another name for a member's address: its peers dialed that member twice, its two streams
    # from each peer took turns replacing each other, and the cluster stopped committing.
    for member in trio.ids:
        port = trio.cluster.addrs[member].rsplit(":", 1)[1]
        for host in ("127.0.0.1", "localhost", "0.0.0.0", "[::ffff:127.0.0.1]"):
            request = pb.MemberAddRequest(peerURLs=[f"http://{host}:{port}"], isLearner=True)
            refused(
                lambda r=request: cluster.MemberAdd(r, timeout=T),
                grpc.StatusCode.FAILED_PRECONDITION,
                "Peer URLs already exists",
            )
    for v in U64:
        if v in {member_id(m) for m in trio.ids}:
            continue
        for call, request in [
            (cluster.MemberRemove, pb.MemberRemoveRequest(ID=v)),
            (cluster.MemberPromote, pb.MemberPromoteRequest(ID=v)),
        ]:
            refused(
                lambda c=call, r=request: c(r, timeout=T),
                grpc.StatusCode.NOT_FOUND,
                "member not found",
            )
    voter = member_id(trio.ids[0])
    refused(
        lambda: cluster.MemberPromote(pb.MemberPromoteRequest(ID=voter), timeout=T),
        grpc.StatusCode.FAILED_PRECONDITION,
        "can only promote a learner",
    )
    clear(lambda: cluster.MemberList(pb.MemberListRequest(linearizable=True), timeout=T))
    # a learner nobody runs: added, never a leader, removed (and the cluster commits after)
    host = f"learner-{role}.invalid:5"
    added = cluster.MemberAdd(
        pb.MemberAddRequest(peerURLs=[f"http://{host}"], isLearner=True), timeout=T
    )
    # (never started: no name and no client URLs yet, as etcd's, so etcdctl says "unstarted")
    assert added.member.name == "" and not added.member.clientURLs and added.member.isLearner
    assert list(added.member.peerURLs) == [f"http://{host}"]
    maintenance = etcd(trio, nid).maintenance
    refused(
        lambda: maintenance.MoveLeader(pb.MoveLeaderRequest(targetID=added.member.ID), timeout=T),
        grpc.StatusCode.FAILED_PRECONDITION,
        "bad leader transferee",
    )
    cluster.MemberRemove(pb.MemberRemoveRequest(ID=added.member.ID), timeout=T)
    assert [
        m.name for m in cluster.MemberList(pb.MemberListRequest(), timeout=T).members
    ] == sorted(trio.ids)
    served(trio)


@pytest.mark.parametrize("role", ROLES)
def test_extreme_maintenance_requests(trio, role):
    nid = node(trio, role)
    m = etcd(trio, nid).maintenance
    kv = etcd(trio, nid).kv
    clear(lambda: m.Status(pb.StatusRequest(), timeout=T))
    clear(lambda: m.Defragment(pb.DefragmentRequest(), timeout=T))
    for v in I64:
        clear(lambda v=v: m.HashKV(pb.HashKVRequest(revision=v), timeout=T))
    for v in U64:
        if v not in {member_id(x) for x in trio.ids}:
            refused(
                lambda v=v: m.MoveLeader(pb.MoveLeaderRequest(targetID=v), timeout=T),
                grpc.StatusCode.FAILED_PRECONDITION,
                "bad leader transferee",
            )
    for action in ENUMS:
        for alarm in ENUMS:
            if action in (1, 2) and alarm in (0, 1):
                continue  # (real ones: below)
            request = pb.AlarmRequest(action=action, alarm=alarm, memberID=2**64 - 1)
            answer = clear(lambda r=request: m.Alarm(r, timeout=T))
            if action not in (0, 1, 2):
                assert isinstance(answer, grpc.RpcError)
                assert answer.code() == grpc.StatusCode.INVALID_ARGUMENT
    # ACTIVATE with no alarm named (NONE, the field's default) changes nothing, as in etcd
    # (it raised NOSPACE: every put refused until someone disarmed)
    m.Alarm(pb.AlarmRequest(action=pb.AlarmRequest.ACTIVATE), timeout=T)
    assert not m.Alarm(pb.AlarmRequest(action=pb.AlarmRequest.GET), timeout=T).alarms
    kv.Put(pb.PutRequest(key=b"not-full", value=b"x"), timeout=T)
    # NOSPACE, raised by a client (as etcd allows), refuses puts until it is disarmed
    m.Alarm(pb.AlarmRequest(action=pb.AlarmRequest.ACTIVATE, alarm=pb.NOSPACE), timeout=T)
    refused(
        lambda: kv.Put(pb.PutRequest(key=b"full", value=b"x"), timeout=T),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "database space exceeded",
    )
    m.Alarm(pb.AlarmRequest(action=pb.AlarmRequest.DEACTIVATE, alarm=pb.NOSPACE), timeout=T)
    wait_for(
        "puts taken again",
        lambda: (
            not isinstance(
                clear(lambda: kv.Put(pb.PutRequest(key=b"full"), timeout=T)), grpc.RpcError
            )
        ),
    )
    served(trio)


# -- generated ---------------------------------------------------------------------------------

i64 = st.one_of(st.sampled_from(I64), st.integers(-(2**63), 2**63 - 1))
u64 = st.one_of(st.sampled_from(U64), st.integers(0, 2**64 - 1))
enum = st.one_of(st.sampled_from(ENUMS), st.integers(-(2**31), 2**31 - 1))
small = st.integers(0, 20)
keys = st.one_of(
    st.sampled_from([b"", b"\0", b"\xff", b"g/", b"g/a", b"g0"]),
    st.binary(max_size=8).map(lambda b: b"g/" + b),
    st.sampled_from([MAX_REQUEST - 64, MAX_REQUEST + 1]).map(lambda n: b"g/" + b"k" * n),
)
values = st.one_of(
    st.binary(max_size=16), st.sampled_from([MAX_REQUEST - 128, MAX_REQUEST]).map(b"v".__mul__)
)
ranges = st.builds(
    pb.RangeRequest,
    key=keys,
    range_end=keys,
    limit=st.one_of(small, i64),
    revision=st.one_of(small, i64),
    sort_order=enum,
    sort_target=enum,
    serializable=st.booleans(),
    keys_only=st.booleans(),
    count_only=st.booleans(),
    min_mod_revision=st.one_of(small, i64),
    max_mod_revision=st.one_of(small, i64),
    min_create_revision=st.one_of(small, i64),
    max_create_revision=st.one_of(small, i64),
)
puts = st.builds(
    pb.PutRequest,
    key=keys,
    value=values,
    lease=st.one_of(st.just(0), i64),
    prev_kv=st.booleans(),
    ignore_value=st.booleans(),
    ignore_lease=st.booleans(),
)
deletes = st.builds(pb.DeleteRangeRequest, key=keys, range_end=keys, prev_kv=st.booleans())
compares = st.builds(
    pb.Compare,
    result=enum,
    target=enum,
    key=keys,
    range_end=keys,
    version=i64,
)


def _ops(txns: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(
        ranges.map(lambda r: pb.RequestOp(request_range=r)),
        puts.map(lambda r: pb.RequestOp(request_put=r)),
        deletes.map(lambda r: pb.RequestOp(request_delete_range=r)),
        txns.map(lambda r: pb.RequestOp(request_txn=r)),
        st.just(pb.RequestOp()),
    )


txns = st.recursive(
    st.builds(pb.TxnRequest, compare=st.lists(compares, max_size=2)),
    lambda inner: st.builds(
        pb.TxnRequest,
        compare=st.lists(compares, max_size=3),
        success=st.lists(_ops(inner), max_size=4),
        failure=st.lists(_ops(inner), max_size=4),
    ),
    max_leaves=12,
)
requests = st.one_of(
    ranges.map(lambda r: ("kv", "Range", r)),
    puts.map(lambda r: ("kv", "Put", r)),
    deletes.map(lambda r: ("kv", "DeleteRange", r)),
    txns.map(lambda r: ("kv", "Txn", r)),
    st.builds(pb.CompactionRequest, revision=i64, physical=st.booleans()).map(
        lambda r: ("kv", "Compact", r)
    ),
    st.builds(pb.LeaseGrantRequest, TTL=i64, ID=i64).map(lambda r: ("lease", "LeaseGrant", r)),
    st.builds(pb.LeaseRevokeRequest, ID=i64).map(lambda r: ("lease", "LeaseRevoke", r)),
    st.builds(pb.LeaseTimeToLiveRequest, ID=i64, keys=st.booleans()).map(
        lambda r: ("lease", "LeaseTimeToLive", r)
    ),
    st.just(("lease", "LeaseLeases", pb.LeaseLeasesRequest())),
    st.builds(pb.MemberListRequest, linearizable=st.booleans()).map(
        lambda r: ("cluster", "MemberList", r)
    ),
    st.builds(pb.MemberRemoveRequest, ID=u64).map(lambda r: ("cluster", "MemberRemove", r)),
    st.builds(pb.MemberPromoteRequest, ID=u64).map(lambda r: ("cluster", "MemberPromote", r)),
    st.builds(pb.HashKVRequest, revision=i64).map(lambda r: ("maintenance", "HashKV", r)),
    st.builds(pb.MoveLeaderRequest, targetID=u64).map(lambda r: ("maintenance", "MoveLeader", r)),
    st.builds(pb.AlarmRequest, action=st.sampled_from([0, 3, -1]), alarm=enum, memberID=u64).map(
        lambda r: ("maintenance", "Alarm", r)
    ),
    st.just(("maintenance", "Status", pb.StatusRequest())),
    st.just(("maintenance", "Defragment", pb.DefragmentRequest())),
)
REAL_MEMBER_IDS: set[int] = set()


@hostile
@given(request=requests, role=st.sampled_from(ROLES))
def test_generated_requests(trio, request, role):
    service, method, message = request
    if not REAL_MEMBER_IDS:
        REAL_MEMBER_IDS.update(member_id(m) for m in trio.ids)
    if service in ("cluster", "maintenance") and method in (
        "MemberRemove",
        "MemberPromote",
        "MoveLeader",
    ):
        target = message.ID if method != "MoveLeader" else message.targetID
        if target in REAL_MEMBER_IDS:
            return  # (removing or promoting real members is no attack)
    stub = getattr(etcd(trio, node(trio, role)), service)
    clear(lambda: getattr(stub, method)(message, timeout=T))
    trio.alive()


# -- after the barrage -------------------------------------------------------------------------


def test_every_node_serves_and_holds_the_same_keyspace(trio):
    served(trio)
    assert_agree(trio)


def test_a_killed_node_gets_every_value_back(trio):
    # extreme values in the state, and a snapshot that holds them
    e = etcd(trio, trio.leader())
    kv = e.kv
    for lease_id in EXTREME_LEASES:
        clear(lambda i=lease_id: e.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=i), timeout=T))
        e.lease.LeaseGrant(pb.LeaseGrantRequest(ID=lease_id, TTL=9_000_000_000), timeout=T)
        kv.Put(pb.PutRequest(key=b"leased/%d" % lease_id, lease=lease_id), timeout=T)
    kv.Put(pb.PutRequest(key=b"\0", value=b"\0" * 1000), timeout=T)
    kv.Put(pb.PutRequest(key=b"\xff" * 1000, value=b"v" * (MAX_REQUEST - 2048)), timeout=T)
    trio.write_acked(310)  # (--snapshot-entries 300: every node snapshots)
    victim = trio.follower()
    trio.cluster.kill(victim)
    alive = [n for n in trio.ids if n != victim]
    kv = etcd(trio, trio.cluster.wait_leader(60, among=alive)).kv
    for i in range(5):
        kv.Put(pb.PutRequest(key=b"while-down/%d" % i, value=b"x" * i), timeout=T)
    trio.cluster.start(victim, first_time=False)
    wait_for(f"{victim} serving", lambda: trio.status(victim).applied_index > 0, timeout=60)
    served(trio)
    assert_agree(trio)
    got = etcd(trio, victim).kv.Range(
        pb.RangeRequest(key=b"leased/", range_end=b"leased0", serializable=True), timeout=T
    )
    assert {kv.lease for kv in got.kvs} >= set(EXTREME_LEASES)
    trio.assert_acked_intact()
