"""Watch streams whose clients stop reading must not grow the node without bound, and must not
keep healthy streams waiting for ever (raftfast.etcd.watch: MAX_UNSENT_WATCH_BYTES).

A hostile hunt: 400 streams watching from revision 1 over a big history, each reading two
answers and no more, took a node from 352 MB to 1.4 GB (2.4 GB with prev_kv): each stream held
a call's answers (max_request_bytes of them, ~1.5 MiB) and a copy in gRPC, 4,096 streams may be
open. Here one node runs in a process of its own with a small bound (4 MiB, set in the process
before it starts), 80 such streams stall, and the node's RSS must stay near what the bound
allows; a stream opened afterwards must get the whole history and a live event (the stalled
streams made way: those ended say why, with UNAVAILABLE, once their client reads).

And a create or cancel on a stream of many watchers that have caught up looks at the new
watcher alone, not at all of them (watch create/cancel churn saturated a node).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc

from raftfast.etcd import watch
from raftfast.etcd.mvcc import MVCCStore, encode
from raftfast.proto.etcd import rpc_pb2 as pb
from raftfast.proto.etcd import rpc_pb2_grpc as pb_grpc
from raftfast.tools.ports import free_ports, release_ports
from tests.hostile.harness import rss_bytes

LIMIT = 4 << 20  # the node's MAX_UNSENT_WATCH_BYTES here
STALLED_S = 0.5  # its _STALLED_S: how long a stream holds answers unread before it may go
# A node with that bound, started as raftfast-node is.
NODE = (
    "import sys\n"
    "from raftfast.etcd import watch\n"
    f"watch.MAX_UNSENT_WATCH_BYTES = {LIMIT}\n"
    f"watch._STALLED_S = {STALLED_S}\n"
    "from raftfast.server.node_cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
REVISIONS = 96  # the history: a put of VALUE bytes each
VALUE = 32 * 1024
STALLED = 80
CONNECTIONS = 8
# What the node may grow by: the bound twice (the answers built, and gRPC's copy of the one it
# sends), and for each stream ended to make room the answer gRPC keeps until its client reads
# (about 64 KiB, twice), with room to spare (it grew by 7-10 MiB). Before the bound each
# stalled stream held ~4.5 MB (80 streams: 361 MiB).
MAX_GROWTH = 2 * LIMIT + STALLED * 2 * (64 << 10) + (32 << 20)
DEADLINE = 30.0


class _Peak:
    """The node's largest RSS while it runs, sampled on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except (OSError, AssertionError):
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(timeout=5)
        return self.peak


async def _until(what: str, check, deadline: float) -> None:
    while True:
        if await check():
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _scenario(addr: str, pid: int) -> None:
    deadline = time.monotonic() + DEADLINE
    channel = grpc.aio.insecure_channel(addr)
    kv = pb_grpc.KVStub(channel)

    async def ready() -> bool:
        try:
            status = await pb_grpc.MaintenanceStub(channel).Status(pb.StatusRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return False
        return status.leader != 0

    await _until("a leader", ready, deadline)
    for i in range(REVISIONS):
        await kv.Put(pb.PutRequest(key=b"w/%03d" % i, value=bytes([i]) * VALUE), timeout=10)
    start = rss_bytes(pid)
    peak = _Peak(pid)
    # Streams from revision 1 that read their created answer and one with events, and stop.
    # (Connections of their own, without BDP probes: the client's windows stay small, as a
    # client that stopped reading keeps them.)
    connections = [
        grpc.aio.insecure_channel(
            addr,
            options=[
                ("raftfast.test.connection", i),
                ("grpc.use_local_subchannel_pool", 1),
                ("grpc.http2.bdp_probe", 0),
            ],
        )
        for i in range(CONNECTIONS)
    ]
    everything = pb.WatchCreateRequest(key=b"w/", range_end=b"w0", start_revision=1)
    stalled = []
    try:
        for k in range(STALLED):
            call = pb_grpc.WatchStub(connections[k % CONNECTIONS]).Watch()
            await call.write(pb.WatchRequest(create_request=everything))
            stalled.append(call)
        for call in stalled:
            created = await asyncio.wait_for(call.read(), deadline - time.monotonic())
            assert created.created and not created.canceled
            first = await asyncio.wait_for(call.read(), deadline - time.monotonic())
            assert first.events

        # A stream opened afterwards gets the whole history, then a live put, in order.
        healthy = pb_grpc.WatchStub(channel).Watch()
        await healthy.write(pb.WatchRequest(create_request=everything))
        revisions: list[int] = []
        live = None
        while live is None or not revisions or revisions[-1] < live:
            answer = await asyncio.wait_for(healthy.read(), deadline - time.monotonic())
            assert answer is not grpc.aio.EOF and not answer.canceled
            revisions += [e.kv.mod_revision for e in answer.events]
            if live is None and len(revisions) >= REVISIONS:
                put = await kv.Put(pb.PutRequest(key=b"w/live", value=b"v"), timeout=10)
                live = put.header.revision
        assert revisions == sorted(set(revisions)) and len(revisions) == REVISIONS + 1
        healthy.cancel()
        grown = peak.stop() - start
        assert grown < MAX_GROWTH, f"the node grew by {grown >> 20} MiB"

        # The streams that made way say why once their client reads (after what gRPC held).
        reasons = set()
        for call in stalled:
            try:
                while await asyncio.wait_for(call.read(), 0.5) is not grpc.aio.EOF:
                    pass
            except TimeoutError:
                continue  # (not ended: it goes on)
            except grpc.aio.AioRpcError as exc:
                reasons.add((exc.code(), exc.details().split(":")[1].strip()))
        assert reasons == {(grpc.StatusCode.UNAVAILABLE, "watch stream ended")}, reasons
    finally:
        peak.stop()
        for call in stalled:
            call.cancel()
        for c in (*connections, channel):
            await c.close()


def test_stalled_watch_streams_hold_a_bounded_amount_and_make_way(tmp_path: Path) -> None:
    port, peer_stream, client_stream = free_ports(3)
    addr = f"127.0.0.1:{port}"
    args = ["--id", "n1", "--listen", addr, "--peers", f"n1={addr}"]
    args += ["--data-dir", str(tmp_path / "n1"), "--tick-ms", "50"]
    args += ["--peer-stream-port", str(peer_stream), "--client-stream-port", str(client_stream)]
    with open(tmp_path / "n1.log", "wb") as log:
        node = subprocess.Popen([sys.executable, "-c", NODE, *args], stdout=log, stderr=log)
    try:
        asyncio.run(_scenario(addr, node.pid))
    except BaseException:
        print((tmp_path / "n1.log").read_text()[-4000:])
        raise
    finally:
        os.kill(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=15)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
        release_ports([port, peer_stream, client_stream])


# -- create / cancel churn -------------------------------------------------------------------


class _CountingWatchers(dict):
    """A stream's watchers, counting the passes over all of them."""

    passes = 0

    def values(self) -> Any:
        self.passes += 1
        return super().values()


def _api(store: MVCCStore) -> Any:
    return SimpleNamespace(
        store=store,
        header=lambda rev=None: pb.ResponseHeader(revision=store.revision if rev is None else rev),
        driver=SimpleNamespace(settings=SimpleNamespace(max_request_bytes=1536 * 1024)),
    )


def _create(stream: watch._Stream, **fields: Any) -> None:
    stream.take(pb.WatchRequest(create_request=pb.WatchCreateRequest(**fields)))


def _put(store: MVCCStore, key: bytes, value: bytes = b"v") -> None:
    store.apply(encode(pb.PutRequest(key=key, value=value)))


def test_a_create_and_cancel_look_at_the_new_watcher_alone() -> None:
    store = MVCCStore()
    _put(store, b"a", b"0")
    stream = watch._Stream(_api(store))
    stream.watchers = _CountingWatchers()
    for i in range(5_000):
        _create(stream, key=b"idle/%d" % i)
    _create(stream, key=b"a")  # (from now)
    stream.pending()  # (their created answers; every watcher looked at once)
    stream.watchers.passes = 0
    for _ in range(100):
        _create(stream, key=b"a", start_revision=1, watch_id=9_999)  # (from the history)
        got = stream.pending()
        assert [len(r.events) for r in got] == [0, 1]  # (created, then the put of "a")
        stream.take(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=9_999)))
        assert [r.canceled for r in stream.pending()] == [True]
    assert stream.watchers.passes == 0
    # the store moves on: every watcher is looked at again, and each gets what it watches
    _create(stream, key=b"a", start_revision=1, watch_id=9_999)
    _put(store, b"a", b"1")
    answers = [r for _ in range(20) for r in stream.pending()]
    events = {}
    for r in answers:
        events.setdefault(r.watch_id, []).extend((e.kv.key, e.kv.value) for e in r.events)
    assert events[9_999] == [(b"a", b"0"), (b"a", b"1")]
    assert events[5_000] == [(b"a", b"1")]  # (the watcher of "a" from before: the new put)
    assert set(events) == {5_000, 9_999}
