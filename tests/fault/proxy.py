"""A fault-injecting TCP proxy for the links between nodes (127.0.0.1 only).

Each directed link a→b (the connections node a opens to node b) gets its own listening port,
and, when b announces a TCP replication stream at an offset from its gRPC port, a second one at
the same offset from the first, so a's stream to b passes through the link too.
Our transport sends a's messages to b only over a's connections, so blocking a→b alone is an
asymmetric partition. The kernel here has no netem, so delay and loss are made here too:
delay holds each chunk back before forwarding (in order), loss resets connections at random
(everything in flight on them is gone, as on a real link that drops packets until TCP gives up).
"""

from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import dataclass, field

from raftfast.tools.ports import claim_port, release_ports


@dataclass
class Link:
    src: str
    dst: str
    target: tuple[str, int]
    stream_offset: int = 0  # b's stream port - b's gRPC port (0: no stream port to proxy)
    port: int = 0
    streams: int = 0  # replication stream connections forwarded (on the stream port)
    blocked: bool = False
    delay: float = 0.0  # seconds added to every chunk
    loss: float = 0.0  # probability that forwarding a chunk resets the connection instead
    conns: set = field(default_factory=set)


class FaultProxy:
    def __init__(
        self, addrs: dict[str, str], seed: int = 0, stream_offsets: dict[str, int] | None = None
    ) -> None:
        self.rng = random.Random(seed)
        self.links: dict[tuple[str, str], Link] = {}
        offsets = stream_offsets or {}
        for a in addrs:
            for b, addr in addrs.items():
                if a != b:
                    host, port = addr.rsplit(":", 1)
                    self.links[(a, b)] = Link(a, b, (host, int(port)), offsets.get(b, 0))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._servers: list[asyncio.base_events.Server] = []
        self._claimed: list[int] = []  # stream ports in the range other clusters' ports claim

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen_all(), self._loop).result(timeout=10)

    def close(self) -> None:
        async def shutdown() -> None:
            for server in self._servers:
                server.close()
            for link in self.links.values():
                for w in list(link.conns):
                    w.close()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        release_ports(self._claimed)

    def view(self, nid: str, own_addr: str) -> dict[str, str]:
        """Node ``nid``'s peer addresses: itself directly, every other node through its link."""
        peers = {nid: own_addr}
        for (a, b), link in self.links.items():
            if a == nid:
                peers[b] = f"127.0.0.1:{link.port}"
        return peers

    # -- faults (thread-safe) ------------------------------------------------------------------

    def set(self, src: str, dst: str, *, blocked=None, delay=None, loss=None) -> None:
        def apply() -> None:
            link = self.links[(src, dst)]
            if blocked is not None:
                link.blocked = blocked
                if blocked:
                    for w in list(link.conns):
                        w.close()
            if delay is not None:
                link.delay = delay
            if loss is not None:
                link.loss = loss

        self._loop.call_soon_threadsafe(apply)

    def streamed_links(self) -> int:
        """How many links carried a TCP replication stream (through this proxy, not around it)."""
        return sum(1 for link in self.links.values() if link.streams)

    def heal(self) -> None:
        for src, dst in self.links:
            self.set(src, dst, blocked=False, delay=0.0, loss=0.0)

    def partition(self, side_a: list[str], side_b: list[str]) -> None:
        for a in side_a:
            for b in side_b:
                self.set(a, b, blocked=True)
                self.set(b, a, blocked=True)

    # -- the proxy -----------------------------------------------------------------------------

    async def _listen_all(self) -> None:
        for link in self.links.values():
            while True:
                server = await asyncio.start_server(
                    lambda r, w, link=link: self._serve(link, r, w, 0), "127.0.0.1", 0
                )
                link.port = server.sockets[0].getsockname()[1]
                if not link.stream_offset:
                    break
                # The stream port, at b's offset from this one, where clusters take their
                # ports (free_ports): claimed like theirs, or a node of this or another test
                # run may find it taken when it starts (seen once).
                stream_port = link.port + link.stream_offset
                if not claim_port(stream_port):
                    server.close()  # claimed or taken: try another pair
                    continue
                self._claimed.append(stream_port)
                try:
                    stream_server = await asyncio.start_server(
                        lambda r, w, link=link: self._serve(link, r, w, link.stream_offset),
                        "127.0.0.1",
                        stream_port,
                    )
                except (OSError, OverflowError):
                    server.close()  # taken or out of range: try another pair
                    continue
                self._servers.append(stream_server)
                break
            self._servers.append(server)

    async def _serve(self, link: Link, reader, writer, offset: int) -> None:
        if link.blocked:
            writer.close()
            return
        host, port = link.target
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port + offset)
        except OSError:
            writer.close()
            return
        link.conns.update({writer, up_writer})
        if offset:
            link.streams += 1
        try:
            await asyncio.gather(
                self._pump(link, reader, up_writer), self._pump(link, up_reader, writer)
            )
        finally:
            for w in (writer, up_writer):
                link.conns.discard(w)
                w.close()

    async def _pump(self, link: Link, reader, writer) -> None:
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk or link.blocked:
                    break
                if link.loss and self.rng.random() < link.loss:
                    break  # a reset: whatever was in flight on this connection is lost
                if link.delay:
                    await asyncio.sleep(link.delay)
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
