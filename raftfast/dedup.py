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

__all__ = ["DEDUP_WINDOW", "MAX_CLIENTS", "ClientWindow", "owned_client_id", "window_of"]

DEDUP_WINDOW = 4096  # sequences remembered per client
MAX_CLIENTS = 100_000  # clients remembered before the least recently active is forgotten


class ClientWindow:
    """One client's results of its sequences in (max_seq - window, max_seq]."""

    __slots__ = ("max_seq", "results")

    def __init__(self) -> None:
        self.max_seq = -1
        self.results: dict[int, Any] = {}

    def copy(self) -> ClientWindow:
        twin = ClientWindow()
        twin.max_seq = self.max_seq
        twin.results = dict(self.results)
        return twin

    def is_late(self, seq: int, window: int) -> bool:
        return seq <= self.max_seq - window

    def remember(self, seq: int, result: Any, window: int) -> None:
        self.results[seq] = result
        if seq > self.max_seq:
            self.max_seq = seq
            if len(self.results) > 2 * window:  # (prune now and then, not on every write)
                floor = seq - window
                self.results = {s: r for s, r in self.results.items() if s > floor}


def window_of(
    clients: OrderedDict[int, ClientWindow], client_id: int, max_clients: int
) -> ClientWindow:
    """``client_id``'s window, now the most recently active; a new client's is created, and
    the least recently active is forgotten past ``max_clients``."""
    window = clients.get(client_id)
    if window is None:
        window = clients[client_id] = ClientWindow()
        if len(clients) > max_clients:
            clients.popitem(last=False)
    else:
        clients.move_to_end(client_id)
    return window


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
