"""The Session stream over plain TCP (raftfast/server/session_stream.py, the client's
raftfast/client/session_tcp.py), on a one-node KV store in this process: our client uses it
where offered and gRPC where not, or where it cannot connect; raw records get the statuses the
module promises (a wrong cluster, a bad hello, a record over the limit, garbage), the
connection limits hold (no hello in time, a stalled record, too many connections), and the
node serves on after each."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

import raftfast
from raftfast import heap
from raftfast.client import Client, SyncClient
from raftfast.client.blocking import NoTcpSession
from raftfast.errors import DeadlineExceededError, InvalidArgumentError, RequestFailedError
from raftfast.kv.fsm import KVStateMachine
from raftfast.proto import raftfast_pb2 as pb
from raftfast.server import session_stream
from raftfast.tools.localcluster import free_ports
from raftfast.transport import tcp
from raftfast.transport.tcp import record
from tests.polling import until

CLUSTER = "raftfast"
# (this suite's own poll waited 20 s at most: so does it with the shared one)
wait_until = functools.partial(until, timeout=20.0)
MAX_REQUEST = 64 * 1024


@contextlib.asynccontextmanager
async def one_node(tmp_path, **settings) -> AsyncIterator[raftfast.Node]:
    addr = f"127.0.0.1:{free_ports(1)[0]}"
    node = raftfast.Node(
        id="n1",
        listen=addr,
        peers={"n1": addr},
        data_dir=str(tmp_path / "n1"),
        state_machine=KVStateMachine(),
        tick_ms=20,
        **{"max_request_bytes": MAX_REQUEST, **settings},
    )
    await node.start()
    try:
        await node.wait_for_leader(timeout=30)
        yield node
    finally:
        await node.stop()


def run(tmp_path, test: Callable[[raftfast.Node], Awaitable[None]], **settings) -> None:
    async def main() -> None:
        async with one_node(tmp_path, **settings) as node:
            await test(node)

    asyncio.run(asyncio.wait_for(main(), 120))


def address(node: raftfast.Node) -> str:
    return node.settings.listen


# -- raw records --------------------------------------------------------------------------------


async def connect(node: raftfast.Node) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", node._driver.session_port)


async def read_results(reader: asyncio.StreamReader) -> list[pb.SessionResult]:
    """Every result until the node closes the connection."""
    data = await asyncio.wait_for(reader.read(), 20)  # (to EOF)
    out = []
    while data:
        size = int.from_bytes(data[:4], "big")
        assert len(data) >= 4 + size, "the node closed in the middle of a record"
        out.append(pb.SessionResult.FromString(data[4 : 4 + size]))
        data = data[4 + size :]
    return out


def hello(cluster_id: str = CLUSTER) -> bytes:
    return record(pb.SessionHello(cluster_id=cluster_id).SerializeToString())


def put_frame(frame_id: int, key: bytes, value: bytes, sequence: int) -> bytes:
    op = pb.Op(kind=pb.Op.PUT, key=key, value=value, sequence=sequence)
    return record(pb.SessionFrame(frame_id=frame_id, client_id=7, ops=[op]).SerializeToString())


async def ended_with(node: raftfast.Node, data: bytes) -> pb.SessionResult:
    """Send ``data``; the one status record the node ends the stream with."""
    reader, writer = await connect(node)
    try:
        writer.write(data)
        await writer.drain()
        results = await read_results(reader)
    finally:
        writer.close()
    assert results and results[-1].frame_id == 0, results
    return results[-1]


async def big_answers_then_puts(node: raftfast.Node, puts: int) -> bytes:
    """A stream's bytes: a hello, 12 frames of 60 reads of a 30 KB value (1.8 MB of answers,
    more than the sockets hold, for a client that does not read them), then ``puts`` frames
    of a 60 KB put: the node takes no frame more once its answers wait."""
    async with Client(address(node), timeout=20) as c:
        await c.put(b"big", b"x" * 30_000)
    get = pb.Op(kind=pb.Op.GET, key=b"big")
    reads = b"".join(
        record(pb.SessionFrame(frame_id=i, ops=[get] * 60).SerializeToString())
        for i in range(1, 13)
    )
    writes = b"".join(put_frame(i, b"p%d" % i, b"y" * 60_000, i) for i in range(100, 100 + puts))
    return hello() + reads + writes


async def serves(node: raftfast.Node) -> None:
    async with Client(address(node), timeout=20, cluster_id=CLUSTER) as c:
        await c.put(b"still", b"here")
        assert await c.get(b"still") == b"here"


def test_our_client_uses_the_tcp_stream_where_offered(tmp_path):
    async def test(node: raftfast.Node) -> None:
        driver = node._driver
        assert driver.session_port and driver.status().session_port == driver.session_port
        async with Client(address(node), timeout=20) as c:
            await c.put(b"k", b"v")
            assert c._session_ports[address(node)] == driver.session_port
            assert len(driver.session_server.connections) == 1
            assert await c.get(b"k") == b"v"
            assert await c.cas(b"k", b"v", b"w") and not await c.cas(b"k", b"v", b"x")
            await c.put_many([(b"a%d" % i, b"%d" % i) for i in range(1000)])
            assert await c.scan(b"a") == sorted((b"a%d" % i, b"%d" % i) for i in range(1000))
            assert await c.delete(b"k") and await c.get(b"k") is None
            many = await asyncio.gather(*(c.put(b"p%d" % i, b"x") for i in range(500)))
            assert many == [None] * 500
            assert driver.app.kv_service.sessions_open == 1
        await wait_until("the stream to close", lambda: not driver.session_server.connections)
        await wait_until("the session to end", lambda: driver.app.kv_service.sessions_open == 0)

    run(tmp_path, test)


def test_calls_write_from_their_own_task_while_the_writer_sleeps(tmp_path, monkeypatch):
    # One at a time, each call writes its frame itself (no hand-over to the writer task);
    # many at once, or while the connection is held back, the writer task takes them.
    from raftfast.client import session as client_session

    written: list[int] = []
    real = client_session.SessionMixin._write_now

    def counting(self) -> bool:
        wrote = real(self)
        written.append(wrote)
        return wrote

    monkeypatch.setattr(client_session.SessionMixin, "_write_now", counting)

    async def test(node: raftfast.Node) -> None:
        async with Client(address(node), timeout=20) as c:
            await c.put(b"first", b"x")  # (the stream opens: the writer task sends it)
            written.clear()
            for i in range(50):
                await c.put(b"k%d" % i, b"%d" % i)
            assert written == [True] * 50
            c._stream.call._writable.clear()  # as if the node did not read: the writer's
            held = asyncio.ensure_future(c.put(b"held", b"back"))  # (it writes, then waits)
            await wait_until("the writer to take it", lambda: written[-1] is False)
            c._stream.call._writable.set()
            await held
            written.clear()  # many at once: the first goes at once, the others share frames
            puts = await asyncio.gather(*(c.put(b"p%d" % i, b"x") for i in range(300)))
            assert puts == [None] * 300 and written.count(True) <= 3, written.count(True)
            assert [await c.get(b"k%d" % i) for i in (0, 49)] == [b"0", b"49"]
            assert await c.get(b"held") == b"back"

    run(tmp_path, test)


def test_a_result_the_client_cannot_take_ends_the_stream_and_the_call_goes_again(
    tmp_path, monkeypatch, caplog
):
    # Results are taken as they arrive, inside the connection's callback: a failure there
    # ends that stream (the call is sent again on a new one: exactly once), never the client.
    from raftfast.client import session as client_session

    real = client_session.SessionMixin._on_result
    failures = [1]

    def failing_once(self, stream, result) -> None:
        if failures:
            failures.pop()
            raise RuntimeError("boom")
        real(self, stream, result)

    monkeypatch.setattr(client_session.SessionMixin, "_on_result", failing_once)

    async def test(node: raftfast.Node) -> None:
        async with Client(address(node), timeout=20) as c:
            await c.put(b"k", b"v")  # (applied, its result lost: sent again, done once)
            assert not failures
            assert await c.cas(b"k", b"v", b"w")
            assert await c.get(b"k") == b"w"
        taken = [r for r in caplog.records if "could not be taken" in r.getMessage()]
        assert taken and taken[0].name == "raftfast.client"

    run(tmp_path, test)


def test_a_node_of_another_cluster_fails_every_call_at_once(tmp_path):
    # status and scan failed at once; put/get/delete/cas/put_many retried the refusal until
    # their deadline and then blamed an unreachable cluster, in both clients.
    async def test(node: raftfast.Node) -> None:
        async with Client(address(node), timeout=8, cluster_id="other") as c:
            for call in (
                lambda: c.put(b"k", b"v"),
                lambda: c.get(b"k"),
                lambda: c.put_many([(b"a", b"1")]),
            ):
                started = time.monotonic()
                with pytest.raises(RequestFailedError, match="wrong cluster"):
                    await call()
                assert time.monotonic() - started < 4
        sync = await asyncio.to_thread(SyncClient, address(node), timeout=8, cluster_id="other")
        try:
            started = time.monotonic()
            with pytest.raises(RequestFailedError, match="wrong cluster"):
                await asyncio.to_thread(sync.put, b"k", b"v")
            assert time.monotonic() - started < 4
        finally:
            await asyncio.to_thread(sync.close)

    run(tmp_path, test)


def test_one_callers_short_deadlines_leave_the_shared_stream_alone(tmp_path, monkeypatch):
    # Each expiry was taken for a dead stream: the stream every caller shares restarted,
    # moved to another node and backed off (p99 of the others 1.7 -> 193 ms).
    from raftfast.client import session as client_session

    restarts: list[str] = []
    real = client_session.Stream.request_restart

    def counting(self, kind: str, detail: str, hint: str = "") -> None:
        restarts.append(kind)
        real(self, kind, detail, hint)

    monkeypatch.setattr(client_session.Stream, "request_restart", counting)

    async def test(node: raftfast.Node) -> None:
        async with Client(address(node), timeout=20) as c:
            await c.put(b"k", b"v")

            async def hasty() -> int:
                expired = 0
                for _ in range(40):
                    with contextlib.suppress(DeadlineExceededError):
                        await c.get(b"k", timeout=0.0003)
                        continue
                    expired += 1
                    await asyncio.sleep(0.01)
                return expired

            async def steady() -> None:
                for i in range(200):
                    await c.put(b"s%d" % i, b"x")

            expired, _ = await asyncio.gather(hasty(), steady())
            assert expired  # (the short deadlines did expire)
            assert "silent" not in restarts, restarts

    run(tmp_path, test)


def test_a_node_whose_port_is_taken_fails_to_start_and_starts_once_it_is_free(tmp_path):
    # A failed start closes what it opened: the client port, bound but never started, stayed
    # taken in this process and every later start failed on it.
    async def main() -> None:
        client_port, session_port = free_ports(2)
        addr = f"127.0.0.1:{client_port}"
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", session_port))
            taken.listen()
            node = raftfast.Node(
                id="n1", listen=addr, peers={"n1": addr}, data_dir=str(tmp_path / "n1"),
                state_machine=KVStateMachine(), tick_ms=20, client_stream_port=session_port,
            )  # fmt: skip
            for _ in range(3):
                with pytest.raises(OSError, match="cannot listen for Session streams"):
                    await node.start()
        async with node:
            await node.wait_for_leader(timeout=30)
            async with Client(addr, timeout=20) as c:
                await c.put(b"k", b"v")
                assert await c.get(b"k") == b"v"

    asyncio.run(main())


def test_a_cluster_id_clients_cannot_send_still_starts(tmp_path):
    # (a node of an older version may have one: upgrading must not refuse it; our clients
    # refuse to send one gRPC metadata cannot hold)
    run(tmp_path, lambda node: asyncio.sleep(0), cluster_id="é")
    with pytest.raises(ValueError, match="printable ASCII"):
        Client("127.0.0.1:1", cluster_id="é")


def test_the_grpc_call_where_tcp_is_not_offered_or_not_wanted(tmp_path):
    async def test(node: raftfast.Node) -> None:
        assert node._driver.session_server is None
        assert node._driver.status().session_port == 0
        async with Client(address(node), timeout=20) as c:
            await c.put(b"k", b"v")
            assert await c.get(b"k") == b"v"
            assert c._session_ports[address(node)] == 0

    run(tmp_path, test, client_stream="grpc")

    async def not_wanted(node: raftfast.Node) -> None:
        async with Client(address(node), timeout=20, session_transport="grpc") as c:
            await c.put(b"k", b"v")
            assert not node._driver.session_server.connections and not c._session_ports

    run(tmp_path / "2", not_wanted)
    with pytest.raises(ValueError, match="session_transport"):
        Client("127.0.0.1:1", session_transport="udp")


def test_a_port_that_cannot_be_reached_is_asked_for_again_then_left_for_grpc(tmp_path):
    async def test(node: raftfast.Node) -> None:
        driver = node._driver
        real = driver.session_port
        closed = free_ports(1)[0]  # (claimed: nothing listens there)
        async with Client(address(node), timeout=20) as c:
            c._session_ports[address(node)] = closed  # as if the node had moved
            await c.put(b"k", b"1")  # a failed connect, Status again, the real port
            assert c._session_ports[address(node)] == real
            assert not c._tcp_failures
        driver.session_port = closed  # a port the node names but no one can reach
        async with Client(address(node), timeout=20) as c:
            await c.put(b"k", b"2")  # twice in vain: the gRPC call
            assert c._tcp_failures[address(node)][0] >= 2
            assert await c.get(b"k") == b"2"
        driver.session_port = real

    run(tmp_path, test)


def test_a_client_that_half_closes_gets_every_answer_then_ok(tmp_path):
    async def test(node: raftfast.Node) -> None:
        reader, writer = await connect(node)
        writer.write(hello() + b"".join(put_frame(i, b"h%d" % i, b"v", i) for i in range(1, 51)))
        writer.write_eof()
        results = await read_results(reader)
        writer.close()
        assert sorted(r.frame_id for r in results[:-1]) == list(range(1, 51))
        assert all(r.results[0].code == 0 and r.results[0].ok for r in results[:-1])
        assert (results[-1].frame_id, results[-1].code) == (0, 0)
        await serves(node)

    run(tmp_path, test)


def test_answers_to_short_frames_go_out_from_their_callback_and_the_end_still_comes_last(
    tmp_path, monkeypatch
):
    # (KVService._writes_now + _Connection._send_now: the writer task neither sends them nor
    # misses that the last one went)
    sent = []
    send_now = session_stream._Connection._send_now

    def counting(self, result):
        done = send_now(self, result)
        sent.append(done)
        return done

    monkeypatch.setattr(session_stream._Connection, "_send_now", counting)

    async def test(node: raftfast.Node) -> None:
        for round_ in range(3):
            reader, writer = await connect(node)
            writer.write(hello())
            for i in range(1, 21):  # one at a time: each answered before the next is sent
                writer.write(put_frame(i, b"s%d-%d" % (round_, i), b"v", 100 * round_ + i))
                size = int.from_bytes(await reader.readexactly(4), "big")
                result = pb.SessionResult.FromString(await reader.readexactly(size))
                assert (result.frame_id, result.results[0].ok) == (i, True)
            writer.write_eof()
            results = await read_results(reader)
            writer.close()
            assert [(r.frame_id, r.code) for r in results] == [(0, 0)]
        assert sent.count(True) == 60
        await serves(node)

    run(tmp_path, test)


def test_refusals_end_the_stream_with_a_status(tmp_path):
    async def test(node: raftfast.Node) -> None:
        status = grpc.StatusCode
        end = await ended_with(node, hello("another") + put_frame(1, b"k", b"v", 1))
        assert end.code == status.FAILED_PRECONDITION.value[0] and "wrong cluster" in end.error
        end = await ended_with(node, record(b"\xff" * 10))
        assert end.code == status.INVALID_ARGUMENT.value[0] and "SessionHello" in end.error
        too_big = session_stream.HELLO_BYTES + 1
        end = await ended_with(node, too_big.to_bytes(4, "big") + b"\0" * 100)
        assert end.code == status.RESOURCE_EXHAUSTED.value[0] and "a hello" in end.error
        end = await ended_with(node, hello() + record(b"\xff" * 10))
        assert end.code == status.INVALID_ARGUMENT.value[0] and "SessionFrame" in end.error
        for size in (MAX_REQUEST + 64 * 1024 + 1, 2**32 - 1):
            end = await ended_with(node, hello() + size.to_bytes(4, "big") + b"\0" * 100)
            assert end.code == status.INVALID_ARGUMENT.value[0], end  # (that frame's fault)
            assert "--max-request-bytes" in end.error
        # a frame under the record limit but over --max-request-bytes: refused per op
        op = pb.Op(kind=pb.Op.PUT, key=b"k", value=b"v" * MAX_REQUEST, sequence=1)
        frame = pb.SessionFrame(frame_id=5, client_id=7, ops=[op]).SerializeToString()
        reader, writer = await connect(node)
        writer.write(hello() + record(frame))
        writer.write_eof()
        results = await read_results(reader)
        writer.close()
        assert results[0].frame_id == 5
        assert results[0].results[0].code == status.INVALID_ARGUMENT.value[0]
        assert "--max-request-bytes" in results[0].results[0].error
        await serves(node)

    run(tmp_path, test)


def test_silent_stalled_and_surplus_connections_are_dropped(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(session_stream, "HANDSHAKE_S", 0.3)
    monkeypatch.setattr(session_stream, "STALL_S", 0.3)
    monkeypatch.setattr(tcp, "_SWEEP_S", 0.1)
    caplog.set_level(logging.INFO, logger="raftfast.transport")

    async def test(node: raftfast.Node) -> None:
        server = node._driver.session_server
        for data in (b"", hello()[:3], hello() + put_frame(1, b"k", b"v", 1)[:10]):
            reader, writer = await connect(node)
            writer.write(data)
            assert await closed(reader)  # dropped
            writer.close()
        await wait_until("no connection left", lambda: not server.connections)
        # (said as a count at most every 10 s: a line each was ~160 a second under a flood)
        drops = [r for r in caplog.records if r.getMessage().startswith("dropped ")]
        assert len(drops) == 1 and "Session stream" in drops[0].getMessage()
        monkeypatch.setattr(session_stream, "MAX_CONNECTIONS", 2)
        kept = [await connect(node) for _ in range(2)]
        for _, writer in kept:
            writer.write(hello())
        await wait_until("two connections", lambda: len(server.connections) == 2)
        reader, writer = await connect(node)
        assert await closed(reader)  # the third: refused
        writer.close()
        # ... unless a connection has said nothing yet for a while: the oldest such makes way
        # (not one whose hello is on its way: a client says it at once)
        monkeypatch.setattr(session_stream, "HANDSHAKE_S", 30.0)  # (not dropped meanwhile)
        monkeypatch.setattr(session_stream, "SILENT_MAKES_WAY_S", 0.2)
        kept[1][1].close()
        await wait_until("one connection", lambda: len(server.connections) == 1)
        silent, silent_writer = await connect(node)
        await wait_until("two again", lambda: len(server.connections) == 2 and server.silent)
        (quiet,) = server.silent.values()
        loop = asyncio.get_running_loop()
        await wait_until("it silent a while", lambda: loop.time() - quiet.opened >= 0.25)
        reader, writer = await connect(node)
        writer.write(hello())
        assert await closed(silent)
        await wait_until("the new one in, hello said", lambda: not server.silent)
        assert len(server.connections) == 2
        reader, late = await connect(node)  # (the port full, no one silent: refused)
        assert await closed(reader)
        for w in (writer, silent_writer, kept[0][1], late):
            w.close()
        await wait_until("no connection left", lambda: not server.connections)
        assert not server.silent
        await serves(node)

    run(tmp_path, test)


def test_unfinished_records_over_every_connection_are_bounded(tmp_path, monkeypatch):
    # Each connection holds all but the last byte of a record of the largest size (a hunt's
    # 1,000 such connections took a node to 2.4 GB, kept after they closed): past the bound
    # over all of them, a connection that adds one more is dropped; once they close the count
    # is back to 0 and the heap is trimmed.
    trims: list[int] = []
    monkeypatch.setattr(tcp, "TRIM_AFTER_BYTES", 100_000)
    monkeypatch.setattr(heap, "release_free_memory", lambda: trims.append(1) or True)

    async def test(node: raftfast.Node) -> None:
        server = node._driver.session_server
        size = server.max_record_bytes()
        bound = server.max_held_bytes()
        assert bound == max(session_stream.MAX_HELD_BYTES, 4 * size)
        monkeypatch.setattr(session_stream, "MAX_HELD_BYTES", 0)  # (4 records, then)
        bound = server.max_held_bytes()
        unfinished = size.to_bytes(4, "big") + b"\x0a" * (size - 1)
        kept, dropped = [], 0
        for _ in range(8):
            reader, writer = await connect(node)
            writer.write(hello() + unfinished)
            await writer.drain()
            before = len(kept)

            def settled(before: int = before, reader: asyncio.StreamReader = reader) -> bool:
                conns = [c for c in server.connections.values() if c.records.partial]
                full = [c for c in conns if c.records.held >= size]
                return len(full) == before + 1 or reader.at_eof()

            await wait_until("the record held, or the connection dropped", settled)
            if reader.at_eof() or len(server.connections) == before:
                assert await closed(reader)
                dropped += 1
                writer.close()
            else:
                kept.append(writer)
            assert server.held_bytes <= bound + size + 4
        assert 3 <= len(kept) <= 4 and dropped == 8 - len(kept), (len(kept), dropped)
        conns = list(server.connections.values())
        for writer in kept:
            writer.close()
        await wait_until("no connection left", lambda: not server.connections)
        assert server.held_bytes == 0
        # (their buffers let go at once, not when a reference cycle is collected)
        assert all(len(c.records._buf) == 0 for c in conns)  # type: ignore[attr-defined]
        await wait_until("the heap trimmed", lambda: trims)
        await serves(node)

    run(tmp_path, test)


def test_frames_read_ahead_over_the_bound_pause_their_streams_and_drop_none(tmp_path, monkeypatch):
    # Clients that do not read their answers hold frames read ahead (the service took none
    # more): over the bound for every stream they hold the others back only where those too
    # have frames waiting, and never get anyone dropped (a review: read-ahead counted with
    # unfinished records got every later connection that paused mid-record dropped).
    from raftfast.server import kv_service

    monkeypatch.setattr(kv_service, "MAX_SESSION_INFLIGHT", 1)
    monkeypatch.setattr(session_stream, "MAX_HELD_BYTES", 0)  # (four records, then)

    async def test(node: raftfast.Node) -> None:
        server = node._driver.session_server
        bound = server.max_held_bytes()
        unread = await big_answers_then_puts(node, 20)
        parked = []
        while server.read_ahead_bytes <= bound:
            assert len(parked) < 12, server.read_ahead_bytes
            reader, writer = await connect(node)
            writer.transport.set_write_buffer_limits(high=64 << 20)  # (we keep sending)
            writer.write(unread)
            parked.append(writer)
            count = len(parked)
            await wait_until(
                "its frames read ahead",
                lambda count=count: (
                    sum(1 for c in server.connections.values() if c.queued_bytes) >= count
                ),
            )
        size = server.max_record_bytes()
        reader, writer = await connect(node)  # (one more, in the middle of a record)
        writer.write(hello() + size.to_bytes(4, "big") + b"\x0a" * 1000)
        await wait_until("its record held", lambda: server.held_bytes >= 1000)
        assert not reader.at_eof() and len(server.connections) == len(parked) + 1
        await serves(node)  # (a client whose frames are taken at once goes on)
        for w in [*parked, writer]:
            w.transport.abort()
        await wait_until("no connection left", lambda: not server.connections)
        assert (server.held_bytes, server.read_ahead_bytes) == (0, 0)

    run(tmp_path, test)


def test_what_a_stream_held_is_let_go_however_it_ends(tmp_path):
    async def test(node: raftfast.Node) -> None:
        server = node._driver.session_server
        size = server.max_record_bytes()
        for data, how in [
            (b"\x00\x00", "closed before its hello is whole"),
            (hello() + (size + 1).to_bytes(4, "big") + b"x" * 100, "a record too big"),
            (hello() + size.to_bytes(4, "big") + b"x" * 100, "closed mid-record"),
            (hello() + put_frame(1, b"k", b"v", 1) + b"\x00\x00\x00", "EOF mid-record"),
        ]:
            reader, writer = await connect(node)
            writer.write(data)
            await writer.drain()
            if how != "a record too big":
                await wait_until(how, lambda: server.held_bytes or server.connections)
                if how == "EOF mid-record":
                    writer.write_eof()
                else:
                    writer.close()
            await wait_until(f"{how}: no connection left", lambda: not server.connections)
            assert (server.held_bytes, server.read_ahead_bytes) == (0, 0), how
            writer.close()
        await serves(node)

    run(tmp_path, test)


def test_a_stopping_node_closes_its_streams(tmp_path):
    async def main() -> None:
        async with one_node(tmp_path) as node:
            reader, writer = await connect(node)
            writer.write(hello() + put_frame(1, b"k", b"v", 1))
            await writer.drain()
            assert (await read_results_one(reader)).frame_id == 1
            await node.stop()
            assert await closed(reader)
            writer.close()
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", node._driver.session_port), timeout=5)

    asyncio.run(asyncio.wait_for(main(), 120))


async def closed(reader: asyncio.StreamReader) -> bool:
    """The node closed (or reset) the connection without a word."""
    try:
        return await asyncio.wait_for(reader.read(), 10) == b""
    except ConnectionResetError:
        return True


async def read_results_one(reader: asyncio.StreamReader) -> pb.SessionResult:
    size = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), 20), "big")
    return pb.SessionResult.FromString(await reader.readexactly(size))


def test_a_port_that_does_not_answer_is_left_for_grpc_at_once(tmp_path):
    async def test(node: raftfast.Node) -> None:
        driver = node._driver
        real = driver.session_port
        # A listener whose queue is full: the kernel drops further connection attempts, as a
        # firewall that lets only the gRPC port through would.
        full = socket.socket()
        full.bind(("127.0.0.1", free_ports(1)[0]))
        full.listen(0)
        queued = [socket.create_connection(full.getsockname(), timeout=5)]  # (backlog 0: one)
        with pytest.raises(TimeoutError):  # (the next is not answered)
            socket.create_connection(full.getsockname(), timeout=0.2)
        driver.session_port = full.getsockname()[1]
        try:
            async with Client(address(node), timeout=5) as c:
                started = asyncio.get_running_loop().time()
                await c.put(b"k", b"v")  # one silent connect (~1 s), then the gRPC call
                assert asyncio.get_running_loop().time() - started < 4.5
                assert c._tcp_failures[address(node)][0] == 2
                assert await c.get(b"k") == b"v"
        finally:
            driver.session_port = real
            for sock in (*queued, full):
                sock.close()

    run(tmp_path, test)


def test_a_client_that_does_not_read_holds_little(tmp_path, monkeypatch):
    # One frame under way (so that the next waits for its answer to be sent), answers of
    # 1.8 MB, more than the sockets buffer: the node stops taking frames, and reads ahead at
    # most one record's worth of bytes and the frames of the read that passed it (it read 64
    # frames ahead, whatever their size; one read holds several frames on a busy machine).
    from raftfast.server import kv_service

    monkeypatch.setattr(kv_service, "MAX_SESSION_INFLIGHT", 1)

    async def test(node: raftfast.Node) -> None:
        unread = await big_answers_then_puts(node, 100)
        reader, writer = await connect(node)
        writer.transport.set_write_buffer_limits(high=64 << 20)  # (we keep sending)
        writer.write(unread)
        server = node._driver.session_server
        await wait_until("a connection", lambda: len(server.connections) == 1)
        (conn,) = server.connections.values()
        await wait_until("the node to stop reading", lambda: not conn.reading)
        await asyncio.sleep(0.3)  # (nothing to wait for: it must stay so)
        assert not conn.reading
        assert conn.queued_bytes <= conn.records.limit + tcp._MIN_READ
        writer.transport.abort()  # (a close would wait to send the megabytes the node holds off)
        await wait_until("the stream to close", lambda: not server.connections)
        await serves(node)

    run(tmp_path, test)


def test_answers_to_frames_before_a_bad_record_still_come(tmp_path):
    async def test(node: raftfast.Node) -> None:
        reader, writer = await connect(node)
        writer.write(hello() + b"".join(put_frame(i, b"b%d" % i, b"v", i) for i in range(1, 6)))
        writer.write(record(b"\xff" * 10))
        results = await read_results(reader)
        writer.close()
        assert sorted(r.frame_id for r in results[:-1]) == [1, 2, 3, 4, 5]
        assert all(r.results[0].code == 0 for r in results[:-1])
        assert results[-1].frame_id == 0
        assert results[-1].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        # frame id 0 is the stream's own; a record cut off by the end is refused
        end = await ended_with(node, hello() + put_frame(0, b"k", b"v", 1))
        assert end.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "frame_id 0" in end.error
        reader, writer = await connect(node)
        writer.write(hello() + put_frame(1, b"k", b"v", 1)[:-3])
        writer.write_eof()
        results = await read_results(reader)
        writer.close()
        assert [r.frame_id for r in results] == [0]
        assert "inside a record" in results[0].error
        # a frame over the op limit gets one answer, not one error per op
        many = pb.SessionFrame(frame_id=3, ops=[pb.Op()] * 10_001).SerializeToString()
        reader, writer = await connect(node)
        writer.write(hello() + record(many))
        writer.write_eof()
        results = await read_results(reader)
        writer.close()
        assert len(results[0].results) == 1 and "at most" in results[0].results[0].error
        await serves(node)

    run(tmp_path, test)


def test_a_port_that_takes_connections_and_drops_them_is_left_for_grpc(tmp_path):
    async def test(node: raftfast.Node) -> None:
        driver = node._driver
        real = driver.session_port

        async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.transport.abort()  # (as a node with no room left, or a middlebox)

        dropper = await asyncio.start_server(drop, "127.0.0.1", 0)
        driver.session_port = dropper.sockets[0].getsockname()[1]
        try:
            async with Client(address(node), timeout=5) as c:
                await c.put(b"k", b"v")  # dropped twice without a word: the gRPC call
                assert c._tcp_failures[address(node)][0] >= 2
        finally:
            driver.session_port = real
            dropper.close()

    run(tmp_path, test)


# -- SyncClient's blocking connection (raftfast/client/blocking.py) ----------------------------


def test_sync_client_puts_on_a_blocking_connection_and_threads_share_the_loop(tmp_path):
    async def test(node: raftfast.Node) -> None:
        driver = node._driver

        def one_thread() -> None:
            with SyncClient(address(node), timeout=20) as c:
                c.put(b"k", b"v")
                assert c._blocking is not None and c._blocking.connected_to == address(node)
                assert len(driver.session_server.connections) == 1  # (not the loop's stream)
                assert c.get(b"k") == b"v" and c.get(b"none") is None
                assert c.cas(b"k", b"v", b"w") and not c.cas(b"k", b"v", b"x")
                assert c.cas(b"new", None, b"1") and not c.cas(b"new", None, b"2")
                assert c.delete(b"k") and not c.delete(b"k")
                with pytest.raises(InvalidArgumentError):
                    c.put(b"", b"v")  # (an empty key: refused at once, the connection kept)
                assert c._blocking.connected_to == address(node)

                # Threads at once: one has the connection, the others the loop's stream.
                def puts(t: int) -> None:
                    for i in range(40):
                        c.put(b"t%d-%d" % (t, i), b"%d" % i)

                threads = [threading.Thread(target=puts, args=(t,)) for t in range(8)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join(60)
                assert len(c.scan(b"t", 0)) == 8 * 40
                assert c.get(b"t7-39") == b"39"

        await asyncio.to_thread(one_thread)
        await wait_until("the streams to close", lambda: not driver.session_server.connections)

    run(tmp_path, test)


def test_sync_client_takes_the_loop_where_tcp_is_not_offered_or_does_not_answer(tmp_path):
    def puts(node: raftfast.Node) -> None:
        with SyncClient(address(node), timeout=10) as c:
            started = time.monotonic()
            c.put(b"k", b"v")
            assert time.monotonic() - started < 8
            assert c.get(b"k") == b"v"
            assert c._blocking is not None and c._blocking.connected_to is None

    async def not_offered(node: raftfast.Node) -> None:
        assert node._driver.session_port == 0
        await asyncio.to_thread(puts, node)

    run(tmp_path, not_offered, client_stream="grpc")

    async def silent(node: raftfast.Node) -> None:
        driver = node._driver
        real = driver.session_port
        full = socket.socket()  # (a full listen queue: connects are not answered)
        full.bind(("127.0.0.1", free_ports(1)[0]))
        full.listen(0)
        queued = [socket.create_connection(full.getsockname(), timeout=5)]
        driver.session_port = full.getsockname()[1]
        try:
            await asyncio.to_thread(puts, node)
        finally:
            driver.session_port = real
            for sock in (*queued, full):
                sock.close()

    run(tmp_path / "2", silent)


def test_a_frame_too_big_for_the_node_fails_at_once_in_either_client(tmp_path):
    big = b"v" * (MAX_REQUEST + 128 * 1024)  # (over the record limit: the stream ends)

    async def test(node: raftfast.Node) -> None:
        loop = asyncio.get_running_loop()
        # (frames of at most what the node takes: then an op too big travels alone)
        async with Client(address(node), timeout=20, max_frame_bytes=MAX_REQUEST) as c:
            started = loop.time()
            put = asyncio.ensure_future(c.put(b"big", big))
            others = [asyncio.ensure_future(c.put(b"p%d" % i, b"x")) for i in range(20)]
            with pytest.raises(InvalidArgumentError, match="max-request-bytes"):
                await put
            await asyncio.gather(*others)  # (the frames after it go again)
            assert loop.time() - started < 10

        def sync() -> None:
            with SyncClient(address(node), timeout=20) as c:
                started = time.monotonic()
                with pytest.raises(InvalidArgumentError, match="max-request-bytes"):
                    c.put(b"big", big)
                assert time.monotonic() - started < 10
                c.put(b"k", b"v")

        await asyncio.to_thread(sync)
        assert node._driver.app.fsm._data.get(b"big") is None
        await serves(node)

    run(tmp_path, test)


@pytest.mark.parametrize("transport", ["auto", "grpc"])  # (auto: TCP here)
def test_frames_bigger_than_the_node_takes_go_again_smaller(tmp_path, transport):
    # A client's frames (up to 1 MiB by default) above a node's --max-request-bytes (64 KiB
    # here): 2,000 small puts at once were refused as one frame: over TCP retried until the
    # deadline (ClusterUnavailableError), over gRPC every put failed (InvalidArgumentError).
    async def test(node: raftfast.Node) -> None:
        loop = asyncio.get_running_loop()
        async with Client(address(node), timeout=20, session_transport=transport) as c:
            started = loop.time()
            await asyncio.gather(*(c.put(b"s%d" % i, b"x" * 300) for i in range(2000)))
            assert loop.time() - started < 15
            assert c._max_bytes < MAX_REQUEST  # (it learned: later frames are smaller)
            if transport == "grpc":  # over gRPC's own limit on a message: gRPC refuses it
                started = loop.time()
                with pytest.raises(InvalidArgumentError, match="larger than max"):
                    await c.put(b"huge", bytes(tcp.MAX_RECORD_BYTES + 1))
                assert loop.time() - started < 15
        data = node._driver.app.fsm._data
        assert all(data.get(b"s%d" % i) == b"x" * 300 for i in range(2000))
        assert data.get(b"huge") is None
        await serves(node)

    run(tmp_path, test)


def test_a_write_the_blocking_connection_may_have_sent_is_finished_under_its_id(tmp_path):
    # As when the leader offers no Session port after a follower took the frame and redirected:
    # the blocking connection gives the write up with its sequence; a Client with the
    # connection's client id finishes it, so the node's exactly-once table holds it once.
    async def test(node: raftfast.Node) -> None:
        fsm = node._driver.app.fsm

        def sync() -> None:
            with SyncClient(address(node), timeout=20) as c:
                c.put(b"k", b"1")
                blocking = c._blocking
                assert blocking is not None
                client_id, real_call = blocking._client_id, blocking.call

                def gives_up(op, timeout):
                    op.sequence = 1  # (the sequence of the write above, as if resent)
                    raise NoTcpSession("no Session port", 5.0, client_id)

                blocking.call = gives_up
                c.put(b"k", b"2")  # a retry of sequence 1: the node answers its first result
                blocking.call = real_call
                assert c.get(b"k") == b"1"
                assert fsm._clients[client_id].max_seq == 1

        await asyncio.to_thread(sync)

    run(tmp_path, test)
