"""Backup files: the one ``raftfast snapshot save`` writes, and the one etcd's ``snapshot
save`` downloads (the same, then a seal: zeros to a multiple of 512 bytes and a SHA-256, which
etcdctl looks for); ``read_header`` takes both and nothing else."""

from __future__ import annotations

import hashlib
import io

import pytest

from raftfast.errors import CorruptionError
from raftfast.storage.backup import (
    HEADER_SIZE,
    BackupInfo,
    BackupWriter,
    header_bytes,
    read_header,
    seal,
)

DATA = bytes(range(256)) * 37


def _written(tmp_path) -> bytes:
    writer = BackupWriter(str(tmp_path / "b.backup"))
    writer.write(DATA)
    writer.finish(7, 3, len(DATA))
    return (tmp_path / "b.backup").read_bytes()


def _sealed(plain: bytes) -> bytes:
    return plain + seal(hashlib.sha256(plain), len(plain))


def test_a_written_backup_and_the_same_sealed_read_alike(tmp_path):
    plain = _written(tmp_path)
    sealed = _sealed(plain)
    assert len(sealed) % 512 == 32 and len(plain) % 512 != 32  # (what etcdctl checks)
    for data in (plain, sealed):
        f = io.BytesIO(data)
        info = read_header(f, "b")
        assert (info.index, info.term, info.size) == (7, 3, len(DATA))
        assert f.tell() == HEADER_SIZE
    crc = read_header(io.BytesIO(plain), "b").crc
    assert header_bytes(BackupInfo(7, 3, len(DATA), crc)) == plain[:HEADER_SIZE]


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s[:-1] + bytes([s[-1] ^ 1]),  # the digest
        lambda s: s[:-40] + b"\1" + s[-39:],  # the padding
        lambda s: s + b"\0",  # a byte more
        lambda s: s[:-32],  # no digest
        lambda s: s[: HEADER_SIZE + 5] + b"x" + s[HEADER_SIZE + 6 :],  # the snapshot
    ],
)
def test_a_damaged_seal_or_snapshot_is_refused(tmp_path, damage):
    with pytest.raises(CorruptionError):
        read_header(io.BytesIO(damage(_sealed(_written(tmp_path)))), "b")
