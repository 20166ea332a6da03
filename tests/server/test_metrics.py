"""``--metrics-listen``: Prometheus text from real nodes (docs/operations.md lists the series)."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from raftfast.client import SyncClient
from raftfast.server.metrics import Histogram
from raftfast.tools.localcluster import ProcCluster, free_ports, wait_for
from tests.integration.load import write_each

SERIES = {
    # name: type
    "raftfast_term": "gauge",
    "raftfast_role": "gauge",
    "raftfast_has_leader": "gauge",
    "raftfast_leader_changes": "counter",
    "raftfast_commit_index": "gauge",
    "raftfast_last_index": "gauge",
    "raftfast_applied_index": "gauge",
    "raftfast_snapshot_index": "gauge",
    "raftfast_proposals": "counter",
    "raftfast_proposals_failed": "counter",
    "raftfast_proposal_batches": "counter",
    "raftfast_linearizable_reads": "counter",
    "raftfast_read_rounds": "counter",
    "raftfast_wal_sync_seconds": "histogram",
    "raftfast_replication_lag_entries": "gauge",
    "raftfast_snapshots_sent": "counter",
    "raftfast_snapshot_send_failures": "counter",
    "raftfast_snapshot_send_seconds": "histogram",
    "raftfast_snapshots_refused": "counter",
    "raftfast_snapshots_no_room": "counter",
    "raftfast_snapshots_received": "counter",
    "raftfast_snapshot_receive_seconds": "histogram",
    "raftfast_request_seconds": "histogram",
    "raftfast_sessions_open": "gauge",
    "raftfast_wal_bytes": "gauge",
    "raftfast_snapshot_bytes": "gauge",
    "raftfast_alarm": "gauge",
}


def scrape(address: str) -> tuple[str, dict[str, dict[tuple, float]], dict[str, str]]:
    """(the text, {sample name: {sorted labels: value}}, {family: type}) of ``address``."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    samples: dict[str, dict[tuple, float]] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return text, samples, types


def documented_series() -> set[str]:
    """The series of docs/operations.md's table."""
    doc = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
    return set(re.findall(r"^\| `(raftfast_[a-z_]+)` \|", doc.read_text(), re.MULTILINE))


def one(samples: dict[str, dict[tuple, float]], name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


def test_every_series_with_sane_values_and_snapshots_counted(tmp_path):
    ports = dict(zip(["n1", "n2", "n3"], free_ports(3), strict=True))
    metrics = {nid: f"127.0.0.1:{port}" for nid, port in ports.items()}
    flags = ["--snapshot-entries", "200", "--snapshot-keep", "0"]
    with ProcCluster(
        tmp_path, extra=flags, node_extra=lambda nid: ["--metrics-listen", metrics[nid]]
    ) as cluster:
        leader = cluster.wait_leader()
        followers = [n for n in cluster.ids if n != leader]
        with SyncClient(cluster.endpoints, timeout=30) as c:
            for i in range(20):
                c.put(f"k{i}", f"v{i}")
                assert c.get(f"k{i}") == f"v{i}".encode()  # (a linearizable read each)
        cluster.status(leader)  # (a unary call: timed by method)

        # A follower that misses compacted entries gets a snapshot.
        down = followers[0]
        cluster.kill(down)
        write_each([cluster.addrs[leader]], "s", 600)
        target = cluster.status(leader).commit_index
        cluster.start(down, first_time=False)
        cluster.wait_applied(down, target, "the follower to catch up by snapshot")

        # (a loaded machine may have held an election meanwhile: ask again)
        leader = cluster.wait_leader()
        scraped = {nid: scrape(metrics[nid]) for nid in cluster.ids}
        text, samples, types = scraped[leader]
        for name, kind in SERIES.items():
            assert types.get(name) == kind, (name, types.get(name))
        assert set(types) == set(SERIES)  # (no series undocumented here)
        served = {f"{n}_total" if t == "counter" else n for n, t in types.items()}
        assert served == documented_series()

        def total(name: str) -> float:
            return sum(one(scraped[nid][1], name) for nid in cluster.ids)

        for nid in cluster.ids:
            _, ns, _ = scraped[nid]
            assert 'raftfast_wal_sync_seconds_bucket{le="+Inf"}' in scraped[nid][0]
            if nid != down:  # (restarted, it got a snapshot and maybe no entries since)
                assert one(ns, "raftfast_wal_sync_seconds_count") > 0
                assert one(ns, "raftfast_wal_sync_seconds_sum") > 0
            assert one(ns, "raftfast_term") >= 1
            assert sum(v for v in ns["raftfast_role"].values()) == 1  # (one role at a time)
            assert one(ns, "raftfast_leader_changes_total") >= 1
            assert one(ns, "raftfast_commit_index") > 0
            assert one(ns, "raftfast_applied_index") > 0
            assert one(ns, "raftfast_wal_bytes") > 0
            assert one(ns, "raftfast_sessions_open") >= 0
            assert one(ns, "raftfast_alarm", type="NOSPACE") == 0
            assert one(ns, "raftfast_proposals_failed_total") >= 0
            # (every node answered Status calls: wait_leader asks each)
            assert (
                one(ns, "raftfast_request_seconds_count", service="raftfast.v1.KV", method="Status")
                >= 1
            )
        assert one(samples, "raftfast_commit_index") >= target > 0
        assert one(samples, "raftfast_snapshot_index") >= 200
        assert one(samples, "raftfast_snapshot_bytes") > 0
        assert total("raftfast_proposals_total") >= 620  # (by whichever node led)
        # Each batch is one proposal or more: never more batches than proposals, on any node.
        batches = {
            nid: sum(
                one(scraped[nid][1], "raftfast_proposal_batches_total", fed=fed)
                for fed in ("after_sync", "while_syncing")
            )
            for nid in cluster.ids
        }
        for nid, count in batches.items():
            assert count <= one(scraped[nid][1], "raftfast_proposals_total"), nid
        assert sum(batches.values()) >= 1
        # Each read round confirmed one linearizable read or more (20 reads, at the leader).
        for nid in cluster.ids:
            _, ns, _ = scraped[nid]
            assert one(ns, "raftfast_read_rounds_total") <= one(
                ns, "raftfast_linearizable_reads_total"
            ), nid
        assert total("raftfast_linearizable_reads_total") >= 20
        assert total("raftfast_snapshots_sent_total") >= 1
        assert total("raftfast_snapshot_send_seconds_count") >= 1

        # The follower that caught up received a snapshot.
        _, fs, _ = scraped[down]
        assert one(fs, "raftfast_snapshots_received_total") >= 1
        assert one(fs, "raftfast_snapshot_receive_seconds_count") >= 1
        assert one(fs, "raftfast_has_leader") == 1

        def leader_view() -> dict | None:
            """The leader's lag gauges, once both followers are near 0 (and only it has
            them)."""
            now = cluster.leader()
            if now is None:
                return None
            views = {nid: scrape(metrics[nid])[1] for nid in cluster.ids}
            if one(views[now], "raftfast_role", role="leader") != 1:
                return None
            if any("raftfast_replication_lag_entries" in views[n] for n in cluster.ids if n != now):
                return None
            lag = views[now].get("raftfast_replication_lag_entries", {})
            others = {(("follower", n),) for n in cluster.ids if n != now}
            if set(lag) != others or any(v > 5 for v in lag.values()):
                return None
            return lag

        wait_for("the leader's lag gauges near 0 for both followers", leader_view)


def test_the_histogram_counts_per_bucket_cumulatively():
    h = Histogram((0.001, 0.01))
    for v in (0.0005, 0.001, 0.005, 0.5):
        h.observe(v)
    buckets, total = h.buckets()
    assert buckets == [("0.001", 2), ("0.01", 3), ("+Inf", 4)]
    assert abs(total - 0.5065) < 1e-9


def test_embedded_nodes_in_one_process_each_have_their_own_metrics_and_log_lines(tmp_path):
    """Three raftfast.Node in one process (a state machine of the test's): each serves its own
    registry; JSON log lines name the node they come from; stop closes the metrics port."""
    import asyncio
    import json
    import logging

    from raftfast.server.logs import JsonFormatter
    from tests.server.test_embedded import three

    lines: list[dict] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(self.format(record)))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("raftfast.node")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    metrics = [f"127.0.0.1:{p}" for p in free_ports(3)]

    async def main() -> None:
        nodes = three(tmp_path)
        for node, address in zip(nodes, metrics, strict=True):
            node.settings.metrics_listen = address
        try:
            for node in nodes:
                await node.start()
            leader = await nodes[0].wait_for_leader()
            await asyncio.gather(*(n.propose(b"1") for n in nodes for _ in range(5)))
            scraped = await asyncio.gather(*(asyncio.to_thread(scrape, m) for m in metrics))
            roles = {}
            for node, (_, samples, _types) in zip(nodes, scraped, strict=True):
                roles[node.id] = one(samples, "raftfast_role", role="leader")
                assert one(samples, "raftfast_applied_index") > 0
                assert one(samples, "raftfast_sessions_open") == 0
                assert one(samples, "raftfast_alarm", type="NOSPACE") == 0
            assert roles == {n.id: (1.0 if n.id == leader else 0.0) for n in nodes}
            leader_samples = scraped[[n.id for n in nodes].index(leader)][1]
            # (followers forward their proposals to the leader's Propose: counted there)
            assert one(leader_samples, "raftfast_proposals_total") >= 15
            propose = one(
                leader_samples,
                "raftfast_request_seconds_count",
                service="raftfast.v1.StateMachine",
                method="Propose",
            )
            assert propose >= 10
        finally:
            for node in nodes:
                await node.stop()
        for address in metrics:
            try:
                await asyncio.to_thread(scrape, address)
            except OSError:
                continue
            raise AssertionError(f"metrics still served on {address} after stop")
        became = [x for x in lines if "became leader" in x["message"]]
        assert became and all(f"node {x['node']} became" in x["message"] for x in became)
        assert all(x["term"] is not None for x in became)
        starting = {x["node"] for x in lines if "starting: term" in x["message"]}
        assert starting == {"n1", "n2", "n3"}

    try:
        asyncio.run(main())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def test_a_metrics_address_in_use_is_one_clear_error():
    import socket

    from raftfast.server.metrics import MetricsServer

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        try:
            MetricsServer(object(), address)  # (the driver is read only when scraped)
        except OSError as exc:
            assert str(exc).startswith(f"cannot serve metrics on {address}: "), exc
        else:
            raise AssertionError("a second server on a port in use")
