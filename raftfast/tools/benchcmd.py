"""``raftfast bench``: measure a cluster's throughput and latency.

Without ``--endpoints`` it starts its own local cluster of real ``raftfast-node`` processes
(data in a temporary directory, fsync on unless ``--no-fsync``) and stops it afterwards;
``--nodes 3,5`` measures each size in turn. ``--noop`` measures a no-op server instead
(``raftfast.tools.noop_server``), with the same client and load: the ceiling the transport
itself sets (our client's Session stream over TCP, or with ``--session-transport grpc`` over
gRPC); ``--noop unary`` loads it with one unary gRPC call per operation instead.

Prints a table (ops/s; p50, p90, p99, p99.9 latency; CPU of every process), a progress bar on
stderr while it runs, ``--json`` one JSON object per run on stdout (a list for several node
counts), and ``--out DIR`` writes ``bench.json`` plus ``throughput.png`` (ops/s by node count)
and ``latency_cdf.png`` (needs matplotlib: ``pip install raftfast[bench]``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.connection
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from raftfast.client.cli import ExitCode
from raftfast.client.session import SESSION_TRANSPORTS
from raftfast.client.tables import format_table
from raftfast.tools.loadgen import START_S, Histogram, WorkerResult, Workload, worker_main

_TICK = os.sysconf("SC_CLK_TCK")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nodes", default="3", metavar="N[,N...]", help="cluster sizes to start (default 3)"
    )
    p.add_argument("--clients", type=int, default=1, metavar="N", help="client processes")
    p.add_argument(
        "--inflight", type=int, default=64, metavar="N", help="requests in flight per client"
    )
    p.add_argument(
        "--batch", type=int, default=1, metavar="N", help="puts per request (put_many); 1: none"
    )
    p.add_argument("--value-size", type=int, default=64, metavar="BYTES")
    p.add_argument("--duration", type=float, default=10.0, metavar="S", help="measured seconds")
    p.add_argument("--warmup", type=float, default=1.0, metavar="S", help="unmeasured seconds")
    p.add_argument("--read-ratio", type=float, default=0.0, metavar="F", help="share of gets")
    p.add_argument("--keys", type=int, default=100_000, metavar="N", help="key space")
    p.add_argument("--no-fsync", action="store_true", help="start nodes with --no-fsync (UNSAFE)")
    p.add_argument(
        "--tls",
        action="store_true",
        help="start the cluster with TLS everywhere and client certificates (raftfast certs)",
    )
    p.add_argument(
        "--noop",
        nargs="?",
        const="session",
        choices=("session", "unary"),
        help="measure a no-op gRPC server instead, with our client (session, the default) or "
        "one unary call per operation (unary)",
    )
    p.add_argument(
        "--session-transport",
        choices=SESSION_TRANSPORTS,
        default="auto",
        help="our client's Session stream: over TCP where the nodes offer it (auto, the "
        "default) or the gRPC call only",
    )
    p.add_argument(
        "--client",
        choices=("async", "sync"),
        default="async",
        help="our client: raftfast.Client with --inflight tasks per process (async, the "
        "default) or raftfast.SyncClient in a plain loop, one request at a time (sync: "
        "--inflight 1)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--out", metavar="DIR", help="write bench.json and PNG charts here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def options(**overrides: Any) -> argparse.Namespace:
    """``raftfast bench``'s options at their defaults, with ``overrides`` (for measurements
    run from code: the benchmark suites, the comparison)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


class BenchFailed(RuntimeError):
    """The run failed; ``code``: the CLI's exit code for why (3: the cluster could not be
    reached in time, 4: permission denied, ...)."""

    def __init__(self, message: str, code: int = ExitCode.FAILED) -> None:
        super().__init__(message)
        self.code = code


def _check(args: argparse.Namespace) -> list[int]:
    try:
        sizes = [int(x) for x in str(args.nodes).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--nodes must be numbers like 3 or 3,5, got {args.nodes!r}") from None
    if not sizes or any(not 1 <= n <= 9 for n in sizes):
        raise ValueError("--nodes: between 1 and 9 nodes")
    for name, low in (("clients", 1), ("inflight", 1), ("batch", 1), ("keys", 1)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name} must be at least {low}")
    if not 0 <= args.value_size <= 1 << 20:
        raise ValueError("--value-size must be between 0 and 1 MiB")
    if not 0 < args.duration <= 3600 or not 0 <= args.warmup <= 600:
        raise ValueError("--duration must be in (0, 3600] and --warmup in [0, 600]")
    if not 0 <= args.read_ratio <= 1:
        raise ValueError("--read-ratio must be between 0 and 1")
    if args.noop == "unary" and args.batch > 1:
        raise ValueError("--noop unary makes one call per operation: no --batch")
    if args.endpoints_given and (args.noop or len(sizes) > 1 or args.tls):
        raise ValueError(
            "--endpoints measures that cluster: no --noop, --tls or several --nodes "
            "(its certificates: --cacert, --cert, --key)"
        )
    if args.client == "sync" and (args.inflight != 1 or args.noop == "unary"):
        raise ValueError(
            "--client sync waits for each answer: --inflight 1, and not the unary no-op server"
        )
    if args.tls and args.noop:
        raise ValueError("--tls starts a cluster: not with --noop")
    if args.out:  # (before the run: its results must have somewhere to go)
        try:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"--out {args.out}: {exc.strerror or exc}") from None
    return sizes


def _cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return float("nan")


class _Progress:
    """A one-line progress bar on stderr (only when it is a terminal, or forced)."""

    def __init__(self, label: str, total_s: float, enabled: bool) -> None:
        self.label, self.total_s, self.enabled = label, total_s, enabled
        self.start = time.monotonic()

    def show(self, ops: int) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        frac = min(elapsed / self.total_s, 1.0)
        bar = "#" * int(frac * 30)
        rate = ops / max(elapsed, 1e-9)
        sys.stderr.write(
            f"\r{self.label} [{bar:<30}] {elapsed:5.1f}/{self.total_s:.0f}s {ops:>10,} ops"
            f" (~{rate:,.0f}/s)"
        )
        sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _run_workers(
    workload: Workload, clients: int, label: str, show_progress: bool, pids: dict[str, int]
) -> dict[str, Any]:
    """Run ``clients`` worker processes; CPU of ``pids`` (and the workers) over the run."""
    ctx = multiprocessing.get_context("spawn")
    go = ctx.Event()  # set once every client process is ready: the clocks start
    pipes, procs = [], []
    for i in range(clients):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=worker_main, args=(workload, i, child, go), daemon=True)
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    progress = _Progress(label, workload.warmup + workload.duration, show_progress)
    ops = [0] * clients
    ready = 0
    results: dict[int, WorkerResult] = {}
    failures: list[tuple[str, int]] = []  # (what, the CLI's exit code for it)
    deadline = time.monotonic() + START_S
    cpu0: dict[str, float] = {}
    wall0 = 0.0
    try:
        while len(results) + len(failures) < clients:
            if time.monotonic() > deadline:
                raise RuntimeError("client processes did not finish in time")
            if failures and not go.is_set():
                break  # (one failed to start: the others wait for go in vain)
            for conn in multiprocessing.connection.wait(pipes, timeout=0.5):
                try:
                    kind, index, payload = conn.recv()
                except EOFError:
                    pipes.remove(conn)
                    failures.append(("a client process died", ExitCode.FAILED))
                    continue
                if kind == "ready":
                    ready += 1
                    if ready == clients:  # every one connected: measure from here
                        cpu0 = {name: _cpu_seconds(pid) for name, pid in pids.items()}
                        cpu0.update(
                            {f"client-{i + 1}": _cpu_seconds(p.pid) for i, p in enumerate(procs)}
                        )
                        wall0 = time.monotonic()
                        go.set()
                        # (slow finish: a request may take its whole timeout)
                        deadline = wall0 + workload.warmup + workload.duration + 120
                elif kind == "progress":
                    ops[index] = payload
                    progress.show(sum(ops))
                elif kind == "done":
                    results[index] = WorkerResult(**payload)
                    pipes.remove(conn)
                else:
                    failures.append(payload)
                    pipes.remove(conn)
        if not failures:
            cpu_cli = {f"client-{i + 1}": _cpu_seconds(p.pid) for i, p in enumerate(procs)}
            wall = time.monotonic() - wall0
            cpu1 = {name: _cpu_seconds(pid) for name, pid in pids.items()}
            cpu1.update(cpu_cli)
    finally:
        progress.done()
        for proc in procs:
            proc.join(timeout=10 if go.is_set() else 0.1)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if failures:
        what, code = failures[0]
        raise BenchFailed(f"client process failed: {what}", code)
    hist = Histogram()
    for r in results.values():
        hist.merge(Histogram.from_bytes(r.histogram))
    total_ops = sum(r.ops for r in results.values())
    rate = sum(r.ops / r.elapsed for r in results.values())
    errors = sum(r.errors for r in results.values())
    # CPU as a share of one core from the start of the clocks (warmup included).
    cpu = {name: round(100 * (cpu1[name] - cpu0[name]) / wall, 1) for name in cpu1}
    return {
        "ops": total_ops,
        "ops_per_s": round(rate, 1),
        "requests": sum(r.requests for r in results.values()),
        "errors": errors,
        "first_error": next((r.first_error for r in results.values() if r.first_error), ""),
        "p50_ms": round(hist.percentile(0.50) * 1000, 3),
        "p90_ms": round(hist.percentile(0.90) * 1000, 3),
        "p99_ms": round(hist.percentile(0.99) * 1000, 3),
        "p999_ms": round(hist.percentile(0.999) * 1000, 3),
        "cpu_percent": cpu,
        "latency_cdf": [(round(s * 1000, 4), round(f, 5)) for s, f in hist.cdf()],
    }


def run_one(args: argparse.Namespace, nodes: int, endpoints: list[str] | None) -> dict:
    """One measurement: start what is needed, load it, stop it; the result as a dict."""
    from raftfast.tools.localcluster import ProcCluster, free_ports, make_certs, wait_for

    workload = _workload(args)
    target = "noop" if args.noop else ("endpoints" if endpoints else "local")
    label = "no-op gRPC" if args.noop else f"{nodes} nodes"
    if args.noop == "unary":
        target, label, workload.system = "noop-unary", "no-op gRPC, unary", "unary"
    show = not args.quiet and sys.stderr.isatty()
    with tempfile.TemporaryDirectory(prefix="raftfast-bench-") as tmp:
        if endpoints:
            workload.endpoints = endpoints
            workload.tls = getattr(args, "client_tls", None)
            measured = _run_workers(workload, args.clients, label, show, {})
        elif args.noop:
            addr = f"127.0.0.1:{free_ports(1)[0]}"
            proc = subprocess.Popen(
                [sys.executable, "-m", "raftfast.tools.noop_server", "--listen", addr],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                from raftfast.client import SyncClient

                with SyncClient([addr], timeout=5) as c:
                    wait_for("the no-op server", lambda: c.status(addr, timeout=1), 30)
                workload.endpoints = [addr]
                measured = _run_workers(workload, args.clients, label, show, {"noop": proc.pid})
            finally:
                proc.terminate()
                proc.wait(timeout=15)
        else:
            extra = ["--no-fsync"] if args.no_fsync else []
            certs = None
            if args.tls:
                certs = Path(tmp) / "tls"
                make_certs(certs, [f"n{i + 1}" for i in range(nodes)])
            with ProcCluster(Path(tmp), nodes, extra=extra, tls=certs, tick_ms=None) as cluster:
                cluster.wait_leader(timeout=60)
                workload.endpoints = cluster.endpoints
                workload.tls = cluster.client_tls
                pids = {nid: p.pid for nid, p in cluster.procs.items()}
                measured = _run_workers(workload, args.clients, label, show, pids)
    reported = 0 if args.noop else (len(endpoints) if endpoints else nodes)
    return _describe(args, target, reported, measured)


def _workload(args: argparse.Namespace) -> Workload:
    return Workload(
        endpoints=[],
        inflight=args.inflight,
        batch=args.batch,
        value_size=args.value_size,
        read_ratio=args.read_ratio,
        duration=args.duration,
        warmup=args.warmup,
        keys=args.keys,
        system=getattr(args, "system", "raftfast"),
        serializable=getattr(args, "serializable", False),
        session_transport=getattr(args, "session_transport", "auto"),
        client=getattr(args, "client", "async"),
    )


def run_endpoints(args: argparse.Namespace, endpoints: list[str], pids: dict[str, int]) -> dict:
    """Measure a running cluster (``args.system`` "raftfast" or "etcd"); ``pids`` of its
    processes, if known, get their CPU reported."""
    workload = _workload(args)
    workload.endpoints = endpoints
    measured = _run_workers(workload, args.clients, args.system, False, pids)
    return _describe(args, args.system, len(endpoints), measured)


def _describe(args: argparse.Namespace, target: str, nodes: int, measured: dict) -> dict:
    return {
        "target": target,
        "nodes": nodes,
        "fsync": not args.no_fsync and not args.noop,
        "tls": bool(args.tls) or getattr(args, "client_tls", None) is not None,
        "clients": args.clients,
        "inflight": args.inflight,
        "client": getattr(args, "client", "async"),
        "batch": args.batch,
        "value_size": args.value_size,
        "read_ratio": args.read_ratio,
        "duration_s": args.duration,
        **measured,
    }


def _table(results: list[dict]) -> str:
    header = ["TARGET", "NODES", "FSYNC", "TLS", "OPS/S", "P50 MS", "P90 MS", "P99 MS", "P99.9 MS"]
    rows = [
        [
            r["target"],
            r["nodes"] or "-",
            "on" if r["fsync"] else "off",
            "on" if r.get("tls") else "off",
            f"{r['ops_per_s']:,.0f}",
            f"{r['p50_ms']:.2f}",
            f"{r['p90_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{r['p999_ms']:.2f}",
        ]
        for r in results
    ]
    lines = format_table(header, rows, ">" * len(header))
    r0 = results[0]
    lines.insert(
        0,
        f"raftfast bench: {r0['clients']} client process(es) x {r0['inflight']} in flight "
        f"({r0.get('client', 'async')} client), "
        f"batch {r0['batch']}, {r0['value_size']} B values, read ratio {r0['read_ratio']:g}, "
        f"{r0['duration_s']:g} s measured",
    )
    for r in results:
        cpu = ", ".join(f"{k} {v:.0f}%" for k, v in r["cpu_percent"].items())
        lines.append(f"CPU ({r['target']}, {r['nodes'] or '-'} nodes; % of one core): {cpu}")
        if r["errors"]:
            lines.append(f"errors: {r['errors']} (first: {r['first_error']})")
    return "\n".join(lines)


def _charts(results: list[dict], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as exc:
        raise RuntimeError(
            "--out needs matplotlib for the charts: pip install 'raftfast[bench]'"
        ) from exc
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"{r['nodes']} nodes" if r["nodes"] else "no-op gRPC" for r in results]
    ax.bar(labels, [r["ops_per_s"] for r in results], color="#3b7dd8")
    ax.set_ylabel("ops/s")
    ax.set_title("raftfast throughput by node count")
    for i, r in enumerate(results):
        ax.annotate(f"{r['ops_per_s']:,.0f}", (i, r["ops_per_s"]), ha="center", va="bottom")
    fig.tight_layout()
    paths.append(out / "throughput.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, r in zip(labels, results, strict=True):
        xs = [p[0] for p in r["latency_cdf"]]
        ys = [p[1] for p in r["latency_cdf"]]
        ax.step(xs, ys, where="post", label=label)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("raftfast latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out / "latency_cdf.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def main(args: argparse.Namespace, endpoints: list[str] | None) -> int:
    """Run ``raftfast bench``; returns the exit code. Raises ValueError on bad options."""
    args.endpoints_given = bool(endpoints)
    sizes = _check(args)
    if args.noop:
        sizes = sizes[:1]
    results = [run_one(args, n, endpoints) for n in sizes]
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
        written = [out / "bench.json", *_charts(results, out)]
    public = [{k: v for k, v in r.items() if k != "latency_cdf"} for r in results]
    if args.json:
        print(json.dumps(public[0] if len(public) == 1 else public, indent=2))
    else:
        print(_table(results))
        if args.out:
            print("wrote " + ", ".join(str(p) for p in written))
    return 0


__all__ = ["add_arguments", "main", "run_endpoints", "run_one"]
