"""The leader's lease for ``lease`` reads, bounded by the clock rather than by ticks.

A follower that heard from its leader ignores vote requests for an election timeout
(``RaftCore._in_lease``, counted in ticks, which never run faster than the clock: at least
``election_ticks - 1`` ticks' time after it heard). So once a quorum has answered a heartbeat
round, no other leader can be elected until that long after the round was sent, and the leader
may answer reads from its own state without a round of its own until then, less a margin for
the clocks' rates. Ticks alone would not do: a leader whose process was paused (SIGSTOP, a VM
frozen, a machine suspended) counts no ticks meanwhile and, resumed, would answer from a state
a newer leader had moved past. Hence the clock, and one that counts a suspend (BOOTTIME).

The lease comes only from a heartbeat round confirmed in the leader's term, which a new leader
runs only once its no-op committed (ReadIndex, thesis §6.4): its commit index is then the
cluster's. A leadership transfer (the target's forced vote is not held back by the followers'
lease) or a membership change (a new voter never heard us) spoils it for the rest of the term.

Not covered (docs/design.md): a follower that restarts within the lease forgot it heard us, and
votes at once.
"""

from __future__ import annotations

import time

_CLOCK = getattr(time, "CLOCK_BOOTTIME", None)  # (Linux: runs on while the machine sleeps)
# Of the followers' shortest election timeout, the part a lease may last: room for the clocks'
# rates to differ and for a tick that fires just after a heartbeat arrives.
LEASE_FRACTION = 0.8


def now() -> float:
    """Seconds on the clock leases are measured with."""
    return time.clock_gettime(_CLOCK) if _CLOCK is not None else time.monotonic()


class LeaderLease:
    """When this leader may answer ``lease`` reads without a heartbeat round."""

    def __init__(self, tick_ms: int, election_ticks: int) -> None:
        self.seconds = LEASE_FRACTION * (election_ticks - 1) * tick_ms / 1000
        self._term = -1  # the term of the confirmed round the lease comes from
        self._until = 0.0
        self._spoiled_term = -1

    def holds(self, term: int) -> bool:
        """May the leader of ``term`` answer a lease read from its own state now?"""
        return term == self._term != self._spoiled_term and now() < self._until

    def confirmed(self, term: int, asked: float) -> None:
        """A heartbeat round asked for at ``asked`` (``now()``, before it was sent) was
        confirmed by a quorum in ``term``."""
        if term == self._spoiled_term:
            return
        until = asked + self.seconds
        if term != self._term or until > self._until:
            self._term, self._until = term, until

    def spoil(self, term: int) -> None:
        """No lease for the rest of ``term``: a transfer or a membership change under way."""
        self._spoiled_term = term
        self._until = 0.0
