"""Many leases (a hostile hunt: 100,000 leases, the most a cluster holds): LeaseLeases sorted
them and made a message of each in one step, ~0.1 s of the leader's loop a call, and 20 calls
at once held it 0.46-0.60 s (leader changes); the lessor walked every lease after each grant
or revoke (grants fell from ~1,200 to ~390 a second between 60,000 and 100,000 leases). Unit
level: the real MVCCStore, EtcdAPI._leases and Lessor, a fake node."""

from __future__ import annotations

import asyncio
import gc
import random
import time
from types import SimpleNamespace
from typing import Any

from raftfast.etcd import api as api_module
from raftfast.etcd.api import MAX_LEASES, EtcdAPI
from raftfast.etcd.lessor import Deadlines, Lessor
from raftfast.etcd.mvcc import LEASE_LOG, MVCCStore, encode
from raftfast.proto.etcd import rpc_pb2 as pb
from tests.loop_gaps import longest_gap


def _grant(store: MVCCStore, lease_id: int, ttl: int = 3600) -> None:
    response = store.apply(encode(pb.LeaseGrantRequest(ID=lease_id, TTL=ttl)))
    assert isinstance(response, pb.LeaseGrantResponse), response


def _revoke(store: MVCCStore, lease_id: int) -> None:
    response = store.apply(encode(pb.LeaseRevokeRequest(ID=lease_id)))
    assert isinstance(response, pb.LeaseRevokeResponse), response


def _store(count: int, seed: int = 1) -> MVCCStore:
    rng = random.Random(seed)
    store = MVCCStore()
    for _ in range(count):
        _grant(store, rng.getrandbits(62) + 1)  # (as the leader chooses them)
    return store


def _api(store: MVCCStore) -> Any:
    """What EtcdAPI._leases uses of a node: a read barrier that lets the loop go once."""

    async def read_barrier(kind: str) -> None:
        await asyncio.sleep(0)

    return SimpleNamespace(
        store=store,
        driver=SimpleNamespace(read_barrier=read_barrier),
        header=lambda rev=None: pb.ResponseHeader(revision=store.revision),
        _stepped_reads=asyncio.Semaphore(2),
    )


def _list(api: Any) -> Any:
    return EtcdAPI._leases(api, pb.LeaseLeasesRequest())


def _counting_builds(monkeypatch) -> list[int]:
    builds: list[int] = []
    build = api_module._LeaseList._build

    async def counted(self: Any, store: MVCCStore) -> None:
        builds.append(store.lease_changes)
        await build(self, store)

    monkeypatch.setattr(api_module._LeaseList, "_build", counted)
    return builds


def test_listing_the_most_leases_twenty_times_at_once_holds_the_loop_no_step_long(monkeypatch):
    store = _store(MAX_LEASES)
    ids = sorted(store.leases)
    # what the listing takes at once (as it was answered): sorted, a message per lease
    once = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        pb.LeaseLeasesResponse(leases=[pb.LeaseStatus(ID=i) for i in sorted(store.leases)])
        once = min(once, time.perf_counter() - t)
    builds = _counting_builds(monkeypatch)
    api = _api(store)
    gc.collect()  # (not in the middle: 200,000 new objects, the leases and their key sets)

    async def twenty() -> list[pb.LeaseLeasesResponse]:
        return await asyncio.gather(*(_list(api) for _ in range(20)))

    gap, answers = asyncio.run(longest_gap(twenty))
    # each call built it at once, ~0.15 s (here), the 20 in one turn of the loop: ~3 s; now
    # steps of ~2-7 ms, one build for the 20 calls, and each copies the answer (~2 ms) two at
    # a time: the ticker waits ~10 ms at most
    assert gap < max(0.1, once / 2), (gap, once)
    assert builds == [store.lease_changes]
    for answer in answers:
        assert [s.ID for s in answer.leases] == ids
        assert answer.header.revision == store.revision
    # kept until a grant or a revoke; then built again, once
    assert [s.ID for s in asyncio.run(_list(api)).leases] == ids and len(builds) == 1
    _grant(store, 7)
    _revoke(store, ids[5])
    expected = sorted([*ids[:5], *ids[6:], 7])
    for _ in range(2):
        assert [s.ID for s in asyncio.run(_list(api)).leases] == expected
    assert builds == [MAX_LEASES, MAX_LEASES + 2]


def test_a_call_that_comes_during_a_build_of_an_older_lease_set_waits_for_a_newer(monkeypatch):
    # (linearizable: a call sees every grant applied before it, even while a listing of the
    # lease set of before is being built for other calls)
    monkeypatch.setattr(api_module, "_LEASE_PART", 3)
    builds = _counting_builds(monkeypatch)
    store = _store(50)
    ids = sorted(store.leases)
    api = _api(store)

    async def calls() -> tuple[Any, Any, Any]:
        first = asyncio.ensure_future(_list(api))
        for _ in range(4):
            await asyncio.sleep(0)  # (its build under way)
        assert builds == [50]
        _grant(store, 1)
        second = asyncio.ensure_future(_list(api))
        third = asyncio.ensure_future(_list(api))
        return await first, await second, await third

    first, second, third = asyncio.run(calls())
    assert [s.ID for s in first.leases] == ids
    assert [s.ID for s in second.leases] == [s.ID for s in third.leases] == [1, *ids]
    assert builds == [50, 51]  # (the two later calls shared one)


def test_a_caller_gone_does_not_end_a_build_others_wait_for(monkeypatch):
    monkeypatch.setattr(api_module, "_LEASE_PART", 2)
    store = _store(20)
    api = _api(store)

    async def calls() -> Any:
        first = asyncio.ensure_future(_list(api))
        second = asyncio.ensure_future(_list(api))
        for _ in range(3):
            await asyncio.sleep(0)
        first.cancel()
        return await second

    assert [s.ID for s in asyncio.run(calls()).leases] == sorted(store.leases)


class _CountingLeases(dict):
    """A store's leases that count the walks over all of them."""

    walks = 0

    def items(self) -> Any:
        _CountingLeases.walks += 1
        return super().items()

    def __iter__(self) -> Any:
        _CountingLeases.walks += 1
        return super().__iter__()


def _lessor(store: MVCCStore) -> Lessor:
    driver = SimpleNamespace(
        settings=SimpleNamespace(auto_compaction_mode="revision", auto_compaction_retention="0"),
        election_timeout_s=0.3,
        raw=SimpleNamespace(term=3),
        is_leader=True,
        restoring=False,
    )
    return Lessor(SimpleNamespace(driver=driver, store=store))


def test_the_lessor_follows_grants_and_revokes_without_walking_every_lease():
    store = _store(20_000)
    store.leases = _CountingLeases(store.leases)
    _CountingLeases.walks = 0
    lessor = _lessor(store)
    lessor.sync()  # (leader from now on: every lease starts afresh)
    assert _CountingLeases.walks == 1 and lessor.expiry.keys() == store.leases.keys()
    rng = random.Random(2)
    kept = next(iter(dict.keys(store.leases)))
    at = lessor.expiry[kept]
    for n in range(300):  # as the API does: a grant applied, then the lessor told
        lease_id = 10**15 + n
        _grant(store, lease_id, 60)
        lessor.granted(lease_id, 60)
        victim = rng.choice([i for i in (lease_id, lease_id - 1, lease_id - 2) if i != kept])
        if victim in store.leases:
            _revoke(store, victim)
        lessor.sync()
        assert lessor.remaining(lease_id) in (-1, 59)  # (whole seconds left, as etcd's)
    # each walked all 20,000 leases: ~2-4 ms a grant, and more with more leases
    assert _CountingLeases.walks == 1
    assert lessor.expiry.keys() == store.leases.keys() and lessor.expiry[kept] == at
    # more changes than the store remembers, or another store (a snapshot's): every lease
    for n in range(LEASE_LOG + 1):
        _grant(store, 10**16 + n)
    _revoke(store, kept)
    lessor.sync()
    assert _CountingLeases.walks == 2 and lessor.expiry.keys() == store.leases.keys()
    restored = MVCCStore.load(store.dump())
    lessor.api.store = restored
    _grant(restored, 5)
    _revoke(store, 10**16)  # (the old store, let go)
    lessor.sync()
    assert lessor.expiry.keys() == restored.leases.keys()
    _revoke(restored, 5)
    _grant(restored, 6)
    lessor.sync()
    assert lessor.expiry.keys() == restored.leases.keys()


def test_expired_leases_are_found_without_a_walk_over_every_lease():
    # The leader walked every lease ten times a second to find the expired ones (76,000
    # leases: 7% of a core, idle). A heap: the earliest first, renewed and gone ones skipped.
    deadlines = Deadlines({i: 100.0 + i for i in range(100_000)})
    assert deadlines.due(99.0, 500) == [] and len(deadlines._heap) == 100_000
    deadlines[3] = 500.0  # renewed
    deadlines.pop(4)  # revoked
    deadlines[7] = 101.5  # renewed, still due sooner than its old time
    assert deadlines.due(106.0, 500) == [0, 1, 7, 2, 5, 6]
    assert deadlines.due(108.0, 1) == [8]  # (at most so many at a time)
    assert deadlines.due(108.0, 500) == []  # (taken off: the caller gives them a time again)
    for n in range(50_000):  # keep-alives push entries; the stale ones do not pile up
        deadlines[9] = 200.0 + n
    assert len(deadlines._heap) <= 2 * len(deadlines) + 1025
    assert deadlines.due(300.0, 500) == [*range(10, 201)]
    deadlines.clear()
    assert deadlines == {} and deadlines.due(10**9, 500) == []
