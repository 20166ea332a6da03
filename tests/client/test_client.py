"""Client tests against fake in-process grpc.aio KV servers (no Raft involved).

``FakeKV`` is a tiny KV servicer over a dict with the server's exactly-once table; a fake
follower answers UNAVAILABLE with the leader's address. ``ThreadedServer`` runs fakes on their
own event loop in a thread, for the synchronous client and the CLI tests.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from raftfast.client import Client, SyncClient, forks, parse_endpoints
from raftfast.errors import (
    ClusterUnavailableError,
    DeadlineExceededError,
    InvalidArgumentError,
    RaftfastError,
    RequestFailedError,
)
from raftfast.kv.commands import unpack_pairs
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
MAX_KEY = 16
ROOT = Path(__file__).resolve().parents[2]


class FakeKV(pb_grpc.KVServicer):
    """A KV servicer over a dict.

    ``redirect_to``: act as a follower whose leader is at that address, either per op
    (``redirect_style="result"``) or by ending the stream (``"abort"``). ``abort_after_apply``:
    that many frames are applied and then the stream is aborted before the answer (a lost
    response). ``blackhole``: frames are read and never answered.
    """

    def __init__(self, node_id: str = "n1") -> None:
        self.node_id = node_id
        self.address = ""
        self.store: dict[bytes, bytes] = {}
        self.frames = 0
        self.frame_sizes: list[int] = []
        self.streams = 0
        self.writes_seen: list[tuple[int, int, bytes]] = []  # (client_id, sequence, key)
        self.results: dict[tuple[int, int], pb.OpResult] = {}  # the exactly-once table
        self.duplicates = 0
        self.metadata_seen: list[dict[str, str]] = []
        self.redirect_to: str | None = None
        self.redirect_style = "result"
        self.abort_after_apply = 0
        self.blackhole = False
        self.members: list[pb.Member] = []
        self.status_aborts: list[grpc.StatusCode] = []  # Status fails with these first

    # -- helpers

    def _leader_md(self) -> tuple[tuple[str, str], ...]:
        return (("leader-id", "n1"), ("leader-address", self.redirect_to or ""))

    def _apply(self, client_id: int, op: pb.Op) -> pb.OpResult:
        if len(op.key) > MAX_KEY:
            return pb.OpResult(code=INVALID_ARGUMENT, error=f"key exceeds {MAX_KEY} bytes")
        if op.kind == pb.Op.GET:
            value = self.store.get(op.key)
            return pb.OpResult(ok=value is not None, value=value or b"")
        self.writes_seen.append((client_id, op.sequence, op.key))
        done = self.results.get((client_id, op.sequence))
        if done is not None:
            self.duplicates += 1
            return done
        if op.kind == pb.Op.PUT:
            self.store[op.key] = op.value
            res = pb.OpResult(ok=True)
        elif op.kind == pb.Op.PUT_MANY:
            keys, values = unpack_pairs(op.value)
            self.store.update(zip(keys, values, strict=True))
            res = pb.OpResult(ok=True)
        elif op.kind == pb.Op.DELETE:
            res = pb.OpResult(ok=self.store.pop(op.key, None) is not None)
        else:
            current = self.store.get(op.key)
            match = current is None if op.expect_absent else current == op.expected
            if match:
                self.store[op.key] = op.value
            res = pb.OpResult(ok=match)
        self.results[(client_id, op.sequence)] = res
        return res

    # -- the service

    async def Session(
        self, request_iterator: AsyncIterator[pb.SessionFrame], context: Any
    ) -> AsyncIterator[pb.SessionResult]:
        self.streams += 1
        self.metadata_seen.append(dict(context.invocation_metadata() or ()))
        if self.redirect_to and self.redirect_style == "abort":
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "not the leader", trailing_metadata=self._leader_md()
            )
        async for frame in request_iterator:
            self.frames += 1
            self.frame_sizes.append(len(frame.ops))
            if self.blackhole:
                continue
            if self.redirect_to:
                err = pb.OpResult(code=UNAVAILABLE, error="not the leader; leader is n1")
                yield pb.SessionResult(
                    frame_id=frame.frame_id, results=[err] * len(frame.ops), leader=self.redirect_to
                )
                continue
            results = [self._apply(frame.client_id, op) for op in frame.ops]
            if self.abort_after_apply > 0:
                self.abort_after_apply -= 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost (injected)")
            yield pb.SessionResult(frame_id=frame.frame_id, results=results)

    async def Scan(self, request: pb.ScanRequest, context: Any) -> pb.ScanResponse:
        if self.redirect_to:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "not the leader", trailing_metadata=self._leader_md()
            )
        if request.prefix == b"bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prefix 'bad' is not allowed")
        if request.prefix == b"boom":
            await context.abort(grpc.StatusCode.INTERNAL, "internal error: boom")
        if request.prefix == b"denied":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "'x' needs the write role")
        if request.prefix == b"full":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "NOSPACE: quota exceeded")
        keys = sorted(k for k in self.store if k.startswith(request.prefix))
        if request.limit:
            keys = keys[: request.limit]
        return pb.ScanResponse(items=[pb.KeyValue(key=k, value=self.store[k]) for k in keys])

    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusResponse:
        if self.status_aborts:
            await context.abort(self.status_aborts.pop(0), "injected")
        leader = not self.redirect_to
        return pb.StatusResponse(
            id=self.node_id,
            role="leader" if leader else "follower",
            term=3,
            leader="n1",
            leader_address=self.address if leader else self.redirect_to or "",
            commit_index=len(self.results),
            applied_index=len(self.results),
            last_index=len(self.results),
            members=self.members,
            cluster_id="test",
            version="1.2.3",
        )


async def start_fake(fake: FakeKV) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    pb_grpc.add_KVServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    fake.address = f"127.0.0.1:{port}"
    return server, fake.address


def closed_port() -> str:
    """An address nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro_fn())


class ThreadedServer:
    """Fake servers on their own event loop in a thread (for sync code under test)."""

    def __init__(self, *fakes: FakeKV) -> None:
        self.fakes = fakes
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.servers: list[grpc.aio.Server] = []
        self.addresses: list[str] = []

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        try:
            for fake in self.fakes:
                started = asyncio.run_coroutine_threadsafe(start_fake(fake), self.loop)
                server, addr = started.result(10)
                self.servers.append(server)
                self.addresses.append(addr)
        except BaseException:
            self.__exit__()
            raise
        return self

    def bare(self) -> str:
        """Start a gRPC server that serves nothing (not raftfast); its address."""

        async def start() -> tuple[grpc.aio.Server, str]:
            server = grpc.aio.server()
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, f"127.0.0.1:{port}"

        server, address = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.servers.append(server)
        return address

    def __exit__(self, *exc_info: object) -> None:
        for server in self.servers:
            asyncio.run_coroutine_threadsafe(server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# ---------------------------------------------------------------------------------- tests


def test_parse_endpoints() -> None:
    with pytest.raises(TypeError, match="endpoints must be"):
        parse_endpoints(None)  # type: ignore[arg-type]
    assert parse_endpoints("a:1, b:2,,a:1") == ["a:1", "b:2"]
    assert parse_endpoints(["[::1]:7001"]) == ["[::1]:7001"]
    for bad in ("", "host", "host:port", "host:0", ":7001", "h:70000"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)


def test_basic_ops_and_str_encoding() -> None:
    async def main() -> None:
        fake = FakeKV()
        server, addr = await start_fake(fake)
        try:
            async with Client([addr], timeout=5.0) as c:
                assert c.client_id > 0 and c.client_id < 2**63
                await c.put("ké", "vé")
                assert fake.store[b"k\xc3\xa9"] == "vé".encode()
                assert await c.get("ké") == "vé".encode()
                assert await c.get(b"missing") is None
                await c.put(bytearray(b"b"), memoryview(b"2"))
                assert await c.get(b"b", read_mode="stale") == b"2"
                assert await c.cas(b"b", b"wrong", b"3") is False
                assert await c.cas(b"b", b"2", b"3") is True
                assert await c.cas(b"new", None, b"1") is True
                assert await c.cas(b"new", None, b"2") is False
                assert await c.delete(b"b") is True
                assert await c.delete(b"b") is False
                assert await c.scan(b"") == [(b"k\xc3\xa9", "vé".encode()), (b"new", b"1")]
                assert await c.scan("n", limit=1) == [(b"new", b"1")]
                # every write got its own, increasing sequence
                seqs = [seq for _, seq, _ in fake.writes_seen]
                assert seqs == sorted(set(seqs)) and seqs[0] >= 1
                assert {cid for cid, _, _ in fake.writes_seen} == {c.client_id}
        finally:
            await server.stop(None)

    run(main)


def test_type_errors_and_bad_arguments() -> None:
    async def main() -> None:
        fake = FakeKV()
        server, addr = await start_fake(fake)
        try:
            async with Client(addr, timeout=5.0) as c:
                with pytest.raises(TypeError):
                    await c.put(1, b"x")  # type: ignore[arg-type]
                with pytest.raises(TypeError):
                    await c.put(b"k", None)  # type: ignore[arg-type]
                with pytest.raises(TypeError):
                    await c.get(None)  # type: ignore[arg-type]
                with pytest.raises(TypeError):
                    await c.cas(b"k", 5, b"x")  # type: ignore[arg-type]
                with pytest.raises(TypeError):
                    await c.put_many([(b"k", 1)])  # type: ignore[list-item]
                with pytest.raises(ValueError):
                    await c.get(b"k", read_mode="bogus")
                with pytest.raises(ValueError):
                    await c.scan(b"", limit=-1)
                with pytest.raises(ValueError):
                    await c.put(b"k", b"v", timeout=0)
                assert fake.frames == 0  # nothing was sent
        finally:
            await server.stop(None)
        with pytest.raises(ValueError):
            Client([])
        with pytest.raises(ValueError):
            Client("nohostport")

    run(main)


def test_invalid_argument_is_not_retried() -> None:
    async def main() -> None:
        fake = FakeKV()
        server, addr = await start_fake(fake)
        try:
            async with Client([addr], timeout=5.0) as c:
                with pytest.raises(InvalidArgumentError, match="key exceeds 16 bytes") as info:
                    await c.put(b"k" * 100, b"v")
                assert isinstance(info.value, ValueError)
                assert fake.frames == 1
                with pytest.raises(InvalidArgumentError, match="prefix 'bad' is not allowed"):
                    await c.scan(b"bad")
                with pytest.raises(RequestFailedError, match="boom") as failed:
                    await c.scan(b"boom")
                assert failed.value.code == "INTERNAL"
        finally:
            await server.stop(None)

    run(main)


@pytest.mark.parametrize("style", ["result", "abort"])
def test_follower_redirects_to_leader(style: str) -> None:
    async def main() -> None:
        leader, follower = FakeKV("n1"), FakeKV("n2")
        lserver, laddr = await start_fake(leader)
        fserver, faddr = await start_fake(follower)
        follower.redirect_to = laddr
        follower.redirect_style = style
        try:
            async with Client([faddr], timeout=5.0, cluster_id="test") as c:
                await c.put(b"a", b"1")
                assert leader.store == {b"a": b"1"}
                assert c.leader == laddr
                assert await c.get(b"a") == b"1"
                assert await c.scan(b"") == [(b"a", b"1")]
                # the redirected write kept its sequence across the two nodes
                if style == "result":
                    assert follower.frames == 1
                assert leader.writes_seen == [(c.client_id, 1, b"a")]
                assert leader.metadata_seen[0]["cluster-id"] == "test"
            # unary calls follow the metadata too (a new client, straight to scan)
            async with Client([faddr], timeout=5.0) as c2:
                assert await c2.scan(b"") == [(b"a", b"1")]
                assert c2.leader == laddr
        finally:
            await lserver.stop(None)
            await fserver.stop(None)

    run(main)


def test_unreachable_endpoint_then_leader() -> None:
    async def main() -> None:
        leader = FakeKV()
        server, addr = await start_fake(leader)
        try:
            async with Client([closed_port(), addr], timeout=5.0) as c:
                await c.put(b"x", b"1")
                assert await c.scan(b"") == [(b"x", b"1")]
                assert (await c.status())["id"] == "n1"
        finally:
            await server.stop(None)

    run(main)


def test_retry_after_lost_response_keeps_sequence() -> None:
    async def main() -> None:
        fake = FakeKV()
        server, addr = await start_fake(fake)
        fake.abort_after_apply = 1  # the first frame is applied, its answer is lost
        try:
            async with Client([addr], timeout=5.0) as c:
                await c.put(b"x", b"1")
                assert fake.store[b"x"] == b"1"
                assert fake.streams == 2
                assert fake.writes_seen == [(c.client_id, 1, b"x"), (c.client_id, 1, b"x")]
                assert fake.duplicates == 1
                await c.put(b"y", b"2")  # a new write: a new sequence
                assert fake.writes_seen[-1] == (c.client_id, 2, b"y")

                # cas is where a re-application would show: the retry returns the first result
                fake.abort_after_apply = 1
                assert await c.cas(b"x", b"1", b"2") is True
                assert fake.store[b"x"] == b"2"
                assert fake.duplicates == 2
        finally:
            await server.stop(None)

    run(main)


def test_many_concurrent_puts_travel_in_few_frames() -> None:
    async def main() -> None:
        fake = FakeKV()
        server, addr = await start_fake(fake)
        try:
            async with Client([addr], timeout=30.0) as c:
                n = 10_000
                await asyncio.gather(*(c.put(f"k{i}", f"v{i}") for i in range(n)))
                assert len(fake.store) == n
                assert fake.store[b"k9999"] == b"v9999"
                assert fake.frames <= 10, fake.frame_sizes
                assert sum(fake.frame_sizes) == n
                seqs = [seq for _, seq, _ in fake.writes_seen]
                assert sorted(seqs) == list(range(1, n + 1))

                # put_many: one call, the pairs packed into a few atomic writes
                before, writes_before = fake.frames, len(fake.writes_seen)
                await c.put_many([(f"m{i}", b"x") for i in range(5000)])
                assert sum(1 for k in fake.store if k.startswith(b"m")) == 5000
                assert fake.frames - before <= 2
                assert len(fake.writes_seen) - writes_before == 2  # 4,096 pairs per write
                got = await asyncio.gather(*(c.get(f"m{i}") for i in range(100)))
                assert got == [b"x"] * 100
        finally:
            await server.stop(None)

    run(main)


def test_outstanding_write_window_is_respected() -> None:
    async def main() -> None:
        fake = FakeKV()
        server, addr = await start_fake(fake)
        try:
            async with Client([addr], timeout=10.0, max_outstanding_writes=100) as c:
                await asyncio.gather(*(c.put(f"k{i}", b"v") for i in range(1000)))
                assert len(fake.store) == 1000
                assert max(fake.frame_sizes) <= 100
        finally:
            await server.stop(None)

    run(main)


def test_deadline_when_nothing_answers() -> None:
    async def main() -> None:
        addr = closed_port()
        async with Client([addr], timeout=0.5) as c:
            for call in (
                lambda: c.put(b"k", b"v"),
                lambda: c.get(b"k"),
                lambda: c.scan(b""),
                lambda: c.status(),
            ):
                start = time.monotonic()
                with pytest.raises(DeadlineExceededError) as info:
                    await call()
                elapsed = time.monotonic() - start
                assert 0.4 < elapsed < 10.0  # (the deadline, 0.5 s, and room for a busy machine)
                assert isinstance(info.value, ClusterUnavailableError)
                assert isinstance(info.value, TimeoutError)
                assert "reachable at " + addr in str(info.value)
                assert "\n" not in str(info.value)
            with pytest.raises(ClusterUnavailableError):
                await c.put(b"k", b"v", timeout=0.2)

    run(main)


def test_deadline_when_the_leader_is_silent() -> None:
    async def main() -> None:
        fake = FakeKV()
        fake.blackhole = True
        server, addr = await start_fake(fake)
        try:
            async with Client([addr], timeout=0.3) as c:
                with pytest.raises(DeadlineExceededError) as info:
                    await c.put(b"k", b"v")
                assert not isinstance(info.value, ClusterUnavailableError)
                fake.blackhole = False
                await c.put(b"k", b"v", timeout=5.0)  # a fresh stream works again
                assert fake.store == {b"k": b"v"}
        finally:
            await server.stop(None)

    run(main)


def test_huge_and_infinite_timeouts_are_a_year() -> None:
    # (1e10 s hung unary calls in gRPC; 1e19 s failed inside SyncClient with struct.error)
    async def main() -> None:
        fake = FakeKV()
        server, addr = await start_fake(fake)
        try:
            async with Client([addr], timeout=float("inf")) as c:
                assert c.timeout == 365 * 24 * 3600.0
                await asyncio.wait_for(c.put(b"k", b"v"), 10)
                assert (await asyncio.wait_for(c.status(), 10))["id"] == "n1"
                assert await asyncio.wait_for(c.get(b"k", timeout=1e12), 10) == b"v"
                assert await asyncio.wait_for(c.scan(b"", timeout=1e19), 10) == [(b"k", b"v")]
                # (an int too big for a float raised OverflowError from inside the client)
                assert await asyncio.wait_for(c.get(b"k", timeout=10**400), 10) == b"v"
        finally:
            await server.stop(None)

    run(main)
    with ThreadedServer(FakeKV()) as servers, SyncClient(servers.addresses, timeout=10**400) as c:
        c.put(b"a", b"1", timeout=float("inf"))
        assert c.get(b"a") == b"1" and c.status()["id"] == "n1"


def test_finished_writes_are_not_held_until_the_next_one() -> None:
    # (their values were: an idle client after a burst of 3,000 puts of 100 KB held 47 MiB)
    async def main() -> None:
        server, addr = await start_fake(FakeKV())
        try:
            async with Client([addr], timeout=30) as c:
                await asyncio.gather(*(c.put(b"k%d" % i, b"v" * 1000) for i in range(3000)))
                assert len(c._outstanding) == 0
                assert await c.get(b"k7") == b"v" * 1000  # (a read changes nothing here)
                assert len(c._outstanding) == 0
        finally:
            await server.stop(None)

    run(main)


def test_a_child_forked_while_a_sync_client_is_open_is_told_gRPC_cannot_work_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # (a client made there waited out its whole timeout, then said no leader was reachable.
    # The fork's hooks are run here, not a fork: a child of this process, threads and all,
    # crashed in CPython's own after-fork code now and then.)
    monkeypatch.setattr(forks, "_cannot_use_grpc", False)
    with ThreadedServer(FakeKV()) as servers:
        forks._before_fork()
        forks._after_fork_in_child()  # (no client open: a child may make them)
        forks._after_fork_in_parent()
        with SyncClient(servers.addresses, timeout=30) as c:
            c.put(b"k", b"v")
            forks._before_fork()
            forks._after_fork_in_parent()  # (the parent goes on)
            assert c.get(b"k") == b"v"
            forks._before_fork()
            forks._after_fork_in_child()
        for make in (lambda: SyncClient(servers.addresses), lambda: Client(servers.addresses)):
            with pytest.raises(RaftfastError, match="forked while a SyncClient was open"):
                make()


def test_calls_in_flight_end_when_the_client_closes() -> None:
    # They waited out their whole deadline (20 s), or raised a bare CancelledError.
    async def main() -> None:
        fake = FakeKV()
        fake.blackhole = True  # (frames taken, never answered)
        server, addr = await start_fake(fake)
        try:
            c = Client([addr], timeout=20)
            puts = [asyncio.ensure_future(c.put(b"k%d" % i, b"v")) for i in range(50)]
            while fake.frames == 0:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            await c.close()
            outcomes = await asyncio.gather(*puts, return_exceptions=True)
            assert time.monotonic() - started < 5
            assert all(isinstance(o, RaftfastError) and "closed" in str(o) for o in outcomes)
        finally:
            await server.stop(None)

    run(main)


def test_unary_calls_that_retry_end_when_the_client_closes() -> None:
    # They went on retrying an unreachable node to their deadline (a year with timeout=inf),
    # on channels the closed client opened again and never closed.
    async def main() -> None:
        c = Client([closed_port()], timeout=float("inf"), backoff_max=1.0)
        calls = [
            asyncio.ensure_future(call)
            for call in (c.status(), c.members(), c.scan(b""), c.propose(b"x"))
        ]
        deadline = time.monotonic() + 10
        while not c._channels:  # (the first attempts made: they retry now)
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await c.close()
        done, _ = await asyncio.wait(calls, timeout=10)
        assert len(done) == len(calls), "calls still retrying after close()"
        for call in calls:
            with pytest.raises(RaftfastError, match="client is closed"):
                call.result()
        assert not c._channels

    run(main)


def test_a_session_task_cancelled_by_the_application_is_started_again() -> None:
    # A shutdown that cancels every other task took the client's session with it: each later
    # put or get waited out its whole deadline.
    async def main(addr: str) -> None:
        async with Client([addr], timeout=5) as c:
            await c.put(b"a", b"1")
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            deadline = time.monotonic() + 10
            while not c._session_task.done():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            await c.put(b"b", b"2", timeout=30)
            assert await c.get(b"b", timeout=30) == b"2"

    with ThreadedServer(FakeKV()) as servers:  # (its tasks are not the application's)
        asyncio.run(main(servers.addresses[0]))


@pytest.mark.parametrize(
    "options, error",
    [
        ({"max_ops_per_frame": "5"}, TypeError),
        ({"max_outstanding_writes": None}, TypeError),
        ({"max_frame_bytes": 1.5}, TypeError),
        ({"cluster_id": "é"}, ValueError),
        ({"cluster_id": "a\nb"}, ValueError),
        ({"cluster_id": 5}, TypeError),
        ({"backoff_base": float("nan")}, ValueError),
        ({"backoff_max": -1}, ValueError),
        ({"backoff_max": "1"}, TypeError),
        ({"max_outstanding_writes": 4096}, ValueError),
    ],
)
def test_bad_options_are_refused_by_the_constructor(options, error) -> None:
    # (a cluster_id gRPC cannot send killed the client's session task: every call then
    # waited out its deadline; a window past the node's exactly-once memory voids it)
    with pytest.raises(error):
        Client("127.0.0.1:1", **options)
    with pytest.raises(error):
        SyncClient("127.0.0.1:1", **options)


def test_status_dict() -> None:
    async def main() -> None:
        fake = FakeKV()
        fake.members = [
            pb.Member(id="n1", address="127.0.0.1:1", role="voter", match_index=7),
            pb.Member(id="n2", address="127.0.0.1:2", role="learner", match_index=3),
        ]
        server, addr = await start_fake(fake)
        try:
            async with Client([addr], timeout=5.0) as c:
                st = await c.status()
                assert st["id"] == "n1" and st["role"] == "leader" and st["term"] == 3
                assert st["endpoint"] == addr and st["cluster_id"] == "test"
                assert st["members"][1] == {
                    "id": "n2",
                    "address": "127.0.0.1:2",
                    "role": "learner",
                    "match_index": 3,
                    "client_address": "",
                }
                assert (await c.status(addr))["id"] == "n1"
                with pytest.raises(ValueError):
                    await c.status("nope")
        finally:
            await server.stop(None)

    run(main)


def test_closed_client_refuses_calls() -> None:
    async def main() -> None:
        c = Client(closed_port(), timeout=0.5)
        await c.close()
        with pytest.raises(RaftfastError, match="closed"):
            await c.put(b"k", b"v")

    run(main)


def test_sync_client() -> None:
    leader, follower = FakeKV("n1"), FakeKV("n2")
    with ThreadedServer(leader, follower) as servers:
        laddr, faddr = servers.addresses
        follower.redirect_to = laddr
        with SyncClient(f"{faddr},{laddr}", timeout=5.0) as c:
            c.put("a", "1")
            assert c.get("a") == b"1"
            assert c.cas("a", "1", "2") is True
            assert c.delete("a") is True
            assert c.get("a") is None
            c.put_many([("p1", "x"), ("p2", "y")])
            assert c.scan("p") == [(b"p1", b"x"), (b"p2", b"y")]
            assert c.status(laddr)["role"] == "leader"
            assert c.leader == laddr
            with pytest.raises(TypeError):
                c.put(3, b"x")  # type: ignore[arg-type]
            with pytest.raises(InvalidArgumentError):
                c.put(b"k" * 99, b"x")
            # usable from several threads at once
            errors: list[BaseException] = []

            def worker(t: int) -> None:
                try:
                    for i in range(20):
                        c.put(f"t{t}-{i}", b"v")
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)

            threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            assert not errors
            assert len(c.scan("t")) == 80
        c.close()  # idempotent
        with pytest.raises(RaftfastError, match="closed"):
            c.get("a")


def test_sync_client_deadline() -> None:
    with SyncClient(closed_port(), timeout=0.3) as c:
        with pytest.raises(ClusterUnavailableError):
            c.get("k")


def test_cancelled_by_a_stopping_node_is_retried() -> None:
    """A node that shuts down cancels the calls it serves: the client asks again."""

    async def main() -> None:
        fake = FakeKV()
        fake.status_aborts = [grpc.StatusCode.CANCELLED, grpc.StatusCode.CANCELLED]
        server, addr = await start_fake(fake)
        try:
            async with Client([addr], timeout=5) as c:
                assert (await c.status())["id"] == "n1"
            assert fake.status_aborts == []
        finally:
            await server.stop(None)

    run(main)


@pytest.mark.parametrize("call", ["put", "status", "scan", "propose"])
def test_a_server_that_is_not_raftfast_fails_fast(call: str) -> None:
    """UNIMPLEMENTED cannot get better by waiting: one clear error at once, not at the
    deadline."""

    async def main() -> None:
        server = grpc.aio.server()  # serves nothing at all
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        addr = f"127.0.0.1:{port}"
        try:
            async with Client([addr], timeout=30) as c:
                started = time.monotonic()
                with pytest.raises(RequestFailedError) as info:
                    if call == "put":
                        await c.put("k", "v")
                    elif call == "status":
                        await c.status()
                    elif call == "scan":
                        await c.scan("k")
                    else:
                        await c.propose(b"x")
                assert time.monotonic() - started < 15  # far from the 30 s deadline
                assert info.value.code == "UNIMPLEMENTED"
                if call == "propose":
                    assert "serves no state machine" in str(info.value)
                else:
                    assert f"not a raftfast server at {addr}" in str(info.value)
        finally:
            await server.stop(None)

    run(main)


def test_a_sync_client_left_open_leaves_no_task_behind(tmp_path: Path) -> None:
    """A script that ends (even by an exception) without closing its SyncClient prints no
    "Task was destroyed but it is pending!"."""
    with ThreadedServer(FakeKV()) as servers:
        script = tmp_path / "script.py"
        script.write_text(
            "from raftfast import SyncClient\n"
            f"c = SyncClient({servers.addresses[0]!r})\n"
            "c.put('k', 'v')\n"
            "raise SystemExit(c.get('k').decode())\n"
        )
        done = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    assert done.stderr.strip() == "v", done.stderr
    assert "Task was destroyed" not in done.stderr
