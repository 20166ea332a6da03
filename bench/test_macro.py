"""Macro benchmarks: real 3- and 5-node clusters (fsync on, 64-byte values) under the load
generator of ``raftfast bench``, and a no-op gRPC server under the very same client and load.

Every gate is a ratio measured in the same run, plus an absolute floor; the numbers themselves
are printed (``-s``) and stored in the benchmark's ``extra_info`` (``make bench``). Targets
(issue 6) are stated next to each gate. Each gate has two bounds (``tests/gates.py``): under
``make bench`` (nothing else running) one near the target, which catches a regression; under
``make test`` (a loaded machine, maybe two runs at once) a generous one, which catches a
collapse, and a ratio there is the best of up to three pairs of short runs.

    make bench                                   # RAFTFAST_BENCH_SECONDS=5 per measurement
    RAFTFAST_BENCH_SECONDS=2 pytest bench/test_macro.py --benchmark-disable -s   # the CI subset
"""

from __future__ import annotations

import os

import pytest

from raftfast import COMPILED
from raftfast.tools import benchcmd
from tests.gates import TIGHT, best_of, limit

SECONDS = float(os.environ.get("RAFTFAST_BENCH_SECONDS", "5"))

pytestmark = pytest.mark.skipif(not COMPILED, reason="macro benchmarks measure the compiled build")


def measure(nodes: int = 3, **options) -> dict:
    args = benchcmd.options(duration=SECONDS, warmup=min(1.0, SECONDS / 4), quiet=True, **options)
    result = benchcmd.run_one(args, nodes, None)
    assert result["errors"] == 0, result["first_error"]
    return result


def record(benchmark, result: dict) -> None:
    for key in ("ops_per_s", "p50_ms", "p99_ms", "nodes", "clients", "inflight", "batch"):
        benchmark.extra_info[key] = result[key]


def show(name: str, r: dict) -> None:
    print(
        f"\n{name}: {r['ops_per_s']:,.0f} ops/s, p50 {r['p50_ms']:.2f} ms, p99 "
        f"{r['p99_ms']:.2f} ms ({r['nodes'] or 'no-op'} nodes, {r['clients']} x "
        f"{r['inflight']} in flight, batch {r['batch']})"
    )


def _ratio(pair: dict, of: str = "ops_per_s") -> float:
    return pair["b"][of] / pair["a"][of]


def test_batched_throughput_three_and_five_nodes(benchmark):
    """Targets: >= 300,000 ops/s with 3 nodes, >= 200,000 with 5; 5 nodes >= 0.6 x 3 nodes.
    The ratio is the best of up to three pairs of runs: on a busy machine one pair can land
    on a busy moment for one size and not the other (it did, in CI)."""
    results = {}
    floor = limit(test=0.3, bench=0.6)

    def run() -> None:
        pair = best_of(
            3,
            lambda: {
                "a": measure(3, inflight=8, batch=2000),
                "b": measure(5, inflight=8, batch=2000),
            },
            _ratio,
            floor,
        )
        results.update({3: pair["a"], 5: pair["b"]})

    benchmark.pedantic(run, rounds=1, iterations=1)
    record(benchmark, results[3])
    benchmark.extra_info["ops_per_s_5_nodes"] = results[5]["ops_per_s"]
    show("batched, 3 nodes", results[3])
    show("batched, 5 nodes", results[5])
    ratio = results[5]["ops_per_s"] / results[3]["ops_per_s"]
    print(f"5 nodes / 3 nodes: {ratio:.2f}")
    assert results[3]["ops_per_s"] >= limit(test=10_000, bench=150_000), "batched 3-node floor"
    assert ratio >= floor, f"5 nodes reach only {ratio:.2f} x the 3-node rate"


def test_unbatched_against_a_noop_grpc_server(benchmark):
    """Target: >= 90% of a no-op gRPC server's rate (one op in flight per client). Measured
    against two no-op baselines in the same run: the issue's, a unary server (one unary call
    per operation), and a far stricter one, the no-op server loaded by our own client (its
    Session stream over TCP, as against a cluster: ~5x cheaper per call than unary gRPC). The
    gate is looser than the target: it catches a collapse, and the note gives the ratios."""
    results = {}
    floor = limit(test=0.05, bench=0.6)  # (of the unary baseline; measured 1.0-1.1)

    def attempt() -> dict:
        return {
            "noop": measure(clients=8, inflight=1, noop="session"),
            "noop_unary": measure(clients=8, inflight=1, noop="unary"),
            "cluster": measure(3, clients=8, inflight=1),
        }

    def run() -> None:
        results.update(
            best_of(
                3,
                attempt,
                lambda r: r["cluster"]["ops_per_s"] / r["noop_unary"]["ops_per_s"],
                floor,
            )
        )

    benchmark.pedantic(run, rounds=1, iterations=1)
    record(benchmark, results["cluster"])
    benchmark.extra_info["noop_ops_per_s"] = results["noop"]["ops_per_s"]
    benchmark.extra_info["noop_unary_ops_per_s"] = results["noop_unary"]["ops_per_s"]
    show("unbatched, no-op server, our client (TCP)", results["noop"])
    show("unbatched, no-op gRPC server, unary calls", results["noop_unary"])
    show("unbatched, 3 nodes", results["cluster"])
    ratio = results["cluster"]["ops_per_s"] / results["noop"]["ops_per_s"]
    unary_ratio = results["cluster"]["ops_per_s"] / results["noop_unary"]["ops_per_s"]
    print(f"cluster / no-op (our client): {ratio:.2f}; cluster / no-op (unary): {unary_ratio:.2f}")
    assert unary_ratio >= floor, f"the cluster runs at {unary_ratio:.2f} x the no-op unary rate"


def test_sync_client_against_the_asyncio_one(benchmark):
    """8 client processes x 1 put at a time, from ``SyncClient`` (its blocking connection)
    and from ``Client`` (an event loop), on clusters alike: the blocking one must not be the
    slower (measured 1.2-1.3x the rate: about two thirds of the client's CPU a put). Best of
    up to three pairs."""
    results = {}
    floor = limit(test=0.3, bench=0.9)

    def run() -> None:
        pair = best_of(
            3,
            lambda: {
                "a": measure(3, clients=8, inflight=1),
                "b": measure(3, clients=8, inflight=1, client="sync"),
            },
            _ratio,
            floor,
        )
        results.update(pair)

    benchmark.pedantic(run, rounds=1, iterations=1)
    record(benchmark, results["b"])
    benchmark.extra_info["async_ops_per_s"] = results["a"]["ops_per_s"]
    show("unbatched, 3 nodes, Client (asyncio)", results["a"])
    show("unbatched, 3 nodes, SyncClient", results["b"])
    ratio = _ratio(results)
    print(f"SyncClient / Client: {ratio:.2f}")
    assert ratio >= floor, f"SyncClient runs at {ratio:.2f} x Client's rate"


def test_sequential_put_latency(benchmark):
    """Target: p50 <= 1 ms for one client, one put at a time (3 nodes, fsync on)."""
    results = {}
    bound = limit(test=25.0, bench=2.0)

    def run() -> None:
        results["seq"] = best_of(
            3, lambda: measure(3, clients=1, inflight=1), lambda r: -r["p50_ms"], -bound
        )

    benchmark.pedantic(run, rounds=1, iterations=1)
    record(benchmark, results["seq"])
    show("sequential puts", results["seq"])
    assert results["seq"]["p50_ms"] <= bound, "sequential put p50 bound"


def test_the_cost_of_tls(benchmark):
    """Target: TLS everywhere (client port, peer port, replication stream, client certificates)
    costs <= 20% of the batched rate and of the sequential p50, against plain in the same run.
    The gate only catches a collapse; the note gives the ratios.

    The sequential pair that is gated runs without fsync: with fsync a sequential put's p50 is
    dominated by the disk's sync latency after an idle gap (bench/disk_sync.py; on the VM these
    numbers come from, ~0.05 ms right after another sync, ~1 ms after a 1 ms gap), which moves
    between runs, and with the gap, more than TLS's own cost does (1.88x with fsync in one run,
    where TLS added ~0.1 ms). Under ``make bench`` the pair with fsync is run and shown too (not
    gated; like every measurement here it still fails on errors)."""
    results = {}
    rate_floor = limit(test=0.3, bench=0.7)
    p50_bound = limit(test=4.0, bench=1.5)

    def pair(kind: str, **options) -> None:
        both = best_of(
            3,
            lambda: {"a": measure(3, **options), "b": measure(3, tls=True, **options)},
            (lambda p: _ratio(p)) if kind == "batched" else (lambda p: -_ratio(p, "p50_ms")),
            rate_floor if kind == "batched" else -p50_bound,
        )
        results[kind, False], results[kind, True] = both["a"], both["b"]

    kinds = ["batched", "sequential, no fsync"]
    if TIGHT:  # (not gated: make bench only)
        kinds.append("sequential, fsync")

    def run() -> None:
        pair("batched", inflight=8, batch=2000)
        pair("sequential, no fsync", clients=1, inflight=1, no_fsync=True)
        if TIGHT:
            for tls in (False, True):
                results["sequential, fsync", tls] = measure(3, clients=1, inflight=1, tls=tls)

    benchmark.pedantic(run, rounds=1, iterations=1)
    record(benchmark, results["batched", True])
    for kind in kinds:
        show(f"{kind}, plain", results[kind, False])
        show(f"{kind}, TLS", results[kind, True])
    rate = results["batched", True]["ops_per_s"] / results["batched", False]["ops_per_s"]
    p50 = results[kinds[1], True]["p50_ms"] / results[kinds[1], False]["p50_ms"]
    benchmark.extra_info["tls_batched_ratio"] = round(rate, 3)
    benchmark.extra_info["tls_sequential_p50_ratio"] = round(p50, 3)
    said = ""
    if TIGHT:
        synced = results[kinds[2], True]["p50_ms"] / results[kinds[2], False]["p50_ms"]
        benchmark.extra_info["tls_sequential_fsync_p50_ratio"] = round(synced, 3)
        said = f" (with fsync {synced:.2f}: the disk's, see above)"
    print(f"TLS / plain: batched rate {rate:.2f}, sequential p50 {p50:.2f}{said}")
    assert rate >= rate_floor, f"TLS runs batched at {rate:.2f} x the plain rate"
    assert p50 <= p50_bound, f"TLS makes the sequential p50 {p50:.2f} x the plain one"
