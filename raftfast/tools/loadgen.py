"""The load generator behind ``raftfast bench``: client processes that keep a fixed number of
operations in flight against a cluster for a fixed time and report what they saw.

Each worker is its own process (one event loop per core is the most Python can push) running
one ``raftfast.Client``: ``inflight`` tasks, each issuing one request after another. A request
is one put/get, or with ``batch`` > 1 one ``put_many`` of that many puts (pipelined clients).
A read-only load (``read_ratio`` 1) writes nothing, so its gets read the one key each worker
puts before the clock starts (a key that exists); otherwise gets read random keys.
Latency is recorded per request into a log-bucketed histogram (``Histogram``), which merges
across processes and costs no memory per operation. Every loop is bounded by the duration.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import random
import time
from array import array
from dataclasses import asdict, dataclass, field
from typing import Any

from raftfast.security.tls import TLSFiles
from raftfast.transport.codec import delimited_header

# Histogram buckets: 1 us to ~100 s, 2% apart (percentiles are within 1% of the truth).
_BASE = 1.02
_MIN_S = 1e-6
_BUCKETS = int(math.log(100.0 / _MIN_S, _BASE)) + 2


class Histogram:
    """Latencies (seconds) in logarithmic buckets; mergeable, percentiles within ~1%."""

    def __init__(self, counts: array | None = None) -> None:
        self.counts = counts if counts is not None else array("Q", bytes(8 * _BUCKETS))

    def record(self, seconds: float, count: int = 1) -> None:
        i = int(math.log(seconds / _MIN_S, _BASE)) + 1 if seconds > _MIN_S else 0
        self.counts[min(i, _BUCKETS - 1)] += count

    def merge(self, other: Histogram) -> None:
        for i, c in enumerate(other.counts):
            if c:
                self.counts[i] += c

    @property
    def total(self) -> int:
        return sum(self.counts)

    @staticmethod
    def _upper(i: int) -> float:
        return _MIN_S * _BASE**i

    def percentile(self, q: float) -> float:
        """The latency (seconds) below which a fraction ``q`` of the operations finished."""
        total = self.total
        if total == 0:
            return float("nan")
        rank = q * total
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                return self._upper(i)
        return self._upper(_BUCKETS - 1)

    def cdf(self) -> list[tuple[float, float]]:
        """(latency seconds, fraction finished by then) at every non-empty bucket."""
        total = self.total
        out, seen = [], 0
        for i, c in enumerate(self.counts):
            if c:
                seen += c
                out.append((self._upper(i), seen / total))
        return out

    def to_bytes(self) -> bytes:
        return self.counts.tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> Histogram:
        counts = array("Q")
        counts.frombytes(data)
        return cls(counts)


@dataclass
class Workload:
    endpoints: list[str]
    inflight: int = 64  # requests in flight per client process
    batch: int = 1  # operations per request (put_many); 1 = one operation per request
    value_size: int = 64
    read_ratio: float = 0.0  # fraction of requests that are (linearizable) gets
    duration: float = 10.0
    warmup: float = 1.0
    keys: int = 100_000  # key space (keys are overwritten, so the state stays bounded)
    # "raftfast" (our Client: Session streams), "unary" (raftfast's unary KV.Put/Get, one call
    # per operation: the no-op baseline the throughput issue names) or "etcd" (etcd's gRPC KV
    # API: etcd itself, or raftfast's etcd API on its client port)
    system: str = "raftfast"
    serializable: bool = False  # "etcd" only: gets are serializable Ranges (else linearizable)
    tls: TLSFiles | None = None  # our Client over TLS, with these files
    session_transport: str = "auto"  # our Client's (Client(session_transport=...))
    # "async": a Client with ``inflight`` tasks; "sync": a SyncClient in a plain loop, one
    # request at a time (what code without asyncio calls; ``inflight`` 1)
    client: str = "async"


@dataclass
class WorkerResult:
    ops: int = 0
    requests: int = 0
    errors: int = 0
    elapsed: float = 0.0
    cpu_s: float = 0.0
    first_error: str = ""
    histogram: bytes = b""
    extra: dict[str, Any] = field(default_factory=dict)


def _field(number: int, data: bytes) -> bytes:
    """One length-delimited protobuf field (all an etcd Put or Range request needs)."""
    return delimited_header(number, len(data)) + data


_SERIALIZABLE = b"\x38\x01"  # RangeRequest field 7 (serializable, a bool, varint) = true

_UNARY_METHODS = {  # system -> (put, get); both take the key as field 1, a put's value as 2
    "etcd": ("/etcdserverpb.KV/Put", "/etcdserverpb.KV/Range"),
    "unary": ("/raftfast.v1.KV/Put", "/raftfast.v1.KV/Get"),
}


class _UnaryClient:
    """One unary gRPC call per operation: etcd's v3 KV.Put/KV.Range, or raftfast's KV.Put/Get.
    Requests are encoded by hand; responses are not decoded (only success matters)."""

    def __init__(
        self, endpoints: list[str], timeout: float, system: str, serializable: bool = False
    ) -> None:
        import grpc

        self._timeout = timeout
        self._range_extra = _SERIALIZABLE if serializable else b""
        self._channel = grpc.aio.insecure_channel(endpoints[0])
        put, get = _UNARY_METHODS[system]
        self._put = self._channel.unary_unary(put)
        self._range = self._channel.unary_unary(get)

    async def __aenter__(self) -> _UnaryClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self._channel.close()

    async def put(self, key: str, value: bytes) -> None:
        await self._put(_field(1, key.encode()) + _field(2, value), timeout=self._timeout)

    async def get(self, key: str) -> None:
        await self._range(_field(1, key.encode()) + self._range_extra, timeout=self._timeout)

    async def put_many(self, items) -> None:
        raise NotImplementedError("no batched put over single unary calls")


class _Requests:
    """What a worker sends: one put/get, or a put_many of ``batch`` pairs, on key number
    ``k``; the same for either kind of client (a ``Client``'s methods return what to await)."""

    def __init__(self, w: Workload, index: int) -> None:
        self.w = w
        self.rng = random.Random(index)
        self.value = os.urandom(w.value_size // 2 + 1).hex()[: w.value_size].encode()
        # put_many's keys made once: formatting 2,000 keys per request in Python was half of
        # this process's CPU, on the cores the nodes it measures run on
        self.batch_keys = [b"k%d" % i for i in range(w.keys)] if w.batch > 1 else []
        self.own_key = f"bench-w{index}"
        # read-only: read a key that exists
        self.read_key = self.own_key if w.read_ratio >= 1 else None

    def send(self, client: Any, k: int) -> tuple[Any, int]:
        """Send one request: (what the client's method returned, operations in it)."""
        w = self.w
        if w.read_ratio and self.rng.random() < w.read_ratio:
            return client.get(self.read_key or f"k{k}"), 1
        if w.batch > 1:
            keys = self.batch_keys[k : k + w.batch]
            while len(keys) < w.batch:  # (wrapping around the key space)
                keys += self.batch_keys[: w.batch - len(keys)]
            return client.put_many(list(zip(keys, itertools.repeat(self.value)))), w.batch
        return client.put(f"k{k}", self.value), 1


def _count(
    res: WorkerResult, hist: Histogram, measured: bool, t0: float, n: int, exc: Exception | None
) -> None:
    """One request's outcome (``measured``: it started after the warmup)."""
    if not measured:
        return
    if exc is not None:
        res.errors += 1
        res.first_error = res.first_error or f"{type(exc).__name__}: {exc}"
        return
    hist.record(time.perf_counter() - t0, n)
    res.ops += n
    res.requests += 1


async def _run(w: Workload, index: int, progress, ready) -> WorkerResult:
    from raftfast.client import Client  # imported in the worker process

    hist = Histogram()
    res = WorkerResult()
    requests = _Requests(w, index)
    rng = requests.rng
    loop = asyncio.get_running_loop()
    if w.serializable and w.system != "etcd":
        raise ValueError("serializable gets: etcd's KV.Range only (system 'etcd')")
    client_cm = (
        _UnaryClient(w.endpoints, 30.0, w.system, w.serializable)
        if w.system in _UNARY_METHODS
        else Client(w.endpoints, timeout=30.0, tls=w.tls, session_transport=w.session_transport)
    )
    async with client_cm as client:
        await client.put(requests.own_key, requests.value)  # find the leader first
        await asyncio.to_thread(ready)
        start = loop.time()
        measure_from = start + w.warmup
        stop_at = measure_from + w.duration

        async def one_task(t: int) -> None:
            k = rng.randrange(w.keys)
            while True:
                now = loop.time()
                if now >= stop_at:
                    return
                t0 = time.perf_counter()
                n, failure = 1, None
                try:
                    call, n = requests.send(client, k)
                    await call
                except Exception as exc:  # noqa: BLE001 - counted and reported, not fatal
                    failure = exc
                _count(res, hist, now >= measure_from, t0, n, failure)
                if failure is None:
                    k = (k + 7919 * (t + 1)) % w.keys

        async def report() -> None:
            while loop.time() < stop_at:
                await asyncio.sleep(0.25)
                progress(res.ops)

        cpu0 = time.process_time()
        reporter = asyncio.create_task(report())
        await asyncio.gather(*(one_task(t) for t in range(w.inflight)))
        reporter.cancel()
        res.elapsed = max(min(loop.time(), stop_at + 30) - measure_from, 1e-9)
        res.cpu_s = time.process_time() - cpu0
    res.histogram = hist.to_bytes()
    return res


def _run_sync(w: Workload, index: int, progress, ready) -> WorkerResult:
    """One ``SyncClient`` in a plain loop: one request at a time (``--client sync``)."""
    from raftfast.client import SyncClient  # imported in the worker process

    if w.system != "raftfast":
        raise ValueError("--client sync: raftfast's own client only")
    hist = Histogram()
    res = WorkerResult()
    requests = _Requests(w, index)
    with SyncClient(
        w.endpoints, timeout=30.0, tls=w.tls, session_transport=w.session_transport
    ) as client:
        client.put(requests.own_key, requests.value)  # find the leader first
        ready()
        start = time.monotonic()
        measure_from = start + w.warmup
        stop_at = measure_from + w.duration
        report_at = start
        k = requests.rng.randrange(w.keys)
        cpu0 = time.process_time()
        while True:
            now = time.monotonic()
            if now >= stop_at:
                break
            if now >= report_at:
                progress(res.ops)
                report_at = now + 0.25
            t0 = time.perf_counter()
            n, failure = 1, None
            try:
                _, n = requests.send(client, k)
            except Exception as exc:  # noqa: BLE001 - counted and reported, not fatal
                failure = exc
            _count(res, hist, now >= measure_from, t0, n, failure)
            if failure is None:
                k = (k + 7919) % w.keys
        res.elapsed = max(min(time.monotonic(), stop_at + 30) - measure_from, 1e-9)
        res.cpu_s = time.process_time() - cpu0
    res.histogram = hist.to_bytes()
    return res


START_S = 120.0  # for every client process to be ready (imported, connected)


def worker_main(w: Workload, index: int, conn, go) -> None:
    """Entry point of one client process: runs the workload, sends progress and the result.
    It says "ready" once connected, and starts its clock when ``go`` (an Event) is set: once
    every process is ready, so that none measures while others still start (64 processes
    importing gRPC take seconds of both cores)."""
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()

    def progress(ops: int) -> None:
        conn.send(("progress", index, ops))

    def ready() -> None:
        conn.send(("ready", index, 0))
        if not go.wait(START_S):
            raise RuntimeError("the other client processes were not ready in time")

    try:
        if w.client == "sync":
            result = _run_sync(w, index, progress, ready)
        else:
            with runner:
                result = runner.run(_run(w, index, progress, ready))
        conn.send(("done", index, asdict(result)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails cleanly
        from raftfast.client.cli import exit_code_of  # (the exit code the CLI gives it)

        conn.send(("failed", index, (f"{type(exc).__name__}: {exc}", int(exit_code_of(exc)))))
    finally:
        conn.close()
