"""A node's metrics: ``--metrics-listen HOST:PORT`` serves them as Prometheus text at
``/metrics`` (docs/operations.md lists every series).

Cheap on the hot path, by construction:

* Most series are read when scraped (``_Collector``, in the metrics server's thread): term,
  role, indexes, replication lag, open sessions, alarms, and the bytes of the WAL and of the
  snapshots on disk (a directory listing per scrape). The loop pays nothing for them.
* What must be counted as it happens is a plain integer on ``NodeMetrics`` (one addition: a
  proposal, a leader change, a snapshot) or a ``Histogram`` here, which is a list of counts
  (``bisect`` + an addition: well under a microsecond, against the fdatasync of ~200 us it
  measures; one observation per Ready's WAL write, never per entry). Only the event loop's
  thread writes them; a scrape copies them (the GIL makes each copy whole; a count may be one
  observation ahead of the sum, which Prometheus tolerates).
* Request latency is timed by an interceptor (``RequestTimer``) that exists only with
  ``--metrics-listen``: one coroutine frame and two clock reads per unary call (a grpc.aio
  call costs some 100 us of CPU by itself). Streams (the Session stream, health Watch,
  reflection) are not timed: the open sessions gauge covers the Session stream.

Each node has its own ``CollectorRegistry`` (several embedded nodes may share a process) and
its own HTTP server thread, started by ``Driver.start`` and shut down by ``Driver.stop``.
prometheus_client is imported only when metrics are served.
"""

from __future__ import annotations

import logging
import os
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator
from time import perf_counter
from typing import TYPE_CHECKING, Any

import grpc

from raftfast.address import split_address
from raftfast.core.types import Role
from raftfast.kv.commands import ALARMS
from raftfast.server.handlers import Twins

if TYPE_CHECKING:
    from raftfast.server.driver import Driver

__all__ = ["Histogram", "MetricsServer", "NodeMetrics", "RequestTimer"]

log = logging.getLogger("raftfast.metrics")

# Seconds. The WAL's write + fdatasync: ~0.1-0.3 ms on a good disk, far more on a bad one.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
SNAPSHOT_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
ROLES = tuple(r.name.lower() for r in Role)  # follower, pre_candidate, candidate, leader


class Histogram:
    """Counts of observations per bucket (``counts[i]``: at most ``bounds[i]`` and more than
    the bound before; the last one: above every bound) and their sum. One writer (the event
    loop's thread)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> tuple[list[tuple[str, float]], float]:
        """Prometheus's cumulative buckets (le, count), +Inf last, and the sum."""
        counts, total = list(self.counts), self.total
        out, running = [], 0
        for bound, count in zip(self.bounds, counts, strict=False):
            running += count
            out.append((_le(bound), running))
        out.append(("+Inf", running + counts[-1]))
        return out, total


def _le(bound: float) -> str:
    return repr(float(bound))


class NodeMetrics:
    """What the driver counts as it happens (the rest is read on scrape)."""

    def __init__(self) -> None:
        self.leader_changes = 0  # a leader became known that is not the one known before
        self.proposals = 0  # commands proposed as leader (a put, a frame's write, a put_many)
        self.proposals_failed = 0  # of those, the ones that ended in an error
        # Proposals handed to Raft together (one log append each): once the leader's last
        # write synced, or while it syncs (driver._pump: a big proposal and those with it).
        self.proposal_batches = {"after_sync": 0, "while_syncing": 0}
        self.reads = 0  # linearizable read requests handed to Raft as leader (ReadIndex)
        self.read_rounds = 0  # ... in rounds of heartbeats, one at a time (driver._feed)
        self.snapshots_sent = 0
        self.snapshots_send_failed = 0
        self.snapshots_refused = 0  # the state machine's snapshot raised
        self.snapshots_no_room = 0  # ours, or a leader's for us, stopped: the disk was full
        self.snapshots_received = 0
        self.wal_sync = Histogram(LATENCY_BUCKETS)  # one WAL write + fdatasync (a Ready)
        self.snapshot_send = Histogram(SNAPSHOT_BUCKETS)
        self.snapshot_receive = Histogram(SNAPSHOT_BUCKETS)
        self.requests: dict[tuple[str, str], Histogram] = {}  # (service, method) -> latency

    def request_histogram(self, full_method: str) -> Histogram:
        service, _, method = full_method.lstrip("/").rpartition("/")
        key = (service, method)
        hist = self.requests.get(key)
        if hist is None:
            hist = self.requests[key] = Histogram(LATENCY_BUCKETS)
        return hist


# ---------------------------------------------------------------------------------- requests


class RequestTimer(grpc.aio.ServerInterceptor):
    """Times unary calls into ``metrics.requests`` by method (only with --metrics-listen).

    Place it after the RoleInterceptor: the handler it is given is then the service's own, the
    same object call after call, so its timed twin is made once per method and reused."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.metrics = metrics
        self._timed = Twins(
            lambda handler, method: _timed(handler, metrics.request_histogram(method))
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler  # unknown methods (UNIMPLEMENTED) and streams: as they are
        return self._timed.of(handler, details.method)


def _timed(handler: grpc.RpcMethodHandler, hist: Histogram) -> grpc.RpcMethodHandler:
    inner = handler.unary_unary
    clock = perf_counter

    async def unary_unary(request, context):
        started = clock()
        try:
            return await inner(request, context)
        finally:
            hist.observe(clock() - started)

    return grpc.unary_unary_rpc_method_handler(
        unary_unary,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


# ---------------------------------------------------------------------------------- scrape


class _Collector:
    """Reads the driver's state when scraped (from the metrics server's thread)."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver

    def describe(self) -> list:
        return []  # (no describe-time collection: the registry must not scrape at register)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        d = self.driver
        m = d.metrics
        raw = d.raw

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"raftfast_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"raftfast_{name}", doc, value=value)

        def histogram(name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
            family = HistogramMetricFamily(f"raftfast_{name}", doc)
            buckets, total = hist.buckets()
            family.add_metric([], buckets, total)
            return family

        if raw is not None:
            status = _status(raw)
            yield gauge("term", "The node's current Raft term.", status.term)
            role = GaugeMetricFamily(
                "raftfast_role",
                "The node's role: 1 for the role it has, 0 for the others.",
                labels=["role"],
            )
            current = status.role.name.lower()
            for name in ROLES:
                role.add_metric([name], 1.0 if name == current else 0.0)
            yield role
            yield gauge(
                "has_leader",
                "1 if the node knows a leader of its term, else 0.",
                1 if status.leader else 0,
            )
            yield gauge(
                "commit_index", "The highest log index known committed.", status.commit_index
            )
            yield gauge("last_index", "The last index of the node's log.", status.last_index)
            lag = GaugeMetricFamily(
                "raftfast_replication_lag_entries",
                "Leader only: its last log index minus each follower's match index.",
                labels=["follower"],
            )
            if status.role == Role.LEADER:
                for peer, (match, _next) in sorted(status.progress.items()):
                    if peer != status.id:
                        lag.add_metric([peer], max(status.last_index - match, 0))
            yield lag
        yield gauge(
            "applied_index", "The last log index applied to the state machine.", d.applied_index
        )
        yield gauge(
            "snapshot_index", "The log index of the node's newest snapshot.", d._snapshot_index
        )
        yield counter(
            "leader_changes",
            "Times a leader became known to this node that was not the one it knew before.",
            m.leader_changes,
        )
        yield counter(
            "proposals", "Commands proposed to the log by this node as leader.", m.proposals
        )
        yield counter(
            "proposals_failed",
            "Proposed commands that ended in an error (leadership lost, shutting down).",
            m.proposals_failed,
        )
        batches = CounterMetricFamily(
            "raftfast_proposal_batches",
            "Batches of proposals this node handed to Raft as leader, one log append each: "
            "proposals_total over this is about the mean batch. fed: after_sync (its last "
            "WAL write had synced) or while_syncing (a big proposal, and those queued with it, "
            "sent to the followers before that sync ended).",
            labels=["fed"],
        )
        for fed, count in m.proposal_batches.items():
            batches.add_metric([fed], count)
        yield batches
        yield counter(
            "linearizable_reads",
            "Linearizable read requests this node handed to ReadIndex as leader (a Session "
            "frame's reads are one).",
            m.reads,
        )
        yield counter(
            "read_rounds",
            "Heartbeat rounds those reads went in, one at a time: reads over this is the mean "
            "a round.",
            m.read_rounds,
        )
        yield histogram(
            "wal_sync_seconds",
            "One WAL write + fdatasync (one per Ready with entries or a new term/vote; thread "
            "hand-offs included).",
            m.wal_sync,
        )
        yield counter(
            "snapshots_sent", "Snapshots streamed to followers in full.", m.snapshots_sent
        )
        yield counter(
            "snapshot_send_failures",
            "Snapshots that could not be streamed to a follower.",
            m.snapshots_send_failed,
        )
        yield histogram(
            "snapshot_send_seconds", "Streaming a snapshot to a follower.", m.snapshot_send
        )
        yield counter(
            "snapshots_refused",
            "Snapshots the state machine could not write (its state holds what it cannot "
            "encode); the node keeps its log and tries again later.",
            m.snapshots_refused,
        )
        yield counter(
            "snapshots_no_room",
            "Snapshots (this node's own, or a leader's for it) stopped for lack of room on the "
            "disk; the node keeps its log, raises NOSPACE and tries again later.",
            m.snapshots_no_room,
        )
        yield counter(
            "snapshots_received", "Snapshots received in full from a leader.", m.snapshots_received
        )
        yield histogram(
            "snapshot_receive_seconds",
            "Receiving a snapshot from a leader, first chunk to last.",
            m.snapshot_receive,
        )
        requests = HistogramMetricFamily(
            "raftfast_request_seconds",
            "Unary gRPC calls on the client port, by service and method (streams not timed).",
            labels=["service", "method"],
        )
        for (service, method), hist in sorted(dict(m.requests).items()):
            buckets, total = hist.buckets()
            requests.add_metric([service, method], buckets, total)
        yield requests
        yield gauge("sessions_open", "Session streams open on this node.", d.app.sessions_open)
        settings = d.settings
        yield gauge(
            "wal_bytes",
            "Bytes of the WAL's files on disk.",
            _dir_bytes(os.path.join(settings.data_dir, "wal")),
        )
        yield gauge(
            "snapshot_bytes",
            "Bytes of the snapshot files on disk.",
            _dir_bytes(os.path.join(settings.data_dir, "snap")),
        )
        alarms = GaugeMetricFamily(
            "raftfast_alarm",
            "1 while the alarm is raised (through the log: the same on every node), else 0.",
            labels=["type"],
        )
        raised = d.app.alarms_raised()
        for name in ALARMS:
            alarms.add_metric([name.decode()], 1.0 if name in raised else 0.0)
        yield alarms


def _status(raw):
    """``raw.status()`` from another thread: the leader's progress table may change size while
    it is copied (a membership change); try again then."""
    for _ in range(10):
        try:
            return raw.status()
        except RuntimeError:
            continue
    return raw.status()


def _dir_bytes(path: str) -> int:
    total = 0
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue  # (a segment released or a temporary file renamed meanwhile)
    except FileNotFoundError:
        return 0
    return total


# ---------------------------------------------------------------------------------- server


class MetricsServer:
    """``/metrics`` of one driver on ``address`` (prometheus_client's app behind a bounded
    HTTP server, ``metrics_http``, in a thread of its own, with a registry of its own)."""

    def __init__(self, driver: Driver, address: str) -> None:
        from prometheus_client import CollectorRegistry

        from raftfast.server import metrics_http

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(driver))
        host, port = split_address(address)
        try:
            self._httpd, self._thread = metrics_http.serve(host, port, self.registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
        self._thread.name = f"raftfast-metrics-{driver.id}"
        self.address = address

    def close(self) -> None:
        """Stop serving (blocks up to half a second: the server's poll interval)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
