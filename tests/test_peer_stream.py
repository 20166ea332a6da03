"""The peer transport in one process: a sender's ``PeerTransport`` and a receiver's
``PeerService`` (+ ``ReplicationServer``) on 127.0.0.1, over the TCP replication stream, the
gRPC ``Replicate`` stream, and the fall-back from one to the other."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import socket
from collections.abc import Awaitable, Callable

import grpc
import pytest

from raftfast.core.types import Message, MsgType
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from raftfast.tools.localcluster import free_ports
from raftfast.transport import grpc as grpc_transport
from raftfast.transport import tcp
from raftfast.transport.codec import encode_frame
from raftfast.transport.grpc import PeerService, PeerTransport
from raftfast.transport.tcp import DEAD_PEER_S, ReplicationServer
from tests.polling import until as _until

CLUSTER = "c1"
# (this suite's own poll waited 20 s at most: so does it with the shared one)
until = functools.partial(_until, timeout=20.0)


def heartbeat(i: int) -> Message:
    return Message(MsgType.HEARTBEAT, "a", "b", term=1, commit=i)


class Receiver:
    """Node "b": records what it is delivered; ``offer_tcp`` False plays a node that only
    takes the gRPC stream, ``broken_offset`` one that announces a port nobody listens on."""

    def __init__(self, offer_tcp: bool = True, broken_offset: bool = False) -> None:
        self.port = free_ports(1)[0]
        self.address = f"127.0.0.1:{self.port}"
        self.delivered: list[Message] = []
        self.removed: dict[str, int] = {}
        self.service = PeerService(
            CLUSTER, lambda src: src not in self.removed, self.delivered.extend, None,
            self.removed.get, node_id="b",
        )  # fmt: skip
        self.offer_tcp, self.broken_offset = offer_tcp, broken_offset
        self.server = grpc.aio.server()
        self.stream_server = ReplicationServer(self.service.check, self.delivered.extend)

    async def start(self) -> None:
        pb_grpc.add_PeerServicer_to_server(self.service, self.server)
        self.server.add_insecure_port(self.address)
        await self.server.start()
        if self.broken_offset:
            self.service.stream_offset = free_ports(1)[0] - self.port
        elif self.offer_tcp:
            stream_port = await self.stream_server.start("127.0.0.1")
            self.service.stream_offset = stream_port - self.port

    async def stop(self) -> None:
        await self.stream_server.close()
        await self.server.stop(None)


def run(
    test: Callable[[Receiver, PeerTransport, list[tuple[str, int]], list[str]], Awaitable[None]],
    stream: str = "tcp",
    **receiver_kwargs: bool,
) -> None:
    async def main() -> None:
        receiver = Receiver(**receiver_kwargs)
        refused: list[tuple[str, int]] = []
        unreachable: list[str] = []
        await receiver.start()
        sender = PeerTransport(
            "a", CLUSTER, {"b": receiver.address}, unreachable.append,
            lambda peer, index: refused.append((peer, index)), stream,
        )  # fmt: skip
        sender.start()
        try:
            await until("the stream to b", lambda: sender._peers["b"].connected)
            await test(receiver, sender, refused, unreachable)
        finally:
            await sender.close()
            await receiver.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


async def send_and_check(receiver: Receiver, sender: PeerTransport, count: int) -> None:
    """``count`` heartbeats in one send (more than fit one frame) arrive whole and in order."""
    before = len(receiver.delivered)
    sender.send([heartbeat(i) for i in range(count)])
    await until(f"{count} messages", lambda: len(receiver.delivered) >= before + count)
    assert [m.commit for m in receiver.delivered[before:]] == list(range(count))


def test_tcp_stream_carries_frames_in_order():
    async def test(receiver, sender, refused, unreachable):
        assert sender._peers["b"].stream is not None  # TCP, not the gRPC stream
        assert sender.all_direct()  # so the node may sync small writes in its loop
        await send_and_check(receiver, sender, 3000)
        await send_and_check(receiver, sender, 1)
        assert receiver.stream_server.connections

    run(test)


def test_tcp_streams_give_up_on_a_silent_peer():
    """Both ends ask the kernel to drop the connection after DEAD_PEER_S without an answer
    (unacknowledged data or keepalives), instead of TCP's ~15 minutes."""

    async def test(receiver, sender, refused, unreachable):
        ours = sender._peers["b"].stream.transport.get_extra_info("socket")
        (theirs,) = [t.get_extra_info("socket") for t in receiver.stream_server.connections]
        for sock in (ours, theirs):
            timeout = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
            assert timeout == DEAD_PEER_S * 1000
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    run(test)


def test_grpc_stream_when_asked_or_when_the_peer_offers_no_tcp():
    async def test(receiver, sender, refused, unreachable):
        assert sender._peers["b"].stream is None
        assert not receiver.stream_server.connections
        assert not sender.all_direct()  # frames leave from a task: the node syncs in a thread
        await send_and_check(receiver, sender, 3000)

    run(test, stream="grpc")
    run(test, offer_tcp=False)


def test_unreachable_stream_port_falls_back_to_grpc():
    async def test(receiver, sender, refused, unreachable):
        assert sender._peers["b"].stream is None
        await send_and_check(receiver, sender, 10)

    run(test, broken_offset=True)


def test_refusal_reaches_the_sender_with_the_removal_index():
    async def test(receiver, sender, refused, unreachable):
        receiver.removed["a"] = 7
        sender.send([heartbeat(1)])
        await until("the refusal", lambda: ("b", 7) in refused)
        await until("the stream to be reported down", lambda: "b" in unreachable)
        assert not any(m.commit == 1 for m in receiver.delivered)

    run(test)


def test_a_refused_node_says_why_once_and_does_not_log_every_retry(caplog):
    # A node every peer refused (another's certificate, a removed id) logged "stream to ...
    # open" ten times a second and never why (a hostile hunt).
    caplog.set_level(logging.DEBUG, logger="raftfast.transport")

    async def test(receiver, sender, refused, unreachable):
        receiver.removed["a"] = 7
        first_refusal = len(caplog.records)

        def opens() -> list[logging.LogRecord]:
            return [r for r in caplog.records[first_refusal:] if " open" in r.getMessage()]

        async def keep_sending() -> None:
            while True:
                sender.send([heartbeat(1)])
                await asyncio.sleep(0.01)

        sending = asyncio.ensure_future(keep_sending())
        try:
            await until("three streams after the refusal", lambda: len(opens()) >= 3)
        finally:
            sending.cancel()
        said = [r for r in caplog.records if "refuses this node" in r.getMessage()]
        assert len(said) == 1 and said[0].levelno == logging.WARNING, said
        assert "not (or no longer) a member" in said[0].getMessage()
        assert all(r.levelno == logging.DEBUG for r in opens()[1:]), opens()

    run(test)


def test_another_members_name_for_our_address_is_refused_and_displaces_nothing(caplog):
    # A member added at another spelling of b's address ("ghost"): the streams to b and to
    # "ghost" reached b from the same sender and each displaced the other, over and over.
    caplog.set_level(logging.WARNING, logger="raftfast.transport")

    async def test(receiver, sender, refused, unreachable):
        stream = receiver.stream_server.senders["a"]
        sender.set_peers({"b": receiver.address, "ghost": receiver.address})
        await until("ghost refused", lambda: any(
            "this is 'b', not 'ghost'" in r.getMessage() for r in caplog.records
        ))  # fmt: skip
        sender.send([Message(MsgType.HEARTBEAT, "a", "ghost", term=1, commit=99)])
        await send_and_check(receiver, sender, 200)
        assert receiver.stream_server.senders["a"] is stream  # (never displaced)
        assert not any(m.dst == "ghost" for m in receiver.delivered)

    run(test)


def test_a_broken_stream_is_reported_and_replaced():
    async def test(receiver, sender, refused, unreachable):
        await receiver.stream_server.close()  # drops the connection and stops listening
        await until("the stream to be reported down", lambda: "b" in unreachable)
        # The next stream: the TCP port is gone but gRPC answers, so over gRPC.
        await until("b reconnected", lambda: sender._peers["b"].connected)
        assert sender._peers["b"].stream is None
        await send_and_check(receiver, sender, 5)

    run(test)


def test_the_grpc_fall_back_is_left_for_tcp_once_the_port_answers(monkeypatch):
    monkeypatch.setattr(grpc_transport, "_FALLBACK_S", 0.5)

    async def test(receiver, sender, refused, unreachable):
        assert sender._peers["b"].stream is None  # nobody listens on the announced port yet
        await send_and_check(receiver, sender, 3)
        port = receiver.port + receiver.service.stream_offset
        await receiver.stream_server.start("127.0.0.1", port)
        await until("the TCP stream", lambda: sender._peers["b"].stream is not None)
        await send_and_check(receiver, sender, 3)

    run(test, broken_offset=True)


# -- what a stranger can make the stream port hold (issue 11) ------------------------------


def _raw(receiver: Receiver) -> tuple[str, int]:
    return "127.0.0.1", receiver.port + receiver.service.stream_offset


async def _read_to_end(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""


def test_a_sender_names_itself_before_it_may_send_much_and_keeps_its_name():
    async def test(receiver, sender, refused, unreachable):
        await send_and_check(receiver, sender, 3)  # the real sender is known as "a"
        host, port = _raw(receiver)
        big = (tcp.HANDSHAKE_BYTES + 1).to_bytes(4, "big")
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(big + b"\0" * 100)  # before any name: too large
        answer = await _read_to_end(reader)
        assert b"too large" in answer
        writer.close()
        reader, writer = await asyncio.open_connection(host, port)
        hello = tcp.record(encode_frame(CLUSTER, "c", []))
        writer.write(hello + tcp.record(encode_frame(CLUSTER, "a", [heartbeat(9)])))
        answer = await _read_to_end(reader)  # a frame of "a" on the stream of "c"
        assert b"on the stream of 'c'" in answer
        writer.close()
        assert not any(m.commit == 9 for m in receiver.delivered)
        await send_and_check(receiver, sender, 3)  # "a" is undisturbed

    run(test)


def test_slow_or_silent_connections_are_dropped_and_a_new_one_replaces_the_old(monkeypatch):
    monkeypatch.setattr(tcp, "HANDSHAKE_S", 0.3)
    monkeypatch.setattr(tcp, "STALL_S", 0.3)
    monkeypatch.setattr(tcp, "_SWEEP_S", 0.05)

    async def test(receiver, sender, refused, unreachable):
        server = receiver.stream_server
        host, port = _raw(receiver)
        _, silent = await asyncio.open_connection(host, port)  # never says a word
        reader, stalled = await asyncio.open_connection(host, port)
        stalled.write(tcp.record(encode_frame(CLUSTER, "c", [])) + (1000).to_bytes(4, "big"))
        await until("both dropped", lambda: len(server.connections) == 1, timeout=10)
        assert await _read_to_end(reader) == b"" and server.held_bytes == 0
        silent.close(), stalled.close()
        # "a" connects again (its old stream is replaced, not kept beside it)
        old = next(iter(server.connections))
        reader, again = await asyncio.open_connection(host, port)
        again.write(tcp.record(encode_frame(CLUSTER, "a", [heartbeat(5)])))
        await until("the new stream", lambda: any(m.commit == 5 for m in receiver.delivered))
        await until("the old stream dropped", lambda: old not in server.connections)
        assert list(server.senders) == ["a"]
        again.close()

    run(test)


def test_unfinished_records_of_all_connections_together_are_bounded(monkeypatch):
    monkeypatch.setattr(tcp, "MAX_PARTIAL_BYTES", 64 * 1024)

    async def test(receiver, sender, refused, unreachable):
        server = receiver.stream_server
        host, port = _raw(receiver)
        writers = []
        for name in ("c", "d", "e"):
            _, w = await asyncio.open_connection(host, port)
            w.write(tcp.record(encode_frame(CLUSTER, name, [])) + (1 << 20).to_bytes(4, "big"))
            w.write(b"\0" * 30_000)  # a third of a record each, 90 KB in all: one too many
            writers.append(w)
        await until(
            "the one that passed the bound dropped, two others' records held",
            lambda: len(server.connections) == 3 and server.held_bytes >= 60_000,
            timeout=10,
        )
        for w in writers:
            w.close()
        await until("all gone", lambda: server.held_bytes == 0, timeout=10)
        await send_and_check(receiver, sender, 3)

    run(test)


# -- the receiver's buffer (tcp._Records) ---------------------------------------------------


def _read(records, data: bytes, chunk: int) -> list[bytes]:
    """Feed ``data`` as a BufferedProtocol would: reads of at most ``chunk`` bytes."""
    out = []
    pos = 0
    while pos < len(data):
        with records.get_buffer() as room:
            assert len(room) > 0
            n = min(len(room), chunk, len(data) - pos)
            room[:n] = data[pos : pos + n]
        out += [bytes(p) for p in records.updated(n)]
        pos += n
    return out


@pytest.mark.parametrize("chunk", [1, 3, 4, 5, 1000, 300_000, 10_000_000])
def test_records_come_out_whole_however_the_stream_is_cut(chunk):
    rng = random.Random(chunk)
    sizes = [0, 1, 3, 4, 5, 100, 0, 9, 700]
    if chunk > 5:  # (byte by byte, megabytes take minutes)
        sizes += [70_000, 0, 2_000_000, 9, 600_000]
    payloads = [rng.randbytes(n) for n in sizes]
    data = b"".join(tcp.record(p) for p in payloads)
    records = tcp._Records()
    assert _read(records, data, chunk) == payloads
    assert not records.partial and records.held == 0


def test_a_header_that_claims_much_does_not_make_the_buffer_grow():
    records = tcp._Records()
    _read(records, (60 * 1024 * 1024).to_bytes(4, "big") + b"x" * 1000, 1000)
    assert records.held == 4 + 1000
    assert len(records._buf) <= 2 * tcp._MIN_READ  # not 60 MiB before the bytes arrive
    with records.get_buffer() as room:
        assert len(room) <= 2 * tcp._MIN_READ


def test_the_limit_is_checked_at_each_record_and_a_big_buffer_shrinks_when_idle():
    records = tcp._Records()
    records.limit = 10
    data = tcp.record(b"small") + tcp.record(b"x" * 11)
    with pytest.raises(tcp.Refused, match="11 bytes is too large"):
        _read(records, data, len(data))
    records = tcp._Records()
    assert _read(records, tcp.record(b"y" * 20_000_000), 5_000_000) == [b"y" * 20_000_000]
    assert len(records._buf) >= 20_000_000
    records.get_buffer().release()  # idle: back to a small buffer
    assert len(records._buf) == tcp._MIN_READ
    stranger = tcp._Records()
    stranger.limit = tcp.HANDSHAKE_BYTES
    stranger.get_buffer().release()
    assert len(stranger._buf) == tcp.HANDSHAKE_BYTES + 4  # what one record of it may take


def test_records_fed_as_bytes():
    records = tcp._Records()
    first = tcp.record(b"abc") + tcp.record(b"d" * 500_000)
    assert [bytes(p) for p in records.feed(first[:7])] == [b"abc"]
    assert [bytes(p) for p in records.feed(first[7:])] == [b"d" * 500_000]


def test_a_stream_that_went_quiet_gives_back_its_big_buffer():
    records = tcp._Records()
    unfinished = (100).to_bytes(4, "big") + b"pa"
    _read(records, tcp.record(b"z" * 3_000_000) + unfinished, 1_000_000)
    records.shrink()  # part of a record is held: kept
    assert len(records._buf) >= 3_000_000 and records.held == 6
    records = tcp._Records()
    _read(records, tcp.record(b"z" * 3_000_000), 1_000_000)
    records.shrink()
    assert len(records._buf) == 0
    assert _read(records, tcp.record(b"after"), 10) == [b"after"]


def test_only_a_member_s_first_frame_says_where_it_takes_streams():
    # Frame.endpoint (where a node dials back when a port refuses calls) is heard from a
    # stream's first frame once the frame checks out: never from a stranger, another cluster,
    # or a later frame.
    from raftfast.proto import raftfast_pb2 as pb

    async def test(receiver, sender, refused, unreachable):
        learned: list[tuple[str, int]] = []
        receiver.stream_server.learned = lambda src, ep: learned.append((src, ep.port_offset))
        receiver.removed["x"] = 5
        host, port = _raw(receiver)

        def first(cluster: str, src: str, offset: int) -> bytes:
            endpoint = pb.StreamEndpoint(port_offset=offset)
            frame = pb.Frame(cluster_id=cluster, src=src, endpoint=endpoint)
            return tcp.record(frame.SerializeToString())

        for hello in (first(CLUSTER, "x", 7), first("other", "d", 7), first(CLUSTER, "", -(2**31))):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(hello)
            await _read_to_end(reader)  # (refused: the stream ends)
            writer.close()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(first(CLUSTER, "d", 2**31 - 1) + first(CLUSTER, "d", 9))
        await until("d's endpoint", lambda: bool(learned))
        await send_and_check(receiver, sender, 3)  # (a turn of the loop for d's second frame)
        assert learned == [("d", 2**31 - 1)]
        writer.close()

    run(test)


def test_a_refusal_counts_while_it_goes_on_and_not_long_after_it_passed(monkeypatch):
    """``refused_by`` (health: a node its leader refuses is not serving): true while the peer
    refuses each new stream, false soon after a refusal that passed (a re-added member that
    one peer had not applied yet: a flag kept until the next stream ended said NOT_SERVING for
    as long as the healthy stream lasted, the review)."""
    monkeypatch.setattr(grpc_transport, "REFUSED_FOR_S", 1.0)

    async def test(receiver, sender, refused, unreachable):
        receiver.removed["a"] = 7
        sender.send([heartbeat(1)])
        await until("a refusal", lambda: sender.refused_by("b"))
        await asyncio.sleep(2.5)  # (refused again at each reconnect meanwhile)
        assert sender.refused_by("b")
        receiver.removed.clear()
        delivered = len(receiver.delivered)
        for i in range(30):  # (a healthy stream)
            sender.send([heartbeat(100 + i)])
            await asyncio.sleep(0.1)
        assert len(receiver.delivered) > delivered
        assert not sender.refused_by("b")

    run(test)
