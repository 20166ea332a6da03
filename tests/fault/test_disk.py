"""Disk faults at the level of a real node: torn tails, flipped bits, missing segments, and
writes or fdatasyncs that fail.

The byte-by-byte torn-tail test at the WAL level is ``test_torn_tail_at_every_offset_is_truncated``
in tests/storage/test_wal.py (with the other WAL-level corruption tests); here the same faults hit
real ``raftfast-node`` processes (or, for failing syscalls, an in-process ``Node``), and what is
checked is what a user sees: the node rejoins and no acknowledged write is lost, or it refuses to
start with one clear line naming the file and offset and never serves.

Nothing sleeps to let things settle: every wait polls with a deadline. Every process started
here is stopped by PID in a finally block.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from raftfast import _sync_py
from raftfast.client import SyncClient
from raftfast.core.types import Role
from raftfast.errors import NotLeaderError, StorageError
from raftfast.kv.commands import encode_put
from raftfast.proto import raftfast_pb2 as pb
from raftfast.proto import raftfast_pb2_grpc as pb_grpc
from raftfast.server.driver import Driver as Node
from raftfast.server.settings import NodeSettings
from raftfast.storage import writer as writer_module
from raftfast.storage.wal import WAL
from raftfast.tools.localcluster import ProcCluster, free_ports, wait_for
from tests.polling import until

ROOT = Path(__file__).resolve().parents[2]
HEADER = struct.Struct("<IIB")  # payload length | crc32c | type (docs/disk-format.md)
REC_HARD_STATE, REC_BATCH, REC_FORMAT = 1, 2, 5
SEGMENT_BYTES = 4096  # small segments: a few hundred writes make several of them


# -- helpers ----------------------------------------------------------------------------------


def records(path: Path) -> list[tuple[int, int, int]]:
    """(offset, type, total length) of each whole record in a segment file."""
    data = path.read_bytes()
    out, off = [], 0
    while off + HEADER.size <= len(data):
        length, _, rtype = HEADER.unpack_from(data, off)
        if off + HEADER.size + length > len(data):
            break
        out.append((off, rtype, HEADER.size + length))
        off += HEADER.size + length
    return out


def segments(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "wal").glob("*.wal"))


def flip_bit(path: Path, offset: int, bit: int = 2) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAFTFAST_")}
    if os.environ.get("RAFTFAST_PUREPYTHON"):
        env["RAFTFAST_PUREPYTHON"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    return env


def node_cmd(data_dir: Path, addr: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "raftfast.server.node_cli",
        "--id",
        "n1",
        "--listen",
        addr,
        "--peers",
        f"n1={addr}",
        "--data-dir",
        str(data_dir),
        "--tick-ms",
        "20",
        *extra,
    ]


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    """Stop a process we started, by PID; its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
    return proc.returncode


def status(addr: str, timeout: float = 1.0) -> pb.StatusResponse:
    with grpc.insecure_channel(addr) as ch:
        return pb_grpc.KVStub(ch).Status(pb.StatusRequest(), timeout=timeout)


def run_refused_start(data_dir: Path, tmp: Path) -> tuple[int, str, str]:
    """Start a node on damaged data; it must exit non-zero without ever answering a KV call.

    Returns (exit code, stderr, address it was told to listen on).
    """
    addr = f"127.0.0.1:{free_ports(1)[0]}"
    err_path = tmp / f"stderr-{addr.rsplit(':', 1)[1]}.txt"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            node_cmd(data_dir, addr), stdout=subprocess.DEVNULL, stderr=err, env=clean_env()
        )
    try:
        deadline = time.monotonic() + 20  # "promptly", with room for a loaded CI machine
        while proc.poll() is None:
            assert time.monotonic() < deadline, "the node did not exit on damaged data"
            with pytest.raises(grpc.RpcError):  # it must never serve
                status(addr, timeout=0.2)
    finally:
        stop(proc, signal.SIGKILL)
    with pytest.raises(grpc.RpcError):
        status(addr, timeout=0.2)
    return proc.returncode, err_path.read_text(errors="replace"), addr


def assert_one_line_refusal(code: int, err: str, path: Path, offset: int | None) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("raftfast-node: error: node n1 failed: "), line
    assert str(path) in line, line
    if offset is not None:
        assert f"byte offset {offset}" in line, line
    return line


# -- torn tail on a live cluster --------------------------------------------------------------


@pytest.fixture
def cluster(tmp_path):
    with ProcCluster(tmp_path) as c:
        yield c


def cut_last_record(data_dir: Path, how: str) -> None:
    """Damage the last record of the last segment the way an interrupted write would."""
    seg = segments(data_dir)[-1]
    recs = records(seg)
    assert recs, f"{seg} holds no whole record"
    off, _, total = recs[-1]
    assert off + total == seg.stat().st_size  # the node left no partial record behind
    if how == "in the header":
        os.truncate(seg, off + 3)
    elif how == "in the payload":
        os.truncate(seg, off + HEADER.size + (total - HEADER.size) // 2)
    elif how == "last byte missing":
        os.truncate(seg, off + total - 1)
    elif how == "bad crc":  # complete length, but the bytes never all reached the disk
        flip_bit(seg, off + total - 1)
    else:
        raise AssertionError(how)


def test_torn_tail_of_a_killed_node_is_cut_and_it_rejoins(cluster):
    """SIGKILL a node, tear its last WAL record, restart it: it recovers, catches up, and every
    acknowledged write is readable, through the cluster and on that node."""
    acked: dict[str, str] = {}
    cuts = ["in the header", "in the payload", "last byte missing", "bad crc"]
    with SyncClient(cluster.endpoints, timeout=30) as c:
        for round_no, how in enumerate(cuts):
            leader = cluster.wait_leader()
            followers = [n for n in cluster.ids if n != leader]
            victim = leader if round_no == 1 else followers[round_no % 2]
            for i in range(25):
                key = f"r{round_no}-{i}"
                c.put(key, f"v{i}")
                acked[key] = f"v{i}"
            cluster.kill(victim)
            cut_last_record(cluster.tmp / victim, how)
            cluster.start(victim, first_time=False)
            wait_for(
                f"{victim} to answer after a torn tail ({how})", lambda v=victim: cluster.status(v)
            )
            c.put(f"after-{round_no}", "x")  # the cluster still commits
            acked[f"after-{round_no}"] = "x"
            new_leader = cluster.wait_leader()
            target = cluster.status(new_leader).commit_index
            cluster.wait_applied(
                victim, target, f"{victim} to catch up after a torn tail ({how})", timeout=30
            )
            assert cluster.procs[victim].poll() is None
        for key, value in acked.items():
            assert c.get(key) == value.encode(), key
    for nid in cluster.ids:  # every replica's own state machine has every acknowledged write
        with SyncClient([cluster.addrs[nid]], timeout=30) as c:
            for key, value in acked.items():
                assert c.get(key, read_mode="stale") == value.encode(), (nid, key)


# -- corruption that must refuse to start -----------------------------------------------------


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """A single node's data directory with several small WAL segments, cleanly shut down."""
    tmp = tmp_path_factory.mktemp("golden")
    data_dir = tmp / "n1"
    addr = f"127.0.0.1:{free_ports(1)[0]}"
    written = {f"g{i:03d}": (f"value-{i}-" + "x" * 60).encode() for i in range(240)}
    with open(tmp / "golden.log", "wb") as log:
        proc = subprocess.Popen(
            node_cmd(data_dir, addr, "--wal-segment-bytes", str(SEGMENT_BYTES)),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )
    try:
        items = list(written.items())
        with SyncClient([addr], timeout=30) as c:
            for i in range(0, len(items), 20):  # several group commits: several segments
                c.put_many(items[i : i + 20])
    finally:
        assert stop(proc) == 0, (tmp / "golden.log").read_text()
    assert len(segments(data_dir)) >= 3, segments(data_dir)
    return data_dir, written


def copy_of(golden_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "n1"
    shutil.copytree(golden_dir, dst)
    return dst


def test_intact_multi_segment_log_restarts_with_every_write(golden, tmp_path):
    """The control for the refusals below: the undamaged copy starts and serves everything."""
    data_dir = copy_of(golden[0], tmp_path)
    addr = f"127.0.0.1:{free_ports(1)[0]}"
    proc = subprocess.Popen(
        node_cmd(data_dir, addr), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=clean_env()
    )
    try:
        with SyncClient([addr], timeout=30) as c:
            for key, value in golden[1].items():
                assert c.get(key) == value
    finally:
        code = stop(proc)
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    assert code == 0, err


@pytest.mark.parametrize("where", ["oldest batch", "last segment's first record"])
def test_flipped_bit_in_an_old_record_refuses_to_start(golden, tmp_path, where):
    data_dir = copy_of(golden[0], tmp_path)
    segs = segments(data_dir)
    if where == "oldest batch":
        seg = segs[0]
        off, _, total = next(r for r in records(seg) if r[1] == REC_BATCH)
    else:
        seg = segs[-1]
        # a segment opens with its format record, then a hard-state record
        assert [r[1] for r in records(seg)[:2]] == [REC_FORMAT, REC_HARD_STATE]
        off, _, total = records(seg)[0]
    assert off + total < seg.stat().st_size  # intact records follow: not a torn tail
    flip_bit(seg, off + total - 2)
    damaged = seg.read_bytes()
    code, err, _ = run_refused_start(data_dir, tmp_path)
    line = assert_one_line_refusal(code, err, seg, off)
    assert "CRC" in line
    assert seg.read_bytes() == damaged  # refused, not "repaired" by truncation


def test_missing_middle_segment_refuses_to_start(golden, tmp_path):
    data_dir = copy_of(golden[0], tmp_path)
    segs = segments(data_dir)
    segs[1].unlink()
    code, err, _ = run_refused_start(data_dir, tmp_path)
    line = assert_one_line_refusal(code, err, segs[1], 0)
    assert "segment missing" in line


def test_missing_first_segment_refuses_to_start(golden, tmp_path):
    """No compaction record explains the absence of segment 0: entries 1.. are gone."""
    data_dir = copy_of(golden[0], tmp_path)
    segs = segments(data_dir)
    segs[0].unlink()
    code, err, _ = run_refused_start(data_dir, tmp_path)
    line = assert_one_line_refusal(code, err, segs[1], 0)
    assert "missing" in line


def test_truncated_older_segment_refuses_to_start(golden, tmp_path):
    """A torn record is only acceptable at the very end of the log, not in an older segment."""
    data_dir = copy_of(golden[0], tmp_path)
    seg = segments(data_dir)[0]
    off, _, total = records(seg)[-1]
    os.truncate(seg, off + total - 1)
    code, err, _ = run_refused_start(data_dir, tmp_path)
    line = assert_one_line_refusal(code, err, seg, off)
    assert "not the last segment" in line


def test_data_directory_of_a_running_node_is_refused(golden, tmp_path):
    """A second process on the same data directory (another port) must not start, and must
    change nothing there: it once rewrote node.json (its own address) before the WAL's lock
    refused it, so the running node's next restart listened on the wrong address."""
    data_dir = copy_of(golden[0], tmp_path)
    addr = f"127.0.0.1:{free_ports(1)[0]}"
    first = subprocess.Popen(
        node_cmd(data_dir, addr),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=clean_env(),
    )
    try:
        wait_for("the first node to serve", lambda: status(addr))
        identity = (data_dir / "node.json").read_bytes()
        code, err, other = run_refused_start(data_dir, tmp_path)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 1 and len(lines) == 1 and "in use by another process" in lines[0], err
        assert (data_dir / "node.json").read_bytes() == identity
        assert status(addr).id == "n1"  # the first node is unaffected
    finally:
        assert stop(first) == 0


# -- failing writes and fdatasyncs: the node stops, nothing is acknowledged ---------------------


def propose_now(node: Node, payloads: list[bytes]) -> str:
    """Run ``node.propose`` up to its first suspension: "refused", "queued" or "done"."""
    coro = node.propose(payloads)
    try:
        coro.send(None)
    except NotLeaderError:
        return "refused"
    except StopIteration:
        return "done"
    coro.close()
    return "queued"


async def _storage_failure_scenario(tmp: Path, inject) -> tuple[Node, list]:
    """Run a single-node cluster, make one write, then ``inject(node)`` a fault and write more.

    Returns the node and the outcome of each write made after the fault (an exception or a
    result).
    """
    addr = f"127.0.0.1:{free_ports(1)[0]}"
    settings = NodeSettings(id="n1", listen=addr, peers={"n1": addr}, data_dir=str(tmp), tick_ms=10)
    node = Node(settings)
    await node.start()
    try:
        await until("n1 to lead", lambda: node.raw.raft.role == Role.LEADER, timeout=10.0)
        assert await node.propose([encode_put(7, 1, b"before", b"1")]) == [True]
        inject(node)
        # Writes through the node API and through gRPC, all in flight when the disk fails.
        direct = [
            asyncio.ensure_future(node.propose([encode_put(7, 1 + i, b"k%d" % i, b"v")]))
            for i in range(1, 6)
        ]
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = pb_grpc.KVStub(ch)
            via_grpc = [
                asyncio.ensure_future(
                    stub.Put(pb.PutRequest(key=b"g%d" % i, value=b"v"), timeout=10)
                )
                for i in range(5)
            ]
            # One loop iteration at a time, so we look right after the failure, before the
            # node's stop() has begun: new work must be refused at once, not queued for a loop
            # that is gone (it would hang until the shutdown cancelled it).
            deadline = time.monotonic() + 15
            while node.failed is None:
                assert time.monotonic() < deadline, "the node did not fail"
                await asyncio.sleep(0)
            assert propose_now(node, [encode_put(7, 50, b"in-between", b"v")]) == "refused"
            outcomes = await asyncio.wait_for(
                asyncio.gather(*direct, *via_grpc, return_exceptions=True), 15
            )
        await asyncio.wait_for(node.stopped.wait(), 15)
        with pytest.raises(NotLeaderError):  # a stopped node takes no more work
            await node.propose([encode_put(7, 99, b"late", b"v")])
        return node, outcomes
    finally:
        if not node.stopped.is_set():
            await node.stop()


def _check_nothing_acknowledged(node: Node, outcomes: list) -> None:
    assert isinstance(node.failed, StorageError), node.failed
    assert node.stopped.is_set()
    assert outcomes
    for out in outcomes:
        assert isinstance(out, NotLeaderError | grpc.aio.AioRpcError), out
        if isinstance(out, grpc.aio.AioRpcError):
            # UNAVAILABLE from the node; CANCELLED when gRPC's server shutdown cut the call off;
            # DEADLINE_EXCEEDED when a loaded machine had not even delivered it by then (it
            # happened with two `make test` runs at once). None is an acknowledgement.
            assert out.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.CANCELLED,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ), out


def _pure_writer(monkeypatch) -> None:
    """The WAL writer's system calls, like the loop's, go through ``os`` (so this module can
    fail them): the pure twin. The compiled one's failures: tests/storage/test_writer.py."""
    monkeypatch.setattr(writer_module, "FileWriter", _sync_py.FileWriter)


def test_failing_fdatasync_stops_the_node_and_acknowledges_nothing(tmp_path, monkeypatch):
    calls: list[int] = []
    _pure_writer(monkeypatch)

    def inject(node: Node) -> None:
        def eio(fd: int) -> None:
            calls.append(fd)
            raise OSError(errno.EIO, "Input/output error (injected)")

        monkeypatch.setattr(os, "fdatasync", eio)

    node, outcomes = asyncio.run(_storage_failure_scenario(tmp_path, inject))
    _check_nothing_acknowledged(node, outcomes)
    assert "Input/output error (injected)" in str(node.failed)
    assert len(calls) == 1, "the node retried a failed fdatasync (it must stop instead)"
    monkeypatch.undo()
    with WAL.open(tmp_path / "wal") as wal:  # the data up to the fault is intact
        assert wal.recovered().log.last_index >= 2  # the leader's no-op and "before"


def test_disk_full_stops_the_node_and_acknowledges_nothing(tmp_path, monkeypatch):
    real_writev = os.writev
    _pure_writer(monkeypatch)
    failed: list[int] = []

    def inject(node: Node) -> None:
        wal_fd = node.wal._fd

        def enospc(fd: int, buffers) -> int:
            if fd == wal_fd:
                failed.append(fd)
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            return real_writev(fd, buffers)

        monkeypatch.setattr(os, "writev", enospc)

    node, outcomes = asyncio.run(_storage_failure_scenario(tmp_path, inject))
    _check_nothing_acknowledged(node, outcomes)
    assert "No space left on device" in str(node.failed)
    assert len(failed) == 1, "the node retried a failed write (it must stop instead)"
    monkeypatch.undo()
    with WAL.open(tmp_path / "wal") as wal:
        log = wal.recovered().log
        assert log.last_index == 2  # the no-op and "before"; nothing that failed to reach disk


_INJECT_FDATASYNC = """
import errno, os, sys
trigger = sys.argv[1]
real = os.fdatasync
def fdatasync(fd):
    if os.path.exists(trigger):
        raise OSError(errno.EIO, "Input/output error (injected)")
    return real(fd)
os.fdatasync = fdatasync
from raftfast import _sync_py
from raftfast.storage import writer
writer.FileWriter = _sync_py.FileWriter  # (its fdatasync is os.fdatasync)
from raftfast.server import node_cli
sys.exit(node_cli.main(sys.argv[2:]))
"""


def test_raftfast_node_exits_1_with_one_line_when_fdatasync_fails(tmp_path):
    data_dir = tmp_path / "n1"
    trigger = tmp_path / "fail-now"
    addr = f"127.0.0.1:{free_ports(1)[0]}"
    args = node_cmd(data_dir, addr)[3:]  # drop "python -m raftfast.server.node_cli"
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _INJECT_FDATASYNC, str(trigger), *args],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=clean_env(),
        )
    try:
        with grpc.insecure_channel(addr) as ch:
            stub = pb_grpc.KVStub(ch)
            wait_for(
                "n1 to accept writes",
                lambda: stub.Put(pb.PutRequest(key=b"before", value=b"1"), timeout=2) or True,
            )
            trigger.touch()
            with pytest.raises(grpc.RpcError) as info:
                stub.Put(pb.PutRequest(key=b"during", value=b"1"), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        proc.wait(timeout=20)
    finally:
        stop(proc, signal.SIGKILL)
    err = err_path.read_text(errors="replace")
    assert proc.returncode == 1, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("raftfast-node: error: node n1 failed: WAL "), err
    assert "Input/output error (injected)" in last
    errors = [line for line in err.splitlines() if line.startswith("raftfast-node: error")]
    assert len(errors) == 1, err

    # Restarted on a healthy disk, the node has the acknowledged write.
    addr = f"127.0.0.1:{free_ports(1)[0]}"
    proc = subprocess.Popen(
        node_cmd(data_dir, addr),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=clean_env(),
    )
    try:
        with SyncClient([addr], timeout=30) as c:
            assert c.get("before") == b"1"
    finally:
        assert stop(proc) == 0
