"""`make compare`: raftfast, etcd and PySyncObj side by side, 3 nodes each, on 127.0.0.1.

The same workloads, in one run, one system at a time (never two at once on these 2 cores):

* sequential: one client, one put at a time (latency);
* unbatched: 8 client processes, one put in flight each;
* pipelined: one client process, 256 (and 2,048) puts in flight;
* batched: one client process, 8 requests of 2,000 puts in flight (raftfast's put_many; etcd
  and PySyncObj have no such call).

raftfast and etcd run with fsync on (etcd 3.4 from Debian's etcd-server, its defaults), driven
by the same load generator (``raftfast.tools.loadgen``; etcd through its gRPC ``KV.Put``, the
request encoded by hand). PySyncObj has no network client: its load is generated inside the
leader process (as in its own benchmarks) and it keeps its log in memory (not durable); with
its default 100 ms append period a request waits ~100 ms, so it needs many in flight.

    python bench/compare.py [--duration 5] [--systems raftfast,etcd,pysyncobj] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from raftfast.client.tables import format_table
from raftfast.tools import benchcmd
from raftfast.tools.localcluster import free_ports, wait_for

HERE = Path(__file__).resolve().parent
WORKLOADS = {
    "sequential": {"clients": 1, "inflight": 1, "batch": 1},
    "unbatched": {"clients": 8, "inflight": 1, "batch": 1},
    "pipelined": {"clients": 1, "inflight": 256, "batch": 1},
    "pipelined-2k": {"clients": 1, "inflight": 2048, "batch": 1},
    "batched": {"clients": 1, "inflight": 8, "batch": 2000},
}


def _args(duration: float, **workload) -> argparse.Namespace:
    return benchcmd.options(duration=duration, quiet=True, system="raftfast", **workload)


# -- etcd ----------------------------------------------------------------------------------------


class EtcdCluster:
    """Three etcd members on 127.0.0.1 with ephemeral ports; stopped by PID."""

    def __init__(self, tmp: Path) -> None:
        ports = free_ports(6)
        self.client = [f"127.0.0.1:{p}" for p in ports[:3]]
        peer = [f"http://127.0.0.1:{p}" for p in ports[3:]]
        initial = ",".join(f"e{i + 1}={peer[i]}" for i in range(3))
        self.procs = []
        for i in range(3):
            cmd = [
                "etcd",
                "--name", f"e{i + 1}",
                "--data-dir", str(tmp / f"e{i + 1}"),
                "--listen-client-urls", f"http://{self.client[i]}",
                "--advertise-client-urls", f"http://{self.client[i]}",
                "--listen-peer-urls", peer[i],
                "--initial-advertise-peer-urls", peer[i],
                "--initial-cluster", initial,
                "--initial-cluster-state", "new",
                "--initial-cluster-token", "raftfast-compare",
                "--log-level", "warn",
            ]  # fmt: skip
            log = open(tmp / f"e{i + 1}.log", "wb")  # noqa: SIM115 - closed in stop()
            self.procs.append((subprocess.Popen(cmd, stdout=log, stderr=log), log))

    def leader_first(self) -> list[str]:
        """The client endpoints, the leader's first (etcd followers forward to the leader)."""
        out = subprocess.run(
            ["etcdctl", "--endpoints", ",".join(self.client), "endpoint", "status", "-w", "json"],
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ, "ETCDCTL_API": "3"},
        )
        statuses = json.loads(out.stdout)
        for st in statuses:
            s = st["Status"]
            if s["leader"] and s["leader"] == s["header"]["member_id"]:
                leader = st["Endpoint"].removeprefix("http://")
                return [leader] + [c for c in self.client if c != leader]
        raise RuntimeError("no etcd leader yet")

    def stop(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc, log in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def run_etcd(duration: float, workloads: dict[str, dict]) -> dict[str, dict]:
    if shutil.which("etcd") is None:
        raise RuntimeError("etcd not found: apt-get install etcd-server etcd-client")
    out = {}
    for name, workload in workloads.items():
        if workload["batch"] > 1:
            continue
        with tempfile.TemporaryDirectory(prefix="compare-etcd-") as tmp:
            cluster = EtcdCluster(Path(tmp))
            try:
                endpoints = wait_for("an etcd leader", cluster.leader_first, timeout=60)
                args = _args(duration, **workload)
                args.system = "etcd"
                out[name] = benchcmd.run_endpoints(args, endpoints, {})
            finally:
                cluster.stop()
    return out


# -- PySyncObj -----------------------------------------------------------------------------------


def run_pysyncobj(duration: float, workloads: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for name, workload in workloads.items():
        if workload["batch"] > 1 or workload["clients"] > 1:
            continue  # load comes from inside the leader process: one "client"
        ports = free_ports(3)
        addrs = [f"127.0.0.1:{p}" for p in ports]
        procs = []
        try:
            for addr in addrs:
                others = [a for a in addrs if a != addr]
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            str(HERE / "pysyncobj_node.py"),
                            addr,
                            *others,
                            "--duration",
                            str(duration),
                            "--inflight",
                            str(workload["inflight"]),
                        ],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL,
                        text=True,
                    )
                )
            deadline = time.monotonic() + duration + 90
            result = None
            while result is None and time.monotonic() < deadline:
                for proc in procs:
                    if proc.poll() is not None and proc.stdout is not None:
                        text = proc.stdout.read().strip()
                        if text:
                            result = json.loads(text)
                time.sleep(0.2)
            if result is None:
                raise RuntimeError("PySyncObj produced no result")
            out[name] = result
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=15)
    return out


# -- raftfast ------------------------------------------------------------------------------------


def run_raftfast(duration: float, workloads: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for name, workload in workloads.items():
        out[name] = benchcmd.run_one(_args(duration, **workload), 3, None)
    return out


# -- report --------------------------------------------------------------------------------------


def table(results: dict[str, dict[str, dict]], workloads: dict[str, dict]) -> str:
    systems = list(results)
    header = ["WORKLOAD"] + [f"{s} ops/s" for s in systems] + [f"{s} p50 ms" for s in systems]
    rows = []
    for name, w in workloads.items():
        row = [
            f"{name} ({w['clients']}x{w['inflight']}"
            + (f", b{w['batch']})" if w["batch"] > 1 else ")")
        ]
        for s in systems:
            r = results[s].get(name)
            row.append(f"{r['ops_per_s']:,.0f}" if r else "n/a")
        for s in systems:
            r = results[s].get(name)
            row.append(f"{r['p50_ms']:.2f}" if r else "n/a")
        rows.append(row)
    return "\n".join(format_table(header, rows, "<" + ">" * (len(header) - 1)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--systems", default="raftfast,etcd,pysyncobj")
    p.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="some of: " + ", ".join(WORKLOADS)
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    unknown = set(args.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    workloads = {n: w for n, w in WORKLOADS.items() if n in args.workloads.split(",")}
    runners = {"raftfast": run_raftfast, "etcd": run_etcd, "pysyncobj": run_pysyncobj}
    results = {}
    for system in args.systems.split(","):
        print(f"measuring {system} ...", file=sys.stderr, flush=True)
        results[system] = runners[system](args.duration, workloads)
    if args.json:
        slim = {
            s: {w: {k: v for k, v in r.items() if k != "latency_cdf"} for w, r in res.items()}
            for s, res in results.items()
        }
        print(json.dumps(slim, indent=2))
    else:
        print(
            "3 nodes + load generator on one 2-core machine, 64-byte values; raftfast and etcd "
            f"with fsync, PySyncObj in memory; {args.duration:g} s per workload"
        )
        print(table(results, workloads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
