"""A tiny synchronous network for unit tests of the core: instant, lossless unless told."""

from __future__ import annotations

import random

from raftfast._accel import EntryLog
from raftfast.core.raft import Config
from raftfast.core.rawnode import RawNode
from raftfast.core.types import HardState, Message, Role


class Net:
    def __init__(self, ids: list[str], **config) -> None:
        self.ids = ids
        self.nodes = {
            nid: RawNode(Config(nid, ids, **config), EntryLog(), HardState(), random.Random(i))
            for i, nid in enumerate(ids)
        }
        self.down: set[str] = set()  # nodes whose messages (both ways) are dropped
        self.applied: dict[str, list[bytes]] = {nid: [] for nid in ids}
        self.sent: list[Message] = []

    def add(self, nid: str) -> RawNode:
        """A new, empty node that knows no configuration (as ``raftfast-node --join``)."""
        node = RawNode(Config(nid, []), EntryLog(), HardState(), random.Random(len(self.nodes)))
        self.nodes[nid] = node
        self.applied[nid] = []
        return node

    def node(self, nid: str) -> RawNode:
        return self.nodes[nid]

    def drive(self, rounds: int = 50) -> None:
        """Persist, deliver and apply until nothing is left to do."""
        for _ in range(rounds):
            busy = False
            for nid, node in self.nodes.items():
                if nid in self.down or not node.has_ready():
                    continue
                busy = True
                rd = node.ready()
                if rd.committed is not None:
                    self.applied[nid].extend(rd.committed.payloads)
                node.advance(rd)
                for m in rd.eager_messages + rd.messages:
                    self.sent.append(m)
                    if m.dst not in self.down and m.dst in self.nodes:
                        self.nodes[m.dst].step(m)
            if not busy:
                return

    def tick_all(self, ticks: int) -> None:
        for _ in range(ticks):
            for nid, node in self.nodes.items():
                if nid not in self.down:
                    node.tick()
            self.drive()

    def elect(self, nid: str) -> None:
        self.nodes[nid].campaign()
        self.drive()
        assert self.nodes[nid].raft.role == Role.LEADER, self.nodes[nid].status()

    def leaders(self) -> list[str]:
        return [
            nid
            for nid, n in self.nodes.items()
            if nid not in self.down and n.raft.role == Role.LEADER
        ]
