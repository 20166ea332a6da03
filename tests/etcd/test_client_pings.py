"""The client port takes clients' keep-alive pings every 5 s, as etcd's (its
--grpc-keepalive-min-time): gRPC's server default is one every 5 minutes, and a client that
pinged more often (clientv3 pings every 10 s at the fastest; etcdctl every 2 s) was sent GOAWAY
too_many_pings after its third ping, its watches cut (a differential hunt against etcd 3.4)."""

from __future__ import annotations

import queue
import threading

import grpc

from raftfast.proto.etcd import rpc_pb2 as pb
from raftfast.proto.etcd import rpc_pb2_grpc as pb_grpc
from raftfast.tools.localcluster import ProcCluster

PING_MS = 6_000  # (above etcd's 5 s minimum, as the hunt's client)
# Long enough for the three pings that got GOAWAY (at ~18 s) and a margin
WATCHED_S = 25.0
TIMEOUT = 30.0


def test_an_idle_watch_of_a_client_that_pings_every_6_s_is_not_cut(tmp_path):
    options = [
        ("grpc.keepalive_time_ms", PING_MS),
        ("grpc.keepalive_timeout_ms", 20_000),  # (an answer late on a loaded machine: no cut)
        ("grpc.http2.max_pings_without_data", 0),  # (pings go on with nothing else sent)
    ]
    with ProcCluster(tmp_path, 1) as cluster:
        node = cluster.wait_leader()
        with grpc.insecure_channel(cluster.addrs[node], options=options) as channel:
            requests: queue.Queue[pb.WatchRequest | None] = queue.Queue()
            requests.put(pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"idle")))
            call = pb_grpc.WatchStub(channel).Watch(iter(requests.get, None), timeout=120)
            responses: queue.Queue[pb.WatchResponse] = queue.Queue()
            ended: list[grpc.RpcError] = []
            done = threading.Event()

            def read() -> None:
                try:
                    for response in call:
                        responses.put(response)
                except grpc.RpcError as exc:
                    ended.append(exc)
                finally:
                    done.set()

            threading.Thread(target=read, daemon=True).start()
            try:
                assert responses.get(timeout=TIMEOUT).created
                # (a bounded look for what must not happen: GOAWAY, the watch ended)
                assert not done.wait(WATCHED_S), [(e.code(), e.details()) for e in ended]
                with grpc.insecure_channel(cluster.addrs[node]) as other:
                    put = pb.PutRequest(key=b"idle", value=b"1")
                    pb_grpc.KVStub(other).Put(put, timeout=TIMEOUT)
                event = responses.get(timeout=TIMEOUT)
                assert [e.kv.value for e in event.events] == [b"1"]
            finally:
                requests.put(None)
                call.cancel()
