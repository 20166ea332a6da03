"""A member cut off from its cluster (the two others SIGSTOPped), as etcd 3.4 behaves (a
differential hunt against it):

* a call whose metadata asks for a leader ("hasleader": "true", clientv3.WithRequireLeader:
  etcdctl's watch, Kubernetes' watches) is refused at once with UNAVAILABLE "etcdserver: no
  leader" when the member knows none, whatever the method (a serializable Range, MemberList,
  Status too), a Watch or LeaseKeepAlive stream at its start; such streams opened before are
  ended so once the member has known no leader for three election timeouts. They were
  served, or waited out the client's deadline, and etcdctl's watch on such a member waited
  for ever;
* a request it cannot get done is given up after etcd's request timeout (~7 s) with
  UNAVAILABLE, which clients retry, though the client's deadline is longer (it waited it out:
  DEADLINE_EXCEEDED);
* a Txn of serializable Ranges only is answered by the member itself (it was handed to the
  leader, and timed out: tests/etcd/test_txn_checks.py has the rest).

One cluster for the module; each test stops two members and lets them go on before it ends.
Nothing sleeps to let things settle: every wait polls a condition, with a deadline.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest

from raftfast.proto.etcd import rpc_pb2 as pb
from raftfast.proto.etcd import rpc_pb2_grpc as pb_grpc
from raftfast.tools.localcluster import ProcCluster, wait_for
from tests.etcd.test_etcdctl import ETCDCTL, Stream

HAS_LEADER = (("hasleader", "true"),)
NO_LEADER = "etcdserver: no leader"
TIMEOUT = 30.0  # seconds for anything that should take a moment (CI is a loaded 2-core machine)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with ProcCluster(tmp_path_factory.mktemp("no-leader")) as c:
        c.wait_leader()
        yield c


def _a_follower(c: ProcCluster) -> str:
    leader = c.wait_leader()
    return next(nid for nid in c.ids if nid != leader)


@contextmanager
def _cut_off(c: ProcCluster, survivor: str) -> Iterator[None]:
    """``survivor`` alone: the other two members stopped (SIGSTOP) until the block ends, then
    let go on, and a leader again."""
    stopped = [c.procs[nid].pid for nid in c.ids if nid != survivor]
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    c.wait_leader(timeout=60)


class _StreamCall:
    """A streaming call of the blocking API read by a thread: its responses in order, and
    the error it ended with."""

    def __init__(self, start: Callable[..., Any], first: Any, metadata: Any = None) -> None:
        self.requests: queue.Queue[Any] = queue.Queue()
        self.requests.put(first)
        self.call = start(iter(self.requests.get, None), metadata=metadata, timeout=300)
        self.responses: queue.Queue[Any] = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.done = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self.responses.put(response)
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.done.set()

    def next(self) -> Any:
        try:
            return self.responses.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no response within {TIMEOUT}s (ended: {self.error})") from None

    def ended_with(self) -> tuple[grpc.StatusCode, str]:
        assert self.done.wait(TIMEOUT), "the stream did not end"
        assert self.error is not None, "the stream ended OK"
        return self.error.code(), self.error.details()

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()


def _watch(channel: grpc.Channel, key: bytes, metadata: Any = None) -> _StreamCall:
    create = pb.WatchRequest(create_request=pb.WatchCreateRequest(key=key))
    return _StreamCall(pb_grpc.WatchStub(channel).Watch, create, metadata)


def _refusal(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str] | None:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return None


def test_etcdctl_watch_on_a_member_that_lost_its_leader_is_canceled(cluster):
    assert ETCDCTL is not None, "etcdctl is not installed (`make test` installs it)"
    follower = _a_follower(cluster)
    with cluster.channel(follower) as channel:
        put = pb.PutRequest(key=b"nl/ctl", value=b"1")
        revision = pb_grpc.KVStub(channel).Put(put, timeout=TIMEOUT).header.revision
    # (from that put's revision: the watch is there once it prints it)
    with Stream(cluster, "watch", "nl/ctl", "--rev", revision, nodes=[follower]) as watch:
        assert [watch.line("the event") for _ in range(3)] == ["PUT", "nl/ctl", "1"]
        with _cut_off(cluster, follower):
            # (etcdctl exits, as with etcd, saying why on stderr)
            assert watch.line("its exit") is None
            assert watch.stop() != 0
            said = watch.stderr.splitlines()
            assert f"watch was canceled ({NO_LEADER})" in said, watch.stderr
            assert "Error: watch is canceled by the server" in said, watch.stderr


def test_calls_that_ask_for_a_leader_are_refused_and_their_streams_ended(cluster):
    follower = _a_follower(cluster)
    with cluster.channel(follower) as channel:
        kv, lease = pb_grpc.KVStub(channel), pb_grpc.LeaseStub(channel)
        maintenance, members = pb_grpc.MaintenanceStub(channel), pb_grpc.ClusterStub(channel)
        granted = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=120), timeout=TIMEOUT)
        keep_alive = _StreamCall(
            lease.LeaseKeepAlive, pb.LeaseKeepAliveRequest(ID=granted.ID), HAS_LEADER
        )
        asking, plain = _watch(channel, b"nl/w", HAS_LEADER), _watch(channel, b"nl/w")
        late: list[_StreamCall] = []
        try:
            assert keep_alive.next().TTL > 0
            assert asking.next().created and plain.next().created
            serializable = pb.RangeRequest(key=b"nl/w", serializable=True)
            with _cut_off(cluster, follower):

                def refused_for_no_leader() -> bool:
                    refusal = _refusal(lambda: kv.Range(serializable, metadata=HAS_LEADER))
                    return refusal == (grpc.StatusCode.UNAVAILABLE, NO_LEADER)

                # (once the member has given up on its leader: an election timeout or so)
                wait_for("the member to know no leader", refused_for_no_leader, TIMEOUT)
                # refused at once: within a deadline shorter than etcd's request timeout,
                # which a write or a linearizable read would otherwise wait out
                calls = {
                    "MemberList": lambda: members.MemberList(
                        pb.MemberListRequest(), metadata=HAS_LEADER, timeout=5
                    ),
                    "Status": lambda: maintenance.Status(
                        pb.StatusRequest(), metadata=HAS_LEADER, timeout=5
                    ),
                    "Put": lambda: kv.Put(
                        pb.PutRequest(key=b"nl/w", value=b"x"), metadata=HAS_LEADER, timeout=5
                    ),
                    "Range": lambda: kv.Range(
                        pb.RangeRequest(key=b"nl/w"), metadata=HAS_LEADER, timeout=5
                    ),
                }
                for name, call in calls.items():
                    assert _refusal(call) == (grpc.StatusCode.UNAVAILABLE, NO_LEADER), name
                # the first value of the key counts (etcd's), and no metadata: served
                not_first = (("hasleader", "false"), ("hasleader", "true"))
                assert kv.Range(serializable, metadata=not_first, timeout=TIMEOUT).count == 0
                assert kv.Range(serializable, timeout=TIMEOUT).count == 0
                # a stream asking for one is refused at its start
                late.append(_watch(channel, b"nl/w", HAS_LEADER))
                assert late[0].ended_with() == (grpc.StatusCode.UNAVAILABLE, NO_LEADER)
                # and those opened before are ended (three election timeouts without one)
                assert keep_alive.ended_with() == (grpc.StatusCode.UNAVAILABLE, NO_LEADER)
                assert asking.ended_with() == (grpc.StatusCode.UNAVAILABLE, NO_LEADER)
            # the watch that did not ask goes on, and sees what is written once a leader is back
            put = kv.Put(pb.PutRequest(key=b"nl/w", value=b"after"), timeout=TIMEOUT)
            while True:
                response = plain.next()
                if response.events:
                    break
            assert [(e.kv.value, e.kv.mod_revision) for e in response.events] == [
                (b"after", put.header.revision)
            ]
            assert not plain.done.is_set()
            assert maintenance.Status(pb.StatusRequest(), metadata=HAS_LEADER, timeout=TIMEOUT)
        finally:
            for call in (keep_alive, asking, plain, *late):
                call.close()


def test_a_write_the_member_cannot_get_done_fails_after_etcds_request_timeout(cluster):
    follower = _a_follower(cluster)
    with cluster.channel(follower) as channel, _cut_off(cluster, follower):
        kv = pb_grpc.KVStub(channel)
        started = time.monotonic()
        refusal = _refusal(lambda: kv.Put(pb.PutRequest(key=b"nl/p", value=b"1"), timeout=25))
        took = time.monotonic() - started
        # (UNAVAILABLE, which clients retry, after ~7 s: not the client's deadline waited out)
        assert refusal is not None and refusal[0] == grpc.StatusCode.UNAVAILABLE, refusal
        assert took < 20, took


def test_a_txn_of_serializable_reads_is_answered_by_a_member_cut_off(cluster):
    follower = _a_follower(cluster)
    with cluster.channel(follower) as channel:
        kv = pb_grpc.KVStub(channel)
        put = kv.Put(pb.PutRequest(key=b"nl/t", value=b"1"), timeout=TIMEOUT)
        wait_for(
            f"{follower} to apply the put",
            lambda: kv.Range(pb.RangeRequest(key=b"nl/t", serializable=True)).count,
            TIMEOUT,
        )
        reads = pb.TxnRequest(
            compare=[pb.Compare(key=b"nl/t", target=pb.Compare.VALUE, value=b"1")],
            success=[pb.RequestOp(request_range=pb.RangeRequest(key=b"nl/t", serializable=True))],
        )
        with _cut_off(cluster, follower):
            # (within a deadline shorter than etcd's request timeout: not handed to a leader)
            answer = kv.Txn(reads, timeout=5)
            assert answer.succeeded and answer.header.revision == put.header.revision
            assert [kv.value for kv in answer.responses[0].response_range.kvs] == [b"1"]
