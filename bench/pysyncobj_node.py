"""One PySyncObj node holding a replicated dict (for `make compare`). The node that becomes
leader generates the load itself (PySyncObj has no network client): ``--inflight`` sets in
flight at once, each callback issuing the next, for ``--duration`` seconds after a 1 s warmup.
It prints one JSON object (ops_per_s, p50_ms, p99_ms) and exits; followers run until stopped.

    python bench/pysyncobj_node.py SELF_ADDR PARTNER_ADDR... --duration 5 --inflight 1
"""

from __future__ import annotations

import argparse
import json
import threading
import time

from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf
from pysyncobj.batteries import ReplDict

VALUE = b"x" * 64


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("self_addr")
    p.add_argument("partners", nargs="+")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--inflight", type=int, default=1)
    args = p.parse_args()
    data = ReplDict()
    node = SyncObj(args.self_addr, args.partners, conf=SyncObjConf(), consumers=[data])
    deadline = time.monotonic() + 60
    while not node._isReady() or node._getLeader() is None:  # noqa: SLF001 - no public API
        if time.monotonic() > deadline:
            raise SystemExit("no leader")
        time.sleep(0.05)
    if node._getLeader().address != args.self_addr:  # noqa: SLF001
        while True:  # a follower: serve until the parent stops us
            time.sleep(1)

    lock = threading.Lock()
    latencies: list[float] = []
    done = threading.Event()
    start = time.monotonic()
    measure_from, stop_at = start + 1.0, start + 1.0 + args.duration
    counter = [0, 0]  # ops issued, errors

    def issue() -> None:
        with lock:
            counter[0] += 1
            key = f"k{counter[0] % 100_000}"
        t0 = time.monotonic()

        def on_commit(result, error) -> None:
            now = time.monotonic()
            if error != FAIL_REASON.SUCCESS and now >= measure_from:
                with lock:
                    counter[1] += 1
            elif now >= measure_from:
                with lock:
                    latencies.append(now - t0)
            if now < stop_at:
                issue()
            else:
                done.set()

        data.set(key, VALUE, callback=on_commit)

    for _ in range(args.inflight):
        issue()
    done.wait(args.duration + 60)
    time.sleep(0.5)  # let the other in-flight callbacks land
    with lock:
        lat = sorted(latencies)
    print(
        json.dumps(
            {
                "ops_per_s": len(lat) / args.duration,
                "p50_ms": lat[len(lat) // 2] * 1000 if lat else float("nan"),
                "p99_ms": lat[int(len(lat) * 0.99)] * 1000 if lat else float("nan"),
                "errors": counter[1],
                "fsync": False,
            }
        ),
        flush=True,
    )
    node.destroy()


if __name__ == "__main__":
    main()
