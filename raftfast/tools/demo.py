"""`make run`: a local 3-node cluster of real `raftfast-node` processes (data in a temporary
directory, fdatasync on), a short workload through the client, a summary, and a clean stop.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from raftfast import COMPILED
from raftfast.client import Client
from raftfast.tools.localcluster import ProcCluster

VALUE = b"x" * 64


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _workload(endpoints: list[str], seconds: float) -> None:
    async with Client(endpoints, timeout=30) as client:
        # 1. One client, one operation at a time: latency.
        latencies = []
        for i in range(300):
            t = time.perf_counter()
            await client.put(f"seq{i}", VALUE)
            latencies.append((time.perf_counter() - t) * 1000)
        print(
            f"sequential puts: p50 {statistics.median(latencies):.2f} ms, "
            f"p99 {_percentile(latencies, 0.99):.2f} ms ({len(latencies)} puts)"
        )
        # 2. Pipelined: many concurrent puts coalesced onto the Session stream.
        done, batch_latencies = 0, []
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            t = time.perf_counter()
            await client.put_many([(f"p{done + i}", VALUE) for i in range(5000)])
            batch_latencies.append((time.perf_counter() - t) * 1000)
            done += 5000
        elapsed = time.perf_counter() - start
        print(
            f"pipelined puts: {done / elapsed:,.0f} ops/s ({done} puts of {len(VALUE)} B in "
            f"{elapsed:.1f} s; batches of 5000 took p50 {statistics.median(batch_latencies):.0f}"
            f" ms)"
        )
        # 3. Linearizable reads see every acknowledged write.
        assert await client.get(f"p{done - 1}") == VALUE
        assert await client.get("seq0") == VALUE
        print("linearizable reads: the last acknowledged write is visible")


def main(seconds: float = 5.0) -> int:
    with tempfile.TemporaryDirectory(prefix="raftfast-run-") as tmp:
        cluster = ProcCluster(Path(tmp), 3, tick_ms=None)
        print(f"starting 3 raftfast-node processes (compiled={COMPILED}), data in {tmp}")
        cluster.start_all()
        try:
            t = time.perf_counter()
            leader = cluster.wait_leader(timeout=60)
            print(
                f"leader: {leader} at {cluster.addrs[leader]} "
                f"(elected {time.perf_counter() - t:.2f} s after start)"
            )
            asyncio.run(_workload(cluster.endpoints, seconds))
            st = cluster.status(leader)
            print(f"leader {st.id}: term {st.term}, commit index {st.commit_index}")
        except BaseException:
            print(cluster.log_tail(), file=sys.stderr)
            raise
        finally:
            cluster.stop_all()
        print("all nodes stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
