"""A follower forwards again, at the next leader, a request the leader it could not reach may
have done already but that changes nothing (or nothing twice): a lease keep-alive, a
linearizable read. As etcd's member, it waits for a leader until the request's deadline. A
keep-alive sent through a follower just after the leader died failed at once, and a client's
keep-alive task (etcetra's) ended: its lease's keys were deleted when it expired."""

from __future__ import annotations

import grpc

from raftfast.proto.etcd import rpc_pb2 as pb
from raftfast.proto.etcd import rpc_pb2_grpc as pb_grpc
from raftfast.tools.localcluster import ProcCluster


def test_a_keep_alive_and_a_read_through_a_follower_wait_for_the_next_leader(tmp_path):
    with ProcCluster(tmp_path, 3) as cluster:
        leader = cluster.wait_leader()
        follower = next(nid for nid in cluster.ids if nid != leader)
        with grpc.insecure_channel(cluster.addrs[follower]) as channel:
            lease, kv = pb_grpc.LeaseStub(channel), pb_grpc.KVStub(channel)
            granted = lease.LeaseGrant(pb.LeaseGrantRequest(TTL=60), timeout=30)
            kv.Put(pb.PutRequest(key=b"held", value=b"v", lease=granted.ID), timeout=30)
            cluster.kill(leader)  # (the follower still knows it as the leader)
            keep_alive = pb.LeaseKeepAliveRequest(ID=granted.ID)
            [answer] = lease.LeaseKeepAlive(iter([keep_alive]), timeout=30)
            assert answer.ID == granted.ID and answer.TTL > 0
            got = kv.Range(pb.RangeRequest(key=b"held"), timeout=30)
            assert [(k.key, k.lease) for k in got.kvs] == [(b"held", granted.ID)]
