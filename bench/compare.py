"""`make compare`: raftfast, etcd and PySyncObj side by side, 3 nodes each, on 127.0.0.1.

The same workloads, in one run, one system at a time (never two at once on these 2 cores):

* sequential: one client, one put at a time (latency);
* unbatched: 8 client processes, one put in flight each (and 64: unbatched-64);
* pipelined: one client process, 256 (and 2,048) puts in flight;
* batched: one client process, 8 requests of 2,000 puts in flight (raftfast's put_many; etcd
  and PySyncObj have no such call).
* sequential-sync, unbatched-sync, unbatched-64-sync: the same from ``raftfast.SyncClient``
  (plain blocking code), raftfast only; each is compared with etcd's row of the same shape.

Every client process connects and is ready before any starts its clock (the load generator's
start barrier): 64 processes importing gRPC take seconds of both cores.

raftfast and etcd run with fsync on (etcd 3.4 from Debian's etcd-server, its defaults), driven
by the same load generator (``raftfast.tools.loadgen``; etcd through its gRPC ``KV.Put``, the
request encoded by hand). PySyncObj has no network client: its load is generated inside the
leader process (as in its own benchmarks) and it keeps its log in memory (not durable); with
its default 100 ms append period a request waits ~100 ms, so it needs many in flight.

A second table, "through etcd's API (same client)", drives raftfast and etcd both through
etcd's gRPC API (raftfast serves it on its client port) with the same load generator: one
unary ``KV.Put``/``KV.Range`` per operation (loadgen system "etcd"), every client process
talking to the leader's client port, for both systems. Its workloads: sequential (1x1),
unbatched (8x1) and pipelined (1x256) puts, and serializable and linearizable ranges (a Range
of one key that exists), 1x64: one client process keeps the servers busy without taking the
other core from them. Each row gives the rate ratio raftfast/etcd and the issue's target:
raftfast >= 3x etcd's rate on pipelined puts, its sequential p50 at most etcd's (reported as
etcd p50 / raftfast p50 >= 1), its unbatched rate and both range rates at least etcd's.

Each workload of each system gets a fresh cluster. ``--workloads`` picks from both tables (a
name in one table only runs there); ``--etcd-api-only`` runs the second table alone.

``--rounds N`` measures everything N times, the systems in turn and in the other order every
other round, and reports each workload's median: this machine's speed drifts by up to 2x within
minutes (the disk's syncs most), and a system measured only in a slow spell would lose a ratio
it wins the rest of the time. ``make compare`` takes 3 rounds.

    python bench/compare.py [--duration 5] [--rounds 3] [--systems raftfast,etcd,pysyncobj] [--json]
    python bench/compare.py --etcd-api-only --systems raftfast,etcd --duration 1  # quick check

``--json`` prints {system: {workload: result}} for the first table and, under "etcd_api",
{"results": {system: {workload: result}}, "vs_etcd": {workload: ratios, target, met}}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import disk_sync

from raftfast.client.tables import format_table
from raftfast.tools import benchcmd
from raftfast.tools.localcluster import ProcCluster, free_ports, wait_for

HERE = Path(__file__).resolve().parent
WORKLOADS = {
    "sequential": {"clients": 1, "inflight": 1, "batch": 1},
    "unbatched": {"clients": 8, "inflight": 1, "batch": 1},
    "unbatched-64": {"clients": 64, "inflight": 1, "batch": 1},
    # The same loads from raftfast.SyncClient (what code without asyncio calls), raftfast only:
    # its etcd row is the workload of the same shape (etcd's client is the same either way).
    "sequential-sync": {"clients": 1, "inflight": 1, "batch": 1, "client": "sync"},
    "unbatched-sync": {"clients": 8, "inflight": 1, "batch": 1, "client": "sync"},
    "unbatched-64-sync": {"clients": 64, "inflight": 1, "batch": 1, "client": "sync"},
    "pipelined": {"clients": 1, "inflight": 256, "batch": 1},
    "pipelined-2k": {"clients": 1, "inflight": 2048, "batch": 1},
    "batched": {"clients": 1, "inflight": 8, "batch": 2000},
}
# Through etcd's API, for raftfast and etcd alike (the module docs).
RANGES = {"clients": 1, "inflight": 64, "read_ratio": 1.0}
API_WORKLOADS = {
    "sequential": {"clients": 1, "inflight": 1},
    "unbatched": {"clients": 8, "inflight": 1},
    "pipelined": {"clients": 1, "inflight": 256},
    "ranges-serializable": {**RANGES, "serializable": True},
    "ranges-linearizable": RANGES,
}
# Issue 15's targets for the first table (raftfast's own client, etcd's unary Put): workload ->
# (measure, at least). "p50" here is raftfast's p50 over etcd's, at most the number; "best" is
# raftfast's rate over etcd's best rate of any workload; "noop" the 8x1 rate over a no-op gRPC
# server's answering the same unary calls (measured in the same run).
SINGLE_WRITE_TARGETS = {
    "sequential": ("p50", 0.6),
    "unbatched": ("rate", 1.5),
    "unbatched-64": ("rate", 3.0),
    "batched": ("best", 100.0),
    "sequential-sync": ("p50", 0.6),
    "unbatched-sync": ("rate", 1.5),
    "unbatched-64-sync": ("rate", 3.0),
}


def _etcd_twin(name: str) -> str:
    """The etcd workload a raftfast one is compared with (a SyncClient row: its shape's)."""
    return name.removesuffix("-sync")


NOOP_TARGET = 0.9

# The targets through etcd's API: workload -> (measure, at least). "rate" is raftfast's
# ops/s over etcd's; "p50" is etcd's p50 over raftfast's (a lower latency is better).
TARGETS = {
    "sequential": ("p50", 1.0),
    "unbatched": ("rate", 1.0),
    "pipelined": ("rate", 3.0),
    "ranges-serializable": ("rate", 1.0),
    "ranges-linearizable": ("rate", 1.0),
}


def _args(duration: float, system: str = "raftfast", **workload) -> argparse.Namespace:
    return benchcmd.options(duration=duration, quiet=True, system=system, **workload)


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


@contextlib.contextmanager
def _cluster(system: str, tmp: Path):
    """A fresh 3-node cluster of ``system`` ("etcd" or "raftfast"; fsync on, their defaults):
    yields its client endpoints, the leader's first, and its processes' PIDs; stops them."""
    if system == "etcd":
        if shutil.which("etcd") is None:
            raise RuntimeError("etcd not found: apt-get install etcd-server etcd-client")
        cluster = EtcdCluster(tmp)
        try:
            endpoints = wait_for("an etcd leader", cluster.leader_first, timeout=60)
            yield endpoints, {f"e{i + 1}": proc.pid for i, (proc, _) in enumerate(cluster.procs)}
        finally:
            cluster.stop()
        return
    with ProcCluster(tmp, 3, tick_ms=None) as cluster:
        leader = cluster.addrs[cluster.wait_leader(timeout=60)]
        try:
            yield (
                [leader] + [e for e in cluster.endpoints if e != leader],
                {nid: proc.pid for nid, proc in cluster.procs.items()},
            )
        finally:
            _warn_log_errors(cluster.logs)


def _warn_log_errors(logs: dict[str, Path]) -> None:
    """On stderr: the ERROR/CRITICAL lines and tracebacks in raftfast's node logs, if any."""
    for nid, path in logs.items():
        text = path.read_text(errors="replace") if path.exists() else ""
        bad = [
            line
            for line in text.splitlines()
            if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")
        ]
        if bad:
            print(
                f"warning: {nid}'s log has {len(bad)} error line(s); first: {bad[0]}",
                file=sys.stderr,
            )


def run_etcd(duration: float, workloads: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for name, workload in workloads.items():
        if workload["batch"] > 1 or workload.get("client", "async") != "async":
            continue
        with tempfile.TemporaryDirectory(prefix="compare-etcd-") as tmp:
            with _cluster("etcd", Path(tmp)) as (endpoints, pids):
                out[name] = benchcmd.run_endpoints(
                    _args(duration, "etcd", **workload), endpoints, pids
                )
    return out


# -- through etcd's API --------------------------------------------------------------------------


def run_etcd_api(system: str, duration: float, workloads: dict[str, dict]) -> dict[str, dict]:
    """``system`` ("raftfast" or "etcd") loaded through etcd's gRPC API at its leader."""
    out = {}
    for name, workload in workloads.items():
        with tempfile.TemporaryDirectory(prefix=f"compare-api-{system}-") as tmp:
            with _cluster(system, Path(tmp)) as (endpoints, pids):
                args = _args(duration, "etcd", **workload)
                out[name] = {**benchcmd.run_endpoints(args, endpoints, pids), "target": system}
    return out


def vs_etcd(results: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Per workload measured on both: raftfast/etcd rate, etcd/raftfast p50, the target, met."""
    out = {}
    for name, (measure, at_least) in TARGETS.items():
        rf, etcd = results.get("raftfast", {}).get(name), results.get("etcd", {}).get(name)
        if not rf or not etcd:
            continue
        ratios = {
            "rate": rf["ops_per_s"] / etcd["ops_per_s"] if etcd["ops_per_s"] else float("inf"),
            "p50": etcd["p50_ms"] / rf["p50_ms"] if rf["p50_ms"] else float("nan"),
        }
        out[name] = {
            "rate_raftfast_over_etcd": round(ratios["rate"], 3),
            "p50_etcd_over_raftfast": round(ratios["p50"], 3),
            "target": f"{measure} >= {at_least:g}x",
            "measured": round(ratios[measure], 3),
            "met": ratios[measure] >= at_least,
        }
    return out


# -- PySyncObj -----------------------------------------------------------------------------------


def run_pysyncobj(duration: float, workloads: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for name, workload in workloads.items():
        if workload["batch"] > 1 or workload["clients"] > 1 or "client" in workload:
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
    if "unbatched" in workloads:  # the ceiling issue 15 names: a no-op server, unary calls
        noop = _args(duration, **workloads["unbatched"], noop="unary")
        out["noop-unary"] = benchcmd.run_one(noop, 3, None)
    return out


def single_write_targets(results: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Issue 15's ratios for the first table, where both systems ran."""
    rf, etcd = results.get("raftfast", {}), results.get("etcd", {})
    out = {}
    best = max((r["ops_per_s"] for r in etcd.values()), default=0)
    for name, (measure, bound) in SINGLE_WRITE_TARGETS.items():
        r, e = rf.get(name), etcd.get(_etcd_twin(name))
        if r is None or (e is None and measure != "best") or (measure == "best" and not best):
            continue
        if measure == "p50":
            ratio, target = r["p50_ms"] / e["p50_ms"], f"p50 <= {bound:g}x etcd's"
            met = ratio <= bound
        elif measure == "rate":
            ratio, target = r["ops_per_s"] / e["ops_per_s"], f">= {bound:g}x etcd's rate"
            met = ratio >= bound
        else:
            ratio, target = r["ops_per_s"] / best, f">= {bound:g}x etcd's best rate"
            met = ratio >= bound
        out[name] = {"ratio": round(ratio, 3), "target": target, "met": met}
    noop = rf.get("noop-unary")
    for name in ("unbatched", "unbatched-sync"):
        if noop and name in rf:
            ratio = rf[name]["ops_per_s"] / noop["ops_per_s"]
            out[f"{name} vs no-op"] = {
                "ratio": round(ratio, 3),
                "target": f">= {NOOP_TARGET:g}x a no-op unary server's rate",
                "met": ratio >= NOOP_TARGET,
            }
    return out


def targets_table(compared: dict[str, dict]) -> str:
    rows = [
        [name, f"{c['ratio']:.2f}x", c["target"], "met" if c["met"] else "NOT met"]
        for name, c in compared.items()
    ]
    return "\n".join(format_table(["WORKLOAD", "RATIO", "TARGET", "RESULT"], rows, "<>>>"))


# -- report --------------------------------------------------------------------------------------


def table(results: dict[str, dict[str, dict]], workloads: dict[str, dict]) -> str:
    systems = list(results)
    header = ["WORKLOAD"] + [f"{s} ops/s" for s in systems] + [f"{s} p50 ms" for s in systems]
    rows = []
    for name, w in workloads.items():
        row = [
            f"{name} ({w['clients']}x{w['inflight']}"
            + (f", b{w['batch']})" if w["batch"] > 1 else ")")
        ]  # (a -sync row: raftfast.SyncClient; etcd has the same client on every row)
        for s in systems:
            r = results[s].get(name)
            row.append(f"{r['ops_per_s']:,.0f}" if r else "n/a")
        for s in systems:
            r = results[s].get(name)
            row.append(f"{r['p50_ms']:.2f}" if r else "n/a")
        rows.append(row)
    return "\n".join(format_table(header, rows, "<" + ">" * (len(header) - 1)))


def api_table(results: dict[str, dict[str, dict]], workloads: dict[str, dict]) -> str:
    """The second table: rate, p50/p99 per system, and the ratio and target where both ran."""
    systems = list(results)
    compared = vs_etcd(results)
    header = ["WORKLOAD"]
    for s in systems:
        header += [f"{s} ops/s", f"{s} p50/p99 ms"]
    if compared:
        header += ["raftfast/etcd rate", "TARGET", "RESULT"]
    rows, notes = [], []
    for name, w in workloads.items():
        row = [f"{name} ({w['clients']}x{w['inflight']})"]
        for s in systems:
            r = results[s].get(name)
            row += (
                [f"{r['ops_per_s']:,.0f}", f"{r['p50_ms']:.2f}/{r['p99_ms']:.2f}"]
                if r
                else ["n/a"] * 2
            )
            if r and r["errors"]:
                first = " ".join(r["first_error"].split())[:160]  # one line
                over = f" over {r['rounds']} rounds" if r.get("rounds", 1) > 1 else ""
                notes.append(f"{s} {name}: {r['errors']:,} errors{over} (first: {first})")
        if compared:
            c = compared.get(name)
            if c:
                met = "met" if c["met"] else "NOT met"
                row += [
                    f"{c['rate_raftfast_over_etcd']:.2f}x",
                    c["target"],
                    f"{c['measured']:.2f}x {met}",
                ]
            else:
                row += ["n/a"] * 3
        rows.append(row)
    lines = format_table(header, rows, "<" + ">" * (len(header) - 1))
    return "\n".join(lines + notes)


_LATENCIES = ("p50_ms", "p90_ms", "p99_ms", "p999_ms")
_TOTALS = ("ops", "requests", "errors")


def median_result(runs: list[dict]) -> dict:
    """One workload's rounds as one result: the median rate and the median of each latency
    percentile, each taken by itself (of an even number of rounds, the less flattering middle
    one: the lower rate, the higher latency); ops, requests and errors added up over the
    rounds; the rest (``cpu_percent`` among it) of the round of median rate; and every round's
    rate and p50 (``rounds_ops_per_s``, ``rounds_p50_ms``)."""
    if not runs:
        raise ValueError("no runs to take the median of")
    by_rate = sorted(runs, key=lambda r: r["ops_per_s"])
    out = dict(by_rate[(len(by_rate) - 1) // 2])
    out.pop("latency_cdf", None)  # (one round's: it would not match the medians)
    for key in _LATENCIES:
        if all(key in r for r in runs):
            out[key] = statistics.median_high([r[key] for r in runs])
    for key in _TOTALS:
        if all(key in r for r in runs):
            out[key] = sum(r[key] for r in runs)
    if "first_error" in out:
        out["first_error"] = next((r["first_error"] for r in runs if r.get("first_error")), "")
    out["rounds"] = len(runs)
    out["rounds_ops_per_s"] = [r["ops_per_s"] for r in runs]
    out["rounds_p50_ms"] = [r.get("p50_ms") for r in runs]
    return out


def medians(runs: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, dict]]:
    """{system: {workload: [run, ...]}} -> {system: {workload: median_result}}."""
    return {s: {w: median_result(rs) for w, rs in by_w.items()} for s, by_w in runs.items()}


def _slim(results: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    return {
        s: {w: {k: v for k, v in r.items() if k != "latency_cdf"} for w, r in res.items()}
        for s, res in results.items()
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=1, help="measure N times, report medians")
    p.add_argument("--systems", default="raftfast,etcd,pysyncobj")
    names = list(dict.fromkeys([*WORKLOADS, *API_WORKLOADS]))
    p.add_argument("--workloads", default=",".join(names), help="some of: " + ", ".join(names))
    p.add_argument(
        "--etcd-api-only",
        action="store_true",
        help="only the second table: raftfast and etcd through etcd's API",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    chosen = args.workloads.split(",")
    systems = list(dict.fromkeys(args.systems.split(",")))  # (each once)
    runners = {"raftfast": run_raftfast, "etcd": run_etcd, "pysyncobj": run_pysyncobj}
    if set(chosen) - set(names):
        p.error(f"unknown workload(s): {', '.join(sorted(set(chosen) - set(names)))}")
    if set(systems) - set(runners):
        p.error(f"unknown system(s): {', '.join(sorted(set(systems) - set(runners)))}")
    if args.rounds < 1:
        p.error("--rounds: at least 1")
    workloads = {n: w for n, w in WORKLOADS.items() if n in chosen and not args.etcd_api_only}
    api_workloads = {n: w for n, w in API_WORKLOADS.items() if n in chosen}
    # (where the clusters keep their logs: the floor under the sequential rows; see disk_sync)
    disk = None
    if {"raftfast", "etcd"} & set(systems):
        try:
            disk = disk_sync.measure(tempfile.gettempdir(), [0, 1], 300)
        except OSError as exc:
            print(f"the disk's sync latency could not be measured: {exc}", file=sys.stderr)
    # {system: {workload: [one result per round]}}; the systems' own order for the tables
    runs: dict = {s: {} for s in systems if workloads}
    api_runs: dict = {s: {} for s in systems if s in ("raftfast", "etcd") and api_workloads}
    for round_no in range(args.rounds):
        turn = "" if args.rounds == 1 else f" (round {round_no + 1} of {args.rounds})"
        order = systems if round_no % 2 == 0 else systems[::-1]
        for system in [s for s in order if s in runs]:
            print(f"measuring {system}{turn} ...", file=sys.stderr, flush=True)
            for name, result in runners[system](args.duration, workloads).items():
                runs[system].setdefault(name, []).append(result)
        for system in [s for s in order if s in api_runs]:
            print(f"measuring {system} through etcd's API{turn} ...", file=sys.stderr, flush=True)
            for name, result in run_etcd_api(system, args.duration, api_workloads).items():
                api_runs[system].setdefault(name, []).append(result)
    results, api_results = medians(runs), medians(api_runs)
    if args.json:
        out = _slim(results)
        if disk is not None:
            out["disk_sync"] = disk
        if results:
            out["targets"] = single_write_targets(results)
        if api_results:
            out["etcd_api"] = {"results": _slim(api_results), "vs_etcd": vs_etcd(api_results)}
        print(json.dumps(out, indent=2))
        return 0
    rounds = (
        f"; medians of {args.rounds} rounds, the systems in turn, in the other order every "
        "other round"
        if args.rounds > 1
        else ""
    )
    print(
        "3 nodes + load generator on one 2-core machine, 64-byte values; raftfast and etcd "
        f"with fsync, PySyncObj in memory; {args.duration:g} s per workload{rounds}"
    )
    if disk is not None:
        print(
            f"this disk's fdatasync of a small append, before the runs: {disk_sync.summary(disk)}"
        )
    if results:
        print(table(results, workloads))
        compared = single_write_targets(results)
        if compared:
            noop = results.get("raftfast", {}).get("noop-unary")
            print(
                "\nissue 15's targets, ratios from this run"
                + (" (of the medians)" if args.rounds > 1 else "")
                + (f" (no-op unary server, 8x1: {noop['ops_per_s']:,.0f} ops/s)" if noop else "")
            )
            print(targets_table(compared))
    if api_results:
        print(
            "\nthrough etcd's API (same client): one unary KV.Put/KV.Range per operation at the "
            "leader's client port; ranges read one existing key; targets: rate = raftfast/etcd "
            "ops/s, p50 = etcd p50 / raftfast p50 (> 1: raftfast ahead)"
        )
        print(api_table(api_results, api_workloads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
