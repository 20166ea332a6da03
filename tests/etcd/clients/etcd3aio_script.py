"""etcd3aio (PyPI: an asyncio etcd v3 client no one here wrote) against a cluster's etcd API, in a
process of its own: etcd3aio registers etcd's etcdserverpb protobuf descriptors, which would
clash with raftfast.proto.etcd's in one process (so nothing of raftfast is imported here).

    python etcd3aio_script.py SCENARIO HOST:PORT[,HOST:PORT...] PREFIX

runs one scenario (kv, txn, watch, lease, lock, cluster, errors) with keys under PREFIX and
prints what it saw as one JSON object (bytes as text); an unexpected error exits 1 with its
traceback. Nothing is asserted here: tests/etcd/test_python_client.py does that. Every call has
a deadline; waits poll a condition until a deadline, and the run as a whole has one too.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from etcd3aio import Etcd3Client, SortOrder, prefix_range_end
from etcd3aio.kv import Compare, KVService

CALL_S = 30.0  # one call's deadline
WAIT_S = 30.0  # a polled condition's
RUN_S = 120.0  # the whole scenario's

KV = KVService  # (its txn_compare_* / txn_op_* builders are class methods)


def kv_of(kv) -> dict[str, Any]:
    return {
        "key": kv.key.decode(),
        "value": kv.value.decode(),
        "create": kv.create_revision,
        "mod": kv.mod_revision,
        "version": kv.version,
        "lease": kv.lease,
    }


def error_of(exc: grpc.aio.AioRpcError) -> dict[str, str]:
    return {"code": exc.code().name, "details": exc.details()}


async def poll(what: str, check: Callable[[], Awaitable[Any]], timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


async def failure(call: Awaitable[Any]) -> dict[str, str] | None:
    """The gRPC error ``call`` ends in (None: it succeeded)."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return error_of(exc)
    return None


# -- scenarios ------------------------------------------------------------------------------


async def kv(c: Etcd3Client, p: str) -> dict[str, Any]:
    end = prefix_range_end(p)
    r1 = await c.kv.put(p + "a", "1", timeout=CALL_S)
    r2 = await c.kv.put(p + "a", "2", prev_kv=True, timeout=CALL_S)
    await c.kv.put(p + "b", "3", timeout=CALL_S)
    await c.kv.put(p + "c", "4", timeout=CALL_S)
    one = await c.kv.get(p + "a", timeout=CALL_S)
    old = await c.kv.get(p + "a", revision=r1.header.revision, timeout=CALL_S)
    prefix = await c.kv.get(p, range_end=end, timeout=CALL_S)
    keys_only = await c.kv.get(p, range_end=end, keys_only=True, timeout=CALL_S)
    count_only = await c.kv.get(p, range_end=end, count_only=True, timeout=CALL_S)
    limited = await c.kv.get(
        p, range_end=end, limit=2, sort_order=SortOrder.DESCEND, timeout=CALL_S
    )
    deleted = await c.kv.delete(p + "a", prev_kv=True, timeout=CALL_S)
    after = await c.kv.get(p + "a", timeout=CALL_S)
    rest = await c.kv.delete(p, range_end=end, timeout=CALL_S)
    empty = await c.kv.get(p, range_end=end, timeout=CALL_S)
    return {
        "revisions": [r1.header.revision, r2.header.revision],
        "prev_kv": kv_of(r2.prev_kv),
        "get": [kv_of(kv) for kv in one.kvs],
        "get_old": [kv_of(kv) for kv in old.kvs],
        "prefix": [kv_of(kv) for kv in prefix.kvs],
        "prefix_count": prefix.count,
        "keys_only": [(kv.key.decode(), kv.value.decode()) for kv in keys_only.kvs],
        "count_only": [count_only.count, len(count_only.kvs)],
        "limited": [kv.key.decode() for kv in limited.kvs],
        "limited_more": limited.more,
        "deleted": deleted.deleted,
        "deleted_prev": [kv_of(kv) for kv in deleted.prev_kvs],
        "after_delete": len(after.kvs),
        "deleted_rest": rest.deleted,
        "left": len(empty.kvs),
    }


async def txn(c: Etcd3Client, p: str) -> dict[str, Any]:
    k, other = p + "k", p + "other"
    first = await c.kv.put(k, "a", timeout=CALL_S)
    await c.kv.put(other, "x", timeout=CALL_S)
    compares = [KV.txn_compare_value(k, "a"), KV.txn_compare_version(other, 1)]
    success = [KV.txn_op_put(k, "b"), KV.txn_op_get(other)]
    failure_ops = [KV.txn_op_put(p + "failed", "yes")]
    won = await c.kv.txn(compares, success, failure_ops, timeout=CALL_S)
    lost = await c.kv.txn(compares, success, [KV.txn_op_get(k)], timeout=CALL_S)
    # create-if-absent (create_revision == 0), twice
    absent = [KV.txn_compare_create_revision(p + "new", 0)]
    created = await c.kv.txn(
        absent, [KV.txn_op_put(p + "new", "1")], [KV.txn_op_get(p + "new")], timeout=CALL_S
    )
    again = await c.kv.txn(
        absent, [KV.txn_op_put(p + "new", "2")], [KV.txn_op_get(p + "new")], timeout=CALL_S
    )
    # other compare results; a read of a past revision and a delete in one txn
    others = [
        KV.txn_compare_version(k, 1, result=Compare.GREATER),
        KV.txn_compare_value(k, "a", result=Compare.NOT_EQUAL),
        KV.txn_compare_create_revision(k, first.header.revision + 1, result=Compare.LESS),
    ]
    mixed = await c.kv.txn(
        others,
        [KV.txn_op_get(k, revision=first.header.revision), KV.txn_op_delete(other)],
        timeout=CALL_S,
    )
    state = await c.kv.get(p, range_end=prefix_range_end(p), timeout=CALL_S)
    return {
        "won": won.succeeded,
        "won_range": [kv_of(kv) for kv in won.responses[1].response_range.kvs],
        "won_revision": won.header.revision,
        "lost": lost.succeeded,
        "lost_range": [kv_of(kv) for kv in lost.responses[0].response_range.kvs],
        "created": created.succeeded,
        "again": again.succeeded,
        "again_range": [kv_of(kv) for kv in again.responses[0].response_range.kvs],
        "mixed": mixed.succeeded,
        "mixed_old": [kv_of(kv) for kv in mixed.responses[0].response_range.kvs],
        "mixed_deleted": mixed.responses[1].response_delete_range.deleted,
        "first_revision": first.header.revision,
        "state": {kv.key.decode(): kv.value.decode() for kv in state.kvs},
    }


async def watch(c: Etcd3Client, p: str) -> dict[str, Any]:
    end = prefix_range_end(p)
    revs = [(await c.kv.put(p + str(i), f"v{i}", timeout=CALL_S)).header.revision for i in range(3)]
    events: list[list] = []

    async def collect() -> None:
        stream = c.watch.watch(p, range_end=end, start_revision=revs[0], prev_kv=True)
        async for response in stream:
            for ev in response.events:
                kind = "DELETE" if ev.type == 1 else "PUT"
                prev = ev.prev_kv.value.decode() if ev.HasField("prev_kv") else None
                events.append(
                    [kind, ev.kv.key.decode(), ev.kv.value.decode(), ev.kv.mod_revision, prev]
                )
            if response.canceled or any(
                ev.kv.key == (p + "end").encode() for ev in response.events
            ):
                return

    task = asyncio.get_running_loop().create_task(collect())
    try:

        async def past_seen() -> bool:
            return len(events) >= 3 or task.done()

        await poll("the past events", past_seen)
        seen_before_live = len(events)
        live = [(await c.kv.put(p + "3", "v3", timeout=CALL_S)).header.revision]
        live.append((await c.kv.delete(p + "0", timeout=CALL_S)).header.revision)
        await c.kv.put(p.rstrip("/") + "-unwatched", "-", timeout=CALL_S)
        live.append((await c.kv.put(p + "end", "e", timeout=CALL_S)).header.revision)
        await asyncio.wait_for(task, WAIT_S)
    finally:
        task.cancel()
    # compaction: a watch from before it is canceled; a read there refused
    await c.kv.compact(live[-1], timeout=CALL_S)

    async def compacted_here() -> bool:  # (this member has applied the compaction)
        return (
            await failure(c.kv.get(p, revision=revs[0], serializable=True, timeout=CALL_S))
        ) is not None

    await poll("the compaction to be applied", compacted_here)
    refused = await failure(c.kv.get(p + "1", revision=revs[0], timeout=CALL_S))
    canceled: dict[str, Any] = {}

    async def watch_compacted() -> None:
        async for response in c.watch.watch(p, range_end=end, start_revision=revs[0]):
            if response.canceled or response.compact_revision:
                canceled.update(
                    canceled=response.canceled,
                    compact_revision=response.compact_revision,
                    events=len(response.events),
                    reason=response.cancel_reason,
                )
                return

    await asyncio.wait_for(watch_compacted(), WAIT_S)
    return {
        "revisions": revs,
        "live_revisions": live,
        "seen_before_live": seen_before_live,
        "events": events,
        "compacted_get": refused,
        "compacted_watch": canceled,
    }


async def lease(c: Etcd3Client, p: str) -> dict[str, Any]:
    ttl = 3
    granted = await c.lease.grant(ttl, timeout=CALL_S)
    granted_at = time.monotonic()
    lease_id = granted.ID
    await c.kv.put(p + "k", "v", lease=lease_id, timeout=CALL_S)
    attached = (await c.kv.get(p + "k", timeout=CALL_S)).kvs[0].lease
    info = await c.lease.time_to_live(lease_id, keys=True, timeout=CALL_S)
    listed = [s.ID for s in (await c.lease.leases(timeout=CALL_S)).leases]
    present = []
    async with c.lease.keep_alive_context(lease_id, ttl=ttl) as keeper:
        while time.monotonic() < granted_at + ttl + 2:  # (past the TTL)
            present.append(len((await c.kv.get(p + "k", timeout=CALL_S)).kvs))
            await asyncio.sleep(0.2)
        alive = keeper.alive
    # the raw keep-alive stream: a request, its answer
    stream = c.lease.keep_alive(lease_id)
    try:
        renewed = None
        async for response in stream:
            renewed = [response.ID, response.TTL]
            break
    finally:
        stream.cancel()

    # no one renews it now: it expires, its key with it
    async def key_gone() -> bool:
        return not (await c.kv.get(p + "k", timeout=CALL_S)).kvs

    await poll("the lease to expire", key_gone)
    expired = await c.lease.time_to_live(lease_id, timeout=CALL_S)
    # revoked: its keys go at once
    second = await c.lease.grant(30, timeout=CALL_S)
    await c.kv.put(p + "r1", "x", lease=second.ID, timeout=CALL_S)
    await c.kv.put(p + "r2", "y", lease=second.ID, timeout=CALL_S)
    revoked = await c.lease.revoke(second.ID, timeout=CALL_S)
    left = await c.kv.get(p, range_end=prefix_range_end(p), timeout=CALL_S)
    return {
        "id": lease_id,
        "ttl": granted.TTL,
        "attached": attached,
        "ttl_info": {
            "id": info.ID,
            "ttl": info.TTL,
            "granted": info.grantedTTL,
            "keys": [k.decode() for k in info.keys],
        },
        "listed": lease_id in listed,
        "present_while_kept": present,
        "keeper_alive": alive,
        "renewed": renewed,
        "expired_ttl": expired.TTL,
        "revoked_revision": revoked.header.revision,
        "left_after_revoke": [kv.key.decode() for kv in left.kvs],
        "put_with_revoked": await failure(c.kv.put(p + "z", "z", lease=second.ID, timeout=CALL_S)),
        "revoke_again": await failure(c.lease.revoke(second.ID, timeout=CALL_S)),
    }


async def lock(c: Etcd3Client, p: str, endpoints: list[str]) -> dict[str, Any]:
    """Two more clients take the same lock, then campaign in the same election."""
    timeline: list[str] = []
    out: dict[str, Any] = {}
    async with Etcd3Client(endpoints) as a, Etcd3Client(endpoints) as b:
        queue_prefix = f"__etcd3aio:lock/{p}lock/"

        async def count(prefix: str) -> int:
            got = await c.kv.get(prefix, range_end=prefix_range_end(prefix), timeout=CALL_S)
            return len(got.kvs)

        async def queued(prefix: str, n: int) -> bool:
            return await count(prefix) == n

        first = a.lock(p + "lock", ttl=10)
        await first.acquire()
        timeline.append("a+")

        async def second() -> None:
            async with b.lock(p + "lock", ttl=10):
                timeline.append("b+")
            timeline.append("b-")

        task = asyncio.get_running_loop().create_task(second())
        await poll("the second locker to queue", lambda: queued(queue_prefix, 2))
        await asyncio.sleep(1.0)  # (a bounded look: a broken lock lets b in now)
        timeline.append("a-")
        await first.release()
        await asyncio.wait_for(task, WAIT_S)
        out["lock_timeline"] = timeline
        out["lock_keys_left"] = await count(queue_prefix)

        # an election: alpha leads, beta waits, then takes over when alpha resigns
        election_prefix = f"__etcd3aio:election/{p}elect/"
        observer = c.election(p + "elect")
        alpha = a.election(p + "elect", value=b"alpha", ttl=10)
        await alpha.__aenter__()
        leaders = [(await observer.leader(timeout=CALL_S)).kvs[0].value.decode()]
        beta_in = asyncio.Event()
        beta_out = asyncio.Event()
        order: list[str] = []

        async def beta() -> None:
            async with b.election(p + "elect", value=b"beta", ttl=10):
                order.append("beta+")
                beta_in.set()
                await beta_out.wait()

        task = asyncio.get_running_loop().create_task(beta())
        await poll("beta to campaign", lambda: queued(election_prefix, 2))
        await asyncio.sleep(1.0)  # (a bounded look: a broken election lets beta in now)
        order.append("alpha-")
        await alpha.__aexit__(None, None, None)
        await asyncio.wait_for(beta_in.wait(), WAIT_S)
        leaders.append((await observer.leader(timeout=CALL_S)).kvs[0].value.decode())
        beta_out.set()
        await asyncio.wait_for(task, WAIT_S)
        out["election_order"] = order
        out["leaders"] = leaders
        out["election_keys_left"] = await count(election_prefix)
    return out


async def cluster(c: Etcd3Client, p: str, endpoints: list[str]) -> dict[str, Any]:
    members = await c.cluster.member_list(timeout=CALL_S)
    status = await c.maintenance.status(timeout=CALL_S)
    # which members answer: round robin over the endpoints given, so ask until each one has
    seen = {status.header.member_id}

    async def all_seen() -> bool:
        seen.add((await c.maintenance.status(timeout=CALL_S)).header.member_id)
        return len(seen) >= len(endpoints)

    await poll("every endpoint to answer", all_seen)
    return {
        "members": [
            {
                "ID": m.ID,
                "name": m.name,
                "clientURLs": list(m.clientURLs),
                "peerURLs": list(m.peerURLs),
                "isLearner": m.isLearner,
            }
            for m in members.members
        ],
        "cluster_id": members.header.cluster_id,
        "status": {
            "member_id": status.header.member_id,
            "leader": status.leader,
            "raftTerm": status.raftTerm,
            "raftIndex": status.raftIndex,
            "version": status.version,
        },
        "answered_by": sorted(seen),
    }


async def errors(c: Etcd3Client, p: str) -> dict[str, Any]:
    r1 = (await c.kv.put(p + "k", "1", timeout=CALL_S)).header.revision
    r2 = (await c.kv.put(p + "k", "2", timeout=CALL_S)).header.revision
    await c.kv.compact(r2, timeout=CALL_S)
    return {
        "compacted_get": await failure(c.kv.get(p + "k", revision=r1, timeout=CALL_S)),
        "compacted_compact": await failure(c.kv.compact(r1, timeout=CALL_S)),
        "future_get": await failure(c.kv.get(p + "k", revision=r2 + 10**6, timeout=CALL_S)),
        "unknown_lease_put": await failure(
            c.kv.put(p + "k", "3", lease=0x1234ABCD, timeout=CALL_S)
        ),
        "unknown_lease_revoke": await failure(c.lease.revoke(0x1234ABCD, timeout=CALL_S)),
        "unknown_lease_ttl": (await c.lease.time_to_live(0x1234ABCD, timeout=CALL_S)).TTL,
        "value": (await c.kv.get(p + "k", timeout=CALL_S)).kvs[0].value.decode(),
    }


async def main(scenario: str, endpoints: list[str], prefix: str) -> dict[str, Any]:
    async with asyncio.timeout(RUN_S), Etcd3Client(endpoints) as c:
        if scenario in ("lock", "cluster"):
            return await globals()[scenario](c, prefix, endpoints)
        return await globals()[scenario](c, prefix)


if __name__ == "__main__":
    name, addresses, key_prefix = sys.argv[1:4]
    result = asyncio.run(main(name, addresses.split(","), key_prefix))
    print(json.dumps(result))
