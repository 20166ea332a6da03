"""Memory per key and a restarted follower's catch-up, on a real 3-node cluster (issue 15).

1. Start 3 nodes (default settings, fsync on) and read each node's resident memory (RSS).
2. Write ``--keys`` keys (16-byte keys, 64-byte values by default) with ``put_many``, wait
   until every node has applied them and its RSS is steady, and read it again: the bytes per
   key are the growth divided by the number of keys (each node's, and the median). The
   absolute RSS and the peak (VmHWM: a snapshot holds a copy of the store) are printed too.
3. Stop a follower (SIGTERM), write ``--behind`` more keys while it is down, start it again and
   time it from the start of its process until it has applied everything the leader committed:
   start-up (imports), loading its snapshot and WAL, and the replication it missed.

    python bench/memory.py                      # 1,000,000 keys
    python bench/memory.py --keys 200000 --json

The targets (issue 15): <= 160 bytes of RSS per key, caught up in <= 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from raftfast import Client
from raftfast.tools.localcluster import ProcCluster, wait_for

CHUNK = 4096  # pairs per put_many call (one log entry each, as put_many packs them)


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def steady_rss(pid: int, timeout: float = 30.0) -> int:
    """The RSS once it has stayed within 1 MiB for a second (a snapshot taken as the writes
    ended holds a copy of the store until it is written)."""
    readings: list[tuple[float, int]] = []

    def steady() -> int:
        now = time.monotonic()
        readings.append((now, rss_bytes(pid)))
        window = [r for t, r in readings if t >= now - 1.0]
        if readings[0][0] <= now - 1.0 and max(window) - min(window) <= 2**20:
            return window[-1]
        return 0

    return wait_for("a steady RSS", steady, timeout, every=0.05)


async def write_keys(endpoints: list[str], first: int, count: int, key_len: int, value: bytes):
    async with Client(endpoints, timeout=60) as client:
        pending: set[asyncio.Task] = set()
        for start in range(first, first + count, CHUNK):
            stop = min(start + CHUNK, first + count)
            pairs = [(b"%0*d" % (key_len, i), value) for i in range(start, stop)]
            pending.add(asyncio.ensure_future(client.put_many(pairs)))
            if len(pending) >= 8:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
        for task in pending:
            await task


def all_applied(cluster: ProcCluster, nodes: list[str]) -> int:
    """The leader's commit index once every node in ``nodes`` has applied it, else 0."""
    leader = cluster.wait_leader()
    commit = cluster.status(leader).commit_index
    done = all(cluster.status(n).applied_index >= commit for n in nodes)
    return commit if done else 0


def run(args: argparse.Namespace) -> dict:
    value = b"v" * args.value_bytes
    with tempfile.TemporaryDirectory(prefix="raftfast-memory-") as tmp:
        with ProcCluster(Path(tmp), 3, tick_ms=None) as cluster:
            cluster.wait_leader()
            ids = list(cluster.ids)
            wait_for("every node up", lambda: all_applied(cluster, ids), 30)
            before = {n: rss_bytes(cluster.procs[n].pid) for n in ids}
            started = time.perf_counter()
            asyncio.run(write_keys(cluster.endpoints, 0, args.keys, args.key_bytes, value))
            wrote = time.perf_counter() - started
            wait_for("every node applied", lambda: all_applied(cluster, ids), 120)
            after = {n: steady_rss(cluster.procs[n].pid) for n in ids}
            peak = {n: rss_bytes(cluster.procs[n].pid, "VmHWM") for n in ids}
            per_key = {n: (after[n] - before[n]) / args.keys for n in ids}

            leader = cluster.wait_leader()
            follower = next(n for n in ids if n != leader)
            cluster.kill(follower, sig=15)
            asyncio.run(
                write_keys(cluster.endpoints, args.keys, args.behind, args.key_bytes, value)
            )
            commit = cluster.status(leader).commit_index
            started = time.perf_counter()
            cluster.start(follower, first_time=False)
            cluster.wait_applied(follower, commit, "the restarted follower", 120, every=0.01)
            catch_up = time.perf_counter() - started
            restarted_rss = rss_bytes(cluster.procs[follower].pid)
    return {
        "keys": args.keys,
        "key_bytes": args.key_bytes,
        "value_bytes": args.value_bytes,
        "write_seconds": round(wrote, 2),
        "rss_before_mib": {n: round(b / 2**20, 1) for n, b in before.items()},
        "rss_after_mib": {n: round(b / 2**20, 1) for n, b in after.items()},
        "rss_peak_mib": {n: round(b / 2**20, 1) for n, b in peak.items()},
        "bytes_per_key": {n: round(v, 1) for n, v in per_key.items()},
        "bytes_per_key_median": round(statistics.median(per_key.values()), 1),
        "restarted_follower": follower,
        "behind_keys": args.behind,
        "catch_up_seconds": round(catch_up, 3),
        "restarted_rss_mib": round(restarted_rss / 2**20, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--key-bytes", type=int, default=16)
    parser.add_argument("--value-bytes", type=int, default=64)
    parser.add_argument("--behind", type=int, default=10_000, help="keys written while down")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{result['keys']:,} keys of {args.key_bytes} + {args.value_bytes} bytes "
        f"(written in {result['write_seconds']} s)"
    )
    for n in result["bytes_per_key"]:
        print(
            f"  {n}: RSS {result['rss_before_mib'][n]} -> {result['rss_after_mib'][n]} MiB, "
            f"{result['bytes_per_key'][n]:.0f} bytes per key "
            f"(peak RSS {result['rss_peak_mib'][n]} MiB)"
        )
    print(f"bytes of RSS per key (median of the nodes): {result['bytes_per_key_median']:.0f}")
    print(
        f"follower {result['restarted_follower']} restarted ({result['behind_keys']:,} keys "
        f"behind): caught up in {result['catch_up_seconds']:.2f} s, "
        f"RSS {result['restarted_rss_mib']} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
