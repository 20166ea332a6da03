"""Durable state of a format this raftfast does not know (written by a newer version) stops
the node at start with one clear line and exit 1, before anything is changed."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from raftfast.core.types import HardState
from raftfast.errors import FormatVersionError
from raftfast.storage.snapshot import SNAPSHOT_FORMAT, state_header, unpack_state
from raftfast.storage.wal import _FORMAT, REC_FORMAT, REC_HARD_STATE, WAL_FORMAT, _record
from raftfast.storage.wal import _encode_hard_state as encode_hard_state
from raftfast.tools.localcluster import free_ports
from tests.fault.test_bad_input import one_error_line, run_node


def _node_args(data: Path) -> list[str]:
    port = free_ports(1)[0]
    return ["--id", "n1", "--peers", f"n1=127.0.0.1:{port}", "--data-dir", str(data)]


def _unchanged(data: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data)): p.read_bytes() for p in data.rglob("*") if p.is_file()}


def test_node_json_of_a_newer_format_exits_1(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    port = free_ports(1)[0]
    ident = {
        "format": 2,
        "id": "n1",
        "listen": f"127.0.0.1:{port}",
        "peers": {"n1": f"127.0.0.1:{port}"},
        "cluster_id": "raftfast",
        "a_field_from_the_future": True,
    }
    (data / "node.json").write_text(json.dumps(ident))
    before = _unchanged(data)
    proc = run_node(["--data-dir", str(data)], tmp_path)
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc)
    assert "node.json has format 2" in line and "upgrade raftfast" in line, line
    assert _unchanged(data) == before


def test_a_wal_of_a_newer_format_exits_1(tmp_path):
    data = tmp_path / "d"
    (data / "wal").mkdir(parents=True)
    seg = data / "wal" / "0000000000000000.wal"
    records = _record(REC_FORMAT, _FORMAT.pack(b"RFW", WAL_FORMAT + 1))
    records += _record(REC_HARD_STATE, encode_hard_state(HardState(1, "", 0)))
    seg.write_bytes(b"".join(records))
    proc = run_node(_node_args(data), tmp_path)
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc)
    assert f"WAL format {WAL_FORMAT + 1}" in line and str(seg) in line, line
    assert seg.read_bytes() == b"".join(records)  # not truncated, not rewritten


def test_a_snapshot_of_a_newer_format_exits_1(tmp_path):
    data = tmp_path / "d"
    (data / "snap").mkdir(parents=True)
    snap = data / "snap" / f"snap-{5:016x}-{1:016x}.snap"
    content = b"RFS" + str(SNAPSHOT_FORMAT + 1).encode() + struct.pack("<II", 0, 0) + b"later"
    snap.write_bytes(content)
    proc = run_node(_node_args(data), tmp_path)
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc)
    assert f"snapshot format {SNAPSHOT_FORMAT + 1}" in line and str(snap) in line, line
    assert snap.read_bytes() == content


def test_snapshot_header_versions() -> None:
    membership = b'{"format": 1}'
    assert unpack_state(state_header(membership) + b"state") == (membership, b"state")
    newer = b"RFS9" + state_header(membership)[4:]
    with pytest.raises(FormatVersionError, match="snapshot format 9"):
        unpack_state(newer, "x.snap")
