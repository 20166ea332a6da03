"""A real 3-node cluster for the hostile-input tests, and raw ways to reach it: gRPC stubs
that send any message (no client-side checks), and the TCP replication stream.

Every acknowledged write the tests make goes into ``acked``: after hostile traffic, and after a
restart of every node, each of them must still read back. Nothing sleeps to let things settle:
waits poll with a deadline. Every process is stopped by PID (``ProcCluster``).
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import grpc

from raftfast.address import split_address
from raftfast.client import SyncClient
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from raftfast.tools.localcluster import ProcCluster, wait_for
from raftfast.transport.codec import encode_frame
from raftfast.transport.tcp import record

CLUSTER = "raftfast"
ACKED_PREFIX = b"\x00acked/"  # hostile keys never start with it (see the strategies)
T = TypeVar("T")
NO_LIMIT = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


class Trio:
    def __init__(self, tmp: Path, extra: list[str] | None = None) -> None:
        self.cluster = ProcCluster(tmp, n=3, extra=extra)
        self.ids = list(self.cluster.ids)
        self.channels: dict[str, grpc.Channel] = {}
        self.acked: dict[bytes, bytes] = {}
        self._keys = itertools.count()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.cluster.start_all()
        self.channels = {
            nid: grpc.insecure_channel(self.cluster.addrs[nid], options=NO_LIMIT)
            for nid in self.ids
        }
        self.leader()

    def stop(self) -> None:
        for ch in self.channels.values():
            ch.close()
        self.cluster.stop_all()

    def restart_all(self) -> None:
        """SIGTERM every node, start each again from its data directory."""
        self.cluster.stop_all()
        for nid in self.ids:
            self.cluster.start(nid, first_time=False)
        self.leader()

    # -- stubs ----------------------------------------------------------------------------

    def kv(self, nid: str) -> pb_grpc.KVStub:
        return pb_grpc.KVStub(self.channels[nid])

    def peer(self, nid: str) -> pb_grpc.PeerStub:
        return pb_grpc.PeerStub(self.channels[nid])

    def admin(self, nid: str) -> pb_grpc.AdminStub:
        return pb_grpc.AdminStub(self.channels[nid])

    def status(self, nid: str) -> pb.StatusResponse:
        return self.kv(nid).Status(pb.StatusRequest(), timeout=5)

    def at_leader(self, call: Callable[[pb_grpc.KVStub], T], what: str) -> T:
        """``call`` with the leader's KV stub; again at the new leader while the answer is
        UNAVAILABLE (leadership moves on a loaded machine; clients do the same)."""

        def attempt() -> tuple[T] | None:
            try:
                return (call(self.kv(self.leader())),)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    return None
                raise

        return wait_for(what, attempt, timeout=60)[0]

    def leader(self) -> str:
        """The leader every node agrees on (waits for one)."""

        def agreed() -> str | None:
            views = [self.status(nid) for nid in self.ids]
            leaders = {(st.leader, st.term) for st in views}
            if len(leaders) == 1 and views[0].leader:
                return views[0].leader
            return None

        return wait_for("a leader every node knows", agreed, timeout=60)

    def follower(self) -> str:
        leader = self.leader()
        return next(nid for nid in self.ids if nid != leader)

    # -- invariants -----------------------------------------------------------------------

    def alive(self) -> None:
        for nid in self.ids:
            code = self.cluster.exited(nid)
            assert code is None, f"{nid} exited with {code}:\n{self.cluster.log_tail()}"

    def write_acked(self, count: int = 1) -> None:
        """Acknowledged writes through the real client, remembered in ``acked``."""
        with SyncClient(self.cluster.endpoints, timeout=30) as c:
            for _ in range(count):
                key = ACKED_PREFIX + b"%d" % next(self._keys)
                value = b"v" + key
                c.put(key, value)
                self.acked[key] = value

    def assert_healthy(self) -> None:
        """Every node runs and serves; the cluster commits a write that every node applies."""
        self.alive()
        self.write_acked()
        leader = self.leader()
        target = self.status(leader).commit_index
        for nid in self.ids:
            self.cluster.wait_applied(nid, target, f"{nid} to apply {target}", timeout=60)

    def assert_acked_intact(self) -> None:
        """Every acknowledged write reads back, from every node (stale reads: each node's own
        state, once it has applied what the leader committed)."""
        target = self.status(self.leader()).commit_index
        for nid in self.ids:
            self.cluster.wait_applied(nid, target, f"{nid} to apply {target}", timeout=60)
            stub = self.kv(nid)
            for key, value in self.acked.items():
                got = stub.Get(pb.GetRequest(key=key, read_mode=pb.READ_STALE), timeout=10)
                assert (got.found, got.value) == (True, value), (nid, key)

    # -- the TCP replication stream -------------------------------------------------------

    def stream_socket(self, nid: str, timeout: float = 10.0) -> socket.socket:
        offset = self.peer(nid).ReplicationEndpoint(pb.PeerEmpty(), timeout=10).port_offset
        assert offset, f"{nid} offers no TCP replication stream"
        port = split_address(self.cluster.addrs[nid])[1] + offset
        return socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def session_socket(self, nid: str, timeout: float = 10.0) -> socket.socket:
        """A connection to ``nid``'s Session stream over TCP."""
        port = self.status(nid).session_port
        assert port, f"{nid} offers no Session stream over TCP"
        return socket.create_connection(("127.0.0.1", port), timeout=timeout)


@contextmanager
def running(tmp: Path, extra: list[str] | None = None) -> Iterator[Trio]:
    """A started, healthy Trio for a module's tests; its nodes' logs are printed on failure."""
    trio = Trio(tmp, extra)
    try:
        trio.start()
        trio.assert_healthy()
        yield trio
    except BaseException:
        print(trio.cluster.log_tail())
        raise
    finally:
        trio.stop()


def frame(src: str, *msgs: pb.RaftMessage, cluster_id: str = CLUSTER) -> pb.Frame:
    return pb.Frame(cluster_id=cluster_id, src=src, messages=list(msgs))


def handshake(src: str) -> bytes:
    """The record that names a sender on the TCP stream (an empty frame)."""
    return record(encode_frame(CLUSTER, src, []))


def read_refusal(sock: socket.socket) -> pb.StreamRefusal | None:
    """Read until the node closes; its one refusal record, or None if it sent nothing."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    if not received:
        return None
    size = int.from_bytes(received[:4], "big")
    assert len(received) == 4 + size, received[:100]
    return pb.StreamRefusal.FromString(received[4:])


def rss_bytes(pid: int | str = "self", field: str = "VmRSS") -> int:
    """A process's resident memory (``field``: VmRSS now, VmHWM its peak), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")
