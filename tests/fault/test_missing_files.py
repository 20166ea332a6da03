"""A data directory that lost files the node needs is refused at start (one line, exit 1),
never run on what is left: the newest snapshot gone while the log was compacted behind it
(the node took an older one for a leader's interrupted install and dropped its log: 251 of
650 acknowledged writes gone), every snapshot gone (it served 251 of 600 keys), the log gone
(a new one: term 0, and a second vote in a term it had voted in). A file replaced by a FIFO
(opening it waited for a writer: a silent hang), a device or a nest of 200,000 brackets is
refused as damaged at once. The same directory intact starts and holds every write."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

import raftfast
from raftfast.client import Client
from raftfast.errors import CorruptionError
from raftfast.kv.fsm import KVStateMachine
from raftfast.tools.localcluster import free_ports
from tests.fault.test_bad_input import one_error_line, run_node

WRITES = 150


def _node(data: Path, port: int) -> raftfast.Node:
    addr = f"127.0.0.1:{port}"
    return raftfast.Node(
        id="n1", listen=addr, peers={"n1": addr}, data_dir=str(data),
        state_machine=KVStateMachine(), tick_ms=20, snapshot_entries=40, snapshot_keep=0,
    )  # fmt: skip


async def _write(data: Path, port: int) -> None:
    async with _node(data, port) as node:
        await node.wait_for_leader(timeout=30)
        async with Client(f"127.0.0.1:{port}", timeout=20) as client:
            for i in range(WRITES):
                await client.put(b"k%03d" % i, b"v%d" % i)
        # (the log behind the newest of two snapshots was dropped)
        while len(node._driver.snapshots.snapshots()) < 2 or node._driver.raw.first_index < 80:
            await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, int]:
    data = tmp_path_factory.mktemp("written") / "n1"
    port = free_ports(1)[0]
    asyncio.run(_write(data, port))
    return data, port


def _copy(written: tuple[Path, int], tmp_path: Path) -> Path:
    data = tmp_path / "n1"
    shutil.copytree(written[0], data)
    return data


def _newest_snapshot_gone(data: Path) -> None:
    sorted((data / "snap").glob("*.snap"))[-1].unlink()


def _every_snapshot_gone(data: Path) -> None:
    for snap in (data / "snap").glob("*.snap"):
        snap.unlink()


def _log_gone(data: Path) -> None:
    shutil.rmtree(data / "wal")


def _segments_gone(data: Path) -> None:
    for segment in (data / "wal").glob("*.wal"):
        segment.unlink()


@pytest.mark.parametrize(
    "damage, words",
    [
        (_newest_snapshot_gone, "the newest is at"),
        (_every_snapshot_gone, "has no such snapshot (none)"),
        (_log_gone, "holds no log, but this data directory ran a node before"),
        (_segments_gone, "holds no log, but this data directory ran a node before"),
    ],
)
def test_a_directory_that_lost_files_is_refused(written, tmp_path, damage, words):
    data = _copy(written, tmp_path)
    damage(data)
    before = {str(p.relative_to(data)): p.read_bytes() for p in data.rglob("*") if p.is_file()}

    async def start() -> None:
        with pytest.raises(CorruptionError, match="docs/operations.md") as info:
            await _node(data, written[1]).start()
        assert words in str(info.value)

    asyncio.run(start())
    after = {str(p.relative_to(data)): p.read_bytes() for p in data.rglob("*") if p.is_file()}
    assert after == before  # (nothing dropped, nothing made)
    port = written[1]
    args = ["--id", "n1", "--peers", f"n1=127.0.0.1:{port}", "--data-dir", str(data)]
    proc = run_node(args, tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert words in one_error_line(proc)


def test_the_same_directory_intact_starts_with_every_write(written, tmp_path):
    data = _copy(written, tmp_path)

    async def start() -> None:
        async with _node(data, written[1]) as node:
            await node.wait_for_leader(timeout=30)
            async with Client(f"127.0.0.1:{written[1]}", timeout=20) as client:
                got = await client.scan(b"k")
        assert got == [(b"k%03d" % i, b"v%d" % i) for i in range(WRITES)]

    asyncio.run(start())


def _replace(path: Path, kind: str) -> None:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        path.symlink_to("/dev/zero")
    else:
        path.write_text("[" * 200_000)


@pytest.mark.parametrize(
    "where, kind",
    [
        ("wal/0000000000000000.wal", "fifo"),
        ("snap", "fifo"),
        ("incarnations.json", "fifo"),
        ("incarnations.json", "zero"),
        ("incarnations.json", "nested"),
    ],
)
def test_a_file_that_is_not_what_was_written_is_refused_at_once(written, tmp_path, where, kind):
    data = _copy(written, tmp_path)
    if where == "snap":
        path = sorted((data / "snap").glob("*.snap"))[-1]
    else:
        path = data / where
    _replace(path, kind)
    port = written[1]
    args = ["--id", "n1", "--peers", f"n1=127.0.0.1:{port}", "--data-dir", str(data)]
    proc = run_node(args, tmp_path)  # (a hang fails it: its timeout)
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc)
    assert path.name in line, line


def test_a_backup_that_is_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "backup"
    os.mkfifo(fifo)
    port = free_ports(1)[0]
    data = tmp_path / "d"
    args = ["--id", "n1", "--peers", f"n1=127.0.0.1:{port}", "--data-dir", str(data)]
    proc = run_node([*args, "--restore", str(fifo)], tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "not a regular file" in one_error_line(proc)
    assert os.listdir(data) == []
