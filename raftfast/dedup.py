"""Exactly-once bookkeeping shared by the state machines: per client, the results of its recent
write sequences, so that a retried write returns its first result instead of applying again.

Part of the replicated state (every replica remembers the same), and deterministic: clients
are forgotten least recently active first (ordered by applied commands, the same everywhere).
A command whose sequence lies below a client's window (more than ``window`` below its highest)
is a *late duplicate*: it is not applied; what it answers is the state machine's choice.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

from raftfast.limits import MAX_CLIENT_ID

__all__ = [
    "DEDUP_WINDOW",
    "MAX_CLIENTS",
    "MAX_RESULTS",
    "ClientTable",
    "ClientWindow",
    "owned_client_id",
    "remember",
    "window_of",
]

DEDUP_WINDOW = 4096  # sequences remembered per client
MAX_CLIENTS = 100_000  # clients remembered before the least recently active is forgotten
# Results remembered by all clients together (~150 bytes each here: ~300 MB at most, the
# windows of ~490 clients that have each written 4,096 times): past it the least recently
# active clients are forgotten. Without it 100,000 made-up client ids of 4,096+ writes each
# were hundreds of millions of results, tens of GB on every node (a hostile hunt: 10-15 MB/s).
MAX_RESULTS = 2_000_000


class ClientWindow:
    """One client's results of its sequences in (max_seq - window, max_seq], and only those
    (what a snapshot keeps: so a replica restored from one holds the same results as one
    that applied every entry, and ``ClientTable.held`` is the same everywhere)."""

    __slots__ = ("max_seq", "results", "gen")

    def __init__(self, gen: int = 0) -> None:
        self.max_seq = -1
        self.results: dict[int, Any] = {}
        self.gen = gen  # (the table's generation it belongs to: ClientTable.frozen)

    def copy(self, gen: int = 0) -> ClientWindow:
        twin = ClientWindow(gen)
        twin.max_seq = self.max_seq
        twin.results = dict(self.results)
        return twin

    def is_late(self, seq: int, window: int) -> bool:
        return seq <= self.max_seq - window

    def remember(self, seq: int, result: Any, window: int) -> int:
        """Keep ``result`` (``seq`` is not below the window); returns how many more results
        the window holds (fewer when it slid past some)."""
        before = len(self.results)
        if seq > self.max_seq:
            if seq - self.max_seq >= window:
                self.results.clear()  # (every one remembered is below the new window)
            else:  # (those the window slides past: one a write for a client in sequence)
                for gone in range(self.max_seq - window + 1, seq - window + 1):
                    self.results.pop(gone, None)
            self.max_seq = seq
        self.results[seq] = result
        return len(self.results) - before


class ClientTable(OrderedDict[int, ClientWindow]):
    """The clients' windows, least recently active first, and ``held``: the results they hold
    in all (kept by ``window_of`` and ``remember``)."""

    gen = 0  # bumped by ``frozen``: a window of an older generation is shared with a copy

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.held = sum(len(w.results) for w in self.values())

    def forget_oldest(self) -> None:
        _, window = self.popitem(last=False)
        self.held -= len(window.results)

    def frozen(self) -> ClientTable:
        """The table as of now, for a snapshot to read in another thread while this one goes
        on: the windows are shared, and this table copies one before it next changes it
        (``window_of``). Copying all of them here cost the loop ~140 ms per 100,000 clients
        at every snapshot (a hostile hunt made up that many ids)."""
        twin = ClientTable()
        OrderedDict.update(twin, self)  # (in C: no window is looked at)
        twin.held = self.held
        self.gen += 1
        return twin


def window_of(clients: ClientTable, client_id: int, max_clients: int) -> ClientWindow:
    """``client_id``'s window, now the most recently active; a new client's is created, and
    the least recently active is forgotten past ``max_clients``."""
    window = clients.get(client_id)
    if window is None:
        window = clients[client_id] = ClientWindow(clients.gen)
        if len(clients) > max_clients:
            clients.forget_oldest()
    else:
        clients.move_to_end(client_id)
        if window.gen != clients.gen:  # (a frozen copy of the table holds it: ours is new)
            window = clients[client_id] = window.copy(clients.gen)
    return window


def remember(
    clients: ClientTable, client: ClientWindow, seq: int, result: Any, window: int
) -> None:
    """``client.remember``, and past MAX_RESULTS in all the least recently active clients
    forgotten (``client``, the most recent, stays): deterministic, as the table is."""
    clients.held += client.remember(seq, result, window)
    while clients.held > MAX_RESULTS and len(clients) > 1:
        clients.forget_oldest()


def owned_client_id(client_id: int, owner: str | None) -> int:
    """The id the table knows a client by when clients show certificates: drawn from the
    certificate's name (``owner``) too, so that no client can take another's id, to make the
    other's writes count as duplicates (acknowledged, never applied) or to be handed their
    results. 0 (no exactly-once) stays 0."""
    if not client_id:
        return 0
    name = (owner or "").encode("utf-8", "surrogateescape")
    digest = hashlib.blake2b(client_id.to_bytes(8, "little") + name, digest_size=8)
    return int.from_bytes(digest.digest(), "little") & MAX_CLIENT_ID or 1
