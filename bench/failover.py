"""`make failover`: how long writes stop when a leader dies or restarts; raftfast beside etcd.

3 nodes on 127.0.0.1, default settings, one writer with one put in flight (raftfast's own
``Client``; for etcd a unary ``KV.Put`` with a 0.5 s deadline that moves to the next endpoint
on any error, after 10 ms, as etcd's clients balance over endpoints: an etcd follower holds a
put while it has no leader, so a longer deadline would only slow etcd down):

* kill -9: the leader is killed ``--rounds`` times (restarted and caught up in between); each
  round's figure is the time from the kill to the acknowledgement of the first put issued
  after it;
* rolling restart: every node in turn gets SIGTERM and is started again once stopped (the
  next one once it has caught up); the figure is the longest gap between two acknowledged
  puts over the whole restart;
* steady load (raftfast, ``--load-seconds``): full batched load (8 requests of 2,000 puts in
  flight) and the number of leader changes it caused (terms moved on).

    make failover
    python bench/failover.py [--rounds 10] [--systems raftfast,etcd] [--load-seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.compare import EtcdCluster  # noqa: E402
from raftfast.client import Client  # noqa: E402
from raftfast.tools import benchcmd  # noqa: E402
from raftfast.tools.loadgen import _field  # noqa: E402
from raftfast.tools.localcluster import ProcCluster, wait_for  # noqa: E402


class Writer:
    """Puts, one at a time, on a loop in a thread; ``acks``: (issued, acknowledged) times."""

    def __init__(self, put: Callable[[int], object], close: Callable[[], object]) -> None:
        self._put = put
        self._close = close
        self.acks: list[tuple[float, float]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        i = 0
        try:
            while not self._stop.is_set():
                issued = time.monotonic()
                try:
                    await self._put(i)
                except Exception:  # noqa: BLE001 - counted; the writer goes on
                    self.errors += 1
                    continue
                self.acks.append((issued, time.monotonic()))
                i += 1
        finally:
            await self._close()

    def __enter__(self) -> Writer:
        self._thread.start()
        wait_for("the first write", lambda: len(self.acks) > 0, timeout=60)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def first_ack_after(self, when: float, timeout: float = 60) -> float:
        """Seconds from ``when`` to the acknowledgement of the first put issued after it."""
        return wait_for(
            "a write after the fault",
            lambda: next((ack - when for issued, ack in self.acks if issued >= when), None),
            timeout=timeout,
        )

    def longest_gap(self, start: float, end: float) -> float:
        times = [start] + [ack for _, ack in self.acks if start <= ack <= end] + [end]
        return max(b - a for a, b in zip(times, times[1:], strict=False))


# -- raftfast ----------------------------------------------------------------------------------


def raftfast_writer(endpoints: list[str]) -> Writer:
    clients: list[Client] = []

    async def put(i: int) -> None:
        if not clients:
            clients.append(Client(endpoints, timeout=30))
        await clients[0].put(f"k{i % 1000}", b"v" * 100)

    async def close() -> None:
        for client in clients:
            await client.close()

    return Writer(put, close)


def raftfast_failover(tmp: Path, rounds: int) -> list[float]:
    out = []
    with ProcCluster(tmp, tick_ms=None) as cluster, raftfast_writer(cluster.endpoints) as w:
        for _ in range(rounds):
            leader = cluster.wait_leader()
            killed_at = time.monotonic()
            cluster.kill(leader)
            out.append(w.first_ack_after(killed_at))
            cluster.start(leader, first_time=False)
            new = cluster.wait_leader()
            cluster.wait_applied(leader, cluster.status(new).commit_index, "the restarted node")
    return out


def raftfast_rolling(tmp: Path) -> float:
    with ProcCluster(tmp, tick_ms=None) as cluster, raftfast_writer(cluster.endpoints) as w:
        cluster.wait_leader()
        start = time.monotonic()
        for nid in list(cluster.ids):
            cluster.kill(nid, signal.SIGTERM)
            cluster.start(nid, first_time=False)
            new = cluster.wait_leader()
            cluster.wait_applied(nid, cluster.status(new).commit_index, f"{nid} to catch up")
        w.first_ack_after(time.monotonic())
        return w.longest_gap(start, time.monotonic())


def raftfast_steady(tmp: Path, seconds: float) -> dict:
    with ProcCluster(tmp, tick_ms=None) as cluster:
        cluster.wait_leader()
        before = cluster.status(cluster.wait_leader()).term  # (a follower may lag a moment)
        args = benchcmd.options(
            duration=seconds, clients=1, inflight=8, batch=2000, quiet=True, system="raftfast"
        )
        result = benchcmd.run_endpoints(args, cluster.endpoints, {})
        after = max(cluster.status(nid).term for nid in cluster.ids)
    return {
        "ops_per_s": result.get("ops_per_s"),
        "leader_changes": after - before,
    }


# -- etcd --------------------------------------------------------------------------------------


def etcd_writer(endpoints: list[str]) -> Writer:
    import grpc

    state: dict = {"at": 0, "channels": {}}

    async def put(i: int) -> None:
        address = endpoints[state["at"] % len(endpoints)]
        channel = state["channels"].get(address)
        if channel is None:
            channel = state["channels"][address] = grpc.aio.insecure_channel(address)
        call = channel.unary_unary("/etcdserverpb.KV/Put")
        try:
            await call(_field(1, f"k{i % 1000}".encode()) + _field(2, b"v" * 100), timeout=0.5)
        except grpc.aio.AioRpcError:
            state["at"] += 1
            await asyncio.sleep(0.01)
            raise

    async def close() -> None:
        for channel in state["channels"].values():
            await channel.close()

    return Writer(put, close)


def _etcd_leader(cluster: EtcdCluster) -> int:
    return cluster.client.index(wait_for("an etcd leader", cluster.leader_first, timeout=60)[0])


def etcd_failover(tmp: Path, rounds: int) -> list[float]:
    out = []
    cluster = EtcdCluster(tmp)
    try:
        with etcd_writer(wait_for("etcd", cluster.leader_first, timeout=60)) as w:
            for _ in range(rounds):
                i = _etcd_leader(cluster)
                proc, log = cluster.procs[i]
                killed_at = time.monotonic()
                proc.kill()
                proc.wait()
                out.append(w.first_ack_after(killed_at))
                cluster.procs[i] = (subprocess.Popen(proc.args, stdout=log, stderr=log), log)
                _wait_etcd_members(cluster)
    finally:
        cluster.stop()
    return out


def _wait_etcd_members(cluster: EtcdCluster) -> None:
    def all_up() -> bool:
        done = subprocess.run(
            ["etcdctl", "--endpoints", ",".join(cluster.client), "endpoint", "health"],
            capture_output=True,
            timeout=10,
            env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
        )
        return done.returncode == 0

    wait_for("every etcd member healthy", all_up, timeout=60)


def etcd_rolling(tmp: Path) -> float:
    cluster = EtcdCluster(tmp)
    try:
        with etcd_writer(wait_for("etcd", cluster.leader_first, timeout=60)) as w:
            start = time.monotonic()
            for i in range(3):
                proc, log = cluster.procs[i]
                proc.terminate()
                proc.wait(timeout=30)
                cluster.procs[i] = (subprocess.Popen(proc.args, stdout=log, stderr=log), log)
                _wait_etcd_members(cluster)
            w.first_ack_after(time.monotonic())
            return w.longest_gap(start, time.monotonic())
    finally:
        cluster.stop()


# -- main --------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--systems", default="raftfast,etcd")
    p.add_argument("--load-seconds", type=float, default=60.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    results: dict[str, dict] = {}
    for system in args.systems.split(","):
        if system == "etcd" and shutil.which("etcd") is None:
            print("etcd not found (apt-get install etcd-server etcd-client): skipped")
            continue
        failover, rolling = {
            "raftfast": (raftfast_failover, raftfast_rolling),
            "etcd": (etcd_failover, etcd_rolling),
        }[system]
        with tempfile.TemporaryDirectory(prefix=f"failover-{system}-") as tmp:
            (Path(tmp) / "a").mkdir()
            (Path(tmp) / "b").mkdir()
            rounds = failover(Path(tmp) / "a", args.rounds)
            gap = rolling(Path(tmp) / "b")
        results[system] = {
            "kill9_ms": [round(r * 1000) for r in rounds],
            "kill9_median_ms": round(statistics.median(rounds) * 1000),
            "rolling_restart_max_gap_ms": round(gap * 1000),
        }
        if system == "raftfast" and args.load_seconds > 0:
            with tempfile.TemporaryDirectory(prefix="failover-load-") as tmp:
                results[system]["steady_load"] = raftfast_steady(Path(tmp), args.load_seconds)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for system, r in results.items():
            print(
                f"{system}: kill -9 of the leader -> first write after {r['kill9_median_ms']} ms "
                f"(median of {len(r['kill9_ms'])}: {r['kill9_ms']}); rolling restart: longest "
                f"write gap {r['rolling_restart_max_gap_ms']} ms"
                + (f"; steady load: {r['steady_load']}" if "steady_load" in r else "")
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
