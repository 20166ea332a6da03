"""``BlockingSession`` (raftfast/client/blocking.py) against fake Session ports over TCP
(threads with plain sockets, no Raft): redirects, a lost answer retried with its sequence (the
write is applied once), stale answers skipped, the statuses a node ends a stream with, backoff
while busy, deadlines, ``NoTcpSession`` before anything was sent, and ``close`` from another
thread."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from raftfast.address import split_address
from raftfast.client import Client, SyncClient
from raftfast.client.blocking import BlockingSession, NoTcpSession
from raftfast.client.calls import DELETE, GET, PUT
from raftfast.client.session import Op
from raftfast.client.sync import _session_port
from raftfast.errors import (
    ClusterUnavailableError,
    DeadlineExceededError,
    InvalidArgumentError,
    PermissionDeniedError,
    RaftfastError,
)
from raftfast.proto import raftfast_pb2 as pb
from raftfast.transport.tcp import record
from tests.raw_server import raw_server

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def read_record(conn: socket.socket) -> bytes | None:
    head = b""
    while len(head) < 4:
        chunk = conn.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    size = int.from_bytes(head, "big")
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            return None
        body += chunk
    return body


class FakePort:
    """A Session port over TCP: a hello, then frames of one op each, answered by ``answer``
    (frame -> the results to send, or None to close the connection without a word). Its
    store and exactly-once table are a node's in miniature."""

    def __init__(
        self, answer: Callable[[FakePort, pb.SessionFrame], list[pb.SessionResult] | None]
    ):
        self.answer = answer
        self.store: dict[bytes, bytes] = {}
        self.table: dict[tuple[int, int], pb.OpResult] = {}  # (client, sequence) -> result
        self.applied = 0
        self.frames: list[pb.SessionFrame] = []
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"  # (the "endpoint": its gRPC port is fake too)
        self.open: list[socket.socket] = []
        self.stopping = threading.Event()  # (answers that hold on end when it is set)
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def apply(self, frame: pb.SessionFrame) -> pb.SessionResult:
        op = frame.ops[0]
        key = (frame.client_id, op.sequence)
        if op.kind != GET and key in self.table:
            r = self.table[key]
        else:
            if op.kind == PUT:
                self.store[op.key] = op.value
                r = pb.OpResult(ok=True)
            elif op.kind == DELETE:
                r = pb.OpResult(ok=self.store.pop(op.key, None) is not None)
            else:
                value = self.store.get(op.key)
                r = pb.OpResult(ok=value is not None, value=value or b"")
            if op.kind != GET:
                self.applied += 1
                self.table[key] = r
        return pb.SessionResult(frame_id=frame.frame_id, results=[r])

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self.open.append(conn)
            self.threads.append(threading.Thread(target=self._serve, args=(conn,), daemon=True))
            self.threads[-1].start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                if read_record(conn) is None:  # the hello
                    return
                while (payload := read_record(conn)) is not None:
                    frame = pb.SessionFrame.FromString(payload)
                    self.frames.append(frame)
                    results = self.answer(self, frame)
                    if results is None:
                        return
                    conn.sendall(b"".join(record(r.SerializeToString()) for r in results))
            except OSError:
                return

    def close(self) -> None:
        """Stop, leaving no thread behind (tests/test_sync.py counts the process's threads)."""
        self.stopping.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # (wakes the accept: Linux)
        except OSError:
            pass
        self.sock.close()
        for conn in self.open:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self.threads:
            thread.join(10)
            assert not thread.is_alive(), "a fake port's thread is still running"


def serve_all(port: FakePort, frame: pb.SessionFrame) -> list[pb.SessionResult]:
    return [port.apply(frame)]


@pytest.fixture
def fakes() -> Iterator[Callable[..., FakePort]]:
    made: list[FakePort] = []

    def make(answer=serve_all) -> FakePort:
        made.append(FakePort(answer))
        return made[-1]

    yield make
    for port in made:
        port.close()


def session(*ports: FakePort, timeout: float = 5.0, lookup=None) -> BlockingSession:
    """A BlockingSession whose endpoints are ``ports`` (their Status: the port itself)."""
    client = Client([p.address for p in ports], timeout=timeout, backoff_base=0.005)
    by_address = {p.address: p.port for p in ports}
    return BlockingSession(client, lookup or (lambda target, timeout: by_address[target]))


def test_ops_and_their_results(fakes) -> None:
    port = fakes()
    s = session(port)
    assert s.call(Op(PUT, b"k", b"v"), None) is None
    assert s.call(Op(GET, b"k"), None) == b"v"
    assert s.call(Op(DELETE, b"k"), None) is True
    assert s.call(Op(DELETE, b"k"), None) is False
    assert s.call(Op(GET, b"k"), None) is None
    assert port.connections == 1 and s.connected_to == port.address == s.leader
    sequences = [f.ops[0].sequence for f in port.frames]
    assert sequences == [1, 0, 2, 3, 0]  # (writes numbered, reads not)
    assert len({f.client_id for f in port.frames}) == 1


def test_a_follower_sends_it_to_the_leader(fakes) -> None:
    leader = fakes()

    def follower(port: FakePort, frame: pb.SessionFrame) -> list[pb.SessionResult]:
        r = pb.OpResult(code=UNAVAILABLE, error="not the leader")
        return [pb.SessionResult(frame_id=frame.frame_id, results=[r], leader=leader.address)]

    follow = fakes(follower)
    s = session(follow, leader)
    s.call(Op(PUT, b"k", b"v"), None)
    assert leader.store == {b"k": b"v"} and s.leader == leader.address
    s.call(Op(PUT, b"k", b"w"), None)  # straight to the leader now
    assert len(follow.frames) == 1 and leader.store == {b"k": b"w"}


def test_a_lost_answer_is_retried_with_its_sequence_and_applied_once(fakes) -> None:
    lost = {"left": 1}

    def drop_first(port: FakePort, frame: pb.SessionFrame) -> list[pb.SessionResult] | None:
        result = port.apply(frame)
        if lost["left"]:
            lost["left"] -= 1
            return None  # applied, then the connection closes without the answer
        return [result]

    port = fakes(drop_first)
    s = session(port)
    s.call(Op(PUT, b"k", b"v"), None)
    assert s.call(Op(DELETE, b"k"), None) is True
    lost["left"] = 1
    s.call(Op(PUT, b"k", b"again"), None)
    assert port.applied == 3 and port.connections == 3
    puts = [f.ops[0] for f in port.frames if f.ops[0].kind == PUT]
    assert [op.sequence for op in puts] == [1, 1, 3, 3]  # (the retries: the same sequence)
    assert port.store == {b"k": b"again"}


def test_an_answer_to_an_earlier_frame_is_skipped(fakes) -> None:
    def stale_first(port: FakePort, frame: pb.SessionFrame) -> list[pb.SessionResult]:
        old = pb.SessionResult(frame_id=frame.frame_id - 1, results=[pb.OpResult(ok=True)])
        return [old, port.apply(frame)]

    port = fakes(stale_first)
    s = session(port)
    s.call(Op(PUT, b"k", b"v"), None)
    assert s.call(Op(GET, b"k"), None) == b"v"


def test_busy_is_retried_after_a_backoff_and_a_refusal_is_raised(fakes) -> None:
    busy = {"left": 3}

    def answer(port: FakePort, frame: pb.SessionFrame) -> list[pb.SessionResult]:
        op = frame.ops[0]
        if op.key == b"bad":
            r = pb.OpResult(code=INVALID, error="key too long")
            return [pb.SessionResult(frame_id=frame.frame_id, results=[r])]
        if op.key == b"full":
            r = pb.OpResult(code=EXHAUSTED, error="NOSPACE: the quota is reached")
            return [pb.SessionResult(frame_id=frame.frame_id, results=[r])]
        if busy["left"]:
            busy["left"] -= 1
            r = pb.OpResult(code=EXHAUSTED, error="too many frames under way")
            return [pb.SessionResult(frame_id=frame.frame_id, results=[r])]
        return [port.apply(frame)]

    port = fakes(answer)
    s = session(port)
    s.call(Op(PUT, b"k", b"v"), None)
    assert port.store == {b"k": b"v"} and len(port.frames) == 4 and port.connections == 1
    with pytest.raises(InvalidArgumentError, match="key too long"):
        s.call(Op(PUT, b"bad", b"v"), None)
    with pytest.raises(RaftfastError, match="NOSPACE"):
        s.call(Op(PUT, b"full", b"v"), None)
    assert s.call(Op(GET, b"k"), None) == b"v"  # (the connection serves on)


def test_a_stream_ended_for_want_of_a_role_raises_at_once(fakes) -> None:
    def refuse(port: FakePort, frame: pb.SessionFrame) -> list[pb.SessionResult]:
        return [pb.SessionResult(frame_id=0, code=DENIED, error="client 'x' has no role here")]

    s = session(fakes(refuse), timeout=30)
    start = time.monotonic()
    with pytest.raises(PermissionDeniedError, match="no role"):
        s.call(Op(PUT, b"k", b"v"), None)
    assert time.monotonic() - start < 10  # (not retried until the deadline)


def test_a_silent_node_ends_in_the_deadline(fakes) -> None:
    port = fakes(lambda port, frame: (port.stopping.wait(30), None)[1])
    s = session(port, timeout=0.5)
    start = time.monotonic()
    with pytest.raises(DeadlineExceededError, match="deadline of 0.5s exceeded"):
        s.call(Op(PUT, b"k", b"v"), None)
    assert time.monotonic() - start < 5
    assert s.connected_to is None  # (a silent connection is not kept)


def test_no_node_reachable_is_cluster_unavailable(fakes) -> None:
    def unreachable(target: str, timeout: float) -> int:
        raise ClusterUnavailableError(f"{target}: connection refused")

    s = session(fakes(), fakes(), timeout=0.5, lookup=unreachable)
    with pytest.raises(ClusterUnavailableError, match="connection refused"):
        s.call(Op(PUT, b"k", b"v"), None)


def test_no_tcp_session_before_anything_was_sent(fakes) -> None:
    port = fakes()
    s = session(port, lookup=lambda target, timeout: 0)  # (the node offers none)
    with pytest.raises(NoTcpSession) as info:
        s.call(Op(PUT, b"k", b"v"), 2.0)
    assert 0 < info.value.remaining <= 2.0 and not port.frames

    def refused(target: str, timeout: float) -> int:
        raise PermissionDeniedError(f"{target}: Status needs read")

    with pytest.raises(NoTcpSession, match="needs read"):  # (the other way says why)
        session(port, lookup=refused).call(Op(GET, b"k"), None)


def test_close_from_another_thread_ends_a_call_under_way(fakes) -> None:
    started = threading.Event()

    def hold(port: FakePort, frame: pb.SessionFrame) -> None:
        started.set()
        port.stopping.wait(30)
        return None

    s = session(fakes(hold), timeout=30)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            s.call(Op(PUT, b"k", b"v"), None)
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert started.wait(10)
    s.close()
    caller.join(10)
    assert not caller.is_alive()
    assert len(errors) == 1 and "client is closed" in str(errors[0])


def test_a_forked_child_neither_uses_nor_breaks_the_parents_connection(fakes) -> None:
    port = fakes()
    s = session(port)
    s.call(Op(PUT, b"k", b"v"), None)
    pid = os.fork()
    if pid == 0:  # the child: refused, and its close leaves the parent's connection open
        ok = False
        try:
            s.call(Op(PUT, b"k", b"child"), None)
        except RaftfastError as exc:
            ok = "another process" in str(exc)
        finally:
            s.close()
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    s.call(Op(PUT, b"k", b"parent"), None)
    assert port.store == {b"k": b"parent"} and port.connections == 1


def test_a_leader_silent_until_the_deadline_is_left_for_the_next_call(fakes) -> None:
    frozen = fakes(lambda port, frame: (port.stopping.wait(30), None)[1])  # (takes, never answers)
    alive = fakes()
    s = session(frozen, alive, timeout=0.5)
    with pytest.raises(DeadlineExceededError):
        s.call(Op(PUT, b"k", b"v"), None)
    s.call(Op(PUT, b"k", b"w"), None)  # (at the other node: a frozen kernel still accepts)
    assert alive.store == {b"k": b"w"} and s.leader == alive.address


def test_a_node_that_reads_slowly_does_not_hold_a_call_past_its_deadline() -> None:
    def trickle(conn: socket.socket, stop: threading.Event) -> None:
        while not stop.wait(0.2):  # reads 64 KiB every 0.2 s, never answers
            if not conn.recv(64 * 1024):
                return

    with raw_server(trickle) as address:
        client = Client([address], timeout=1.0)
        s = BlockingSession(client, lambda target, timeout: split_address(address)[1])
        started = time.monotonic()
        try:
            with pytest.raises(DeadlineExceededError):
                s.call(Op(PUT, b"k", b"v" * (16 << 20)), None)
            assert time.monotonic() - started < 4
        finally:
            s.close()


def test_no_tcp_session_carries_whether_the_write_may_be_out(fakes) -> None:
    no_port = fakes()

    def lookup(target: str, timeout: float) -> int:
        if target == down.address:
            raise ClusterUnavailableError(f"{target}: connection refused")
        return 0  # (the leader offers no Session port)

    down = fakes()
    s = session(down, no_port, lookup=lookup)
    op = Op(PUT, b"k", b"v")
    with pytest.raises(NoTcpSession) as info:
        s.call(op, None)
    assert op.sequence == 0 and not no_port.frames  # (nothing was sent: any way will do)

    def follower(port: FakePort, frame: pb.SessionFrame) -> list[pb.SessionResult]:
        r = pb.OpResult(code=UNAVAILABLE, error="not the leader")
        return [pb.SessionResult(frame_id=frame.frame_id, results=[r], leader=no_port.address)]

    follow = fakes(follower)
    ports = {follow.address: follow.port, no_port.address: 0}
    s = session(follow, no_port, lookup=lambda target, timeout: ports[target])
    op = Op(PUT, b"k", b"v")
    with pytest.raises(NoTcpSession) as info:
        s.call(op, None)
    assert op.sequence == 1 and info.value.client_id == follow.frames[0].client_id


def test_a_frame_the_node_cannot_take_fails_at_once(fakes) -> None:
    def too_big(port: FakePort, frame: pb.SessionFrame) -> list[pb.SessionResult]:
        error = "record of 70000000 bytes is too large for --max-request-bytes"
        return [pb.SessionResult(frame_id=0, code=INVALID, error=error)]

    s = session(fakes(too_big), timeout=30)
    started = time.monotonic()
    with pytest.raises(InvalidArgumentError, match="too large"):
        s.call(Op(PUT, b"k", b"v"), None)
    assert time.monotonic() - started < 10


def test_a_sync_client_dropped_unclosed_is_collected_with_its_thread() -> None:
    client = SyncClient("127.0.0.1:1")
    thread = client._thread
    del client
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()  # (the finalizer ran: nothing it holds holds the client)


def test_an_answer_claiming_4_gib_is_not_waited_for() -> None:
    def huge_header(conn: socket.socket, stop: threading.Event) -> None:
        read_record(conn)  # (the hello)
        read_record(conn)  # the first frame, answered with a 4 GiB header
        conn.sendall((2**32 - 1).to_bytes(4, "big") + b"\0" * 64)
        stop.wait(0.5)

    with raw_server(huge_header) as address:
        client = Client([address], timeout=1.0, backoff_base=0.005)
        s = BlockingSession(client, lambda target, timeout: split_address(address)[1])
        started = time.monotonic()
        try:
            op = Op(PUT, b"k", b"v")
            with pytest.raises(NoTcpSession):  # (twice no answer: the other way, with its id)
                s.call(op, None)
            assert time.monotonic() - started < 4 and op.sequence == 1
        finally:
            s.close()


def test_a_close_while_connecting_leaves_no_connection(fakes) -> None:
    # Another thread's close() came while the connection opened: the put then went out on a
    # connection of the closed client (about 6% of such races), which stayed open.
    port = fakes()
    closing: list[BlockingSession] = []

    def lookup(target: str, timeout: float) -> int:
        closing[0].close()  # (as another thread would, while this one connects)
        return port.port

    s = session(port, lookup=lookup)
    closing.append(s)
    with pytest.raises(RaftfastError, match="client is closed"):
        s.call(Op(PUT, b"k", b"v"), None)
    assert s.connected_to is None and not port.frames


def test_the_session_port_asked_as_the_client_closes_says_so() -> None:
    # A bare concurrent.futures.CancelledError, with an empty message, before.
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asked = threading.Event()

    class Asking:  # (a Client whose Status is never answered)
        async def _ask_session_port(self, target: str, timeout: float) -> int:
            asked.set()
            await asyncio.Event().wait()
            return 0

    def close_when_asked() -> None:  # (closing cancels what is left on the client's loop)
        assert asked.wait(10)
        loop.call_soon_threadsafe(lambda: [t.cancel() for t in asyncio.all_tasks(loop)])

    closer = threading.Thread(target=close_when_asked)
    closer.start()
    try:
        with pytest.raises(RaftfastError, match="client is closed"):
            _session_port(Asking(), loop, "127.0.0.1:1", 30)  # type: ignore[arg-type]
    finally:
        closer.join(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
