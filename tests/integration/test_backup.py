"""Backup and restore: ``raftfast snapshot save`` from a running cluster, ``raftfast-node
--restore`` into a new one; every key comes back with its value, nothing written after the save
does, and a damaged or misplaced restore changes nothing."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from raftfast.client import SyncClient
from raftfast.core.membership import Membership
from raftfast.storage.backup import HEADER_SIZE, BackupWriter
from raftfast.storage.snapshot import (
    pack_state,
    read_state_header,
    state_machine_of,
    with_state_machine,
)
from raftfast.tools.localcluster import ProcCluster, free_ports, wait_for
from tests.fault.test_bad_input import clean_env, one_error_line, run_node

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raftfast.client.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )


@pytest.fixture(scope="module")
def backup(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A backup of a 3-node cluster holding 2,000 keys, saved through a follower (it redirects
    to the leader); a key written after the save."""
    tmp = tmp_path_factory.mktemp("old")
    path = tmp / "cluster.backup"
    (tmp / "cluster").mkdir()
    with ProcCluster(tmp / "cluster") as old:
        leader = old.wait_leader()
        follower = next(n for n in old.ids if n != leader)
        data = {f"key{i:05d}": f"value {i} " + "x" * (i % 50) for i in range(2_000)}
        with SyncClient(old.endpoints, timeout=30) as c:
            items = list(data.items())
            c.put_many(items[:1_500])
            for key, value in items[1_500:]:
                c.put(key, value)
            c.delete("key00007")
            del data["key00007"]
            done = cli("--endpoints", old.addrs[follower], "snapshot", "save", str(path))
            assert done.returncode == 0, done.stderr
            assert done.stdout.startswith(f"saved {path}: index "), done.stdout
            c.put("after-the-backup", "1")
            # a symlink: the file it names gets the backup; anything else but a file is left
            # alone (a FIFO, a device, /dev/stdout were replaced by a plain file)
            (tmp / "link.backup").symlink_to(tmp / "real.backup")
            at = ("--endpoints", old.addrs[leader], "snapshot", "save")
            done = cli(*at, str(tmp / "link.backup"))
            assert done.returncode == 0, done.stderr
            assert (tmp / "link.backup").is_symlink() and (tmp / "real.backup").stat().st_size
            os.mkfifo(tmp / "fifo")
            done = cli(*at, str(tmp / "fifo"))
            assert done.returncode == 5 and "not a regular file" in done.stderr, done.stderr
            assert stat.S_ISFIFO(os.stat(tmp / "fifo").st_mode)
    assert not list(tmp.glob("*.tmp"))
    return path, data


def test_restore_into_a_new_cluster_brings_back_every_key(backup, tmp_path):
    path, data = backup
    with ProcCluster(tmp_path, restore=path) as new:
        new.wait_leader()
        with SyncClient(new.endpoints, timeout=30) as c:
            assert dict((k.decode(), v.decode()) for k, v in c.scan("key", 0)) == data
            assert c.get("after-the-backup") is None
            c.put("new", "write")
        # a node restarts from its own data (no --restore again) and has it all
        nid = new.ids[0]
        new.kill(nid)
        new.start(nid, first_time=False)
        new.wait_applied(nid, new.status(new.wait_leader()).commit_index, "the restart")
        with SyncClient([new.addrs[nid]], timeout=30) as c:
            assert c.get("new", read_mode="stale") == b"write"
            assert c.get("key01999", read_mode="stale") == data["key01999"].encode()
        members = {m.id: m.address for m in new.status(nid).members}
        assert members == new.addrs  # the new cluster's members, not the old ones


def _restore_args(data_dir: Path, backup_file: Path) -> list[str]:
    port = free_ports(1)[0]
    return [
        "--id", "n1", "--peers", f"n1=127.0.0.1:{port}", "--data-dir", str(data_dir),
        "--restore", str(backup_file),
    ]  # fmt: skip


def test_a_damaged_backup_is_refused_and_changes_nothing(backup, tmp_path):
    path, _ = backup
    damaged = tmp_path / "damaged.backup"
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0x40
    damaged.write_bytes(bytes(content))
    data = tmp_path / "d"
    proc = run_node(_restore_args(data, damaged), tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "checksum mismatch" in one_error_line(proc)
    assert os.listdir(data) == []
    cut = tmp_path / "cut.backup"
    cut.write_bytes(path.read_bytes()[:1000])
    proc = run_node(_restore_args(data, cut), tmp_path)
    assert proc.returncode == 1 and "bytes of snapshot" in one_error_line(proc)
    proc = run_node(_restore_args(data, tmp_path / "missing"), tmp_path)
    assert proc.returncode == 1 and "cannot read the backup" in one_error_line(proc)
    assert os.listdir(data) == []


def _restore_made(tmp_path: Path, membership: bytes, state: bytes, data: Path):
    """``raftfast-node --restore`` into ``data`` of a backup made of these (index 7, term 2)."""
    content = pack_state(membership, state)
    made = tmp_path / "made.backup"
    writer = BackupWriter(str(made))
    writer.write(content)
    writer.finish(7, 2, len(content))
    return run_node(_restore_args(data, made), tmp_path)


@pytest.mark.parametrize(
    "state", [b"RFX1" + bytes(64), b"", b"\x00" * 1000], ids=["another machine", "empty", "zeros"]
)
def test_a_backup_of_another_kind_of_cluster_is_refused_and_changes_nothing(tmp_path, state):
    """A well-formed backup (right checksums) whose state this node's state machine cannot read
    (one of a --state-machine cluster restored into a KV node): one line, exit 1, nothing kept;
    it had reported success and left a directory that could not start nor be restored into."""
    membership = Membership({"x": "127.0.0.1:1"}).encode()
    data = tmp_path / "d"
    proc = _restore_made(tmp_path, membership, state, data)
    assert proc.returncode == 1, proc.stderr
    assert "state machine cannot read the backup's state" in one_error_line(proc)
    assert "restored" not in proc.stderr
    assert os.listdir(data) == []


def test_a_backup_of_another_state_machine_is_refused_by_name(backup, tmp_path):
    """Snapshots name the node's --state-machine: a backup of one restored into a node of
    another was taken whenever that one's restore took the bytes (a job queue's into a
    ledger: no error). The KV store's own backups name it too ("")."""
    path, _ = backup
    with open(path, "rb") as f:
        f.seek(HEADER_SIZE)
        assert state_machine_of(read_state_header(f)) == ""
    membership = with_state_machine(Membership({"x": "127.0.0.1:1"}).encode(), "jobq:JobQueue")
    data = tmp_path / "d"
    proc = _restore_made(tmp_path, membership, b"RFX1" + bytes(64), data)
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc)
    assert "a cluster that ran --state-machine jobq:JobQueue" in line, line
    assert "this node runs the key/value store" in line
    assert os.listdir(data) == []


@pytest.mark.parametrize("index, term", [(0, 1), (2**62, 1), (2**64 - 1, 1), (5, 0), (5, 2**63)])
def test_a_backup_naming_an_impossible_index_or_term_is_refused(backup, tmp_path, index, term):
    """A well-formed backup (right checksum) whose header names an index or term no log can
    hold: one line, exit 1, nothing written (not a node that cannot start later)."""
    path, _ = backup
    content = path.read_bytes()
    header = bytearray(content[:36])
    struct.pack_into("<QQ", header, 8, index, term)
    forged = tmp_path / "forged.backup"
    forged.write_bytes(bytes(header) + content[36:])
    data = tmp_path / "d"
    proc = run_node(_restore_args(data, forged), tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "out of range" in one_error_line(proc)
    assert os.listdir(data) == []


def test_restore_never_overwrites_a_node(backup, tmp_path):
    path, _ = backup
    data = tmp_path / "d"
    (data / "wal").mkdir(parents=True)
    proc = run_node(_restore_args(data, path), tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "needs an empty --data-dir" in one_error_line(proc)
    assert os.listdir(data) == ["wal"]


def test_quorum_lost_for_good_one_survivor_starts_a_new_cluster(tmp_path):
    """Two of three machines are gone with their disks: the survivor restarts with
    --force-new-cluster as the only voter, keeps every acknowledged write, and the replaced
    machines join it again with empty data directories (docs/operations.md)."""
    with ProcCluster(tmp_path) as cluster:
        survivor = cluster.wait_leader()
        with SyncClient(cluster.endpoints, timeout=30) as c:
            for i in range(200):
                c.put(f"q{i}", f"{i}")
        lost = [n for n in cluster.ids if n != survivor]
        for nid in lost:
            cluster.kill(nid)
            shutil.rmtree(tmp_path / nid)
        cluster.kill(survivor, signal.SIGTERM)
        cluster.extra = ["--force-new-cluster"]
        cluster.start(survivor, first_time=False)
        cluster.extra = []
        assert cluster.wait_leader(among=[survivor]) == survivor
        with SyncClient([cluster.addrs[survivor]], timeout=30) as c:
            assert [c.get(f"q{i}") for i in (0, 199)] == [b"0", b"199"]
            c.put("while-alone", "1")
        for nid in lost:
            cluster.joins[nid] = cluster.peer_addrs[survivor]
            cluster.start(nid)

        def voters() -> set[str]:
            members = cluster.status(survivor).members
            return {m.id for m in members if m.role == "voter"}

        wait_for("the replaced nodes to join as voters", lambda: voters() == set(cluster.ids))
        with SyncClient(cluster.endpoints, timeout=30) as c:
            c.put("together-again", "1")
        commit = cluster.status(cluster.wait_leader()).commit_index
        for nid in lost:
            cluster.wait_applied(nid, commit, f"{nid} to catch up")
            with SyncClient([cluster.addrs[nid]], timeout=30) as c:
                assert c.get("q150", read_mode="stale") == b"150"
                assert c.get("while-alone", read_mode="stale") == b"1"
