"""The bounded chaos subset that runs in `make test`, through raftfast's client and through
etcd's API; `make chaos` runs the long version."""

from __future__ import annotations

import os

import pytest

from .chaos import run_schedule

DURATION = float(os.environ.get("RAFTFAST_CHAOS_DURATION", 15))


@pytest.mark.parametrize(
    "nodes, seed, tls", [(3, 101, False), (5, 202, True)], ids=["n3", "n5-tls"]
)
def test_chaos_schedule(tmp_path, nodes, seed, tls):
    report = run_schedule(nodes, seed, DURATION, tmp_path, tls=tls)
    print(report.line())
    assert sum(report.faults.values()) >= 3, "the nemesis injected too few faults"
    assert report.ok > 50, f"too little progress under faults: {report.line()}"
    assert report.linearizable, report.explanation
    assert report.lost_writes == 0
    assert report.converged
    # Every link's replication stream ran over TCP, through the fault proxy.
    assert report.streamed_links == nodes * (nodes - 1)


def test_chaos_schedule_through_the_etcd_api(tmp_path):
    """The same faults and checks, with clients that speak only etcd's v3 API (Put, a
    linearizable Range, a compare-and-swap Txn, DeleteRange) to every node, with TLS: the
    followers hand writes and reads to the leader over the (faulty) peer links."""
    report = run_schedule(3, 303, DURATION, tmp_path, tls=True, api="etcd")
    print(report.line())
    assert not report.problems, "\n".join(report.problems[:20])
    assert sum(report.faults.values()) >= 3, "the nemesis injected too few faults"
    assert report.ok > 50, f"too little progress under faults: {report.line()}"
    assert report.linearizable, report.explanation
    assert report.lost_writes == 0
    assert report.converged
    assert report.streamed_links == 3 * 2
