"""Chaos schedules on real `raftfast-node` processes: concurrent clients run random operations
on a few keys while a nemesis kills (-9) and restarts nodes, pauses them (SIGSTOP longer than an
election timeout), partitions them (majority/minority, isolated leader, asymmetric) and delays or
drops their traffic. Every schedule is bounded in time and ends with: heal, a quiet period, final
reads, and three checks — the history is linearizable, no acknowledged write is lost, every node
holds the same state.

    python -m tests.fault.chaos --schedules 20 --duration 25     (what `make chaos` runs)

``--tls half`` (the default) runs every other pair of schedules with TLS everywhere (client
certificates, the peer port, the replication stream through the proxy); ``on``, ``off``.

``--api both`` (the default) runs half the schedules through etcd's v3 API instead of raftfast's
own client: the clients then speak only etcdserverpb.KV (Put, linearizable Range, DeleteRange, a
compare-and-swap Txn) to any node, which hands writes and linearizable reads to the leader; the
final reads and the state compared at the end are etcd's too. Every pair of schedules has one of
each, and every 8 schedules cover each (nodes, TLS, API) combination once; ``etcd``,
``raftfast``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from raftfast.client import Client, SyncClient
from raftfast.errors import InvalidArgumentError
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from raftfast.proto.etcd import rpc_pb2 as etcd_pb
from raftfast.proto.etcd import rpc_pb2_grpc as etcd_grpc
from raftfast.security.tls import TLSFiles, channel_credentials
from raftfast.tools.localcluster import ProcCluster, make_certs, wait_for

from .linearizability import Op, check
from .proxy import FaultProxy

KEYS = [b"k%d" % i for i in range(6)]
OP_TIMEOUT = 2.0
# A share of the raftfast client's puts carry a value big enough that a leader hands it to its
# followers while its own write syncs (driver._FEED_WHILE_SYNCING_BYTES), not after.
BIG_SHARE = 0.05
BIG_PAD = b"." * (80 * 1024)
APIS = ("raftfast", "etcd")


@dataclass
class Report:
    nodes: int
    seed: int
    tls: bool = False
    api: str = "raftfast"
    ops: int = 0
    ok: int = 0
    unknown: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    linearizable: bool | None = None
    explanation: str = ""
    lost_writes: int = 0
    converged: bool = False
    streamed_links: int = 0  # links whose replication stream ran over TCP through the proxy
    seconds: float = 0.0
    # What no fault explains: a client that crashed, an answer no node should give (INTERNAL,
    # INVALID_ARGUMENT...). Each fails the schedule.
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (
            bool(self.linearizable)
            and self.lost_writes == 0
            and self.converged
            and not self.problems
        )

    def line(self) -> str:
        faults = ",".join(f"{k}={v}" for k, v in sorted(self.faults.items()))
        verdict = {True: "linearizable", False: "NOT LINEARIZABLE", None: "unknown"}
        return (
            f"nodes={self.nodes} seed={self.seed:<4} tls={'on' if self.tls else 'off':<3} "
            f"api={self.api:<8} ops={self.ops:<5} ok={self.ok:<5} "
            f"unknown={self.unknown:<3} faults[{faults}] {verdict[self.linearizable]} "
            f"lost={self.lost_writes} converged={self.converged} {self.seconds:.0f}s"
            + (f" PROBLEMS={len(self.problems)}" if self.problems else "")
        )


# -- clients -------------------------------------------------------------------------------------


async def _worker(
    wid: int,
    endpoints: list[str],
    rng: random.Random,
    stop: asyncio.Event,
    history: list[Op],
    reader: bool = False,
    tls: TLSFiles | None = None,
    sync: bool = False,
) -> None:
    """A client doing random operations one at a time; a ``reader`` only reads, starting at
    ``endpoints[0]`` (a follower must redirect it: serving it locally would be a stale read).
    ``sync``: a ``SyncClient`` (its blocking connection), called from a thread."""
    seen: dict[bytes, bytes | None] = {}
    counter = 0
    if sync:
        blocking = SyncClient(endpoints, timeout=OP_TIMEOUT, tls=tls)
        client: Any = _InThread(blocking)
        closing = asyncio.to_thread(blocking.close)
    else:
        client = Client(endpoints, timeout=OP_TIMEOUT, tls=tls)
        closing = client.close()
    try:
        while not stop.is_set():
            key = rng.choice(KEYS)
            roll = 0.5 if reader else rng.random()
            counter += 1
            value = b"w%d-%d" % (wid, counter)
            invoke = time.monotonic()
            try:
                if roll < 0.45:
                    kind, expected = "put", None
                    if roll < 0.45 * BIG_SHARE:
                        value += BIG_PAD  # (may be sent while the leader's own write syncs)
                    await client.put(key, value)
                    output = None
                elif roll < 0.80:
                    kind, expected, value = "get", None, None
                    output = await client.get(key)
                    seen[key] = output
                elif roll < 0.92:
                    kind, expected = "cas", seen.get(key)
                    output = await client.cas(key, expected, value)
                else:
                    kind, expected, value = "delete", None, None
                    output = await client.delete(key)
                complete = time.monotonic()
            except InvalidArgumentError:
                raise
            except Exception:  # noqa: BLE001 - timeouts, no leader: the outcome is unknown
                if kind == "get":
                    continue  # a failed read has no effect
                complete, output = None, None
            history.append(Op(wid, kind, key, value, expected, invoke, complete, output))
    finally:
        await closing


class _InThread:
    """A SyncClient's put/get/cas/delete, awaitable: each runs in a thread."""

    def __init__(self, client: SyncClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self._client, name)
        return lambda *args: asyncio.to_thread(method, *args)


# -- etcd API clients ----------------------------------------------------------------------------

# Reconnect soon after a node restarts (gRPC's defaults wait 1 s, then up to 120 s).
ETCD_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
# The statuses faults cause (a node down, paused or cut off, no leader, a timeout): the op's
# outcome is unknown. Any other status is a problem (the op is still recorded as unknown: that
# is always sound).
ETCD_FAULT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def _etcd_channel(address: str, tls: TLSFiles | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address, options=ETCD_CHANNEL_OPTIONS)
    return grpc.aio.secure_channel(address, channel_credentials(tls), options=ETCD_CHANNEL_OPTIONS)


async def _connected(channel: grpc.aio.Channel, wait: float = 0.5) -> bool:
    """Whether ``channel`` is connected (waiting up to ``wait`` s for it). Nothing is sent
    over a channel that is not, so an op not invoked for that has no outcome to record."""
    if channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY:
        return True
    try:
        await asyncio.wait_for(channel.channel_ready(), wait)
    except TimeoutError:
        return False
    return True


def _etcd_cas(key: bytes, expected: bytes | None, value: bytes) -> etcd_pb.TxnRequest:
    """Put ``value`` if the key holds ``expected`` (None: if it is absent, version 0)."""
    if expected is None:
        compare = etcd_pb.Compare(
            key=key, target=etcd_pb.Compare.VERSION, result=etcd_pb.Compare.EQUAL, version=0
        )
    else:
        compare = etcd_pb.Compare(
            key=key, target=etcd_pb.Compare.VALUE, result=etcd_pb.Compare.EQUAL, value=expected
        )
    put = etcd_pb.RequestOp(request_put=etcd_pb.PutRequest(key=key, value=value))
    return etcd_pb.TxnRequest(compare=[compare], success=[put])


async def _etcd_worker(
    wid: int,
    endpoints: list[str],
    rng: random.Random,
    stop: asyncio.Event,
    history: list[Op],
    problems: list[str],
    reader: bool = False,
    tls: TLSFiles | None = None,
) -> None:
    """``_worker``'s operations through etcd's KV service alone: put = Put, get = a
    linearizable Range, cas = a Txn (compare the value, or version 0 for "absent", then put),
    delete = DeleteRange. Writers use every node (one at random now and then, the next one
    after an error): a follower hands the request to the leader. A ``reader`` stays on
    ``endpoints[0]``.

    etcd has no exactly-once: a write retried after an unknown outcome may apply twice. So
    nothing is retried: an error after sending leaves the op unknown (it may take effect
    later, or never), and the next op is a new one with a value never written before."""
    channels = [_etcd_channel(a, tls) for a in endpoints]
    stubs = [etcd_grpc.KVStub(ch) for ch in channels]
    at = 0 if reader else wid % len(stubs)
    seen: dict[bytes, bytes | None] = {}
    counter = 0
    try:
        while not stop.is_set():
            if not reader and rng.random() < 0.2:
                at = rng.randrange(len(stubs))
            if not await _connected(channels[at]):
                if not reader:
                    at = (at + 1) % len(stubs)
                continue
            stub = stubs[at]
            key = rng.choice(KEYS)
            roll = 0.5 if reader else rng.random()
            counter += 1
            value = b"e%d-%d" % (wid, counter)
            invoke = time.monotonic()
            try:
                if roll < 0.45:
                    kind, expected = "put", None
                    await stub.Put(etcd_pb.PutRequest(key=key, value=value), timeout=OP_TIMEOUT)
                    output = None
                elif roll < 0.80:
                    kind, expected, value = "get", None, None
                    resp = await stub.Range(etcd_pb.RangeRequest(key=key), timeout=OP_TIMEOUT)
                    output = resp.kvs[0].value if resp.kvs else None
                    seen[key] = output
                elif roll < 0.92:
                    kind, expected = "cas", seen.get(key)
                    resp = await stub.Txn(_etcd_cas(key, expected, value), timeout=OP_TIMEOUT)
                    output = resp.succeeded
                else:
                    kind, expected, value = "delete", None, None
                    resp = await stub.DeleteRange(
                        etcd_pb.DeleteRangeRequest(key=key), timeout=OP_TIMEOUT
                    )
                    output = resp.deleted > 0
                complete = time.monotonic()
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in ETCD_FAULT_CODES:
                    problems.append(
                        f"c{wid} {kind} {key!r} at {endpoints[at]}: {exc.code().name} "
                        f"{exc.details()}"
                    )
                if not reader:
                    at = (at + 1) % len(stubs)
                await asyncio.sleep(rng.uniform(0.02, 0.1))
                if kind == "get":
                    continue  # a failed read has no effect
                complete, output = None, None
            history.append(Op(wid, kind, key, value, expected, invoke, complete, output))
    finally:
        for ch in channels:
            await ch.close()


async def _etcd_final_reads(
    cluster: ProcCluster, history: list[Op], timeout: float = 60.0
) -> dict[bytes, bytes | None]:
    """A linearizable Range of every key, each asked of another node (after an error, the
    next), recorded in the history like the clients' reads."""
    channels = [_etcd_channel(a, cluster.client_tls) for a in cluster.endpoints]
    stubs = [etcd_grpc.KVStub(ch) for ch in channels]
    final: dict[bytes, bytes | None] = {}
    try:
        for i, key in enumerate(KEYS):
            deadline = time.monotonic() + timeout
            at = i
            while True:
                invoke = time.monotonic()
                try:
                    resp = await stubs[at % len(stubs)].Range(
                        etcd_pb.RangeRequest(key=key), timeout=10
                    )
                    break
                except grpc.aio.AioRpcError:
                    if time.monotonic() > deadline:
                        raise
                    at += 1
                    await asyncio.sleep(0.2)
            value = resp.kvs[0].value if resp.kvs else None
            history.append(Op(-1, "get", key, None, None, invoke, time.monotonic(), value))
            final[key] = value
    finally:
        for ch in channels:
            await ch.close()
    return final


def _etcd_state(cluster: ProcCluster, nid: str) -> tuple:
    """Node ``nid``'s own etcd keyspace (a serializable Range of every key): its revision and
    every key's value, create and mod revisions and version."""
    with cluster.channel(nid) as ch:
        resp = etcd_grpc.KVStub(ch).Range(
            etcd_pb.RangeRequest(key=b"\0", range_end=b"\0", serializable=True), timeout=5
        )
    kvs = [(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version) for kv in resp.kvs]
    return resp.header.revision, kvs


# -- nemesis -------------------------------------------------------------------------------------


class Nemesis:
    def __init__(
        self, cluster: ProcCluster, proxy: FaultProxy, rng: random.Random, report: Report
    ) -> None:
        self.cluster = cluster
        self.proxy = proxy
        self.rng = rng
        self.report = report
        self.paused: set[str] = set()
        self.dead: set[str] = set()

    def _count(self, name: str) -> None:
        self.report.faults[name] = self.report.faults.get(name, 0) + 1

    def _target(self) -> str:
        if self.rng.random() < 0.5:
            leader = self.cluster.leader()
            if leader is not None:
                return leader
        return self.rng.choice(self.cluster.ids)

    async def run(self, until: float) -> None:
        faults = ["kill", "kill-majority", "pause", "split", "isolate", "oneway", "slow"]
        while time.monotonic() < until - 3:
            await asyncio.sleep(self.rng.uniform(0.5, 1.5))  # a calm stretch between faults
            fault = self.rng.choice(faults)
            self._count(fault)
            await asyncio.to_thread(self._inject, fault)
            await asyncio.sleep(self.rng.uniform(1.5, 3.0))  # > election timeout (0.5–1 s)
            await asyncio.to_thread(self.heal)

    def _inject(self, fault: str) -> None:
        c, p, ids = self.cluster, self.proxy, self.cluster.ids
        if fault == "kill":
            victims = [self._target()]
            if len(ids) == 5 and self.rng.random() < 0.5:
                victims.append(self.rng.choice([n for n in ids if n not in victims]))
            for nid in victims:
                c.kill(nid, signal.SIGKILL)
                self.dead.add(nid)
        elif fault == "kill-majority":
            # The leader and enough others to lose the quorum, at the same instant: only what
            # was durable survives, so anything acknowledged early would be lost here.
            victims = [self._target()]
            others = [n for n in ids if n not in victims]
            self.rng.shuffle(others)
            victims += others[: len(ids) // 2]
            for nid in victims:
                c.kill(nid, signal.SIGKILL)
                self.dead.add(nid)
        elif fault == "pause":
            nid = self._target()
            if nid in c.procs:
                c.procs[nid].send_signal(signal.SIGSTOP)
                self.paused.add(nid)
        elif fault == "split":
            shuffled = ids[:]
            self.rng.shuffle(shuffled)
            cut = self.rng.randint(1, len(ids) // 2)
            p.partition(shuffled[:cut], shuffled[cut:])
        elif fault == "isolate":
            lone = self._target()
            p.partition([lone], [n for n in ids if n != lone])
        elif fault == "oneway":
            a = self._target()
            for b in ids:
                if b != a:
                    p.set(a, b, blocked=True) if self.rng.random() < 0.5 else p.set(
                        b, a, blocked=True
                    )
        elif fault == "slow":
            for src, dst in p.links:
                p.set(src, dst, delay=self.rng.uniform(0.002, 0.03), loss=self.rng.uniform(0, 0.02))

    def heal(self) -> None:
        self.proxy.heal()
        for nid in list(self.paused):
            if nid in self.cluster.procs:
                self.cluster.procs[nid].send_signal(signal.SIGCONT)
        self.paused.clear()
        for nid in list(self.dead):
            self.cluster.start(nid, first_time=False)
        self.dead.clear()


# -- checks --------------------------------------------------------------------------------------


def _scan_all(cluster: ProcCluster, nid: str) -> dict[bytes, bytes]:
    with cluster.channel(nid) as ch:
        resp = pb_grpc.KVStub(ch).Scan(
            pb.ScanRequest(prefix=b"", limit=10_000, read_mode=pb.READ_STALE), timeout=5
        )
    return {kv.key: kv.value for kv in resp.items}


def _effect(op: Op) -> tuple[bool, bytes | None]:
    """(does it change the state, the state it leaves) for a write that took effect."""
    if op.kind == "put":
        return True, op.value
    if op.kind == "delete":
        return True, None
    if op.kind == "cas":
        return op.output is not False, op.value
    return False, None


def lost_writes(history: list[Op], final: dict[bytes, bytes | None]) -> int:
    """Acknowledged writes with nothing after or beside them whose effect is not the final state."""
    lost = 0
    for key in KEYS:
        writes = [o for o in history if o.key == key and o.kind != "get" and _effect(o)[0]]
        for w in writes:
            if w.complete is None:
                continue
            if any(x.invoke > w.complete for x in writes if x is not w):
                continue  # overwritten by a later write: nothing to see
            concurrent = {
                _effect(x)[1]
                for x in writes
                if x is not w and (x.complete is None or x.complete > w.invoke)
            }
            if final.get(key) != _effect(w)[1] and final.get(key) not in concurrent:
                lost += 1
    return lost


async def _final_reads(cluster: ProcCluster, history: list[Op]) -> dict[bytes, bytes | None]:
    final = {}
    async with Client(cluster.endpoints, timeout=30, tls=cluster.client_tls) as client:
        for key in KEYS:
            invoke = time.monotonic()
            value = await client.get(key)
            history.append(Op(-1, "get", key, None, None, invoke, time.monotonic(), value))
            final[key] = value
    return final


async def _run(
    cluster: ProcCluster,
    proxy: FaultProxy,
    report: Report,
    seed: int,
    duration: float,
    clients: int,
) -> list[Op]:
    rng = random.Random(seed)
    history: list[Op] = []
    stop = asyncio.Event()
    nemesis = Nemesis(cluster, proxy, random.Random(seed + 1), report)
    until = time.monotonic() + duration
    tls = cluster.client_tls
    if report.api == "etcd":

        def client(wid: int, endpoints: list[str], reader: bool = False):
            seeded = random.Random(rng.random())
            return _etcd_worker(
                wid, endpoints, seeded, stop, history, report.problems, reader=reader, tls=tls
            )
    else:

        def client(wid: int, endpoints: list[str], reader: bool = False):
            seeded = random.Random(rng.random())
            sync = wid % 2 == 1 and not reader  # (half the writers: SyncClient)
            return _worker(wid, endpoints, seeded, stop, history, reader=reader, tls=tls, sync=sync)

    workers = [asyncio.create_task(client(w, cluster.endpoints)) for w in range(clients)]
    # One reader per node, starting there: a follower must not answer it from its own state.
    workers += [
        asyncio.create_task(client(100 + i, [addr], reader=True))
        for i, addr in enumerate(cluster.endpoints)
    ]
    try:
        await nemesis.run(until)
        await asyncio.sleep(max(0.0, until - time.monotonic()))
    finally:
        stop.set()
        results = await asyncio.gather(*workers, return_exceptions=True)
        await asyncio.to_thread(nemesis.heal)
    for result in results:
        if isinstance(result, BaseException):
            report.problems.append(f"a client failed: {result!r}")
    return history


def run_schedule(
    nodes: int,
    seed: int,
    duration: float,
    tmp: Path,
    clients: int = 3,
    tls: bool = False,
    api: str = "raftfast",
) -> Report:
    """One schedule; ``api``: the clients use raftfast's own client or etcd's v3 API."""
    if api not in APIS:
        raise ValueError(f"api must be one of {APIS}, not {api!r}")
    report = Report(nodes, seed, tls, api)
    started = time.monotonic()
    certs = None
    if tls:
        certs = tmp / "tls"
        make_certs(certs, [f"n{i + 1}" for i in range(nodes)])
    cluster = ProcCluster(tmp, nodes, tls=certs)
    proxy = FaultProxy(cluster.peer_addrs, seed, cluster.stream_offsets())
    proxy.start()
    cluster.peer_view = lambda nid: proxy.view(nid, cluster.peer_addrs[nid])
    cluster.start_all()
    try:
        cluster.wait_leader(timeout=60)
        history = asyncio.run(_run(cluster, proxy, report, seed, duration, clients))
        # Quiet period: a leader, and every node applied everything it committed.
        leader = cluster.wait_leader(timeout=60)

        def caught_up() -> bool:
            target = cluster.status(leader).commit_index
            return all(cluster.status(n).applied_index >= target for n in cluster.ids)

        wait_for("every node to catch up after healing", caught_up, timeout=90)
        if api == "etcd":
            final = asyncio.run(_etcd_final_reads(cluster, history))
            states = [_etcd_state(cluster, n) for n in cluster.ids]
        else:
            final = asyncio.run(_final_reads(cluster, history))
            states = [_scan_all(cluster, n) for n in cluster.ids]
        report.converged = all(s == states[0] for s in states)
        report.ops = len(history)
        report.unknown = sum(o.complete is None for o in history)
        report.ok = report.ops - report.unknown
        report.lost_writes = lost_writes(history, final)
        report.streamed_links = proxy.streamed_links()
        result = check(history)
        report.linearizable = result.ok
        report.explanation = "" if result.ok else result.explanation
    except BaseException:
        print(cluster.log_tail(), file=sys.stderr)
        print(_statuses(cluster), file=sys.stderr)
        raise
    finally:
        cluster.stop_all()
        proxy.close()
        report.seconds = time.monotonic() - started
    return report


def _keep(keep: Path | None, tmp: Path, seed: int) -> None:
    if keep is not None:
        kept = keep / f"seed-{seed}"
        shutil.copytree(tmp, kept, dirs_exist_ok=True, ignore_dangling_symlinks=True)
        print(f"kept the failed schedule's files in {kept}", file=sys.stderr, flush=True)


def _statuses(cluster: ProcCluster) -> str:
    """One line per node: what it thinks of the cluster (for a failed schedule's report)."""
    lines = []
    for nid in cluster.ids:
        try:
            st = cluster.status(nid)
        except grpc.RpcError as exc:
            lines.append(f"{nid}: no status ({exc.code().name})")
            continue
        lines.append(
            f"{nid}: {st.role} term {st.term} leader {st.leader or '-'} first {st.first_index} "
            f"last {st.last_index} commit {st.commit_index} applied {st.applied_index} "
            f"snapshot {st.snapshot_index}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", type=int, default=20)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of faults each")
    parser.add_argument("--seed", type=int, default=int(os.environ.get("RAFTFAST_CHAOS_SEED", 1)))
    parser.add_argument("--tls", choices=("off", "on", "half"), default="half")
    parser.add_argument("--api", choices=(*APIS, "both"), default="both")
    parser.add_argument(
        "--keep", type=Path, help="copy a failed schedule's data directories and logs under here"
    )
    args = parser.parse_args(argv)
    reports = []
    for i in range(args.schedules):
        nodes = 3 if i % 2 == 0 else 5
        tls = args.tls == "on" or (args.tls == "half" and i % 4 >= 2)
        # both: etcd when bits 0-2 of i hold an odd number of ones (1, 2, 4, 7): one of each
        # pair, and each (nodes, tls, api) once in every 8 schedules.
        api = args.api
        if api == "both":
            api = "etcd" if bin(i % 8).count("1") % 2 else "raftfast"
        with tempfile.TemporaryDirectory(prefix="raftfast-chaos-") as tmp:
            try:
                report = run_schedule(
                    nodes, args.seed + i, args.duration, Path(tmp), tls=tls, api=api
                )
            except BaseException:
                _keep(args.keep, Path(tmp), args.seed + i)
                raise
            if not report.passed:
                _keep(args.keep, Path(tmp), args.seed + i)
        reports.append(report)
        print(report.line(), flush=True)
        if report.explanation:
            print("  " + report.explanation.replace("\n", "\n  "), flush=True)
        for problem in report.problems[:20]:
            print("  problem: " + problem, flush=True)
    failed = [r for r in reports if not r.passed]
    total_faults = sum(sum(r.faults.values()) for r in reports)
    print(
        f"\n{len(reports)} schedules, {sum(r.ops for r in reports)} operations, "
        f"{total_faults} faults, {sum(r.lost_writes for r in reports)} acknowledged writes lost, "
        f"{len(reports) - len(failed)} passed, {len(failed)} failed"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
