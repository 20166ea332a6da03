"""``raftfast-node --restore FILE``: a new cluster's first state, from a backup made with
``raftfast snapshot save``.

Every founding node of the new cluster restores the same file into an empty data directory:
the snapshot becomes the node's (with the new cluster's members in place of the old ones), and
the log starts right after it, at the snapshot's term. The nodes then elect a leader as any
cluster does and go on from the snapshot's index.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from raftfast.core.membership import Membership
from raftfast.core.types import HardState
from raftfast.errors import CorruptionError, RaftfastError, message_of
from raftfast.storage.backup import HEADER_SIZE, BackupInfo, read_header
from raftfast.storage.fsutil import open_regular
from raftfast.storage.snapshot import (
    SnapshotStore,
    read_state_header,
    state_machine_of,
    with_state_machine,
)
from raftfast.storage.wal import WAL

if TYPE_CHECKING:
    from raftfast.statemachine import StateMachine

__all__ = ["check_state", "data_dir_contents", "restore_backup"]

_NODE_FILES = ("node.json", "incarnations.json", "wal", "snap")


def data_dir_contents(data_dir: str) -> list[str]:
    """What of a node's state ``data_dir`` already holds (empty: a restore may go there)."""
    return [name for name in _NODE_FILES if os.path.exists(os.path.join(data_dir, name))]


def restore_backup(
    path: str,
    data_dir: str,
    peers: dict[str, str],
    fsync: bool = True,
    state_machine: str | None = None,
) -> BackupInfo:
    """Check the backup at ``path`` whole (format, size, checksum, and, given this node's
    ``state_machine`` (its --state-machine, "" for the key/value store), that it is a state of
    that one when it names one), then write its snapshot and an empty log after it into
    ``data_dir`` (which holds no node state yet). The configuration becomes ``peers`` (all
    voters). Raises CorruptionError, FormatVersionError, OSError."""
    try:
        f = open_regular(path)  # (closed below)
    except OSError as exc:
        raise RaftfastError(f"cannot read the backup {path}: {exc.strerror or exc}") from None
    with f:
        info = read_header(f, path)
        old = read_state_header(f, path)  # the old cluster's members: replaced by the new ones
        recorded = state_machine_of(old)
        if state_machine is not None and recorded is not None and recorded != state_machine:
            raise CorruptionError(
                f"{path} is a backup of a cluster that ran {_named(recorded)}; this node runs "
                f"{_named(state_machine)}: restore it with the same --state-machine",
                path,
            )
        store = SnapshotStore(os.path.join(data_dir, "snap"), fsync=fsync)
        config = Membership(dict(peers)).encode()
        if recorded is not None:
            config = with_state_machine(config, recorded)
        snapshot = store.create(info.index, info.term, config)
        end = HEADER_SIZE + info.size  # (a seal may follow: a backup etcdctl saved)
        try:
            while (left := end - f.tell()) > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                snapshot.out.write(chunk)
        except BaseException:
            snapshot.abort()
            raise
        snapshot.finish()
    with WAL.open(os.path.join(data_dir, "wal"), fsync=fsync) as wal:
        wal.append(HardState(info.term, "", info.index), None)
        wal.install_snapshot(info.index, info.term)
    return info


def _named(state_machine: str) -> str:
    return f"--state-machine {state_machine}" if state_machine else "the key/value store"


def check_state(data_dir: str, state_machine: StateMachine | None) -> None:
    """Read the state restored into ``data_dir`` with ``state_machine`` (None: a new KV
    store), as the node will at its start: CorruptionError if it cannot (a backup of another
    kind of cluster, or of another state machine). A user's state machine reads it behind its
    exactly-once table, as the node runs it (the bare one met the table first: no backup of
    such a cluster ever restored)."""
    from raftfast.exactly_once import ExactlyOnce
    from raftfast.kv.fsm import KVStateMachine  # (the KV store only when it is the one)

    machine = KVStateMachine() if state_machine is None else ExactlyOnce(state_machine)
    store = SnapshotStore(os.path.join(data_dir, "snap"))
    meta = store.latest()
    if meta is None:
        raise CorruptionError(f"no snapshot was restored into {data_dir}", data_dir)
    _, state = store.open_state(meta)
    with state:
        try:
            machine.restore(state)
        except Exception as exc:  # noqa: BLE001 - a user's state machine may raise anything
            raise CorruptionError(
                f"this node's state machine cannot read the backup's state (a backup of "
                f"another kind of cluster?): {type(exc).__name__}: {message_of(exc)}",
                meta.path,
            ) from None
