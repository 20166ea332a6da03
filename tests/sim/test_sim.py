"""Hundreds of seeded, hostile schedules over 3 and 5 nodes; a failing seed replays exactly.

Replay one seed:  RAFTFAST_SIM_SEED=123 pytest tests/sim -k seed
More seeds:       RAFTFAST_SIM_SEEDS=3000 make soak
"""

from __future__ import annotations

import os

import pytest

from raftfast import COMPILED

from .cluster import Cluster, SafetyViolation

FAULT_UNITS = 6_000  # virtual time units with faults (600 ticks, ~40 election timeouts)
STALL_UNITS = 5_000  # 50 election timeouts without any node applying anything
CHECK_EVERY = 200


def _seeds(default: int) -> list[int]:
    if "RAFTFAST_SIM_SEED" in os.environ:
        return [int(os.environ["RAFTFAST_SIM_SEED"])]
    return list(range(int(os.environ.get("RAFTFAST_SIM_SEEDS", default))))


def run_schedule(n: int, seed: int) -> Cluster:
    cluster = Cluster(n, seed)
    try:
        for _ in range(FAULT_UNITS // CHECK_EVERY):
            cluster.run(CHECK_EVERY)
            cluster.check_log_matching()
        cluster.heal()
        cluster.settle(STALL_UNITS)
        cluster.check_log_matching()
        cluster.check_acknowledged()
    except SafetyViolation as exc:
        history = "\n".join(cluster.events[-30:])
        raise SafetyViolation(
            f"{exc}\n  seed={seed} nodes={n} faults={cluster.initial_faults}\n"
            f"  config={cluster.config}\n"
            f"  replay: RAFTFAST_SIM_SEED={seed} pytest tests/sim -k 'n{n} and seed'\n"
            f"  last events:\n{history}"
        ) from None
    return cluster


# 300 seeds split over 3 and 5 nodes in CI (fewer for the slower pure twins).
CI_SEEDS = 150 if COMPILED else 40


@pytest.mark.parametrize("n", [3, 5], ids=["n3", "n5"])
@pytest.mark.parametrize("seed", _seeds(CI_SEEDS))
def test_seed(n: int, seed: int) -> None:
    cluster = run_schedule(n, seed)
    assert cluster.acked or cluster.faults.propose == 0, "the schedule acknowledged nothing"


def test_leaders_apply_what_commits_while_their_own_write_syncs() -> None:
    """The schedules above exercise it (and check it is safe): a leader applies entries the
    followers' acknowledgements committed before its own sync of them completes."""
    applied = sum(run_schedule(3, seed).stats.get("applied_while_syncing", 0) for seed in range(5))
    assert applied > 0


def test_leaders_take_proposals_while_their_own_write_syncs() -> None:
    """The schedules above cover it (and check it is safe): a leader hands a proposal to the
    core and sends it while a Ready of its own is still syncing, as the driver does for a big
    one (_FEED_WHILE_SYNCING_BYTES). This checks the simulation's coverage, not the driver
    (tests/server/test_feed_while_syncing.py does)."""
    fed = sum(run_schedule(3, seed).stats.get("proposed_while_syncing", 0) for seed in range(5))
    assert fed > 0


@pytest.mark.slow
def test_soak() -> None:
    """`make soak`: thousands of seeds (RAFTFAST_SIM_SEEDS, default 3000) per cluster size."""
    count = int(os.environ.get("RAFTFAST_SIM_SEEDS", 3000))
    for n in (3, 5):
        for seed in range(10_000, 10_000 + count):
            run_schedule(n, seed)
