"""A lock service on three nodes: one holder at a time, and a holder that dies loses the lock
once its lease runs out.

    python examples/lock_service.py

Three ``raftfast.Node``s in this process replicate a ``raftfast.ReplLock`` (a 2 s lease).
Alice takes the lock through node n1 and holds it (``hold`` renews it); Bob, through n2, is
refused meanwhile. Then n1 stops without a word (as if Alice's machine died): Bob gets the lock
once Alice's lease has run out, not before. Prints one JSON line and exits 0 if all of that held.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time

import raftfast
from raftfast.tools.localcluster import free_ports

LEASE = 2.0


async def main(root: str) -> dict:
    peers = {f"n{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(free_ports(3))}
    locks = {nid: raftfast.ReplLock(lease=LEASE) for nid in peers}
    nodes = {
        nid: raftfast.Node(
            id=nid,
            listen=address,
            peers=peers,
            data_dir=f"{root}/{nid}",
            state_machine=raftfast.Objects(lock=locks[nid]),
            tick_ms=20,
            log_level="WARNING",
        )
        for nid, address in peers.items()
    }
    for node in nodes.values():
        await node.start()
    try:
        await nodes["n1"].wait_for_leader()
        alice, bob = locks["n1"], locks["n2"]
        assert await alice.try_acquire("alice")

        async def keep_renewing() -> None:  # what `hold` does for a holder that lives
            while True:
                await asyncio.sleep(LEASE / 3)
                await alice.try_acquire("alice")

        renewing = asyncio.create_task(keep_renewing())
        refused_while_held = True
        for _ in range(3):  # longer than the lease: alice renews it meanwhile
            await asyncio.sleep(LEASE / 2)
            refused_while_held &= not await bob.try_acquire("bob")
        # alice's machine dies, holding the lock: no release, no more renewals
        renewing.cancel()
        await alice.try_acquire("alice")
        died = time.monotonic()
        await nodes.pop("n1").stop()
        while not await bob.try_acquire("bob"):
            await asyncio.sleep(0.1)
        waited = time.monotonic() - died
        assert await bob.release("bob")
    finally:
        for node in nodes.values():
            await node.stop()
    return {
        "refused_while_held": refused_while_held,
        "bob_waited_s": round(waited, 2),
        "lease_s": LEASE,
        "ok": refused_while_held and LEASE * 0.9 <= waited <= LEASE + 5,
    }


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="lock-service-") as tmp:
        result = asyncio.run(main(tmp))
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)
