"""A replicated counter on three nodes in three processes, through a crash.

    python examples/replicated_counter.py

Starts three processes, each a ``raftfast.Node`` replicating ``raftfast.ReplCounter``; sends
1,000 increments concurrently, spread over the three nodes (each a command to the counter,
``Client.propose``: exactly-once, retried at another node if its node goes away); kills one node
(kill -9) half way and starts it again; then asks every node for its value. Prints one JSON
line, ``{"value": V, "expected": 1000, "nodes_agree": true}``, and exits 0 only if every node
holds 1000.

Each node process runs this file with ``--node ID`` (see ``run_node``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import raftfast
from raftfast.objects.codec import decode, encode
from raftfast.tools.localcluster import free_ports

INCREMENTS = 1000
IN_FLIGHT = 50


async def run_node(node_id: str, peers: dict[str, str], data_dir: str) -> None:
    """One node: replicate the counter until SIGTERM."""
    counter = raftfast.ReplCounter()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with raftfast.Node(
        id=node_id,
        listen=peers[node_id],
        peers=peers,
        data_dir=data_dir,
        state_machine=raftfast.Objects(counter=counter),
        tick_ms=20,
        log_level="WARNING",
    ):
        await stop.wait()


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.peers = {f"n{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(free_ports(3))}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, node_id: str) -> None:
        cmd = [sys.executable, __file__, "--node", node_id, "--peers", json.dumps(self.peers)]
        cmd += ["--data-dir", str(self.root / node_id)]
        log = open(self.root / f"{node_id}.log", "ab")  # noqa: SIM115 - the child keeps it
        self.procs[node_id] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def kill(self, node_id: str) -> None:
        proc = self.procs.pop(node_id)
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


GET = encode(["counter", "get", [], {}])
ADD_ONE = encode(["counter", "add", [1], {}])
READY = encode(["counter", "add", [0], {}])  # a write of nothing: waits for a leader


async def value_at(address: str) -> int | None:
    """The counter as this node holds it now (a stale read: its own copy)."""
    try:
        async with raftfast.Client([address], timeout=2) as client:
            return decode(await client.query(GET, read_mode="stale"))
    except raftfast.RaftfastError:
        return None


async def drive(cluster: Cluster) -> dict:
    addresses = list(cluster.peers.values())
    # one client per node, each preferring its node (the others are where it retries)
    clients = [raftfast.Client(addresses[i:] + addresses[:i], timeout=60) for i in range(3)]
    try:
        await clients[0].propose(READY)  # a leader is elected and serving
        done = 0
        slots = asyncio.Semaphore(IN_FLIGHT)

        async def increment(i: int) -> None:
            nonlocal done
            async with slots:
                await clients[i % 3].propose(ADD_ONE)
                done += 1

        tasks = [asyncio.create_task(increment(i)) for i in range(INCREMENTS)]
        while done < INCREMENTS // 2:
            await asyncio.sleep(0.01)
        victim = "n2"
        cluster.kill(victim)  # kill -9, half way
        cluster.start(victim)
        await asyncio.gather(*tasks)
        deadline = time.monotonic() + 60
        while True:
            values = [await value_at(a) for a in addresses]
            if all(v == INCREMENTS for v in values) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    finally:
        for client in clients:
            await client.close()
    return {"value": values[0], "expected": INCREMENTS, "nodes_agree": len(set(values)) == 1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", help=argparse.SUPPRESS)
    parser.add_argument("--peers", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.node:
        asyncio.run(run_node(args.node, json.loads(args.peers), args.data_dir))
        return 0
    with tempfile.TemporaryDirectory(prefix="replicated-counter-") as tmp:
        cluster = Cluster(Path(tmp))
        try:
            for node_id in cluster.peers:
                cluster.start(node_id)
            result = asyncio.run(drive(cluster))
        finally:
            cluster.stop()
    print(json.dumps(result))
    return 0 if result["nodes_agree"] and result["value"] == INCREMENTS else 1


if __name__ == "__main__":
    sys.exit(main())
