"""The leader's lease (raftfast/server/lease.py): measured on the clock from the time a
confirmed round was asked for, of one term, and spoiled for the rest of a term."""

from __future__ import annotations

import pytest

from raftfast.server import lease
from raftfast.server.lease import LeaderLease


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(lease, "now", lambda: now[0])
    return now


def test_a_lease_lasts_less_than_the_followers_shortest_election_timeout(clock):
    held = LeaderLease(tick_ms=25, election_ticks=12)
    assert 0 < held.seconds < (12 - 1) * 0.025
    assert not held.holds(3), "no lease before a confirmed round"
    held.confirmed(3, asked=clock[0])
    assert held.holds(3) and not held.holds(4)
    clock[0] += held.seconds - 0.001
    assert held.holds(3)
    clock[0] += 0.002
    assert not held.holds(3), "past it: a round again"


def test_an_older_round_does_not_shorten_the_lease_and_a_new_term_starts_afresh(clock):
    held = LeaderLease(tick_ms=10, election_ticks=20)
    held.confirmed(5, asked=clock[0])
    held.confirmed(5, asked=clock[0] - 1)  # (a round asked earlier, confirmed later)
    clock[0] += held.seconds / 2
    assert held.holds(5)
    held.confirmed(6, asked=clock[0] - held.seconds)  # (already over when confirmed)
    assert not held.holds(5) and not held.holds(6)


def test_a_spoiled_term_has_no_lease_again(clock):
    held = LeaderLease(tick_ms=25, election_ticks=12)
    held.confirmed(7, asked=clock[0])
    held.spoil(7)
    assert not held.holds(7)
    held.confirmed(7, asked=clock[0])
    assert not held.holds(7), "a transfer or a membership change spoils the rest of the term"
    held.confirmed(8, asked=clock[0])
    assert held.holds(8)
