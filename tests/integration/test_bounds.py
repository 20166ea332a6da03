"""Memory and disk stay bounded under an endless write load (real processes).

The bound, for the settings below (a snapshot every 20,000 entries, 2,000 entries kept behind
it, 4 MiB WAL segments) and a working set of 20,000 keys with 64-byte values: a node's data
directory holds two snapshots (~2 MB each) and the WAL written since the older one's compaction
point, in whole segments (a few MiB); its resident memory is the interpreter, gRPC, the state
and the log tail (~60 MiB measured). The test asserts generous limits (DISK_LIMIT, RSS_LIMIT)
and that nothing keeps growing: the second half of the run peaks no higher than the first half
plus a margin. CI runs it for ``RAFTFAST_BOUND_SECONDS`` = 15 s; ``make soak`` for 10 minutes.
A loaded machine writes less in that time: the load then goes on until it has written
``MIN_WRITES`` (five snapshot cycles), for up to four times as long.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import grpc

from raftfast.client import Client
from raftfast.tools.localcluster import ProcCluster

from .load import put_each

DURATION = float(os.environ.get("RAFTFAST_BOUND_SECONDS", "15"))
FLAGS = [
    "--snapshot-entries",
    "20000",
    "--snapshot-keep",
    "2000",
    "--wal-segment-bytes",
    str(4 << 20),
]
KEYS = 20_000
VALUE = b"v" * 64
DISK_LIMIT = 64 << 20
RSS_LIMIT = 256 << 20
GROWTH_MARGIN_RSS = 48 << 20  # allocator noise and a bigger gRPC buffer now and then
GROWTH_MARGIN_DISK = 16 << 20  # one WAL segment plus one snapshot more, give or take
MIN_WRITES = 5 * 20_000  # enough snapshot cycles to tell growth from a sawtooth


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _disk(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass  # a WAL segment or snapshot deleted while we looked
    return total


def test_memory_and_disk_stay_bounded_under_an_endless_write_load(tmp_path):
    with ProcCluster(tmp_path, extra=FLAGS) as cluster:
        cluster.wait_leader()
        samples: list[tuple[float, dict[str, int], dict[str, int]]] = []
        writes = 0

        def sample(at: float) -> None:
            rss = {n: _rss(p.pid) for n, p in cluster.procs.items()}
            disk = {n: _disk(tmp_path / n) for n in cluster.ids}
            samples.append((at, rss, disk))

        async def load() -> float:
            nonlocal writes
            async with Client(cluster.endpoints, timeout=30) as c:
                started = time.monotonic()
                next_sample = started
                i = 0
                while (now := time.monotonic()) - started < DURATION or (
                    writes < MIN_WRITES and now - started < 4 * DURATION
                ):
                    if now >= next_sample:
                        sample(now - started)
                        next_sample = now + max(1.0, DURATION / 60)
                    await put_each(c, ((f"k{(i + j) % KEYS}", VALUE) for j in range(2000)))
                    i += 2000
                    writes += 2000
                sample(elapsed := time.monotonic() - started)
                return elapsed

        duration = asyncio.run(load())
        assert writes >= MIN_WRITES, f"only {writes} writes: too few snapshot cycles to tell"
        peak_rss = max(max(s[1].values()) for s in samples)
        peak_disk = max(max(s[2].values()) for s in samples)
        first = [s for s in samples if s[0] <= duration / 2]
        second = [s for s in samples if s[0] > duration / 2]
        first_rss = max(max(s[1].values()) for s in first)
        second_rss = max(max(s[1].values()) for s in second)
        first_disk = max(max(s[2].values()) for s in first)
        second_disk = max(max(s[2].values()) for s in second)
        print(
            f"{writes} writes in {duration:.0f}s; peak RSS {peak_rss >> 20} MiB (halves "
            f"{first_rss >> 20}/{second_rss >> 20}), peak data dir {peak_disk >> 20} MiB "
            f"(halves {first_disk >> 20}/{second_disk >> 20})"
        )
        assert peak_rss <= RSS_LIMIT, f"resident memory {peak_rss >> 20} MiB"
        assert peak_disk <= DISK_LIMIT, f"data directory {peak_disk >> 20} MiB"
        assert second_rss <= first_rss + GROWTH_MARGIN_RSS, "memory keeps growing"
        assert second_disk <= first_disk + GROWTH_MARGIN_DISK, "disk use keeps growing"
        for nid in cluster.ids:
            assert cluster.status(nid).first_index > 1, f"{nid} never compacted its log"


ETCD_RETENTION = 2_500  # revisions of etcd history kept (--auto-compaction-retention)
ETCD_MIN_WRITES = 4 * ETCD_RETENTION  # several compactions (each in steps of a tenth)
ETCD_INFLIGHT = 64


def test_etcd_api_memory_stays_bounded_with_auto_compaction(tmp_path):
    """Puts through etcd's API, forever overwriting a working set: the history is compacted
    (revision mode), so resident memory levels off instead of growing with every revision."""
    from raftfast.proto.etcd import rpc_pb2 as epb
    from raftfast.proto.etcd import rpc_pb2_grpc as epb_grpc

    flags = [*FLAGS, "--auto-compaction-retention", str(ETCD_RETENTION)]
    with ProcCluster(tmp_path, extra=flags) as cluster:
        leader = cluster.wait_leader()
        samples: list[tuple[float, dict[str, int]]] = []
        writes = 0

        async def load() -> tuple[float, int]:
            nonlocal writes
            async with grpc.aio.insecure_channel(cluster.addrs[leader]) as channel:
                kv = epb_grpc.KVStub(channel)
                started = time.monotonic()
                next_sample = started

                async def put(i: int) -> None:
                    await kv.Put(epb.PutRequest(key=b"k%d" % (i % KEYS), value=VALUE), timeout=30)

                i = 0
                while (now := time.monotonic()) - started < DURATION or (
                    # (two CI runs sharing 2 cores: ~650 puts/s here; 4 x 15 s fell 64 short)
                    writes < ETCD_MIN_WRITES and now - started < 8 * DURATION
                ):
                    if now >= next_sample:
                        samples.append(
                            (now - started, {n: _rss(p.pid) for n, p in cluster.procs.items()})
                        )
                        next_sample = now + max(1.0, DURATION / 60)
                    await asyncio.gather(*(put(i + j) for j in range(ETCD_INFLIGHT)))
                    i += ETCD_INFLIGHT
                    writes += ETCD_INFLIGHT
                elapsed = time.monotonic() - started
                samples.append((elapsed, {n: _rss(p.pid) for n, p in cluster.procs.items()}))
                hashed = await epb_grpc.MaintenanceStub(channel).HashKV(
                    epb.HashKVRequest(), timeout=30
                )
                return elapsed, hashed.compact_revision

        duration, compacted = asyncio.run(load())
        assert writes >= ETCD_MIN_WRITES, f"only {writes} writes: too few compactions to tell"
        # (revision = writes + 1: the history kept is at most the retention and one step)
        assert compacted >= writes - 2 * ETCD_RETENTION, f"compacted only to {compacted}"
        peak = max(max(s[1].values()) for s in samples)
        first = max(max(s[1].values()) for s in samples if s[0] <= duration / 2)
        second = max(max(s[1].values()) for s in samples if s[0] > duration / 2)
        print(
            f"etcd API: {writes} puts in {duration:.0f}s, compacted to revision {compacted}; "
            f"peak RSS {peak >> 20} MiB (halves {first >> 20}/{second >> 20})"
        )
        assert peak <= RSS_LIMIT, f"resident memory {peak >> 20} MiB"
        assert second <= first + GROWTH_MARGIN_RSS, "memory keeps growing"
