"""What the leader knows about each follower's log (etcd's Progress, simplified).

A follower is either *probed* (one AppendEntries at a time until we find where the logs agree)
or *replicated* (optimistic ``next_index``, up to ``max_inflight`` frames and
``max_inflight_bytes`` payload bytes in flight: the pipelining window).
"""

from __future__ import annotations

from collections import deque
from enum import IntEnum


class ProgressState(IntEnum):
    PROBE = 0
    REPLICATE = 1
    SNAPSHOT = 2  # the follower needs a snapshot; nothing else is sent until it is reported


class Progress:
    __slots__ = (
        "match_index",
        "next_index",
        "state",
        "probe_sent",
        "recent_active",
        "_inflight",
        "inflight_bytes",
        "pending_snapshot",
        "generation",
        "heartbeat_match",
    )

    def __init__(self, next_index: int, match_index: int = 0) -> None:
        self.match_index = match_index
        self.next_index = next_index
        self.state = ProgressState.PROBE
        self.probe_sent = False  # PROBE: an append is outstanding; wait for its answer
        self.recent_active = False  # heard from since the last check-quorum round
        self._inflight: deque[tuple[int, int]] = deque()  # (last index, payload bytes) per frame
        self.inflight_bytes = 0
        self.pending_snapshot = 0
        # Bumped at every state change and carried by AppendEntries (and echoed in the answers),
        # so a rejection of a frame sent under an earlier state can be recognised as stale.
        self.generation = 0
        self.heartbeat_match = -1  # match_index at its last heartbeat answer (REPLICATE)

    def become_snapshot(self, index: int) -> None:
        self.generation += 1
        self.state = ProgressState.SNAPSHOT
        self.pending_snapshot = index
        self._clear_inflight()

    def become_probe(self) -> None:
        self.generation += 1
        self.state = ProgressState.PROBE
        self.next_index = self.match_index + 1
        self.probe_sent = False
        self._clear_inflight()

    def become_replicate(self) -> None:
        self.generation += 1
        self.state = ProgressState.REPLICATE
        self.next_index = self.match_index + 1
        self.probe_sent = False
        self._clear_inflight()

    def is_paused(self, max_inflight: int, max_inflight_bytes: int) -> bool:
        if self.state == ProgressState.PROBE:
            return self.probe_sent
        if self.state == ProgressState.SNAPSHOT:
            return True
        return len(self._inflight) >= max_inflight or self.inflight_bytes >= max_inflight_bytes

    def sent(self, last_index: int, nbytes: int) -> None:
        """Record that entries up to ``last_index`` went out in one frame."""
        if self.state == ProgressState.REPLICATE:
            self.next_index = last_index + 1
            self._inflight.append((last_index, nbytes))
            self.inflight_bytes += nbytes
        else:
            self.probe_sent = True

    def maybe_update(self, index: int) -> bool:
        """A follower acknowledged ``index`` as durable; True if its match index grew."""
        self.probe_sent = False
        updated = index > self.match_index
        if updated:
            self.match_index = index
        if index + 1 > self.next_index:
            self.next_index = index + 1
        self._free_through(index)
        return updated

    def maybe_decrease(self, rejected: int, probe_hint: int) -> bool:
        """A follower rejected an append whose previous index was ``rejected``.

        Returns False for a stale rejection (one that no longer matches what we sent).
        """
        if self.state == ProgressState.REPLICATE:
            if rejected <= self.match_index:
                return False
            self.become_probe()
            return True
        if self.next_index - 1 != rejected:
            return False
        if probe_hint < self.match_index:
            # The follower rejects the very entry it acknowledged: its disk lost what it had
            # made durable (a torn or truncated WAL). Start again from what it still has.
            self.match_index = probe_hint
        self.next_index = max(min(rejected, probe_hint + 1), self.match_index + 1)
        self.probe_sent = False
        return True

    def free_one_if_full(self, max_inflight: int, max_inflight_bytes: int) -> None:
        """Drop the oldest in-flight frame from the window if it is full (it may be lost)."""
        if self.state == ProgressState.REPLICATE and self._inflight:
            if self.is_paused(max_inflight, max_inflight_bytes):
                self.inflight_bytes -= self._inflight.popleft()[1]

    def _free_through(self, index: int) -> None:
        inflight = self._inflight
        while inflight and inflight[0][0] <= index:
            self.inflight_bytes -= inflight.popleft()[1]

    def _clear_inflight(self) -> None:
        self._inflight.clear()
        self.inflight_bytes = 0

    def __repr__(self) -> str:
        return (
            f"Progress(match={self.match_index}, next={self.next_index}, "
            f"state={self.state.name}, inflight={len(self._inflight)})"
        )
