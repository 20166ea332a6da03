"""The WAL's syncs on the writer thread (raftfast.storage.writer): the same files as
``WAL.sync``, across segment rotations; a failed write fails the WAL; a cancelled waiter still
leaves the WAL consistent."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import Iterator

import pytest

from raftfast import _sync_py
from raftfast.core.types import HardState
from raftfast.errors import StorageError
from raftfast.storage import writer as writer_module
from raftfast.storage.wal import WAL
from raftfast.storage.writer import WALWriter

from .walutil import batch, contents, reopen


@contextlib.contextmanager
def writer_on(path, **kw) -> Iterator[tuple[WAL, WALWriter]]:
    """A WAL at ``path`` and a WALWriter on it, both closed at the end."""
    wal = WAL.open(str(path), **kw)
    w = WALWriter(wal)
    try:
        yield wal, w
    finally:
        w.close()
        wal.close()


def test_syncs_on_the_writer_recover_like_inline_ones(tmp_path):
    async def main() -> None:
        with writer_on(tmp_path / "w", segment_bytes=300) as (wal, w):  # rotates every few writes
            for i in range(1, 31):
                wal.append(HardState(1 + i // 10, "n1", i - 1), batch(i, 1 + i // 10, 1))
                if i % 3:
                    await w.sync()
                else:
                    wal.sync()  # inline and on the writer, mixed
            assert len(wal.segments) > 3
            assert w.start() is None  # nothing buffered: no job
        again = reopen(wal)
        try:
            state = again.recovered()
            assert state.hard_state == HardState(4, "n1", 29)
            assert contents(state.log) == [(i, 1 + i // 10, f"e{i}".encode()) for i in range(1, 31)]
        finally:
            again.close()

    asyncio.run(main())


def test_one_sync_at_a_time(tmp_path):
    async def main() -> None:
        with writer_on(tmp_path / "w") as (wal, w):
            wal.append(HardState(1, "a", 0), batch(1, 1, 1))
            first = w.start(0.05)
            wal.append(None, batch(2, 1, 1))
            with pytest.raises(RuntimeError, match="in progress"):
                w.start()
            await first
            await w.sync()

    asyncio.run(main())


def test_a_failed_write_fails_the_wal(tmp_path, monkeypatch):
    # The pure twin calls os.fdatasync, which this test fails (the C thread calls its own).
    monkeypatch.setattr(writer_module, "FileWriter", _sync_py.FileWriter)

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error (injected)")

    async def main() -> None:
        with writer_on(tmp_path / "w") as (wal, w):
            wal.append(HardState(1, "a", 0), batch(1, 1, 1))
            await w.sync()
            monkeypatch.setattr(os, "fdatasync", eio)
            wal.append(None, batch(2, 1, 1))
            with pytest.raises(StorageError, match="injected"):
                await w.sync()
            monkeypatch.undo()
            with pytest.raises(StorageError):  # the WAL does not pretend afterwards
                wal.append(None, batch(3, 1, 1))

    asyncio.run(main())


def test_a_full_disk_fails_the_wal(tmp_path):
    """The compiled writer's own failure (and the twin's): a write to /dev/full."""

    async def main() -> None:
        full = os.open("/dev/full", os.O_WRONLY)
        try:
            with writer_on(tmp_path / "w") as (wal, w):
                wal.append(HardState(1, "a", 0), batch(1, 1, 1))
                os.dup2(full, wal._fd)  # the segment's descriptor now writes to a full disk
                with pytest.raises(StorageError, match="No space left"):
                    await w.sync()
                with pytest.raises(StorageError):
                    wal.sync()
        finally:
            os.close(full)

    asyncio.run(main())


def test_a_cancelled_waiter_leaves_the_wal_consistent(tmp_path):
    async def main() -> None:
        with writer_on(tmp_path / "w") as (wal, w):
            wal.append(HardState(1, "a", 0), batch(1, 1, 2))
            task = asyncio.ensure_future(w.sync(0.1))
            await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(w.drain(), 10)  # the write finishes all the same
            wal.append(None, batch(3, 1, 1))
            wal.sync()  # the WAL's lock was released
        again = reopen(wal)
        try:
            assert again.recovered().log.last_index == 3
        finally:
            again.close()

    asyncio.run(main())
