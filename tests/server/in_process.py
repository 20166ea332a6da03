"""Nodes of one cluster in the test's own process (``raftfast.Node``), on free ports of
127.0.0.1: a test can reach into each one's driver."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import raftfast
from raftfast.tools.localcluster import free_ports


def peers(count: int = 3) -> dict[str, str]:
    """Node ids n1..n<count> and their addresses."""
    return {f"n{i + 1}": f"127.0.0.1:{port}" for i, port in enumerate(free_ports(count))}


def node(
    nid: str,
    peers: dict[str, str],
    tmp_path: Path,
    state_machine: raftfast.StateMachine,
    **settings: Any,
) -> raftfast.Node:
    """Node ``nid`` of ``peers``, its data under ``tmp_path / nid``, a tick of 20 ms."""
    return raftfast.Node(
        id=nid,
        listen=peers[nid],
        peers=peers,
        data_dir=str(tmp_path / nid),
        state_machine=state_machine,
        tick_ms=20,
        **settings,
    )
