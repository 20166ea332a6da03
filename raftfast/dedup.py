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
    "units",
    "window_of",
]

DEDUP_WINDOW = 4096  # sequences remembered per client
MAX_CLIENTS = 100_000  # clients remembered before the least recently active is forgotten
# Results remembered by all clients together, in units (``units``: one a result, and one more
# per _UNIT_BYTES of bytes it holds; ~150 bytes of memory a unit at most: ~300 MB, the windows
# of ~490 clients that have each written 4,096 small results): past it the least recently
# active clients are forgotten. Without it 100,000 made-up client ids of 4,096+ writes each
# were hundreds of millions of results, tens of GB on every node (a hostile hunt: 10-15 MB/s);
# counted by results alone, 300 commands of 17 bytes whose results were 1 MB each grew every
# node by ~300 MB (another).
MAX_RESULTS = 2_000_000
_UNIT_BYTES = 128
_MISSING = object()


def units(result: Any) -> int:
    """What ``result`` counts against MAX_RESULTS (the same on every replica)."""
    if type(result) is bytes:  # (kept results are bytes: raftfast.exactly_once._kept)
        return 1 + len(result) // _UNIT_BYTES
    return 1


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
        """Keep ``result`` (``seq`` is not below the window); returns how many more units
        (``units``) the window holds (fewer when it slid past some)."""
        results = self.results
        added = units(result)
        if seq > self.max_seq:
            if seq - self.max_seq >= window:
                added -= self.units()
                results.clear()  # (every one remembered is below the new window)
            else:  # (those the window slides past: one a write for a client in sequence)
                for gone in range(self.max_seq - window + 1, seq - window + 1):
                    old = results.pop(gone, _MISSING)
                    if old is not _MISSING:
                        added -= units(old)
            self.max_seq = seq
        old = results.get(seq, _MISSING)
        if old is not _MISSING:
            added -= units(old)
        results[seq] = result
        return added

    def units(self) -> int:
        """What its results count against MAX_RESULTS."""
        return sum(map(units, self.results.values()))


class ClientTable(OrderedDict[int, ClientWindow]):
    """The clients' windows, least recently active first, and ``held``: the units (``units``)
    of the results they hold in all (kept by ``window_of`` and ``remember``)."""

    gen = 0  # bumped by ``frozen``: a window of an older generation is shared with a copy

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.held = sum(w.units() for w in self.values())

    def forget_oldest(self) -> None:
        _, window = self.popitem(last=False)
        self.held -= window.units()

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
