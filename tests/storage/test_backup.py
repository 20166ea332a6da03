"""Backup files: the one ``raftfast snapshot save`` writes, and the one etcd's ``snapshot
save`` downloads (the same, then a seal: zeros to a multiple of 512 bytes and a SHA-256, which
etcdctl looks for); ``read_header`` takes both and nothing else."""

from __future__ import annotations

import hashlib
import io
import struct

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


@pytest.mark.parametrize("offset", [8, 12, 16, 20, 24])  # index, term and size: every byte
def test_a_flipped_bit_in_the_header_is_refused(tmp_path, offset):
    """Format 1's CRC covered the snapshot only: a flipped bit of its index or term restored a
    node at another point of the log (4,011 -> 69,547), which diverged from the others."""
    plain = bytearray(_written(tmp_path))
    plain[offset] ^= 0x10
    with pytest.raises(CorruptionError, match="checksum mismatch|bytes of snapshot"):
        read_header(io.BytesIO(bytes(plain)), "b")


def test_a_format_1_backup_is_still_read(tmp_path):
    plain = _written(tmp_path)
    crc = read_header(io.BytesIO(plain), "b").crc
    old = struct.pack("<4sHHQQQI", b"RFBK", 1, 0, 7, 3, len(DATA), crc) + plain[HEADER_SIZE:]
    info = read_header(io.BytesIO(old), "b")
    assert (info.index, info.term, info.size, info.crc) == (7, 3, len(DATA), crc)
    assert plain[4] == 2 and plain[:HEADER_SIZE] != old[:HEADER_SIZE]
