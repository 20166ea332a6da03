"""How long this disk takes to make a small write durable: the floor under every durable,
replicated write (raftfast's and etcd's alike: each member appends to its log and
fdatasyncs it before the write is acknowledged).

A small append and an ``fdatasync`` of it, again and again, with a pause between two syncs
(``--gaps``) or none. On the 2-core VM this project is measured on, the same sync takes
~0.03-0.05 ms back to back and 0.2-1.1 ms once the disk has been idle for a millisecond,
varying from one minute to the next (issue 15, eighteenth session). A cluster on one disk
sits between the two: its members' syncs come a fraction of a millisecond apart, so a
sequential put pays more of the idle figure the longer each round trip leaves the disk idle
(through etcd's API, ~0.3 ms more of gRPC per put, a put's own syncs took 0.85 ms instead of
0.31). ``make compare`` prints both figures above its tables, so that its sequential rows can
be read against the disk of the day; etcd's guidance for its own WAL is a 99th percentile
under 10 ms.

    python bench/disk_sync.py [--dir DIR] [--count 400] [--gaps 0,1]   # gaps in ms
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

_RECORD = b"r" * 128  # about a WAL record of one small put


def sync_latency(directory: str, gap_ms: float, count: int) -> dict[str, float]:
    """p50/p90/p99 (ms) of ``count`` fdatasyncs of a 128-byte append each, ``gap_ms`` apart
    (slept, as a node waits for its next write), in a file made and removed in ``directory``."""
    if count < 1 or gap_ms < 0:
        raise ValueError("count must be >= 1 and gap_ms >= 0")
    sync = getattr(os, "fdatasync", None) or os.fsync  # (macOS has no fdatasync)
    took = []
    fd, path = tempfile.mkstemp(prefix="disk-sync-", dir=directory)
    try:
        for _ in range(count):
            os.write(fd, _RECORD)
            start = time.perf_counter()
            sync(fd)
            took.append(time.perf_counter() - start)
            if gap_ms:
                time.sleep(gap_ms / 1000)
    finally:
        os.close(fd)
        os.unlink(path)
    took.sort()
    return {f"p{q}_ms": took[min(len(took) - 1, len(took) * q // 100)] * 1000 for q in (50, 90, 99)}


def measure(directory: str, gaps_ms: list[float], count: int) -> dict[str, dict[str, float]]:
    """{"gap <g> ms": sync_latency(...)} for each gap."""
    return {f"gap {g:g} ms": sync_latency(directory, g, count) for g in gaps_ms}


def summary(results: dict[str, dict[str, float]]) -> str:
    """One line: each gap's p50/p99."""
    return "; ".join(
        f"{name}: p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms" for name, r in results.items()
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the test file goes")
    p.add_argument("--count", type=int, default=400, help="syncs per gap")
    p.add_argument("--gaps", default="0,1", help="pauses between two syncs, ms (0: none)")
    args = p.parse_args()
    try:
        gaps = [float(g) for g in args.gaps.split(",")]
        results = measure(args.dir, gaps, args.count)
    except (ValueError, OSError) as exc:
        print(f"disk_sync: {exc}", file=sys.stderr)
        return 2
    print(f"fdatasync of a 128-byte append in {args.dir}: {summary(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
